"""kd_tf2.data: tf.data input pipelines for the benchmark (DESIGN.md contract 4).

    ds, info = kd_tf2.data.load("cifar10", "train", fraction=0.25, seed=0, batch_size=64)
    for batch in ds:        # one epoch; iterate again for the next (reshuffled, re-augmented)
      batch["image"]        # float32 [B, H, W, C], normalised with info.mean / info.std
      batch["label"]        # int64 [B]
      batch["index"]        # int64 [B], the sample's position in the full split

Names (``available()``): a tfds image-classification dataset (``cifar10``, ``cifar100``, ...),
``folder:PATH``, the embedded offline ``cifar10_mini`` or ``synthetic[:options]``; see
``kd_tf2.data.sources``. ``fraction`` keeps a class-balanced, seed-determined subset of the training
split (``kd_tf2.data.subset``); the pipeline itself is ``kd_tf2.data.pipeline``.

With a ``tf.distribute`` strategy, either pass ``load(...)[0]`` batched with the global batch size
to ``strategy.experimental_distribute_dataset``, or use
``strategy.distribute_datasets_from_function(dataset_fn(name, split, batch_size=GLOBAL, ...))``.
"""
import dataclasses

import numpy as np

from kd_tf2.checks import is_int
from kd_tf2.data import pipeline, sources, subset
from kd_tf2.data.sources import available, check

__all__ = ["Info", "available", "check", "dataset_fn", "load"]


@dataclasses.dataclass(frozen=True)
class Info:
  """What ``load`` returns beside the dataset.

  class_counts and num_examples describe the streamed samples (after ``fraction``); split_size is
  the size of the full split, the range of ``index`` (e.g. for CRD's memory bank).
  num_batches is the number of batches of one pass (of this input pipeline's shard, if sharded).
  subset_fingerprint is ``subset.fingerprint`` of the streamed samples' indices (before sharding):
  equal for equal (dataset, split, fraction, seed), whatever the batch size or the process.
  """
  name: str
  split: str
  num_classes: int
  class_names: tuple
  class_counts: tuple
  num_examples: int
  split_size: int
  image_shape: tuple
  mean: tuple
  std: tuple
  batch_size: int
  num_batches: int
  augment: bool
  splits: tuple
  subset_fingerprint: str = ""


def load(name, split, *, fraction=1.0, seed=0, batch_size=64, augment=None, data_dir=None,
         shuffle=None, drop_remainder=None, image_size=None, input_context=None,
         pair_by_class=False):
  """Builds the input pipeline of one split; returns ``(tf.data.Dataset, Info)``.

  Args:
    name: dataset name, see ``available()``.
    split: split name (``train``, ``test``, or as the dataset calls them).
    fraction: in (0, 1]; on the ``train`` split keeps, per class, max(1, round(fraction * n_class))
      samples chosen by ``seed`` alone. Other splits are never subsampled.
    seed: int >= 0; fixes the subset, the shuffling and the augmentation.
    batch_size: batch size (the global one when ``input_context`` is given).
    augment, shuffle, drop_remainder: default (None) to True for the ``train`` split and False
      otherwise, so training drops the last partial batch and evaluation sees every sample.
    data_dir: where tfds looks for prepared datasets (tfds' default when None).
    image_size: resize every image to image_size x image_size (shorter side, centre crop);
      required for datasets whose images differ in size. None keeps the native size.
    input_context: a ``tf.distribute.InputContext``: stream this input pipeline's rows of every
      global batch, as batches of the per-replica size. Every pipeline shuffles and draws the
      augmentation alike, so the global batches are those of the unsharded pipeline (same seed).
    pair_by_class: follow every sample by a random sample of its class (CS-KD,
      ``kd_tf2.data.paired``).
  """
  if not is_int(seed) or seed < 0:
    raise ValueError(f"seed={seed!r} is not an int >= 0")
  if not is_int(batch_size) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} is not an int >= 1")
  fraction = subset.check_fraction(fraction)
  training = split == "train"
  augment = training if augment is None else bool(augment)
  shuffle = training if shuffle is None else bool(shuffle)
  drop_remainder = training if drop_remainder is None else bool(drop_remainder)

  data = sources.read(name, split, data_dir, image_size)
  mean, std = sources.normalization(name, data, data_dir, image_size)
  num_classes = len(data.class_names)
  if training:
    indices = subset.balanced_subset(data.labels, data.class_names, fraction, seed)
  else:
    indices = np.arange(len(data.labels), dtype=np.int64)
  counts = tuple(int(c) for c in np.bincount(data.labels[indices], minlength=num_classes))
  num_examples = len(indices)
  digest = subset.fingerprint(indices)

  rows = None
  if input_context is not None:
    share = batch_size // input_context.num_input_pipelines
    first = input_context.input_pipeline_id * share
    rows = (first, first + share, input_context.get_per_replica_batch_size(batch_size))
  if drop_remainder and len(indices) < batch_size:
    raise ValueError(f"batch_size={batch_size} exceeds the {len(indices)} samples of {name!r} "
                     f"{split} (fraction={fraction}), so dropping the remainder leaves no batch")
  num_batches = _count_batches(len(indices), batch_size, drop_remainder, rows)

  ds = pipeline.build(data.tensor, data.labels, indices, batch_size=batch_size, mean=mean,
                      std=std, seed=seed, shuffle=shuffle, augment=augment,
                      drop_remainder=drop_remainder, rows=rows, pair_by_class=pair_by_class)
  batch_size = batch_size if rows is None else rows[2]
  info = Info(name=name, split=split, num_classes=num_classes, class_names=data.class_names,
              class_counts=counts, num_examples=num_examples, split_size=len(data.labels),
              image_shape=tuple(int(d) for d in data.images.shape[1:]), mean=tuple(mean),
              std=tuple(std), batch_size=batch_size, num_batches=num_batches, augment=augment,
              splits=data.splits, subset_fingerprint=digest)
  return ds, info


def _count_batches(n, batch_size, drop_remainder, rows=None):
  """Batches in one pass over ``n`` samples (only ``rows`` of each batch, if given)."""
  sizes = [batch_size] * (n // batch_size)
  if n % batch_size and not drop_remainder:
    sizes.append(n % batch_size)
  if rows is None:
    return len(sizes)
  start, stop, size = rows
  kept = [max(0, min(b, stop) - start) for b in sizes]
  return sum(k // size if drop_remainder else -(-k // size) for k in kept)


def dataset_fn(name, split, **kwargs):
  """``input_context -> tf.data.Dataset`` for ``strategy.distribute_datasets_from_function``.

  kwargs are ``load``'s, with ``batch_size`` the global batch size. Later calls for the same input
  pipeline return the same dataset, so that iterating it again is the next epoch (reshuffled,
  re-augmented) as with ``load``; a dataset built anew would repeat the first epoch's order.
  """
  built = {}

  def make(input_context):
    key = (input_context.input_pipeline_id, input_context.num_input_pipelines)
    if key not in built:
      built[key] = load(name, split, input_context=input_context, **kwargs)[0]
    return built[key]
  return make

