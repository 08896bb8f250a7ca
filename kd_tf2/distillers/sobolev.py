"""Sobolev - input-gradient (Jacobian) matching.

Czarnecki, Osindero, Jaderberg, Swirszcz, Pascanu, "Sobolev Training for Neural Networks",
NeurIPS 2017, arXiv:1706.04859; Srinivas, Fleuret, "Knowledge Transfer with Jacobian Matching",
ICML 2018, arXiv:1803.00443. METHODS.md §4 (Zoo form), weight 20 (Zoo lambda):

    g_s = d z_s[y] / d x,  g_t = d z_t[y] / d x           x: images [B, H, W, C]
    L   = mean_{b, i} (normalize(g_s)[b, i] - normalize(g_t)[b, i])^2       (over B * H*W*C)

with ``normalize`` the per-sample l2 normalisation of the flattened gradient. The teacher runs in
inference mode and its gradient is a constant; the student's gradient is differentiated once more
(second-order gradients through a nested ``GradientTape``), so the term trains the student's
Jacobian. As in the Zoo the summed ground-truth logit of the batch is differentiated: with the
student's BatchNorm in training mode the batch statistics couple the samples, and the result is
exactly the Zoo's gradient (not a per-sample Jacobian).

Per replica: both gradients are taken on the replica's own batch. The paper's own variants (full
Jacobian, matching through the teacher's soft targets) are not implemented; the catalog follows the
Zoo. METHODS.md notes the term is unstable alone: add ``--kd_weight`` for the soft-target term.
"""
import tensorflow as tf

from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller, StepOutput, arch_name, as_float32
from kd_tf2.errors import UsageError
from op_util.ops import flatten_per_sample, l2_normalize


def label_logit_sum(logits, labels):
  """sum_b logits[b, labels[b]] (float32): the scalar Jacobian / Grad-CAM methods differentiate."""
  labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
  picked = tf.gather(tf.cast(logits, tf.float32), labels, axis=1, batch_dims=1)
  return tf.reduce_sum(picked)


def normalized_gradient(grad):
  """[B, ...] gradient -> [B, N] per-sample unit vectors (float32)."""
  return l2_normalize(flatten_per_sample(tf.cast(grad, tf.float32)), axis=1)


def require_same_classes(method, distiller, s, t):
  """UsageError unless the two nets' logits have the same number of classes."""
  k_s, k_t = int(s.logits.shape[-1]), int(t.logits.shape[-1])
  if k_s != k_t:
    raise UsageError(f"{method} needs the same classes in both nets: "
                     f"{arch_name(distiller.student)} has {k_s}, "
                     f"{arch_name(distiller.teacher)} has {k_t}")


@register("Sobolev")
class Sobolev(Distiller):
  """{"sobolev": method_weight * MSE(normalize(d z_s[y]/dx), normalize(d z_t[y]/dx))}."""
  method_weight = 20.0

  def build_connectors(self, s, t):
    require_same_classes(self.method_name, self, s, t)

  def teacher_gradient(self, images, labels):
    """Teacher ``Outputs`` (stop-gradient) and its normalised input gradient [B, H*W*C]."""
    with tf.GradientTape() as tape:
      tape.watch(images)
      raw = self.teacher(images, training=False, features=True)
      target = label_logit_sum(raw.logits, labels)
    grad = tape.gradient(target, images)
    t = tf.nest.map_structure(tf.stop_gradient, as_float32(raw))
    return t, tf.stop_gradient(normalized_gradient(grad))

  def train_step(self, batch, ctx):
    images = tf.cast(batch["image"], tf.float32)
    labels = batch["label"]
    t, g_t = self.teacher_gradient(images, labels)
    with tf.GradientTape() as tape:
      with tf.GradientTape() as inner:
        inner.watch(images)
        s = self.student_outputs(images, training=True)
        target = label_logit_sum(s.logits, labels)
      g_s = normalized_gradient(inner.gradient(target, images))
      terms = self.total_terms(s, t, batch, training=True)
      terms["sobolev"] = self.method_weight * tf.reduce_mean(tf.square(g_s - g_t))
      loss = tf.add_n(list(terms.values()))
    ctx.minimize(loss, tape)
    return StepOutput(terms, s.logits)
