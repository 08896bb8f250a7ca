"""ImageNet nets: resnet18/34/50_imagenet (torchvision's ResNets) and mobilenetv1_imagenet.

ResNets: He, Zhang, Ren, Sun, CVPR 2016, arXiv:1512.03385, layer for layer as torchvision's
``resnet18/34/50`` (the "v1.5" bottleneck: stride on the 3x3 conv), so torchvision state dicts load
by key name. Stem conv7x7/2 (pad 3) → BN → ReLU → maxpool3x3/2 (pad 1); stages of BasicBlocks or
Bottlenecks at 1/4, 1/8, 1/16, 1/32 of the input with projections ``downsample.0/1``; global
average pool; ``fc``.
MobileNetV1: Howard et al., arXiv:1704.04861, in the form of the CRD / mdistiller ImageNet
experiments (``mdistiller/models/imagenet/mobilenetv1.py``): ``model.0`` conv3x3/2 (3→32) → BN →
ReLU, then 13 depthwise-separable units ``model.1`` … ``model.13`` (dw3x3/s → BN → ReLU → conv1x1 →
BN → ReLU), global average pool, ``fc``.

Feature contract (DESIGN.md contract 1), following mdistiller's ImageNet nets:
- ResNets: features = ReLU(bn1) *before* the max pool (H/2 x W/2 x 64), then each stage's output;
  preacts = bn1's output, then each stage's last block sum before its ReLU; embedding [B, 512·e].
- MobileNetV1: features = the output of ``model.1`` (H/2 x W/2 x 64, our choice: mdistiller exposes
  no stem), then of ``model.3``, ``model.5``, ``model.11``, ``model.13`` (mdistiller's four);
  preacts = the same tensors before their last ReLU; embedding [B, 1024].
Padding is PyTorch's, symmetric (nets/layers.py), also for the max pool.
"""
import keras
from keras import ops

from nets import layers as L
from nets.base import Block, StagedNet, prefixed, relu
from nets.registry import register
from nets.resnetv2 import ResNetV2


def max_pool3x3_s2_pad1(x):
  """PyTorch ``MaxPool2d(3, stride=2, padding=1)``: -inf padding on every side, then 3x3/2 windows.
  [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C] (Keras 'same' would shift the windows on even maps)."""
  x = ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=float("-inf"))
  return ops.max_pool(x, 3, strides=2, padding="valid")


@keras.saving.register_keras_serializable(package="nets")
class ImageNetResNet(ResNetV2):
  """torchvision's ResNet: ``ResNetV2`` (blocks 'basic' | 'bottleneck', four stages of
  ``num_blocks``, planes 64/128/256/512, strides 1/2/2/2) with the ImageNet stem, projections named
  ``downsample`` and the classifier ``fc``. Input [B, H, W, 3], any H, W. Init as torchvision: conv
  He-normal fan_out, BN 1/0, fc PyTorch default (no zero-init residual)."""

  projection_name, classifier_name = "downsample", "fc"

  def stem_conv(self):
    return L.Conv2D(64, 7, strides=2, pad=3, name="conv1", kernel_initializer=L.he_normal_fan_out())

  def build(self, input_shape=(None, 224, 224, 3)):
    super().build(input_shape)

  def stem(self, x, training):
    pre = self.bn1(self.conv1(x), training=training)
    return relu(pre), pre

  def stem_pool(self, x):
    return max_pool3x3_s2_pad1(x)


class ConvBN(Block):
  """conv3x3/s (pad 1) → BN (modules ``0``, ``1``); returns (ReLU(bn), bn).
  ``depthwise=True``: mdistiller's ``conv_dw`` unit, dw3x3/s → BN → ReLU → conv1x1 (→ ``out``) → BN
  (modules ``0``, ``1``, ``3``, ``4``). Shapes: [B, H, W, in] -> [B, H/s, W/s, out] twice."""

  def __init__(self, out_channels, strides, depthwise, synchronized_bn=False, **kwargs):
    super().__init__(**kwargs)
    self.depthwise = depthwise
    if depthwise:
      self.conv_dw = L.depthwise3x3(strides, name="0")
      self.bn_dw = L.batch_norm("1", synchronized_bn)
      self.conv = L.conv1x1(out_channels, name="3")
      self.bn = L.batch_norm("4", synchronized_bn)
    else:
      self.conv = L.conv3x3(out_channels, strides, name="0")
      self.bn = L.batch_norm("1", synchronized_bn)

  def call(self, x, training=None):
    if self.depthwise:
      x = relu(self.bn_dw(self.conv_dw(x), training=training))
    pre = self.bn(self.conv(x), training=training)
    return relu(pre), pre

  def torch_layers(self):
    if self.depthwise:
      yield "0", self.conv_dw
      yield "1", self.bn_dw
      yield "3", self.conv
      yield "4", self.bn
    else:
      yield "0", self.conv
      yield "1", self.bn


# (width, stride) of model.2 … model.13, grouped into the four stages mdistiller reads.
_MOBILENET_STAGES = (((128, 2), (128, 1)), ((256, 2), (256, 1)),
                     ((512, 2),) + ((512, 1),) * 5, ((1024, 2), (1024, 1)))


@keras.saving.register_keras_serializable(package="nets")
class MobileNetV1(StagedNet):
  """MobileNetV1 (width 1.0) as mdistiller's ImageNet model; stem = ``model.0`` and ``model.1``.
  Input [B, H, W, 3]; global average pool (mdistiller's AvgPool2d(7) is that at 224 px).
  Init: PyTorch defaults (mdistiller does not re-initialise)."""

  def __init__(self, num_classes=1000, **kwargs):
    super().__init__(num_classes=num_classes, **kwargs)
    sync = self.synchronized_bn
    self.stem_units = [ConvBN(32, 2, False, sync, name="model.0"),
                       ConvBN(64, 1, True, sync, name="model.1")]
    self.stages, k = [], 2
    for widths in _MOBILENET_STAGES:
      self.stages.append([ConvBN(w, s, True, sync, name=f"model.{k + j}")
                          for j, (w, s) in enumerate(widths)])
      k += len(widths)
    self.classifier = L.dense(self.num_classes, 1024, "torch", name="fc")

  def build(self, input_shape=(None, 224, 224, 3)):
    super().build(input_shape)

  def stem(self, x, training):
    x, _ = self.stem_units[0](x, training=training)
    return self.stem_units[1](x, training=training)

  def stem_layers(self):
    for unit in self.stem_units:
      yield from prefixed(unit.name, unit.torch_layers())


def _resnet(block, num_blocks):
  def build(num_classes=100, **kwargs):
    return ImageNetResNet(block, num_blocks, num_classes=num_classes, **kwargs)
  return build


resnet18_imagenet = register(_resnet("basic", (2, 2, 2, 2)), name="resnet18_imagenet")
resnet34_imagenet = register(_resnet("basic", (3, 4, 6, 3)), name="resnet34_imagenet")
resnet50_imagenet = register(_resnet("bottleneck", (3, 4, 6, 3)), name="resnet50_imagenet")


@register(name="mobilenetv1_imagenet")
def mobilenetv1_imagenet(num_classes=100, **kwargs):
  return MobileNetV1(num_classes=num_classes, **kwargs)
