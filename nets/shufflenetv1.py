"""ShuffleNetV1, 3 groups, for CIFAR (model name ``ShuffleV1``), NETS.md §2.6.

Zhang, Zhou, Lin, Sun, "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile
Devices", CVPR 2018, arXiv:1707.01083, in RepDistiller's ``models/ShuffleNetv1.py`` form, which
differs from the paper in two ways we keep: a 1x1 stem conv without max pool, and a ReLU after the
depthwise BN.
Features: stem ReLU output (32x32x24), then the stage outputs (16x16x240, 8x8x480, 4x4x960);
preacts: stem, then each stage's last unit before its ReLU; embedding: global average, [B, 960].
"""
import keras
from keras import ops

from nets import layers as L
from nets.base import Block, StagedNet, make_stages, relu
from nets.registry import register


class ShuffleUnit(Block):
  """branch = gconv1x1 (in→mid, g1 groups) → BN → ReLU → shuffle(g1) → dw3x3/s → BN → ReLU →
  gconv1x1 (mid→out, g groups) → BN; stride 2: pre = concat[branch, avgpool3x3/2(x)], else
  pre = branch + x; returns (ReLU(pre), pre). mid = out // 4; g1 = 1 on the 24-channel stem output.
  Shapes: [B, H, W, in] -> [B, H/s, W/s, out (+ in if s = 2)]."""

  def __init__(self, in_channels, out_channels, strides, groups, synchronized_bn=False, **kwargs):
    super().__init__(**kwargs)
    mid = out_channels // 4
    self.strides = strides
    self.g1 = 1 if in_channels == 24 else groups
    self.conv1 = L.Conv2D(mid, 1, groups=self.g1, name="conv1")
    self.bn1 = L.batch_norm("bn1", synchronized_bn)
    self.conv2 = L.depthwise3x3(strides, name="conv2")
    self.bn2 = L.batch_norm("bn2", synchronized_bn)
    self.conv3 = L.Conv2D(out_channels, 1, groups=groups, name="conv3")
    self.bn3 = L.batch_norm("bn3", synchronized_bn)

  def call(self, x, training=None):
    h = relu(self.bn1(self.conv1(x), training=training))
    h = L.channel_shuffle(h, self.g1)
    h = relu(self.bn2(self.conv2(h), training=training))
    h = self.bn3(self.conv3(h), training=training)
    if self.strides == 2:
      pre = ops.concatenate([h, L.avg_pool3x3_s2_pad1(x)], axis=-1)
    else:
      pre = h + x
    return relu(pre), pre

  def torch_layers(self):
    for i in (1, 2, 3):
      yield f"conv{i}", getattr(self, f"conv{i}")
      yield f"bn{i}", getattr(self, f"bn{i}")


@keras.saving.register_keras_serializable(package="nets")
class ShuffleNetV1(StagedNet):
  """ShuffleNetV1 with stage widths ``out_planes``, ``num_blocks`` units per stage and ``groups``
  groups, for 32x32 inputs. Init: PyTorch defaults everywhere (NETS.md §1.5)."""

  def __init__(self, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups=3,
               num_classes=100, **kwargs):
    super().__init__(num_classes=num_classes, **kwargs)
    self.out_planes = tuple(int(c) for c in out_planes)
    self.num_blocks = tuple(int(n) for n in num_blocks)
    self.groups = int(groups)
    sync = self.synchronized_bn
    self.conv1 = L.conv1x1(24, name="conv1")
    self.bn1 = L.batch_norm("bn1", sync)

    def unit(s, u, in_ch, width, stride):
      branch = width - in_ch if u == 0 else width  # unit 0 concatenates its input
      return ShuffleUnit(in_ch, branch, stride, self.groups, sync,
                         name=f"layer{s}.{u}"), width

    specs = [(w, 2, n) for w, n in zip(self.out_planes, self.num_blocks)]
    self.stages, out_ch = make_stages(24, specs, unit)
    self.classifier = L.dense(self.num_classes, out_ch, "torch", name="linear")

  def arch_config(self):
    return {"out_planes": list(self.out_planes), "num_blocks": list(self.num_blocks),
            "groups": self.groups}


@register
def ShuffleV1(num_classes=100, **kwargs):  # pylint: disable=invalid-name
  return ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes=num_classes, **kwargs)
