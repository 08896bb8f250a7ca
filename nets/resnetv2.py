"""ResNet18 and ResNet50 with a CIFAR stem (NETS.md §2.2), RepDistiller's ``models/resnetv2.py``.

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, arXiv:1512.03385.
Stem conv3x3 (3→64) → BN → ReLU at 32x32 (no max pool); four stages at 32, 16, 8, 4 pixels;
ResNet50 uses the "v1.5" bottleneck (stride on the 3x3 conv), ResNet18 the BasicBlock.
Features: stem ReLU output, then each stage's output; preacts: stem, then each stage's last block's
sum before ReLU; embedding: global average of the last map, [B, 2048] (ResNet50) or [B, 512].
"""
import keras

from nets import layers as L
from nets.base import Block, StagedNet, make_stages, relu
from nets.registry import register
from nets.resnet import BasicBlock


class Bottleneck(Block):
  """conv1x1 (in→p) → BN → ReLU → conv3x3/s (p→p) → BN → ReLU → conv1x1 (p→4p) → BN, plus identity or
  projection conv1x1/s → BN (``{shortcut_name}.0/1``: 'shortcut' here, 'downsample' in torchvision);
  returns (ReLU(sum), sum).
  Shapes: [B, H, W, in] -> [B, H/s, W/s, 4p] twice."""

  expansion = 4

  def __init__(self, in_channels, planes, strides=1, synchronized_bn=False,
               shortcut_name="shortcut", **kwargs):
    super().__init__(**kwargs)
    init = L.he_normal_fan_out
    out_channels = self.expansion * planes
    self.conv1 = L.conv1x1(planes, name="conv1", kernel_initializer=init())
    self.bn1 = L.batch_norm("bn1", synchronized_bn)
    self.conv2 = L.conv3x3(planes, strides, name="conv2", kernel_initializer=init())
    self.bn2 = L.batch_norm("bn2", synchronized_bn)
    self.conv3 = L.conv1x1(out_channels, name="conv3", kernel_initializer=init())
    self.bn3 = L.batch_norm("bn3", synchronized_bn)
    self.projects = strides != 1 or in_channels != out_channels
    if self.projects:
      self.proj_conv = L.conv1x1(out_channels, strides, name=f"{shortcut_name}.0",
                                 kernel_initializer=init())
      self.proj_bn = L.batch_norm(f"{shortcut_name}.1", synchronized_bn)
    self.shortcut_name = shortcut_name

  def call(self, x, training=None):
    h = relu(self.bn1(self.conv1(x), training=training))
    h = relu(self.bn2(self.conv2(h), training=training))
    h = self.bn3(self.conv3(h), training=training)
    r = self.proj_bn(self.proj_conv(x), training=training) if self.projects else x
    pre = h + r
    return relu(pre), pre

  def torch_layers(self):
    for i in (1, 2, 3):
      yield f"conv{i}", getattr(self, f"conv{i}")
      yield f"bn{i}", getattr(self, f"bn{i}")
    if self.projects:
      yield f"{self.shortcut_name}.0", self.proj_conv
      yield f"{self.shortcut_name}.1", self.proj_bn


_BLOCKS = ("basic", "bottleneck")


@keras.saving.register_keras_serializable(package="nets")
class ResNetV2(StagedNet):
  """CIFAR-stem ResNet with four stages of ``num_blocks`` blocks, planes 64/128/256/512, strides
  1/2/2/2. Conv init He-normal fan_out; classifier PyTorch default (NETS.md §1.5)."""

  projection_name, classifier_name = "shortcut", "linear"  # state_dict module names

  def stem_conv(self):
    return L.conv3x3(64, name="conv1", kernel_initializer=L.he_normal_fan_out())

  def __init__(self, block, num_blocks, num_classes=100, **kwargs):
    super().__init__(num_classes=num_classes, **kwargs)
    if block not in _BLOCKS:
      raise ValueError(f"unknown block {block!r}; expected one of {_BLOCKS}")
    if len(num_blocks) != 4 or min(num_blocks) < 1:
      raise ValueError(f"num_blocks must be four positive counts, got {num_blocks!r}")
    self.block, self.num_blocks = block, tuple(int(n) for n in num_blocks)
    self.conv1 = self.stem_conv()
    self.bn1 = L.batch_norm("bn1", self.synchronized_bn)
    specs = list(zip((64, 128, 256, 512), (1, 2, 2, 2), self.num_blocks))
    self.stages, out_ch = make_stages(64, specs, resnet_block(block, self.projection_name,
                                                              self.synchronized_bn))
    self.classifier = L.dense(self.num_classes, out_ch, "torch", name=self.classifier_name)

  def arch_config(self):
    return {"block": self.block, "num_blocks": list(self.num_blocks)}


def resnet_block(block, shortcut_name, synchronized_bn):
  """``make_stages`` block factory: 'basic' (BasicBlock) or 'bottleneck' (Bottleneck, expansion 4),
  with the projection named ``shortcut_name``."""
  def make(s, i, in_ch, planes, stride):
    name = f"layer{s}.{i}"
    if block == "bottleneck":
      return (Bottleneck(in_ch, planes, stride, synchronized_bn, shortcut_name=shortcut_name,
                         name=name), planes * Bottleneck.expansion)
    return (BasicBlock(in_ch, planes, stride, synchronized_bn, shortcut_name=shortcut_name,
                       name=name), planes)
  return make


@register
def ResNet50(num_classes=100, **kwargs):  # pylint: disable=invalid-name
  return ResNetV2("bottleneck", (3, 4, 6, 3), num_classes=num_classes, **kwargs)


@register
def ResNet18(num_classes=100, **kwargs):  # pylint: disable=invalid-name
  return ResNetV2("basic", (2, 2, 2, 2), num_classes=num_classes, **kwargs)
