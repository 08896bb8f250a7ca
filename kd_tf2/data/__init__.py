"""kd_tf2.data: tf.data input pipelines for the benchmark (DESIGN.md contract 4).

    ds, info = kd_tf2.data.load("cifar10", "train", fraction=0.25, seed=0, batch_size=64)
    for batch in ds:        # one epoch; iterate again for the next (reshuffled, re-augmented)
      batch["image"]        # float32 [B, H, W, C], normalised with info.mean / info.std
      batch["label"]        # int64 [B]
      batch["index"]        # int64 [B], the sample's position in the full split
      batch["views"]        # with views=K > 1: float32 [B, K, H, W, C], K augmentations of each
                            # sample (KDCL); batch["image"] is view 0

Names (``available()``): a tfds image-classification dataset (``cifar10``, ``cifar100``,
``imagenet2012``, ...), ``folder:PATH``, ``tfrecord:PATTERN``, the embedded offline
``cifar10_mini`` or ``synthetic[:options]``; see ``kd_tf2.data.sources``. Splits are *listed*
(labels, and where each image is) without decoding; ``fraction`` keeps a class-balanced,
seed-determined subset of the training split chosen from the labels alone
(``kd_tf2.data.subset``), so a 1% subset decodes 1% of the images. The pipeline
(``kd_tf2.data.pipeline``) decodes and augments in its parallel map; small splits are decoded once
into memory instead (``cache``).

With a ``tf.distribute`` strategy, either pass ``load(...)[0]`` batched with the global batch size
to ``strategy.experimental_distribute_dataset``, or use
``strategy.distribute_datasets_from_function(dataset_fn(name, split, batch_size=GLOBAL, ...))``.
"""
import dataclasses

import numpy as np

from kd_tf2.checks import is_int
from kd_tf2.data import pipeline, sources, subset, transforms
from kd_tf2.data.sources import available, check

__all__ = ["AUGMENTS", "CACHES", "Info", "available", "check", "dataset_fn", "load",
           "subset_labels"]

AUGMENTS = ("auto", "imagenet", "cifar", "none")
CACHES = ("auto", "memory", "none")
CACHE_BUDGET = 1 << 30   # cache=auto keeps a split decoded in memory up to this many bytes


