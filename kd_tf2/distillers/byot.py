"""BYOT - be your own teacher: the deepest classifier teaches heads attached to shallow stages.

Zhang, Song, Gao, Chen, Bao, Ma, "Be Your Own Teacher: Improve the Performance of Convolutional
Neural Networks via Self Distillation", ICCV 2019, arXiv:1905.08094. After every stage but the last
an auxiliary head: a bottleneck (conv3x3/2 + BN + ReLU, repeated until the map has the last stage's
resolution; the last conv gives the embedding's width) + global average pooling + an FC
classifier. The net's own classifier is the deepest, teacher head. Loss (eq. 1-3)
over the shallow heads i:

    L = CE(q_C, y) + sum_i [ (1 - alpha) CE(q_i, y) + alpha T^2 KL(q_C^T || q_i^T)
                             + lambda ||F_i - F_C||^2 ]

q_C / F_C (the deepest logits and embedding) detached in the distillation terms. Defaults
alpha = 0.3 (``kd_weight``-like share, here ``alpha``), lambda = 0.03 (``method_weight``), T = 3:
our reading of the authors' CIFAR setting (the paper gives the form, not one value set).
Works on any zoo net (``Outputs.features`` and ``embedding``, contract 1): no branching needed.
The student (the full net) is exported; each head's test accuracy is logged (``head<i>``).
Per replica: per-sample terms only (the heads' BatchNorm is synchronized like the student's).
"""
import keras
import tensorflow as tf

from kd_tf2 import losses as kd_losses
from kd_tf2.distillers import register
from kd_tf2.distillers._online import _View
from kd_tf2.distillers.base import Distiller, as_float32


class _Head(keras.layers.Layer):
  """Bottleneck + pool + FC: [B, h, w, c] -> (logits [B, K], feature [B, d])."""

  def __init__(self, steps, width, num_classes, sync, **kwargs):
    super().__init__(**kwargs)
    self.convs, self.bns = [], []
    for i in range(steps):
      self.convs.append(keras.layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False,
                                            name=f"conv{i}"))
      self.bns.append(keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5,
                                                      synchronized=sync, name=f"bn{i}"))
    self.fc = keras.layers.Dense(num_classes, name="fc")

  def call(self, x, training=None):
    for conv, bn in zip(self.convs, self.bns):
      x = tf.nn.relu(bn(conv(x), training=training))
    feature = tf.reduce_mean(x, axis=[1, 2])
    return self.fc(feature), feature


@register("BYOT")
class BYOT(Distiller):
  """{"ce": CE(deepest), "byot_ce": (1-a) sum CE(q_i), "byot_kl": a T^2 sum KL(q_C||q_i),
  "byot_feat": lambda sum ||F_i - F_C||^2}."""
  uses_teacher = False
  method_weight = 0.03
  temperature = 3.0

  def __init__(self, student, teacher, *, alpha=0.3, **kwargs):
    super().__init__(student, teacher, **kwargs)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
      from kd_tf2.errors import UsageError
      raise UsageError(f"alpha={alpha!r} for BYOT: must be a number in [0, 1]")
    self.alpha = float(alpha)

  def build_connectors(self, s, t):
    del t
    last = s.features[-1]
    width = int(s.embedding.shape[-1])
    heads = []
    for i, f in enumerate(s.features[1:-1], start=1):
      steps, size = 0, int(f.shape[1])
      while size > int(last.shape[1]):
        size = (size + 1) // 2
        steps += 1
      head = _Head(max(steps, 1), width, int(s.logits.shape[-1]), self.synchronized_bn,
                   name=f"head{i}")
      head(f)
      heads.append(head)
    self.heads = heads

  def head_outputs(self, s, training):
    return [tuple(tf.cast(x, tf.float32) for x in h(f, training=training))
            for h, f in zip(self.heads, s.features[1:-1])]

  def terms(self, s, t, batch, *, training=True):
    del t
    labels = batch["label"]
    deep_logits = tf.stop_gradient(s.logits)
    deep_feature = tf.stop_gradient(s.embedding)
    outs = self.head_outputs(s, training)
    ce = tf.add_n([self.cross_entropy(z, labels) for z, _ in outs])
    kl = tf.add_n([kd_losses.soft_target(z, deep_logits, self.temperature) for z, _ in outs])
    feat = tf.add_n([tf.reduce_mean(tf.reduce_sum(tf.square(f - deep_feature), axis=-1))
                     for _, f in outs])
    return {"byot_ce": (1.0 - self.alpha) * ce, "byot_kl": self.alpha * kl,
            "byot_feat": self.method_weight * feat}

  def eval_models(self):
    def view(i):
      def fn(x, training):
        s = as_float32(self.student(x, training=training, features=True))
        return self.heads[i](s.features[i + 1], training=training)[0]
      return _View(fn)
    return {f"head{i + 1}": view(i) for i in range(len(self.heads))}

  def hparams(self):
    return {**super().hparams(), "alpha": self.alpha}
