"""VID - variational information distillation.

Ahn, Hu, Damianou, Lawrence, Dai, "Variational Information Distillation for Knowledge Transfer",
CVPR 2019, arXiv:1904.05835. METHODS.md §2.12 / §3 / §5 item 7.

Points: the stage outputs of both nets, ``Outputs.features[1:]`` (RepDistiller ``feat[1:-1]``),
paired stage by stage up to the shorter list (RepDistiller's ``zip``). At each pair the taller map
is average-pooled to the other's size first (pool-to-match happens *before* the regressor), then

    mu_i = regressor_i(s_i)                     # [B, H, W, C_t]
    {"vid": method_weight * sum_i vid_nll(t_i, mu_i, alpha_i, eps)}

regressor_i = conv1x1 (C_s -> C_t) - ReLU - conv1x1 (C_t -> C_t) - ReLU - conv1x1 (C_t -> C_t), no
bias, PyTorch's default init (RepDistiller ``VIDLoss`` with mid channels = C_t); alpha_i [C_t] is the
per-channel ``log_scale`` with variance softplus(alpha) + eps, initialised so that the variance
starts at ``init_var``. Regressors and alphas are trained with the student.

Defaults (RepDistiller ``-r 1 -a 0 -b 1``): init_var 5, eps 1e-5 (catalog choice: RepDistiller and
mdistiller; Zoo uses 1e-6 and the mean over three stages, sseung0703 a variance floor of 1).
The paper's Gaussian NLL keeps its log 2pi constant; the catalog drops it (no effect on gradients).

Per replica: a per-replica mean; no batch statistics.
"""
import math

import keras
import tensorflow as tf

from kd_tf2 import losses as kd_losses
from kd_tf2.checks import is_number
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller
from kd_tf2.errors import UsageError
from nets import layers as torch_layers
from op_util import pool_to_match

__all__ = ["VID", "VIDRegressor"]


@keras.saving.register_keras_serializable(package="kd_tf2")
class VIDRegressor(keras.layers.Layer):
  """RepDistiller ``VIDLoss`` parameters: the mean regressor and the per-channel log-scale.

  ``call(x)`` maps [B, H, W, C_s] to the predicted mean [B, H, W, C_t]; ``log_scale`` is [C_t],
  initialised to log(exp(init_var - eps) - 1) so that softplus(log_scale) + eps = init_var.
  """

  def __init__(self, mid_channels, out_channels, init_var=5.0, eps=1e-5, **kwargs):
    super().__init__(**kwargs)
    self.mid_channels, self.out_channels = int(mid_channels), int(out_channels)
    self.init_var, self.eps = float(init_var), float(eps)
    self.convs = [torch_layers.Conv2D(c, 1, use_bias=False, name=f"conv{j}")
                  for j, c in enumerate((self.mid_channels, self.mid_channels, self.out_channels))]
    alpha0 = math.log(math.expm1(self.init_var - self.eps))
    self.log_scale = self.add_weight(shape=(self.out_channels,), name="log_scale",
                                     initializer=keras.initializers.Constant(alpha0))

  def call(self, x):
    for j, conv in enumerate(self.convs):
      x = conv(keras.ops.relu(x) if j else x)
    return x

  def get_config(self):
    config = super().get_config()
    config.update(mid_channels=self.mid_channels, out_channels=self.out_channels,
                  init_var=self.init_var, eps=self.eps)
    return config


@register("VID")
class VID(Distiller):
  """{"vid": method_weight * sum over stage pairs of vid_nll(t, regressor(s), log_scale, eps)}."""
  method_weight = 1.0

  def __init__(self, student, teacher, *, init_var=5.0, eps=1e-5, **kwargs):
    super().__init__(student, teacher, **kwargs)
    for key, value in (("init_var", init_var), ("eps", eps)):
      if not is_number(value) or not value > 0:
        raise UsageError(f"VID {key}={value!r}: must be a number > 0")
    if not init_var > eps:
      raise UsageError(f"VID init_var={init_var!r} must be larger than eps={eps!r}")
    self.init_var, self.eps = float(init_var), float(eps)

  def build_connectors(self, s, t):
    pairs = list(zip(s.features[1:], t.features[1:]))
    if not pairs:
      raise UsageError(f"VID needs stage outputs; {self.student.arch} has "
                       f"{len(s.features) - 1} and {self.teacher.arch} has {len(t.features) - 1}")
    self.regressors = [
        VIDRegressor(ft.shape[-1], ft.shape[-1], self.init_var, self.eps, name=f"regressor_{i}")
        for i, (_, ft) in enumerate(pairs)]

  def terms(self, s, t, batch, *, training=True):
    terms = []
    for regressor, fs, ft in zip(self.regressors, s.features[1:], t.features[1:]):
      fs, ft = pool_to_match(fs, ft)
      mean = tf.cast(regressor(fs), tf.float32)
      terms.append(kd_losses.vid_nll(ft, mean, regressor.log_scale, eps=self.eps))
    return {"vid": self.method_weight * tf.add_n(terms)}

  def hparams(self):
    return dict(super().hparams(), init_var=self.init_var, eps=self.eps)