@dataclasses.dataclass(frozen=True)
class Info:
  """What ``load`` returns beside the dataset.

  class_counts and num_examples describe the streamed samples (after ``fraction``); split_size is
  the size of the full split, the range of ``index`` (e.g. for CRD's memory bank).
  num_batches is the number of batches of one pass (of this input pipeline's shard, if sharded).
  subset_fingerprint is ``subset.fingerprint`` of the streamed samples' indices (before sharding):
  equal for equal (dataset, split, fraction, seed), whatever the batch size or the process.
  style: the augmentation style (``cifar`` or ``imagenet``, also deciding the evaluation
  transform); augment: whether training augmentation is applied; cache: ``memory`` (decoded once)
  or ``none`` (decoded as streamed); stats: where mean/std come from; views: augmented views per
  sample (``views`` entry when > 1).
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
  style: str = "cifar"
  cache: str = "memory"
  stats: str = "computed"
  views: int = 1


def _check_augment(augment):
  """(style or "auto", augment flag or None) of ``augment``: None/bool or one of AUGMENTS."""
  if augment is None or isinstance(augment, (bool, np.bool_)):
    return "auto", None if augment is None else bool(augment)
  if isinstance(augment, str) and augment.lower() in AUGMENTS:
    augment = augment.lower()
    return ("auto" if augment in ("auto", "none") else augment), (False if augment == "none"
                                                                    else None)
  raise ValueError(f"augment={augment!r} not accepted; accepted: {', '.join(AUGMENTS)} (or "
                   "True/False/None)")


def check_image_size(image_size):
  """``image_size`` if None or an int >= 1, else ValueError."""
  if image_size is not None and (not is_int(image_size) or image_size < 1):
    raise ValueError(f"image_size={image_size!r} is not accepted; accepted: a positive int "
                     "(pixels per side), or None for the native size")
  return image_size


def check_views(views):
  """``views`` if an int >= 1, else ValueError."""
  if not is_int(views) or views < 1:
    raise ValueError(f"views={views!r} is not accepted; accepted: an int >= 1 (augmented views "
                     "of each sample)")
  return int(views)


def check_cache(cache):
  if not isinstance(cache, str) or cache.lower() not in CACHES:
    raise ValueError(f"cache={cache!r} not accepted; accepted: {', '.join(CACHES)}")
  return cache.lower()


def load(name, split, *, fraction=1.0, seed=0, batch_size=64, augment=None, data_dir=None,
         shuffle=None, drop_remainder=None, image_size=None, input_context=None, cache="auto",
         style=None, pair_by_class=False, views=1):
  """Builds the input pipeline of one split; returns ``(tf.data.Dataset, Info)``.

  Args:
    name: dataset name, see ``available()``.
    split: split name (``train``, ``test``, or as the dataset calls them).
    fraction: in (0, 1]; on the ``train`` split keeps, per class, max(1, round(fraction * n_class))
      samples chosen by ``seed`` alone. Other splits are never subsampled.
    seed: int >= 0; fixes the subset, the shuffling and the augmentation.
    batch_size: batch size (the global one when ``input_context`` is given).
    augment: None (training augmentation on the ``train`` split only), True/False, or a style:
      ``auto`` (``imagenet`` for images of 64 px and more, else ``cifar``), ``imagenet``,
      ``cifar`` (training augmentation on ``train``), ``none`` (none, auto evaluation transform).
      The style also picks the evaluation transform (``kd_tf2.data.transforms``).
    shuffle, drop_remainder: default (None) to True for the ``train`` split and False otherwise,
      so training drops the last partial batch and evaluation sees every sample.
    data_dir: where tfds looks for prepared datasets (tfds' default when None).
    image_size: output images are image_size x image_size (``cifar`` style: shorter side resized to
      it and centre-cropped, for images of another size; ``imagenet`` style: its crops). Required
      for datasets whose images differ in size. None keeps the native size.
    input_context: a ``tf.distribute.InputContext``: stream this input pipeline's rows of every
      global batch, as batches of the per-replica size. Every pipeline shuffles and draws the
      augmentation alike, so the global batches are those of the unsharded pipeline (same seed);
      each decodes only the images of its rows.
    cache: ``memory`` decodes the streamed samples once into memory; ``none`` decodes them as they
      are streamed, every epoch; ``auto``: memory for ``cifar``-style splits whose decoded
      samples take at most CACHE_BUDGET bytes, unless sharded by ``input_context``. synthetic and
      cifar10_mini are always in memory.
    style: ``auto``, ``imagenet`` or ``cifar`` overrides the style named by ``augment`` (e.g.
      ``augment=False, style="imagenet"``: the ImageNet evaluation transform on any split).
    pair_by_class: follow every sample by a random sample of its class (CS-KD,
      ``kd_tf2.data.paired``).
    views: K >= 1; K > 1 adds ``views``, float32 [B, K, H, W, C]: K independent augmentations of
      each sample's image (the same rule and normalisation as ``image``, which is view 0; copies
      when not augmenting), for methods that feed each net its own view (KDCL). Same seed, same
      views; sharding, cache modes and streaming sources as for ``image``.
  """
  if not is_int(seed) or seed < 0:
    raise ValueError(f"seed={seed!r} is not an int >= 0")
  if not is_int(batch_size) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} is not an int >= 1")
  fraction = subset.check_fraction(fraction)
  style_of_augment, augment = _check_augment(augment)
  if style is None:
    style = style_of_augment
  elif not isinstance(style, str) or style.lower() not in ("auto",) + transforms.STYLES:
    raise ValueError(f"style={style!r} not accepted; accepted: auto, "
                     f"{', '.join(transforms.STYLES)}")
  style = style.lower()
  image_size = check_image_size(image_size)
  cache = check_cache(cache)
  views = check_views(views)
  training = split == "train"
  augment = training if augment is None else augment
  shuffle = training if shuffle is None else bool(shuffle)
  drop_remainder = training if drop_remainder is None else bool(drop_remainder)

  data = sources.listing(name, split, data_dir)
  (mean, std), stats = sources.normalization(name, data, data_dir)
  num_classes = len(data.class_names)
  if training:
    indices = subset.balanced_subset(data.labels, data.class_names, fraction, seed)
  else:
    indices = np.arange(len(data.labels), dtype=np.int64)
  counts = tuple(int(c) for c in np.bincount(data.labels[indices], minlength=num_classes))
  num_examples = len(indices)
  digest = subset.fingerprint(indices)

  if image_size is not None:
    size = (image_size, image_size)
  elif data.image_shape is not None:
    size = data.image_shape[:2]
  else:
    raise ValueError(f"images of {data.what} differ in size; pass image_size=S to resize them "
                     "(shorter side to S, centre crop S x S)")
  if style == "auto":
    style = transforms.style_for(min(size))
  if style == "imagenet":
    size = (min(size),) * 2

  rows = None
  if input_context is not None:
    share = batch_size // input_context.num_input_pipelines
    first = input_context.input_pipeline_id * share
    rows = (first, first + share, input_context.get_per_replica_batch_size(batch_size))
  if drop_remainder and len(indices) < batch_size:
    raise ValueError(f"batch_size={batch_size} exceeds the {len(indices)} samples of {name!r} "
                     f"{split} (fraction={fraction}), so dropping the remainder leaves no batch")
  num_batches = _count_batches(len(indices), batch_size, drop_remainder, rows)

  source, image_rows, cache = _source(data, name, split, data_dir, indices, size, style, cache,
                                      sharded=input_context is not None)
  ds = pipeline.build(source, indices, batch_size=batch_size, mean=mean, std=std, seed=seed,
                      shuffle=shuffle, augment=augment, drop_remainder=drop_remainder,
                      style=style, size=size, rows=rows, image_rows=image_rows,
                      pair_by_class=pair_by_class, views=views)
  batch_size = batch_size if rows is None else rows[2]
  info = Info(name=name, split=split, num_classes=num_classes, class_names=data.class_names,
              class_counts=counts, num_examples=num_examples, split_size=len(data.labels),
              image_shape=tuple(size) + (data.channels,), mean=tuple(mean), std=tuple(std),
              batch_size=batch_size, num_batches=num_batches, augment=augment,
              splits=data.splits, subset_fingerprint=digest, style=style, cache=cache,
              stats=stats, views=views)
  return ds, info


def subset_labels(name, split="train", *, fraction=1.0, seed=0, data_dir=None):
  """int64 [split_size]: the label of every index of ``split``, -1 outside the ``fraction``
  subset that ``load`` streams for the same (name, split, fraction, seed). Decodes no image."""
  data = sources.listing(name, split, data_dir)
  labels = np.full([len(data.labels)], -1, np.int64)
  if split == "train":
    indices = subset.balanced_subset(data.labels, data.class_names, fraction, seed)
  else:
    indices = np.arange(len(data.labels), dtype=np.int64)
  labels[indices] = data.labels[indices]
  return labels


def _source(data, name, split, data_dir, indices, size, style, cache, sharded):
  """(listing the pipeline reads, the memory row of each streamed sample or None, cache mode)."""
  if data.kind == "memory":
    if style == "cifar" and data.image_shape[:2] != tuple(size):
      if size[0] == size[1]:
        data = sources.read(name, split, data_dir, size[0])  # resized once, kept
    return data, None, "memory"
  if cache == "auto":
    decoded = len(indices) * size[0] * size[1] * data.channels
    cache = "memory" if style == "cifar" and decoded <= CACHE_BUDGET and not sharded else "none"
  if cache == "none":
    return data, None, "none"
  if style == "cifar":
    cached = _cached(data, indices.tobytes(), tuple(size))
  else:
    if data.image_shape is None:
      raise ValueError(f"cache=memory with imagenet-style augmentation keeps the images at their "
                       f"native size, but those of {data.what} differ in size; accepted: "
                       "cache=none or cache=auto")
    cached = _cached(data, indices.tobytes(), None)
  return cached, np.arange(len(indices), dtype=np.int64), "memory"


_CACHE = {}
_CACHE_ENTRIES = 3


def _cached(data, key, size):
  """A memory listing holding the decoded images of the positions ``key`` (int64 bytes) of
  ``data`` (fitted to ``size`` if given); the last few are kept per process for later loads
  (the engine loads the training subset more than once)."""
  k = (id(data), key, size)
  if k not in _CACHE:
    positions = np.frombuffer(key, np.int64)
    images = sources.decode_subset(data, positions, size_hw=size)
    while len(_CACHE) >= _CACHE_ENTRIES:
      _CACHE.pop(next(iter(_CACHE)))  # the oldest
    _CACHE[k] = sources.Listing("memory", data.labels, data.class_names, data.splits,
                                data.channels, images.shape[1:], images=images, what=data.what)
  return _CACHE[k]


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

