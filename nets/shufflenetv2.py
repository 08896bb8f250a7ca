"""ShuffleNetV2 1.0x for CIFAR (model name ``ShuffleV2``), NETS.md §2.7.

Ma, Zhang, Zheng, Sun, "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture
Design", ECCV 2018, arXiv:1807.11164, in RepDistiller's ``models/ShuffleNetv2.py`` form (1x1 stem
conv, no max pool).
Features: stem ReLU output (32x32x24), then the stage outputs (16x16x116, 8x8x232, 4x4x464, channel-
shuffled); preacts: stem, then the last unit's concat[kept half, branch before ReLU] — *not*
shuffled, so ReLU(preact) is a channel permutation of the feature; embedding: global average of
ReLU(BN(conv1x1 464→1024 (f3))), [B, 1024].
"""
import keras
from keras import ops

from nets import layers as L
from nets.base import Block, StagedNet, make_stages, relu
from nets.registry import register


class DownUnit(Block):
  """Two stride-2 branches on x, mid = out // 2:
  left  = dw3x3/2 → BN → conv1x1 (in→mid) → BN → ReLU            (conv1/bn1, conv2/bn2)
  right = conv1x1 (in→mid) → BN → ReLU → dw3x3/2 → BN → conv1x1 → BN → ReLU (conv3..5/bn3..5)
  out = shuffle2(concat[left, right]). Shapes: [B, H, W, in] -> [B, H/2, W/2, out]."""

  def __init__(self, in_channels, out_channels, synchronized_bn=False, **kwargs):
    super().__init__(**kwargs)
    mid = out_channels // 2
    self.conv1 = L.depthwise3x3(2, name="conv1")
    self.conv2 = L.conv1x1(mid, name="conv2")
    self.conv3 = L.conv1x1(mid, name="conv3")
    self.conv4 = L.depthwise3x3(2, name="conv4")
    self.conv5 = L.conv1x1(mid, name="conv5")
    for i in range(1, 6):
      setattr(self, f"bn{i}", L.batch_norm(f"bn{i}", synchronized_bn))

  def call(self, x, training=None):
    left = self.bn1(self.conv1(x), training=training)
    left = relu(self.bn2(self.conv2(left), training=training))
    right = relu(self.bn3(self.conv3(x), training=training))
    right = self.bn4(self.conv4(right), training=training)
    right = relu(self.bn5(self.conv5(right), training=training))
    out = L.channel_shuffle(ops.concatenate([left, right], axis=-1), 2)
    return out, out

  def torch_layers(self):
    for i in range(1, 6):
      yield f"conv{i}", getattr(self, f"conv{i}")
      yield f"bn{i}", getattr(self, f"bn{i}")


class SplitUnit(Block):
  """Keep the first half x1, transform the second x2: conv1x1 → BN → ReLU → dw3x3 → BN → conv1x1 →
  BN = b_pre; out = shuffle2(concat[x1, ReLU(b_pre)]); returns (out, concat[x1, b_pre]).
  Shapes: [B, H, W, C] -> [B, H, W, C] twice."""

  def __init__(self, channels, synchronized_bn=False, **kwargs):
    super().__init__(**kwargs)
    self.half = channels // 2
    self.conv1 = L.conv1x1(self.half, name="conv1")
    self.bn1 = L.batch_norm("bn1", synchronized_bn)
    self.conv2 = L.depthwise3x3(1, name="conv2")
    self.bn2 = L.batch_norm("bn2", synchronized_bn)
    self.conv3 = L.conv1x1(self.half, name="conv3")
    self.bn3 = L.batch_norm("bn3", synchronized_bn)

  def call(self, x, training=None):
    x1, x2 = x[..., :self.half], x[..., self.half:]
    h = relu(self.bn1(self.conv1(x2), training=training))
    h = self.bn2(self.conv2(h), training=training)
    b_pre = self.bn3(self.conv3(h), training=training)
    out = L.channel_shuffle(ops.concatenate([x1, relu(b_pre)], axis=-1), 2)
    return out, ops.concatenate([x1, b_pre], axis=-1)

  def torch_layers(self):
    for i in (1, 2, 3):
      yield f"conv{i}", getattr(self, f"conv{i}")
      yield f"bn{i}", getattr(self, f"bn{i}")


@keras.saving.register_keras_serializable(package="nets")
class ShuffleNetV2(StagedNet):
  """ShuffleNetV2 with stage widths ``out_channels[:3]``, head width ``out_channels[3]`` and
  ``num_blocks`` split units after each stage's down unit, for 32x32 inputs.
  Init: PyTorch defaults everywhere (NETS.md §1.5)."""

  def __init__(self, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3), num_classes=100,
               **kwargs):
    super().__init__(num_classes=num_classes, **kwargs)
    self.out_channels = tuple(int(c) for c in out_channels)
    self.num_blocks = tuple(int(n) for n in num_blocks)
    sync = self.synchronized_bn
    self.conv1 = L.conv1x1(24, name="conv1")
    self.bn1 = L.batch_norm("bn1", sync)

    def unit(s, u, in_ch, width, stride):
      del stride
      if u == 0:
        return DownUnit(in_ch, width, sync, name=f"layer{s}.0"), width
      return SplitUnit(width, sync, name=f"layer{s}.{u}"), width

    specs = [(w, 2, n + 1) for w, n in zip(self.out_channels[:3], self.num_blocks)]
    self.stages, _ = make_stages(24, specs, unit)
    self.conv2 = L.conv1x1(self.out_channels[3], name="conv2")
    self.bn2 = L.batch_norm("bn2", sync)
    self.classifier = L.dense(self.num_classes, self.out_channels[3], "torch", name="linear")

  def arch_config(self):
    return {"out_channels": list(self.out_channels), "num_blocks": list(self.num_blocks)}

  def head(self, x, training):
    return L.global_avg_pool(relu(self.bn2(self.conv2(x), training=training)))

  def head_layers(self):
    yield "conv2", self.conv2
    yield "bn2", self.bn2


@register
def ShuffleV2(num_classes=100, **kwargs):  # pylint: disable=invalid-name
  return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes=num_classes, **kwargs)
