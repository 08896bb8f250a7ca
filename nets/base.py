"""The common base of every zoo net: logits or the full ``Outputs`` contract (DESIGN.md contract 1)."""
import keras
import numpy as np
from keras import ops

from nets.outputs import Outputs


class ZooNet(keras.Model):
  """A CIFAR classifier of the reference zoo (RepDistiller, Tian et al., ICLR 2020, arXiv:1910.10699).

  Subclasses create their layers in ``__init__`` (``self.classifier`` last), implement
  ``forward(x, training) -> (features, preacts, embedding)`` and ``torch_layers()``, which yields
  ``(state_dict module path, keras layer)`` for every weighted layer — the table the weight
  converter walks (NETS.md §4).

  ``model(x, training=...)`` -> logits [B, num_classes];
  ``model(x, training=..., features=True)`` -> ``Outputs(logits, features, preacts, embedding)``.
  """

  def __init__(self, num_classes=100, synchronized_bn=False, arch=None, **kwargs):
    kwargs.setdefault("name", arch)
    super().__init__(**kwargs)
    integer = isinstance(num_classes, (int, np.integer)) and not isinstance(num_classes, bool)
    if not integer or num_classes < 1:
      raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    self.num_classes = int(num_classes)
    self.synchronized_bn = bool(synchronized_bn)
    self.arch = arch or type(self).__name__

  def forward(self, x, training):
    raise NotImplementedError

  def torch_layers(self):
    raise NotImplementedError

  def call(self, inputs, training=None, features=False):
    feats, preacts, embedding = self.forward(inputs, training)
    logits = self.classifier(embedding)
    if not features:
      return logits
    return Outputs(logits, tuple(feats), tuple(preacts), embedding)

  def build(self, input_shape=(None, 32, 32, 3)):
    """Create every variable by tracing the forward pass symbolically (no computation)."""
    self.compute_output_spec(keras.KerasTensor(tuple(input_shape)), training=False)

  def arch_config(self):
    """The family-specific constructor arguments (subclasses extend)."""
    return {}

  def get_config(self):
    return {"name": self.name, "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
            "num_classes": self.num_classes, "synchronized_bn": self.synchronized_bn,
            "arch": self.arch, **self.arch_config()}

  @classmethod
  def from_config(cls, config):
    return cls(**config)


class StagedNet(ZooNet):
  """stem → stages of blocks → head → classifier: the ResNets and ShuffleNets (NETS.md §2).

  Subclasses create ``conv1``/``bn1`` (the stem), ``stages`` (a list of lists of blocks, each
  ``block(x, training) -> (out, pre)`` with a ``torch_layers()`` table and *named by its state_dict
  path*, e.g. ``layer2.0``) and ``classifier`` (named by its path too); they override ``stem``,
  ``stem_layers``, ``stem_pool``, ``head``, ``head_layers`` where they differ.
  Features: the stem output, then each stage's output; preacts: the stem's preact, then each stage's
  last ``pre``; embedding: ``head`` of the last map (global average by default).
  """

  def stem(self, x, training):
    """-> (feature, preact) of the stem: ReLU(bn1(conv1(x))) twice by default."""
    x = relu(self.bn1(self.conv1(x), training=training))
    return x, x

  def stem_pool(self, x):
    """What the first stage reads, from the stem feature (identity; a max pool on ImageNet)."""
    return x

  def stem_layers(self):
    yield "conv1", self.conv1
    yield "bn1", self.bn1

  def head(self, x, training):
    del training
    return ops.mean(x, axis=(1, 2))

  def head_layers(self):
    """(path, layer) of weighted layers between the last stage and the classifier."""
    return ()

  def forward(self, x, training):
    x, pre = self.stem(x, training)
    feats, preacts = [x], [pre]
    x = self.stem_pool(x)
    for blocks in self.stages:
      for block in blocks:
        x, pre = block(x, training=training)
      feats.append(x)
      preacts.append(pre)
    return feats, preacts, self.head(x, training)

  def torch_layers(self):
    yield from self.stem_layers()
    for blocks in self.stages:
      for block in blocks:
        yield from prefixed(block.name, block.torch_layers())
    yield from self.head_layers()
    yield self.classifier.name, self.classifier


def make_stages(in_channels, specs, make_block):
  """Blocks of each stage: specs = [(width, stride, n)]; ``make_block(s, i, in_ch, width, stride)``
  builds block i of stage s (1-based s; only block 0 takes the stride) and returns
  (block, out_channels). Returns (stages, channels after the last stage)."""
  stages = []
  for s, (width, stride, n) in enumerate(specs, start=1):
    blocks = []
    for i in range(n):
      block, in_channels = make_block(s, i, in_channels, width, stride if i == 0 else 1)
      blocks.append(block)
    stages.append(blocks)
  return stages, in_channels


class Block(keras.layers.Layer):
  """A block of a zoo net. Its sub-layers build themselves on first call; this ``build`` only marks
  the block built, which spares Keras a second, symbolic trace of every block while building."""

  def build(self, input_shape):
    del input_shape


def relu(x):
  return ops.relu(x)


def prefixed(prefix, pairs):
  """Prepend ``prefix.`` to the module paths of (path, layer) pairs."""
  for path, layer in pairs:
    yield f"{prefix}.{path}", layer
