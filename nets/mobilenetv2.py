"""MobileNetV2 as RepDistiller builds it (``mobile_half``: expansion 6, width 0.5), NETS.md §2.5.

Sandler, Howard, Zhu, Zhmoginov, Chen, "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
CVPR 2018, arXiv:1801.04381. Differences from the paper/torchvision that the reference has and we
keep: widths int(c·width) without rounding to multiples of 8, stage 1 at stride 1, ReLU instead of
ReLU6, the expansion 1x1 conv even for t = 1, no dropout, head width 1280 not scaled.
Features (= preacts): stem ReLU output 16x16x16, then the linear-bottleneck outputs after stages
1, 2, 4, 6 (16x16x12, 8x8x16, 4x4x48, 2x2x160 at width 0.5); embedding: global average of
ReLU(BN(conv1x1(f4))), [B, 1280].
"""
import math

import keras

from nets import layers as L
from nets.base import Block, Trace, ZooNet, prefixed, relu
from nets.registry import register

# (expansion t, channels c, units n, first stride s); t = None means "the net's expansion T".
_SETTING = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
            (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1))
_FEATURE_STAGES = (1, 2, 4, 6)  # features are read after these stages


def _he_fan_out(fan_out):
  """N(0, sqrt(2 / fan_out)) with fan_out = kh*kw*out of the PyTorch weight."""
  return L.normal(math.sqrt(2.0 / fan_out))


class InvertedResidual(Block):
  """conv1x1 (inp→inp·t) → BN → ReLU → dw3x3/s → BN → ReLU → conv1x1 (→oup) → BN, plus x iff s = 1
  and inp = oup. Modules ``conv.0/1``, ``conv.3/4``, ``conv.6/7``.
  Shapes: [B, H, W, inp] -> [B, H/s, W/s, oup]."""

  def __init__(self, inp, oup, strides, expansion, synchronized_bn=False, **kwargs):
    super().__init__(**kwargs)
    hidden = inp * expansion
    self.residual = strides == 1 and inp == oup
    self.expand = L.conv1x1(hidden, name="conv.0", kernel_initializer=_he_fan_out(hidden))
    self.bn_expand = L.batch_norm("conv.1", synchronized_bn)
    self.depthwise = L.depthwise3x3(strides, name="conv.3", std=math.sqrt(2.0 / (9 * hidden)))
    self.bn_depthwise = L.batch_norm("conv.4", synchronized_bn)
    self.project = L.conv1x1(oup, name="conv.6", kernel_initializer=_he_fan_out(oup))
    self.bn_project = L.batch_norm("conv.7", synchronized_bn)

  def call(self, x, training=None):
    h = relu(self.bn_expand(self.expand(x), training=training))
    h = relu(self.bn_depthwise(self.depthwise(h), training=training))
    h = self.bn_project(self.project(h), training=training)
    return x + h if self.residual else h

  def torch_layers(self):
    yield "conv.0", self.expand
    yield "conv.1", self.bn_expand
    yield "conv.3", self.depthwise
    yield "conv.4", self.bn_depthwise
    yield "conv.6", self.project
    yield "conv.7", self.bn_project


@keras.saving.register_keras_serializable(package="nets")
class MobileNetV2(ZooNet):
  """RepDistiller's MobileNetV2(T=expansion, width_mult) for 32x32 inputs (width_mult <= 1: the
  head stays 1280 wide). Conv init N(0, sqrt(2/(kh·kw·out))) — for depthwise sqrt(2/(9·C));
  classifier N(0, 0.01) with zero bias (NETS.md §1.5)."""

  def __init__(self, expansion=6, width_mult=0.5, num_classes=100, **kwargs):
    super().__init__(num_classes=num_classes, **kwargs)
    if not 0 < width_mult <= 1:
      raise ValueError(f"width_mult must be in (0, 1], got {width_mult!r}")
    self.expansion, self.width_mult = int(expansion), float(width_mult)
    sync = self.synchronized_bn
    in_ch = int(32 * self.width_mult)
    self.conv1 = L.conv3x3(in_ch, 2, name="conv1.0", kernel_initializer=_he_fan_out(9 * in_ch))
    self.bn1 = L.batch_norm("conv1.1", sync)
    self.stages = []
    for s, (t, c, n, stride) in enumerate(_SETTING):
      out_ch = int(c * self.width_mult)
      units = []
      for u in range(n):
        units.append(InvertedResidual(in_ch, out_ch, stride if u == 0 else 1,
                                      self.expansion if t is None else t, sync,
                                      name=f"blocks.{s}.{u}"))
        in_ch = out_ch
      self.stages.append(units)
    self.last_channels = 1280
    self.conv2 = L.conv1x1(self.last_channels, name="conv2.0",
                           kernel_initializer=_he_fan_out(self.last_channels))
    self.bn2 = L.batch_norm("conv2.1", sync)
    self.classifier = L.dense(self.num_classes, self.last_channels, "normal_0.01",
                              name="classifier.0")

  def arch_config(self):
    return {"expansion": self.expansion, "width_mult": self.width_mult}

  def stage_units(self):
    """The units of the four protocol stages: settings 0-1, 2, 3-4, 5-6 (one per feature)."""
    starts = (0,) + tuple(s + 1 for s in _FEATURE_STAGES[:-1])
    return [[u for units in self.stages[a:b + 1] for u in units]
            for a, b in zip(starts, _FEATURE_STAGES)]

  def part_layers(self):
    return [[self.conv1, self.bn1]] + self.stage_units()

  def forward_stem(self, x, training):
    x = relu(self.bn1(self.conv1(x), training=training))
    return Trace(x, (x,), (x,))

  def forward_stage(self, i, trace, training):
    x = trace.x
    for unit in self.stage_units()[i]:
      x = unit(x, training=training)
    return trace.then(x, (x,), (x,))

  def forward_head(self, trace, training):
    h = relu(self.bn2(self.conv2(trace.x), training=training))
    return list(trace.features), list(trace.preacts), L.global_avg_pool(h)

  def torch_layers(self):
    yield "conv1.0", self.conv1
    yield "conv1.1", self.bn1
    for s, units in enumerate(self.stages):
      for u, unit in enumerate(units):
        yield from prefixed(f"blocks.{s}.{u}", unit.torch_layers())
    yield "conv2.0", self.conv2
    yield "conv2.1", self.bn2
    yield "classifier.0", self.classifier


@register(name="MobileNetV2")
def mobile_half(num_classes=100, **kwargs):
  """RepDistiller's ``mobile_half``: MobileNetV2(T=6, width_mult=0.5)."""
  return MobileNetV2(6, 0.5, num_classes=num_classes, **kwargs)
