"""The feature contract every net returns with ``features=True`` (DESIGN.md contract 1)."""
from typing import NamedTuple, Tuple

import tensorflow as tf


class Outputs(NamedTuple):
  """What ``model(x, training=..., features=True)`` returns.

  logits:    [B, K]
  features:  tuple of NHWC maps, stem first, one per stage boundary (RepDistiller ``feat[:-1]``)
  preacts:   tuple, same positions and shapes, the pre-activation form (NETS.md §3)
  embedding: [B, D], the pooled vector the classifier reads (RepDistiller ``feat[-1]``)
  """
  logits: tf.Tensor
  features: Tuple[tf.Tensor, ...]
  preacts: Tuple[tf.Tensor, ...]
  embedding: tf.Tensor
