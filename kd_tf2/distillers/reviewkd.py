"""ReviewKD - distilling knowledge via knowledge review.

Chen, Liu, Zhao, Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021, arXiv:2104.09044
(reference code: mdistiller ``ReviewKD``). METHODS.md §4 ReviewKD / §3.

Levels (shallow to deep): the student's stage outputs ``Outputs.features[1:]`` (mdistiller's CIFAR
configs read the post-ReLU features, ``STU_PREACT False``) plus its embedding as a [B, 1, 1, D] map;
the teacher's targets are its pre-ReLU stage outputs ``Outputs.preacts[1:]`` plus its embedding.
When the nets have different stage counts the deepest stages are paired (library extension:
mdistiller only configures pairs with equal counts).

Attention-based fusion (ABF) modules run from deep to shallow; at level l (student map x_l):

    x = BN(conv1x1(x_l))                                     # C_s -> mid = min(512, D_s)
    if a deeper level exists:                                 # fuse with its residual r
      r = nearest(r, size of x_l);  a = sigmoid(conv1x1([x, r]))   # [B, H, W, 2]
      x = x * a[..., 0] + r * a[..., 1]
    x = nearest(x, size of the teacher's level l);  r <- x    # residual for the next level
    y_l = BN(conv3x3(x))                                      # mid -> C_t (the teacher's channels)

HCL, per level: (MSE(y, t) + sum_k w_k MSE(pool_k(y), pool_k(t))) / (1 + sum_k w_k) over pyramid
sizes k = 4, 2, 1 smaller than the level's height, w = 1/2, 1/4, 1/8 in turn; summed over levels.

    {"reviewkd": method_weight * min((epoch + 1) / warmup_epochs, 1) * HCL}

``epoch`` is the engine's 0-based ``self.epoch``, so the factor is mdistiller's min(epoch / 20, 1)
with its 1-based epoch count (1/20 in the first epoch). Defaults (mdistiller): ``-r 1 -a 0 -b 1``,
``-b 5`` for resnet32x4 -> resnet8x4 (a per-pair default: ``kd_tf2.distillers._pairs``, logged
in ``hparams()["pair_defaults"]``, overridden by ``--method_weight``), warm-up 20 epochs.
``nearest`` is PyTorch's ``interpolate(mode="nearest")``: output index i reads input index
floor(i * in / out).
Convolutions: conv1x1 / conv3x3 without bias, Kaiming-uniform (a = 1) init; the attention conv has
a bias and PyTorch's default init; BatchNorm with PyTorch's eps/momentum.

Per replica: a per-replica mean; the ABFs' BatchNorm uses per-replica statistics unless the
student uses synchronized BatchNorm.
"""
import math

import keras
import numpy as np
import tensorflow as tf

from kd_tf2 import losses as kd_losses
from kd_tf2.checks import is_number
from kd_tf2.distillers import register
from kd_tf2.distillers._pairs import apply_pair_defaults, describe
from kd_tf2.distillers.base import Distiller
from kd_tf2.errors import UsageError
from nets import layers as torch_layers

__all__ = ["ReviewKD", "ABF", "nearest_resize"]

def nearest_resize(x, size):
  """PyTorch ``F.interpolate(x, (size, size), mode="nearest")`` on an NHWC map with static shape:
  output row i reads input row floor(i * H / size) (same for columns). [B, H, W, C] -> [B, s, s, C]."""
  h, w = int(x.shape[1]), int(x.shape[2])
  if (h, w) == (size, size):
    return x
  rows = (np.arange(size) * h) // size
  cols = (np.arange(size) * w) // size
  return tf.gather(tf.gather(x, rows, axis=1), cols, axis=2)


def _kaiming_uniform_a1():
  """PyTorch ``kaiming_uniform_(w, a=1)``: U(+-sqrt(3 / fan_in))."""
  return keras.initializers.VarianceScaling(1.0, mode="fan_in", distribution="uniform")


