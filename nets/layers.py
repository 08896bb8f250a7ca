"""Keras building blocks that compute exactly what the PyTorch layers of the reference zoo compute.

NETS.md §1: PyTorch pads ``pad`` zeros on every side of a conv input, Keras' ``'same'`` puts the
smaller half of the padding on top/left. The two agree for stride 1 and a kernel of 2·pad+1, and
disagree for stride 2 on even maps (the sampling grid shifts by one pixel). The conv layers below take
PyTorch's ``pad`` argument and pad symmetrically whenever ``'same'`` would differ.

Initialisers follow the reference's schemes (NETS.md §1.5); BatchNormalization uses PyTorch's
epsilon 1e-5 and momentum 0.1 (Keras momentum 0.9) and PyTorch's moving-variance update.
"""
import math

import keras
import tensorflow as tf
from keras import ops

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


@keras.saving.register_keras_serializable(package="nets")
class BatchNorm(keras.layers.BatchNormalization):
  """``torch.nn.BatchNorm2d`` in training mode: normalise with the batch mean and the *biased* batch
  variance, but move ``moving_variance`` towards the *unbiased* one, var · n/(n-1), n = the number
  of values per channel in the batch (B·H·W; summed over replicas when ``synchronized``). Keras'
  own layer moves it towards the biased variance (NETS.md §1.3). Inference is Keras' own path.

  ``synchronized=True`` sums [Σx, n] and then Σ(x - mean)² over replicas: two all-reduces (Keras
  uses three, for Σx, Σx² and n, and the less accurate E[x²] - E[x]²).
  Shapes: [..., C] -> [..., C]; statistics over every axis but the last.
  """

  def __init__(self, axis=-1, **kwargs):
    if axis != -1 or kwargs.get("renorm"):
      raise ValueError(f"BatchNorm normalises the last axis without renorm; got axis={axis!r}")
    super().__init__(axis=axis, **kwargs)

  def call(self, inputs, training=None, mask=None):
    if not (training and self.trainable) or mask is not None:
      return super().call(inputs, training=training, mask=mask)
    x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
    mean, variance, count = self._batch_moments(x)
    keep = self.momentum
    self.moving_mean.assign(self.moving_mean * keep + mean * (1.0 - keep))
    unbiased = variance * (count / ops.maximum(count - 1.0, 1.0))
    self.moving_variance.assign(self.moving_variance * keep + unbiased * (1.0 - keep))
    gamma = ops.cast(self.gamma, x.dtype) if self.scale else None
    beta = ops.cast(self.beta, x.dtype) if self.center else None
    out = ops.batch_normalization(x, mean, variance, axis=-1, offset=beta, scale=gamma,
                                  epsilon=self.epsilon)
    return ops.cast(out, self.compute_dtype)

  def _batch_moments(self, x):
    """(mean [C], biased variance [C], n scalar) over all axes but the last."""
    axes = self._reduction_axes
    replica = tf.distribute.get_replica_context() if self.synchronized else None
    if replica is None or replica.num_replicas_in_sync == 1:
      mean, variance = tf.nn.moments(x, axes)
      count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), x.dtype)
      return mean, variance, count
    # Two passes, as tf.nn.moments: [Σx, n], then Σ(x - mean)² (E[x²] - E[x]² loses digits
    # when |mean| >> std).
    c = x.shape[-1]
    local = tf.concat([tf.reduce_sum(x, axes),
                       tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), x.dtype)[None]], axis=0)
    total = replica.all_reduce(tf.distribute.ReduceOp.SUM, local)
    count = total[c]
    mean = tf.math.divide_no_nan(total[:c], count)
    squares = replica.all_reduce(tf.distribute.ReduceOp.SUM,
                                 tf.reduce_sum(tf.square(x - mean), axes))
    return mean, tf.math.divide_no_nan(squares, count), count


def batch_norm(name, synchronized=False):
  """``BatchNorm`` over the channel axis with PyTorch's statistics (eps 1e-5, momentum 0.1)."""
  return BatchNorm(axis=-1, epsilon=BN_EPSILON, momentum=BN_MOMENTUM, synchronized=synchronized,
                   name=name)


# --- initialisers (NETS.md §1.5) -------------------------------------------------------------------

