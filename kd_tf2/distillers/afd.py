"""AFD - attention feature distillation (Zoo form).

Wang, Xia, Du, Zhang, Wang, "Pay Attention to Features, Transfer Learn Faster CNNs", ICLR 2020
(OpenReview ryxyCeHtPB; no arXiv id). METHODS.md §2.17 / §3: the Zoo's variant.

Points: the stage outputs of both nets, ``Outputs.features[1:]`` (Zoo ``rb1..rb3``), paired stage
by stage; every pair must have the same shape [B, H, W, C] (checked when the distiller is built).
At each pair an SE attention module on the teacher map gives per-sample channel weights

    rho_i = normalize_sum(sigmoid(conv1x1(ReLU(conv1x1(GAP(t_i))))))      # [B, C], rows sum to 1
    {"afd": method_weight * mean_i afd(s_i, t_i, rho_i)}

(conv1x1 C -> int(att_f * C) -> C with bias, Kaiming-normal fan-out init, zero bias). The modules
are trained with the student; gradients reach them through rho (the teacher map itself is a
constant).

Defaults (Zoo ``example_train_script.sh``; RepDistiller has no AFD): ``-r 1 -a 0 -b 500``, att_f 1,
mean over the stage pairs. Catalog convention: the paper's AFDS attention is replaced by the
Zoo's SE block (the original was reported unstable) and the spatial norm adds eps 1e-6.

Per replica: a per-replica mean over samples; no batch statistics.
"""
import keras
import tensorflow as tf

from kd_tf2 import losses as kd_losses
from kd_tf2.checks import is_number
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller
from kd_tf2.errors import UsageError
from nets import layers as torch_layers

__all__ = ["AFD", "SEAttention"]


@keras.saving.register_keras_serializable(package="kd_tf2")
class SEAttention(keras.layers.Layer):
  """Zoo AFD attention: [B, H, W, C] teacher map -> rho [B, C] (positive, each row sums to 1)."""

  def __init__(self, channels, att_f=1.0, **kwargs):
    super().__init__(**kwargs)
    self.channels, self.att_f = int(channels), float(att_f)
    mid = int(self.channels * self.att_f)
    if mid < 1:
      raise UsageError(f"AFD att_f={att_f!r} leaves no hidden channel for a {channels}-channel map")
    self.squeeze = torch_layers.Conv2D(mid, 1, use_bias=True, name="conv0",
                                       kernel_initializer=torch_layers.he_normal_fan_out())
    self.excite = torch_layers.Conv2D(self.channels, 1, use_bias=True, name="conv1",
                                      kernel_initializer=torch_layers.he_normal_fan_out())

  def call(self, t_map):
    pooled = tf.reduce_mean(t_map, axis=[1, 2], keepdims=True)          # [B, 1, 1, C]
    weights = tf.sigmoid(self.excite(keras.ops.relu(self.squeeze(pooled))))
    weights = tf.cast(tf.reshape(weights, [-1, self.channels]), tf.float32)
    return weights / tf.reduce_sum(weights, axis=1, keepdims=True)

  def get_config(self):
    config = super().get_config()
    config.update(channels=self.channels, att_f=self.att_f)
    return config


@register("AFD")
class AFD(Distiller):
  """{"afd": method_weight * mean over stage pairs of afd(s, t, SEAttention(t))}."""
  method_weight = 500.0

  def __init__(self, student, teacher, *, att_f=1.0, **kwargs):
    super().__init__(student, teacher, **kwargs)
    if not is_number(att_f) or not att_f > 0:
      raise UsageError(f"AFD att_f={att_f!r}: must be a number > 0")
    self.att_f = float(att_f)

  def build_connectors(self, s, t):
    pairs = list(zip(s.features[1:], t.features[1:]))
    if not pairs:
      raise UsageError(f"AFD needs stage outputs; {self.student.arch} has "
                       f"{len(s.features) - 1} and {self.teacher.arch} has {len(t.features) - 1}")
    for i, (fs, ft) in enumerate(pairs, start=1):
      if fs.shape[1:] != ft.shape[1:]:
        raise UsageError(
            f"AFD needs equal stage shapes: {self.student.arch} stage {i} is "
            f"{'x'.join(map(str, fs.shape[1:]))} but {self.teacher.arch} stage {i} is "
            f"{'x'.join(map(str, ft.shape[1:]))} (pick a teacher with the student's widths)")
    self.attentions = [SEAttention(ft.shape[-1], self.att_f, name=f"attention_{i}")
                       for i, (_, ft) in enumerate(pairs)]

  def terms(self, s, t, batch, *, training=True):
    terms = [kd_losses.afd(fs, ft, attention(ft))
             for attention, fs, ft in zip(self.attentions, s.features[1:], t.features[1:])]
    return {"afd": self.method_weight * tf.add_n(terms) / float(len(terms))}

  def hparams(self):
    return dict(super().hparams(), att_f=self.att_f)
