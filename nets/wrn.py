"""Wide ResNets wrn_<depth>_<width> (NETS.md §2.3).

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016, arXiv:1605.07146, in the
pre-activation form of RepDistiller's ``models/wrn.py`` (no dropout). Depth 6n + 4, widen factor k,
widths 16, 16k, 32k, 64k.
Features are *raw* tensors (stem conv output, then each group's residual sum, no BN/ReLU);
preacts are the next BN applied to them (``block2.layer.0.bn1``, ``block3.layer.0.bn1``, top
``bn1``), without ReLU; embedding: global average of ReLU(bn1(f3)), [B, 64k].
"""
import keras

from nets import layers as L
from nets.base import Block, Trace, ZooNet, prefixed, relu
from nets.registry import register, register_pattern


def check_wrn_depth(depth, width):
  if depth < 10 or (depth - 4) % 6 or width < 1:
    raise ValueError(f"wrn_{depth}_{width}: WRN needs depth = 6n + 4 with n >= 1 and width >= 1")


class WideBlock(Block):
  """Pre-activation block. a = ReLU(bn1(x)); h = conv3x3/s(a) → bn2 → ReLU → conv3x3;
  out = h + (x if in == out else convShortcut1x1/s(a)) — no BN on the shortcut, no final ReLU.

  Returns (out, bn1(x)); the second is the "preact" of the previous group's output.
  Shapes: [B, H, W, in] -> [B, H/s, W/s, out], [B, H, W, in].
  """

  def __init__(self, in_channels, out_channels, strides=1, synchronized_bn=False, **kwargs):
    super().__init__(**kwargs)
    if in_channels == out_channels and strides != 1:
      raise ValueError("a WRN block without projection cannot have a stride")
    init = L.he_normal_fan_out
    self.bn1 = L.batch_norm("bn1", synchronized_bn)
    self.conv1 = L.conv3x3(out_channels, strides, name="conv1", kernel_initializer=init())
    self.bn2 = L.batch_norm("bn2", synchronized_bn)
    self.conv2 = L.conv3x3(out_channels, 1, name="conv2", kernel_initializer=init())
    self.projects = in_channels != out_channels
    if self.projects:
      self.conv_shortcut = L.conv1x1(out_channels, strides, name="convShortcut",
                                     kernel_initializer=init())

  def call(self, x, training=None):
    bn_x = self.bn1(x, training=training)
    a = relu(bn_x)
    h = relu(self.bn2(self.conv1(a), training=training))
    h = self.conv2(h)
    r = self.conv_shortcut(a) if self.projects else x
    return h + r, bn_x

  def torch_layers(self):
    yield "bn1", self.bn1
    yield "conv1", self.conv1
    yield "bn2", self.bn2
    yield "conv2", self.conv2
    if self.projects:
      yield "convShortcut", self.conv_shortcut


@keras.saving.register_keras_serializable(package="nets")
class WideResNet(ZooNet):
  """WRN-depth-width for 32x32 inputs. Conv init He-normal fan_out; classifier weight PyTorch default,
  bias 0 (NETS.md §1.5)."""

  def __init__(self, depth, width, num_classes=100, **kwargs):
    super().__init__(num_classes=num_classes, **kwargs)
    check_wrn_depth(depth, width)
    self.depth, self.width = int(depth), int(width)
    n = (self.depth - 4) // 6
    sync = self.synchronized_bn
    widths = (16, 16 * self.width, 32 * self.width, 64 * self.width)
    self.conv1 = L.conv3x3(16, name="conv1", kernel_initializer=L.he_normal_fan_out())
    self.groups = []
    in_ch = 16
    for g, (out_ch, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
      blocks = []
      for i in range(n):
        blocks.append(WideBlock(in_ch, out_ch, stride if i == 0 else 1, sync,
                                name=f"block{g}.layer.{i}"))
        in_ch = out_ch
      self.groups.append(blocks)
    self.bn1 = L.batch_norm("bn1", sync)
    self.classifier = L.dense(self.num_classes, in_ch, "torch_zero_bias", name="fc")

  def arch_config(self):
    return {"depth": self.depth, "width": self.width}

  def part_layers(self):
    return [[self.conv1]] + [list(blocks) for blocks in self.groups]

  def forward_stem(self, x, training):
    del training
    x = self.conv1(x)
    return Trace(x, (x,), (x,))

  def forward_stage(self, i, trace, training):
    """Group i+1; its first block's bn1 is the preact of group i's output (none for the stem's)."""
    x, preacts = trace.x, ()
    for j, block in enumerate(self.groups[i]):
      x, bn_in = block(x, training=training)
      if j == 0 and i > 0:
        preacts = (bn_in,)
    return trace.then(x, (x,), preacts)

  def forward_head(self, trace, training):
    bn_x = self.bn1(trace.x, training=training)  # the top bn1: the last group's preact
    return (list(trace.features), list(trace.preacts) + [bn_x],
            L.global_avg_pool(relu(bn_x)))

  def torch_layers(self):
    yield "conv1", self.conv1
    for g, blocks in enumerate(self.groups, start=1):
      for i, block in enumerate(blocks):
        yield from prefixed(f"block{g}.layer.{i}", block.torch_layers())
    yield "bn1", self.bn1
    yield "fc", self.classifier


def _wrn_name(match):
  """'wrn_<d>_<k>' for a valid depth/width (depth = 6n + 4 >= 10, width >= 1), else None."""
  depth, width = int(match.group(1)), int(match.group(2))
  if depth >= 10 and (depth - 4) % 6 == 0 and width >= 1:
    return f"wrn_{depth}_{width}"
  return None


def _wrn_from_name(name, num_classes=100, **kwargs):
  _, depth, width = name.split("_")
  kwargs.setdefault("arch", name)
  return WideResNet(int(depth), int(width), num_classes=num_classes, **kwargs)


register_pattern(r"wrn_(\d+)_(\d+)", _wrn_name, _wrn_from_name,
                 "any wrn_<depth>_<width> with depth = 6n + 4 >= 10, width >= 1")


def _wrn(depth, width):
  def build(num_classes=100, **kwargs):
    return WideResNet(depth, width, num_classes=num_classes, **kwargs)
  return build


wrn_16_1 = register(_wrn(16, 1), name="wrn_16_1")
wrn_16_2 = register(_wrn(16, 2), name="wrn_16_2")
wrn_16_4 = register(_wrn(16, 4), name="wrn_16_4")
wrn_40_1 = register(_wrn(40, 1), name="wrn_40_1")
wrn_40_2 = register(_wrn(40, 2), name="wrn_40_2")
wrn_40_4 = register(_wrn(40, 4), name="wrn_40_4")