def he_normal_fan_out():
  """N(0, sqrt(2 / (kh*kw*out))) on a [kh, kw, in/groups, out] kernel (untruncated)."""
  return keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")


def torch_default_kernel():
  """PyTorch's default conv/linear weight init: U(±1/sqrt(fan_in)), fan_in = (in/groups)*kh*kw.

  kaiming_uniform with a = sqrt(5) has bound sqrt(6/(1+5))·sqrt(3/fan_in)/sqrt(3) = 1/sqrt(fan_in);
  Keras' fan_in of a [kh, kw, in/groups, out] (or [in, out]) kernel is the same number.
  """
  return keras.initializers.VarianceScaling(1.0 / 3.0, mode="fan_in", distribution="uniform")


def uniform(bound):
  """U(-bound, +bound)."""
  return keras.initializers.RandomUniform(-bound, bound)


def normal(std):
  """N(0, std), untruncated."""
  return keras.initializers.RandomNormal(0.0, std)


# --- convolutions ----------------------------------------------------------------------------------

def _as_pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


def _keras_padding(kernel_size, strides, pad):
  """('same' | 'valid', explicit pad): 'same' only where it equals PyTorch's symmetric padding."""
  k, s = _as_pair(kernel_size), _as_pair(strides)
  if pad == 0:
    return "valid", 0
  if s == (1, 1) and k == (2 * pad + 1, 2 * pad + 1):
    return "same", 0
  return "valid", pad


class _TorchPadding:
  """Mixin for Keras conv layers: zero-pad ``pad`` pixels on every side, as PyTorch does."""

  def _init_padding(self, kernel_size, strides, pad, kwargs):
    if "padding" in kwargs:
      raise ValueError("pass PyTorch's `pad`, not Keras' `padding`")
    kwargs["padding"], self._explicit_pad = _keras_padding(kernel_size, strides, pad)
    self.pad = pad
    return kwargs

  def _pad(self, x):
    p = self._explicit_pad
    return ops.pad(x, [[0, 0], [p, p], [p, p], [0, 0]]) if p else x

  def call(self, inputs):
    return super().call(self._pad(inputs))

  def compute_output_shape(self, input_shape):
    b, h, w, c = input_shape
    p = 2 * self._explicit_pad
    return super().compute_output_shape(
        (b, None if h is None else h + p, None if w is None else w + p, c))

  def get_config(self):
    config = super().get_config()
    config.pop("padding")
    config["pad"] = self.pad
    return config


@keras.saving.register_keras_serializable(package="nets")
class Conv2D(_TorchPadding, keras.layers.Conv2D):
  """``torch.nn.Conv2d(in, filters, kernel_size, strides, padding=pad, bias=use_bias)`` in NHWC.

  Kernel [kh, kw, in/groups, filters]. With ``groups > 1`` the grouped conv is computed as
  split → one conv per group → concat (group k reads input channels [k·in/g, (k+1)·in/g) and writes
  output channels [k·out/g, (k+1)·out/g), as in PyTorch). That is numerically the same as Keras'
  own grouped conv but avoids its XLA-compiled CPU fallback, which is ~30x slower (NETS.md §2.6).
  Default init: PyTorch's default (``torch_default_kernel``), no bias.
  """

  def __init__(self, filters, kernel_size, strides=1, pad=0, use_bias=False,
               kernel_initializer=None, **kwargs):
    kwargs = self._init_padding(kernel_size, strides, pad, kwargs)
    super().__init__(filters, kernel_size, strides=strides, use_bias=use_bias,
                     kernel_initializer=kernel_initializer or torch_default_kernel(), **kwargs)

  def convolution_op(self, inputs, kernel):
    if self.groups == 1:
      return super().convolution_op(inputs, kernel)
    xs = ops.split(inputs, self.groups, axis=-1)
    ks = ops.split(kernel, self.groups, axis=-1)
    return ops.concatenate(
        [super(Conv2D, self).convolution_op(x, k) for x, k in zip(xs, ks)], axis=-1)


