"""The common base of every zoo net: logits or the full ``Outputs`` contract (DESIGN.md contract 1).

Every zoo net runs as stem -> stages -> head (the staged-forward protocol, ``ZooNet.forward_*``);
``nets.branched`` splits any net after any stage with it, so the per-family rules for features and
preacts live only in the families.
"""
from typing import Any, NamedTuple, Tuple

import keras
import numpy as np
from keras import ops

from nets.outputs import Outputs


class Trace(NamedTuple):
  """The forward pass at a stage boundary. x: the map the next stage (or the head) reads,
  [B, h, w, c];
  features / preacts: the tensors of contract 1 so far. A family may append a preact one stage late
  (WRN's is the next BN, which the next stage or the head owns)."""
  x: Any
  features: Tuple[Any, ...]
  preacts: Tuple[Any, ...]

  def then(self, x, features=(), preacts=()):
    """The trace after a stage: its output map ``x`` and the features/preacts it appends."""
    return Trace(x, self.features + tuple(features), self.preacts + tuple(preacts))


class ZooNet(keras.Model):
  """A CIFAR classifier of the reference zoo (RepDistiller, Tian et al., ICLR 2020, arXiv:1910.10699).

  Subclasses create their layers in ``__init__`` (``self.classifier`` last) and implement
  ``torch_layers()``, which yields ``(state_dict module path, keras layer)`` for every weighted
  layer — the table the weight converter walks (NETS.md §4) — and the staged-forward protocol:

  - ``part_layers()``: [stem layers, stage 1 layers, ..., stage n layers] (head and classifier
    excluded); n = ``num_stages`` = len(features) - 1;
  - ``forward_stem(x, training) -> Trace``; ``forward_stage(i, trace, training) -> Trace``
    (i = 0..n-1); ``forward_head(trace, training) -> (features, preacts, embedding)``.

  ``forward`` chains them; ``nets.branched`` chains them across several nets.
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

  def part_layers(self):
    raise NotImplementedError

  @property
  def num_stages(self):
    return len(self.part_layers()) - 1

  def forward_stem(self, x, training):
    raise NotImplementedError

  def forward_stage(self, i, trace, training):
    raise NotImplementedError

  def forward_head(self, trace, training):
    raise NotImplementedError

  def forward(self, x, training):
    """-> (features, preacts, embedding): stem, every stage, head."""
    trace = self.forward_stem(x, training)
    for i in range(self.num_stages):
      trace = self.forward_stage(i, trace, training)
    return self.forward_head(trace, training)

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

  def part_layers(self):
    return [[layer for _, layer in self.stem_layers()]] + [list(blocks) for blocks in self.stages]

  def forward_stem(self, x, training):
    x, pre = self.stem(x, training)
    return Trace(self.stem_pool(x), (x,), (pre,))

  def forward_stage(self, i, trace, training):
    x = trace.x
    for block in self.stages[i]:
      x, pre = block(x, training=training)
    return trace.then(x, (x,), (pre,))

  def forward_head(self, trace, training):
    return list(trace.features), list(trace.preacts), self.head(trace.x, training)

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
