"""LwM - Learning without Memorizing: Grad-CAM attention distillation.

Dhar, Singh, Peng, Wu, Chellappa, "Learning without Memorizing", CVPR 2019, arXiv:1811.08051.
METHODS.md §4 (Zoo form: only the attention-distillation term of the incremental-learning method),
at the middle stage output ``Outputs.features[layer]``, ``layer = 2`` (Zoo "rb2"; the last stage
would give spatially constant maps because of global average pooling), weight 0.4 (Zoo lambda):

    g   = d z[y] / d f                          f: [B, H, W, C] feature map at ``layer``
    w_c = mean_{h, w} g[b, h, w, c]             [B, 1, 1, C]
    cam = ReLU(sum_c w_c * g[..., c])           [B, H, W, 1]
    L   = mean_{b, i} |normalize(cam_s)[b, i] - normalize(cam_t)[b, i]|      (over B * H*W)

``normalize`` is the per-sample l2 normalisation of the flattened map. Catalog = Zoo, which weights
the gradient channels by the *gradient* (standard Grad-CAM, and the paper, weight the
activations; METHODS.md §5 item 14). The teacher runs in inference mode and its map is a constant;
the student's map is differentiated once more (second-order gradients through a nested
``GradientTape``). Library extension: when the two maps differ in spatial size, the larger cam is
average-pooled to the smaller's before normalisation (``pool_to_match``); equal sizes (every CIFAR
ResNet/WRN pair) are the Zoo's computation. Per replica: the gradients and the loss use the
replica's own batch (the student's BatchNorm batch statistics couple its samples, as in the Zoo).
"""
import tensorflow as tf

from kd_tf2 import losses as kd_losses
from kd_tf2.checks import is_int
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller, StepOutput, arch_name, as_float32
from kd_tf2.distillers.sobolev import label_logit_sum, require_same_classes
from kd_tf2.errors import UsageError


def grad_cam(grad):
  """Zoo's gradient-weighted map: gradient [B, H, W, C] -> ReLU(sum_c mean(g_c) g_c) [B, H, W, 1]."""
  grad = tf.cast(grad, tf.float32)
  weights = tf.reduce_mean(grad, axis=[1, 2], keepdims=True)
  return tf.nn.relu(tf.reduce_sum(weights * grad, axis=-1, keepdims=True))


@register("LwM")
class LwM(Distiller):
  """{"lwm": method_weight * L1(cam_s, cam_t)} at ``features[layer]``."""
  method_weight = 0.4

  def __init__(self, student, teacher, *, layer=2, **kwargs):
    super().__init__(student, teacher, **kwargs)
    if not is_int(layer):
      raise UsageError(f"layer={layer!r}: must be an integer feature position")
    self.layer = layer

  def build_connectors(self, s, t):
    require_same_classes(self.method_name, self, s, t)
    n_s, n_t = len(s.features), len(t.features)
    if not (0 <= self.layer < n_s and 0 <= self.layer < n_t):
      raise UsageError(f"LwM layer={self.layer} is out of range for {arch_name(self.student)} "
                       f"({n_s} feature maps) and {arch_name(self.teacher)} ({n_t}); accepted: "
                       f"0..{min(n_s, n_t) - 1}")

  def teacher_cam(self, images, labels):
    """Teacher ``Outputs`` (stop-gradient) and its constant Grad-CAM map [B, H, W, 1]."""
    with tf.GradientTape() as tape:
      tape.watch(images)
      raw = self.teacher(images, training=False, features=True)
      target = label_logit_sum(raw.logits, labels)
    cam = grad_cam(tape.gradient(target, raw.features[self.layer]))
    t = tf.nest.map_structure(tf.stop_gradient, as_float32(raw))
    return t, tf.stop_gradient(cam)

  def train_step(self, batch, ctx):
    images = tf.cast(batch["image"], tf.float32)
    labels = batch["label"]
    t, cam_t = self.teacher_cam(images, labels)
    with tf.GradientTape() as tape:
      with tf.GradientTape() as inner:
        raw = self.student(images, training=True, features=True)
        target = label_logit_sum(raw.logits, labels)
      # The gradient is taken w.r.t. the net's own tensor (before any float32 cast).
      cam_s = grad_cam(inner.gradient(target, raw.features[self.layer]))
      s = as_float32(raw)
      terms = self.total_terms(s, t, batch, training=True)
      terms["lwm"] = self.method_weight * kd_losses.cam_distance(cam_s, cam_t)
      loss = tf.add_n(list(terms.values()))
    ctx.minimize(loss, tape)
    return StepOutput(terms, s.logits)