@keras.saving.register_keras_serializable(package="nets")
class DepthwiseConv2D(_TorchPadding, keras.layers.DepthwiseConv2D):
  """``torch.nn.Conv2d(C, C, kernel_size, strides, padding=pad, groups=C, bias=False)`` in NHWC.

  Kernel [kh, kw, C, 1]. Keras computes fans of this kernel the other way round from PyTorch, so
  every family passes its depthwise initialiser explicitly (NETS.md §1.5).
  """

  def __init__(self, kernel_size, strides=1, pad=0, depthwise_initializer=None, **kwargs):
    if depthwise_initializer is None:
      raise ValueError("DepthwiseConv2D needs an explicit depthwise_initializer (NETS.md §1.5)")
    kwargs = self._init_padding(kernel_size, strides, pad, kwargs)
    kwargs.setdefault("use_bias", False)
    super().__init__(kernel_size, strides=strides,
                     depthwise_initializer=depthwise_initializer, **kwargs)


def conv3x3(filters, strides=1, name=None, **kwargs):
  """3x3 conv with PyTorch padding 1 (bias-free unless use_bias=True)."""
  return Conv2D(filters, 3, strides=strides, pad=1, name=name, **kwargs)


def conv1x1(filters, strides=1, name=None, **kwargs):
  """1x1 conv, padding 0 (bias-free unless use_bias=True)."""
  return Conv2D(filters, 1, strides=strides, pad=0, name=name, **kwargs)


def depthwise3x3(strides=1, name=None, std=None):
  """3x3 depthwise conv, padding 1. Init N(0, std) if ``std`` is given, else PyTorch's default
  U(±1/sqrt(9)) (fan_in of a [C, 1, 3, 3] weight is 9)."""
  init = normal(std) if std is not None else uniform(1.0 / 3.0)
  return DepthwiseConv2D(3, strides=strides, pad=1, depthwise_initializer=init, name=name)


def dense(units, in_features, scheme, name="classifier"):
  """The classifier ``nn.Linear(in_features, units)`` with one of the reference's init schemes.

  scheme: 'torch' (weight and bias U(±1/sqrt(in))), 'torch_zero_bias' (same weight, bias 0),
  'normal_0.01' (weight N(0, 0.01), bias 0).
  """
  bound = 1.0 / math.sqrt(in_features)
  if scheme == "torch":
    k_init, b_init = torch_default_kernel(), uniform(bound)
  elif scheme == "torch_zero_bias":
    k_init, b_init = torch_default_kernel(), "zeros"
  elif scheme == "normal_0.01":
    k_init, b_init = normal(0.01), "zeros"
  else:
    raise ValueError(f"unknown dense init scheme {scheme!r}; "
                     "expected 'torch', 'torch_zero_bias' or 'normal_0.01'")
  return keras.layers.Dense(units, kernel_initializer=k_init, bias_initializer=b_init, name=name)


# --- parameter-free ops ----------------------------------------------------------------------------

def channel_shuffle(x, groups):
  """ShuffleNet's channel shuffle on NHWC: output channel i·g + j takes input channel j·(C/g) + i.

  (Zhang et al., "ShuffleNet", CVPR 2018, arXiv:1707.01083.) x: [B, H, W, C] -> [B, H, W, C].
  """
  if groups == 1:
    return x
  shape = ops.shape(x)
  c = x.shape[-1]
  x = ops.reshape(x, (-1, shape[1], shape[2], groups, c // groups))
  x = ops.transpose(x, (0, 1, 2, 4, 3))
  return ops.reshape(x, (-1, shape[1], shape[2], c))


def global_avg_pool(x):
  """[B, H, W, C] -> [B, C]. Every final pool of the zoo covers the whole map at 32x32 input."""
  return ops.mean(x, axis=(1, 2))


def avg_pool3x3_s2_pad1(x):
  """PyTorch ``AvgPool2d(3, stride=2, padding=1)`` (count_include_pad=True: border windows divide by
  9, padded zeros included). Keras' 'same' pooling would divide by the real-pixel count instead."""
  x = ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
  return ops.average_pool(x, 3, strides=2, padding="valid")


def max_pool2x2(x):
  """PyTorch ``MaxPool2d(2, 2)``: 2x2 windows, stride 2, no padding."""
  return ops.max_pool(x, 2, strides=2, padding="valid")
