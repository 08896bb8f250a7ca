"""CIFAR ResNets: resnet8 … resnet110, resnet8x4, resnet32x4 (NETS.md §2.1).

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, arXiv:1512.03385,
in the CIFAR form of RepDistiller's ``models/resnet.py`` (Tian et al., ICLR 2020, arXiv:1910.10699).
Depth 6n + 2, BasicBlocks, stages of widths w1, w2, w3 at 32x32, 16x16, 8x8.
Features: stem ReLU output, then each stage's output; preacts: stem, then the last block's sum
before its ReLU; embedding: global average of the last map, [B, w3].
"""
import keras

from nets import layers as L
from nets.base import Block, StagedNet, make_stages, relu
from nets.registry import register


class BasicBlock(Block):
  """conv3x3/s → BN → ReLU → conv3x3 → BN, plus identity or (conv1x1/s → BN); returns (ReLU(sum), sum).

  ``shortcut_name`` is the PyTorch module name of the projection ('downsample' here, 'shortcut' in
  resnetv2's ResNet18). Shapes: [B, H, W, in] -> [B, H/s, W/s, out] twice.
  """

  def __init__(self, in_channels, out_channels, strides=1, synchronized_bn=False,
               shortcut_name="downsample", **kwargs):
    super().__init__(**kwargs)
    init = L.he_normal_fan_out
    self.conv1 = L.conv3x3(out_channels, strides, name="conv1", kernel_initializer=init())
    self.bn1 = L.batch_norm("bn1", synchronized_bn)
    self.conv2 = L.conv3x3(out_channels, 1, name="conv2", kernel_initializer=init())
    self.bn2 = L.batch_norm("bn2", synchronized_bn)
    self.shortcut_name = shortcut_name
    self.projects = strides != 1 or in_channels != out_channels
    if self.projects:
      self.proj_conv = L.conv1x1(out_channels, strides, name=f"{shortcut_name}.0",
                                 kernel_initializer=init())
      self.proj_bn = L.batch_norm(f"{shortcut_name}.1", synchronized_bn)

  def call(self, x, training=None):
    h = relu(self.bn1(self.conv1(x), training=training))
    h = self.bn2(self.conv2(h), training=training)
    r = self.proj_bn(self.proj_conv(x), training=training) if self.projects else x
    pre = h + r
    return relu(pre), pre

  def torch_layers(self):
    yield "conv1", self.conv1
    yield "bn1", self.bn1
    yield "conv2", self.conv2
    yield "bn2", self.bn2
    if self.projects:
      yield f"{self.shortcut_name}.0", self.proj_conv
      yield f"{self.shortcut_name}.1", self.proj_bn


@keras.saving.register_keras_serializable(package="nets")
class CifarResNet(StagedNet):
  """CIFAR ResNet of depth 6n + 2 and widths (w0, w1, w2, w3). Input [B, 32, 32, 3].

  Conv init He-normal fan_out; classifier PyTorch default (NETS.md §1.5).
  """

  def __init__(self, depth, widths=(16, 16, 32, 64), num_classes=100, **kwargs):
    super().__init__(num_classes=num_classes, **kwargs)
    if depth < 8 or (depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
    if len(widths) != 4:
      raise ValueError(f"widths must be (w0, w1, w2, w3), got {widths!r}")
    self.depth, self.widths = int(depth), tuple(int(w) for w in widths)
    n = (self.depth - 2) // 6
    sync = self.synchronized_bn
    self.conv1 = L.conv3x3(self.widths[0], name="conv1", kernel_initializer=L.he_normal_fan_out())
    self.bn1 = L.batch_norm("bn1", sync)

    def block(s, i, in_ch, width, stride):
      return BasicBlock(in_ch, width, stride, sync, name=f"layer{s}.{i}"), width

    specs = [(w, st, n) for w, st in zip(self.widths[1:], (1, 2, 2))]
    self.stages, out_ch = make_stages(self.widths[0], specs, block)
    self.classifier = L.dense(self.num_classes, out_ch, "torch", name="fc")

  def arch_config(self):
    return {"depth": self.depth, "widths": list(self.widths)}


def _cifar_resnet(depth, widths):
  def build(num_classes=100, **kwargs):
    return CifarResNet(depth, widths, num_classes=num_classes, **kwargs)
  return build


_NARROW, _WIDE = (16, 16, 32, 64), (32, 64, 128, 256)
resnet8 = register(_cifar_resnet(8, _NARROW), name="resnet8")
resnet14 = register(_cifar_resnet(14, _NARROW), name="resnet14")
resnet20 = register(_cifar_resnet(20, _NARROW), name="resnet20")
resnet32 = register(_cifar_resnet(32, _NARROW), name="resnet32")
resnet44 = register(_cifar_resnet(44, _NARROW), name="resnet44")
resnet56 = register(_cifar_resnet(56, _NARROW), name="resnet56")
resnet110 = register(_cifar_resnet(110, _NARROW), name="resnet110")
resnet8x4 = register(_cifar_resnet(8, _WIDE), name="resnet8x4")
resnet32x4 = register(_cifar_resnet(32, _WIDE), name="resnet32x4")