@keras.saving.register_keras_serializable(package="kd_tf2")
class ABF(keras.layers.Layer):
  """Attention-based fusion module (mdistiller ``ABF``) for one level.

  ``call(x, residual, out_size)``: x [B, H, W, C_in] (student level), residual [B, h, w, mid] from
  the deeper level or None (``fuse=False``). Returns (y [B, S, S, C_out], new residual
  [B, S, S, mid]) with S = ``out_size`` (the teacher level's size).
  """

  def __init__(self, mid_channels, out_channels, fuse, synchronized_bn=False, **kwargs):
    super().__init__(**kwargs)
    self.mid_channels, self.out_channels = int(mid_channels), int(out_channels)
    self.fuse, self.synchronized_bn = bool(fuse), bool(synchronized_bn)
    self.conv1 = torch_layers.Conv2D(self.mid_channels, 1, kernel_initializer=_kaiming_uniform_a1(),
                                     name="conv1")
    self.bn1 = torch_layers.batch_norm("bn1", self.synchronized_bn)
    self.conv2 = torch_layers.Conv2D(self.out_channels, 3, pad=1,
                                     kernel_initializer=_kaiming_uniform_a1(), name="conv2")
    self.bn2 = torch_layers.batch_norm("bn2", self.synchronized_bn)
    if self.fuse:
      bound = 1.0 / math.sqrt(2 * self.mid_channels)
      self.att_conv = torch_layers.Conv2D(2, 1, use_bias=True, name="att_conv",
                                          bias_initializer=torch_layers.uniform(bound))

  def call(self, x, residual=None, out_size=None, training=None):
    x = self.bn1(self.conv1(x), training=training)
    if self.fuse:
      residual = nearest_resize(tf.cast(residual, x.dtype), int(x.shape[1]))
      attention = tf.sigmoid(self.att_conv(tf.concat([x, residual], axis=-1)))
      x = x * attention[..., 0:1] + residual * attention[..., 1:2]
    x = nearest_resize(x, int(out_size))
    return self.bn2(self.conv2(x), training=training), x

  def get_config(self):
    config = super().get_config()
    config.update(mid_channels=self.mid_channels, out_channels=self.out_channels, fuse=self.fuse,
                  synchronized_bn=self.synchronized_bn)
    return config


def _as_map(embedding):
  return embedding[:, None, None, :]


@register("ReviewKD")
class ReviewKD(Distiller):
  """{"reviewkd": method_weight * min((epoch + 1) / warmup_epochs, 1) * HCL(ABF(s), t)}."""
  method_weight = 1.0
  # mdistiller's per-pair REVIEWKD_WEIGHT (CIFAR), applied unless --method_weight is given.
  pair_defaults = {("resnet8x4", "resnet32x4"): {"method_weight": 5.0}}
  pair_sources = {("resnet8x4", "resnet32x4"): "mdistiller configs/cifar100/reviewkd.yaml"}

  def __init__(self, student, teacher, *, warmup_epochs=20, **kwargs):
    super().__init__(student, teacher, **kwargs)
    self._pair_applied = apply_pair_defaults(self, {"method_weight": kwargs.get("method_weight")})
    if not is_number(warmup_epochs) or not warmup_epochs > 0:
      raise UsageError(f"ReviewKD warmup_epochs={warmup_epochs!r}: must be a number > 0")
    self.warmup_epochs = float(warmup_epochs)

  def _levels(self, s, t):
    """(student levels, teacher levels), shallow to deep, deepest stages paired."""
    n = min(len(s.features), len(t.preacts)) - 1
    s_maps = list(s.features[len(s.features) - n:]) + [_as_map(s.embedding)]
    t_maps = list(t.preacts[len(t.preacts) - n:]) + [_as_map(t.embedding)]
    return s_maps, t_maps

  def build_connectors(self, s, t):
    s_maps, t_maps = self._levels(s, t)
    for i, (xs, xt) in enumerate(zip(s_maps, t_maps)):
      if xs.shape[1] != xs.shape[2] or xt.shape[1] != xt.shape[2]:
        raise UsageError(f"ReviewKD needs square maps; level {i} is {xs.shape[1:]} for "
                         f"{self.student.arch} and {xt.shape[1:]} for {self.teacher.arch}")
    mid = min(512, int(s.embedding.shape[-1]))
    sync = self.synchronized_bn
    deepest = len(s_maps) - 1
    self.abfs = [ABF(mid, int(xt.shape[-1]), fuse=i < deepest, synchronized_bn=sync, name=f"abf_{i}")
                 for i, xt in enumerate(t_maps)]

  def warmup(self):
    """min((epoch + 1) / warmup_epochs, 1) as a float32 scalar tensor."""
    return tf.minimum((tf.cast(self.epoch, tf.float32) + 1.0) / self.warmup_epochs, 1.0)

  def review(self, s_maps, t_maps, training):
    """The ABF outputs, shallow to deep, each with its teacher level's shape."""
    outputs, residual = [None] * len(s_maps), None
    for i in reversed(range(len(s_maps))):
      outputs[i], residual = self.abfs[i](s_maps[i], residual=residual,
                                          out_size=int(t_maps[i].shape[1]), training=training)
    return outputs

  def terms(self, s, t, batch, *, training=True):
    s_maps, t_maps = self._levels(s, t)
    outputs = self.review(s_maps, t_maps, training)
    return {"reviewkd": self.method_weight * self.warmup() * kd_losses.hcl(outputs, t_maps)}

  def hparams(self):
    out = dict(super().hparams(), warmup_epochs=self.warmup_epochs)
    if self._pair_applied:
      out["pair_defaults"] = describe(self, self._pair_applied)
    return out
