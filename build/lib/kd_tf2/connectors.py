"""Learnable connectors that map a student tensor onto a teacher tensor's shape.

A library of Keras layers owned by distillers (trained with the student, checkpointed with the
distiller, never exported with the student). Layers compute what the PyTorch reference modules
compute: convolutions pad like PyTorch (``nets.layers``), initialise like PyTorch, and BatchNorm
uses PyTorch's epsilon and momentum.
"""
import math

import keras

from kd_tf2.errors import UsageError
from nets import layers as torch_layers

__all__ = ["ConvReg"]


def _hwc(shape, what):
  dims = tuple(shape)
  if len(dims) != 4 or any(d is None for d in dims[1:]):
    raise ValueError(f"{what} must be a static NHWC shape [B, H, W, C], got {dims}")
  return int(dims[1]), int(dims[2]), int(dims[3])


@keras.saving.register_keras_serializable(package="kd_tf2")
class ConvReg(keras.layers.Layer):
  """RepDistiller's ``ConvReg`` (FitNet regressor; AB connector with ``use_relu=False``).

  Maps a student map [B, Hs, Ws, Cs] to the teacher's [B, Ht, Wt, Ct] (Romero et al., "FitNets",
  ICLR 2015, arXiv:1412.6550; module from Tian et al., ICLR 2020, arXiv:1910.10699):
    Hs == 2*Ht:  conv 3x3, stride 2, PyTorch padding 1
    2*Hs == Ht:  transposed conv 4x4, stride 2, PyTorch padding 1 (output 2*Hs)
    Hs >= Ht:    conv (1+Hs-Ht) x (1+Ws-Wt), no padding
  then BatchNorm (+ ReLU when ``use_relu``). Convs have a bias; init is PyTorch's default
  (U(+-1/sqrt(fan_in)) for kernel and bias). Any other size pair raises ``UsageError``.
  """

  def __init__(self, s_shape, t_shape, use_relu=True, synchronized_bn=False, **kwargs):
    super().__init__(**kwargs)
    self.s_shape, self.t_shape = tuple(s_shape), tuple(t_shape)
    self.use_relu, self.synchronized_bn = bool(use_relu), bool(synchronized_bn)
    hs, ws, cs = _hwc(s_shape, "student shape")
    ht, wt, ct = _hwc(t_shape, "teacher shape")
    if hs == 2 * ht:
      fan_in = cs * 9
      self.conv = torch_layers.Conv2D(ct, 3, strides=2, pad=1, use_bias=True,
                                      bias_initializer=_uniform(fan_in), name="conv")
      self._crop = 0
    elif 2 * hs == ht:
      # PyTorch's ConvTranspose2d(padding=1) is the 'valid' transposed conv with one pixel
      # cropped on every side; its fan_in (weight.size(1) * k * k) is out_channels * 16, which is
      # also what Keras computes for a [k, k, out, in] kernel.
      fan_in = ct * 16
      self.conv = keras.layers.Conv2DTranspose(
          ct, 4, strides=2, padding="valid", use_bias=True,
          kernel_initializer=torch_layers.torch_default_kernel(),
          bias_initializer=_uniform(fan_in), name="conv")
      self._crop = 1
    elif hs >= ht and ws >= wt:
      kernel = (1 + hs - ht, 1 + ws - wt)
      fan_in = cs * kernel[0] * kernel[1]
      self.conv = torch_layers.Conv2D(ct, kernel, strides=1, pad=0, use_bias=True,
                                      bias_initializer=_uniform(fan_in), name="conv")
      self._crop = 0
    else:
      raise UsageError(f"ConvReg cannot map a {hs}x{ws} student map onto a {ht}x{wt} teacher "
                       "map (supported: Hs = 2Ht, 2Hs = Ht, or Hs >= Ht)")
    self.bn = torch_layers.batch_norm("bn", synchronized=self.synchronized_bn)

  def call(self, x, training=None):
    x = self.conv(x)
    if self._crop:
      c = self._crop
      x = x[:, c:-c, c:-c, :]
    x = self.bn(x, training=training)
    return keras.ops.relu(x) if self.use_relu else x

  def get_config(self):
    config = super().get_config()
    config.update(s_shape=self.s_shape, t_shape=self.t_shape, use_relu=self.use_relu,
                  synchronized_bn=self.synchronized_bn)
    return config


def _uniform(fan_in):
  bound = 1.0 / math.sqrt(fan_in)
  return keras.initializers.RandomUniform(-bound, bound)
