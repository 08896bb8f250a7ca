"""VGG with batch norm for CIFAR: vgg8, vgg11, vgg13, vgg16, vgg19 (NETS.md §2.4).

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015, arXiv:1409.1556, in RepDistiller's ``models/vgg.py`` form: five conv blocks (conv with
bias → BN → ReLU, the block's last ReLU applied outside it), 2x2 max pools after blocks 0-2 (and
after block 3 only for 64x64 inputs), global average pool, one linear layer — no hidden FC layers.
Features: ReLU(block b output) before the pool, b = 0..4 (32, 16, 8, 4, 4 pixels at 32x32);
preacts: f0, then the block outputs before their ReLU; embedding: global average, [B, 512].
"""
import keras

from nets import layers as L
from nets.base import Block, Trace, ZooNet, relu
from nets.registry import register

_CFGS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGGBlock(Block):
  """(conv3x3 with bias → BN → ReLU) × n, without the last ReLU. Modules ``{3j}`` conv, ``{3j+1}`` BN.
  Shapes: [B, H, W, in] -> [B, H, W, widths[-1]]."""

  def __init__(self, widths, synchronized_bn=False, **kwargs):
    super().__init__(**kwargs)
    self.convs, self.bns = [], []
    for j, w in enumerate(widths):
      self.convs.append(L.conv3x3(w, name=str(3 * j), use_bias=True,
                                  kernel_initializer=L.he_normal_fan_out(),
                                  bias_initializer="zeros"))
      self.bns.append(L.batch_norm(str(3 * j + 1), synchronized_bn))

  def call(self, x, training=None):
    for j, (conv, bn) in enumerate(zip(self.convs, self.bns)):
      if j:
        x = relu(x)
      x = bn(conv(x), training=training)
    return x

  def torch_layers(self):
    for j, (conv, bn) in enumerate(zip(self.convs, self.bns)):
      yield str(3 * j), conv
      yield str(3 * j + 1), bn


@keras.saving.register_keras_serializable(package="nets")
class VGG(ZooNet):
  """VGG-bn for 32x32 (or 64x64) inputs; ``cfg`` is one of vgg8/11/13/16/19. Conv init He-normal
  fan_out with zero bias; classifier N(0, 0.01) with zero bias (NETS.md §1.5)."""

  def __init__(self, cfg, num_classes=100, **kwargs):
    if cfg not in _CFGS:
      raise ValueError(f"unknown VGG config {cfg!r}; expected one of {sorted(_CFGS)}")
    super().__init__(num_classes=num_classes, **kwargs)
    self.cfg = cfg
    self.blocks = [VGGBlock(widths, self.synchronized_bn, name=f"block{b}")
                   for b, widths in enumerate(_CFGS[cfg])]
    self.classifier = L.dense(self.num_classes, _CFGS[cfg][-1][-1], "normal_0.01",
                              name="classifier")

  def arch_config(self):
    return {"cfg": self.cfg}

  def part_layers(self):
    return [[block] for block in self.blocks]  # block0 is the stem, blocks 1-4 the stages

  def forward_stem(self, x, training):
    f = relu(self.blocks[0](x, training=training))
    return Trace(L.max_pool2x2(f), (f,), (f,))

  def forward_stage(self, i, trace, training):
    """Block i+1, then its pool: after blocks 1, 2 and (only for 64x64 inputs, as the reference)
    block 3. f0 has the input's size (block0 keeps it)."""
    b = i + 1
    pre = self.blocks[b](trace.x, training=training)
    f = relu(pre)
    pool = b < 3 or (b == 3 and trace.features[0].shape[1] == 64)
    return trace.then(L.max_pool2x2(f) if pool else f, (f,), (pre,))

  def forward_head(self, trace, training):
    del training
    return list(trace.features), list(trace.preacts), L.global_avg_pool(trace.x)

  def torch_layers(self):
    for b, block in enumerate(self.blocks):
      for path, layer in block.torch_layers():
        yield f"block{b}.{path}", layer
    yield "classifier", self.classifier


def _vgg(cfg):
  def build(num_classes=100, **kwargs):
    return VGG(cfg, num_classes=num_classes, **kwargs)
  return build


vgg8 = register(_vgg("vgg8"), name="vgg8")
vgg11 = register(_vgg("vgg11"), name="vgg11")
vgg13 = register(_vgg("vgg13"), name="vgg13")
vgg16 = register(_vgg("vgg16"), name="vgg16")
vgg19 = register(_vgg("vgg19"), name="vgg19")
