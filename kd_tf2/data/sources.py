"""Where the images come from: every dataset name resolved to a *listing* of one split.

A listing gives, without decoding an image, the int64 ``labels [N]`` of a split (position i is
sample i's ``index``), its class names and split names, and a way to get each image:

- ``memory``: uint8 ``images [N, H, W, C]`` already decoded (``synthetic`` and the embedded
  ``cifar10_mini``, both small);
- ``files``: one image file per sample (``folder:PATH``), decoded when the pipeline reads it;
- ``records``: encoded image bytes in index order from TFRecord shards (a prepared tfds dataset,
  or ``tfrecord:PATTERN``), decoded when the pipeline reads them.

Accepted names:

- ``cifar10_mini``: the embedded offline subset of CIFAR-10 (kd_tf2/datasets/cifar10_mini, cut by
  scripts/make_cifar10_mini.py: 2,000 train and 500 test images per class, original JPEG bytes);
- ``synthetic[:options]``: see ``kd_tf2.data.synthetic``;
- ``folder:PATH``: ``PATH/<split>/<class>/<image>`` (.jpg/.jpeg/.png), listed in the order tfds'
  ``ImageFolder`` uses (per class sorted, then shuffled by ``random.Random(split)``), so indices
  and fraction subsets are those earlier versions (which read the folder through ImageFolder) had;
- ``tfrecord:PATTERN``: TFRecord shards of ``tf.train.Example`` records, ``PATTERN`` a glob with
  ``{split}`` in it (``tfrecord:/data/in1k/{split}-*``); the splits are those of train, validation,
  val, test whose glob matches files, read in sorted file order. Feature spec of a record:
    ``image/encoded``     bytes, one JPEG or PNG image (any size);
    ``image/class/label`` int64 scalar, the class in [0, num_classes) - 0-based (TF-slim's ImageNet
                          shards count from 1, leaving an empty class 0).
  Classes are named ``class_<i>``, i < 1 + the largest label of the train split.
- anything else: a tfds image-classification dataset (``cifar10``, ``cifar100``, ``imagenette``,
  ``imagenet2012``, ...), read from ``data_dir`` (tfds' default when None) as its prepared shards,
  image bytes undecoded (``tfds.decode.SkipDecoding``), in the order of ``as_dataset(shuffle_files=
  False)``. If it is not prepared there and no network is reachable, loading fails at once.

Listing labels costs no decoding: a folder is listed from its directories; TFRecord sources are
read once for their labels (I/O of the bytes, no image decoded), once per process.
"""
import functools
import glob
import os
import random
import socket
import urllib.parse
import urllib.request

import numpy as np
import tensorflow as tf

from kd_tf2.checks import is_int
from kd_tf2.data import synthetic, transforms

EMBEDDED = "cifar10_mini"
EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "datasets", EMBEDDED)
FOLDER_PREFIX = "folder:"
TFRECORD_PREFIX = "tfrecord:"
SYNTHETIC = "synthetic"
TFRECORD_SPLITS = ("train", "validation", "val", "test")
TFRECORD_IMAGE = "image/encoded"
TFRECORD_LABEL = "image/class/label"
# The normalisation of the reference benchmark (RepDistiller's CIFAR loaders).
KNOWN_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
KNOWN_STATS[EMBEDDED] = KNOWN_STATS["cifar10"]
# torchvision's ImageNet normalisation, used for every ImageNet-like tfds dataset.
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IMAGENET_LIKE = ("imagenette", "imagewang")   # and every tfds name starting with "imagenet"
STATS_SAMPLE = 500     # images decoded to compute the normalisation of an unknown dataset
PROBE = 16             # images decoded to find a streamed split's image size
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # what tfds' ImageFolder reads
_PROBE_HOST = ("storage.googleapis.com", 443)    # where tfds fetches most datasets and metadata
_PROBE_TIMEOUT_S = 3.0
_ALTERNATIVES = ("pass --data_dir (data_dir=) pointing at pre-downloaded tfds data, or use "
                 "folder:PATH (an image folder) or cifar10_mini (embedded, offline)")


def available():
  """The accepted dataset names and name patterns."""
  return [EMBEDDED, SYNTHETIC, SYNTHETIC + ":KEY=VALUE,...", FOLDER_PREFIX + "PATH",
          TFRECORD_PREFIX + "PATTERN_WITH_{split}",
          "TFDS_NAME (a tfds image-classification dataset, e.g. cifar10, cifar100, imagenette)"]


class Listing:
  """One split, listed: labels int64 [N], class names, split names, and where the images are.

  kind ``memory``: ``images`` uint8 [N, H, W, C]; ``files``: ``paths`` str [N]; ``records``:
  ``records()`` -> a ``tf.data.Dataset`` of the N encoded images (tf.string) in index order.
  ``channels``: C of the decoded images. ``image_shape``: (H, W, C) if every image has it, None
  if the sizes differ (a streamed split is judged from ``PROBE`` images spread over it).
  """

  def __init__(self, kind, labels, class_names, splits, channels, image_shape=None, images=None,
               paths=None, records=None, what=""):
    self.kind = kind
    self.labels = np.asarray(labels, np.int64)
    self.class_names = tuple(class_names)
    self.splits = tuple(splits)
    self.channels = int(channels)
    self.image_shape = None if image_shape is None else tuple(int(d) for d in image_shape)
    self.images = images
    self.paths = paths
    self.records = records
    self.what = what

  @functools.cached_property
  def tensor(self):
    """The in-memory images as one CPU tensor, made once and shared by every pipeline."""
    with tf.init_scope(), tf.device("/cpu:0"):  # eager even if first used inside a tf.function
      return tf.constant(self.images)

  @functools.cached_property
  def pixel_stats(self):
    """Per-channel (mean, std) of the in-memory pixels on the [0, 1] scale, exact."""
    return stats_of([self.images[..., c] for c in range(self.images.shape[-1])])


# Older name: a decoded split is a memory listing.
Split = Listing


def stats_of(channel_pixels):
  """(mean, std) per channel on the [0, 1] scale, exact (uint8 histograms); std floored at 1e-3."""
  levels = np.arange(256, dtype=np.float64) / 255.0
  mean, std = [], []
  for pixels in channel_pixels:
    hist = np.bincount(np.asarray(pixels).ravel(), minlength=256).astype(np.float64)
    m = float(hist @ levels / hist.sum())
    mean.append(m)
    std.append(max(float(np.sqrt(hist @ (levels - m) ** 2 / hist.sum())), 1e-3))
  return tuple(mean), tuple(std)


def _check_name(name):
  if not isinstance(name, str) or not name.strip():
    raise ValueError(f"dataset name {name!r} is not a non-empty string; accepted: {available()}")
  return name.strip()


def check(name, data_dir=None):
  """Raises ValueError / FileNotFoundError if ``name`` cannot be a dataset, without reading an
  image: a bad synthetic option, a folder without the ``<split>/<class>/<image>`` layout, a
  tfrecord pattern matching no file, a tfds name that is not registered or not image
  classification. (Whether a tfds dataset is prepared or downloadable, and whether the images
  decode, is found out when it is read.)"""
  name = _check_name(name)
  if name.startswith(FOLDER_PREFIX):
    _check_folder(os.path.abspath(os.path.expanduser(name[len(FOLDER_PREFIX):])))
  elif name.startswith(TFRECORD_PREFIX):
    _tfrecord_splits(name[len(TFRECORD_PREFIX):])
  elif name.lower().split(":")[0] == SYNTHETIC:
    synthetic.parse_options(name.partition(":")[2])
  elif name.lower() != EMBEDDED:
    _tfds_builder(name, None if data_dir is None else os.fspath(data_dir))


def _check_split(split):
  if not isinstance(split, str) or not split:
    raise ValueError(f"split {split!r} is not a non-empty string (e.g. 'train', 'test')")


def _norm_data_dir(data_dir):
  return None if data_dir is None else os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


def listing(name, split, data_dir=None):
  """The ``Listing`` of ``split`` of dataset ``name`` (cached per process); decodes nothing but
  the few images that tell the image size (``memory`` kinds are decoded whole)."""
  name = _check_name(name)
  _check_split(split)
  data_dir = _norm_data_dir(data_dir)
  if name.startswith(FOLDER_PREFIX):
    return _list_folder(os.path.abspath(os.path.expanduser(name[len(FOLDER_PREFIX):])), split)
  if name.startswith(TFRECORD_PREFIX):
    return _list_tfrecord(name[len(TFRECORD_PREFIX):], split)
  if name.lower() == EMBEDDED:
    return _read_embedded(split)
  if name.lower().split(":")[0] == SYNTHETIC:
    options = synthetic.parse_options(name.partition(":")[2])
    return _read_synthetic(tuple(sorted(options.items())), split)
  return _list_tfds(name, split, data_dir)


def read(name, split, data_dir=None, image_size=None):
  """``split`` of ``name`` decoded whole into memory: a ``memory`` Listing (cached per process).

  image_size: fit every image to image_size x image_size (shorter side, centre crop); required if
  the images differ in size.
  """
  if image_size is not None and (not is_int(image_size) or image_size < 1):
    raise ValueError(f"image_size={image_size!r} is not a positive int (or None: native size)")
  base = listing(name, split, data_dir)
  if base.kind == "memory" and (image_size is None or base.image_shape[:2] == (image_size,) * 2):
    return base
  return _decoded(base, image_size)


@functools.lru_cache(maxsize=8)
def _decoded(base, image_size):
  positions = np.arange(len(base.labels), dtype=np.int64)
  images = decode_subset(base, positions, image_size)
  return Listing("memory", base.labels, base.class_names, base.splits, base.channels,
                 images.shape[1:], images=images, what=base.what)


def is_imagenet_like(name):
  """Whether a tfds name is ImageNet or one of its subsets/variants (gets ImageNet's mean/std)."""
  base = name.split("/")[0].split(":")[0].lower()
  if name.startswith((FOLDER_PREFIX, TFRECORD_PREFIX)):
    return False
  return base.startswith("imagenet") or base in IMAGENET_LIKE


def normalization(name, split_listing, data_dir=None):
  """((mean, std) per channel on the [0, 1] scale, where they come from).

  The reference values for CIFAR-10/100 (and cifar10_mini), torchvision's for ImageNet-like
  datasets; exact over the ``train`` split for ``synthetic``; otherwise computed from a sample of
  up to ``STATS_SAMPLE`` images of the ``train`` split (or, without one, of the split at hand),
  decoded at their native size, chosen by a fixed seed (files) or evenly spaced (records).
  """
  base = name.split("/")[0].split(":")[0].lower()
  if base in KNOWN_STATS and not name.startswith((FOLDER_PREFIX, TFRECORD_PREFIX)):
    return KNOWN_STATS[base], "reference"
  if is_imagenet_like(name):
    return IMAGENET_STATS, "imagenet"
  if "train" in split_listing.splits:
    split_listing = listing(name, "train", data_dir)
  if split_listing.kind == "memory":
    return split_listing.pixel_stats, "computed"
  return _sampled_stats(split_listing), f"computed on {STATS_SAMPLE} sampled images"


@functools.lru_cache(maxsize=8)
def _sampled_stats(split_listing):
  n = len(split_listing.labels)
  k = min(n, STATS_SAMPLE)
  if split_listing.kind == "files":
    positions = np.sort(np.random.default_rng(0).choice(n, k, replace=False))
  else:
    positions = np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))
  hists = np.zeros((split_listing.channels, 256), np.int64)
  for image in _decode_stream(split_listing, positions).as_numpy_iterator():
    for c in range(split_listing.channels):
      hists[c] += np.bincount(image[..., c].ravel(), minlength=256)
  levels = np.arange(256, dtype=np.float64) / 255.0
  mean = hists @ levels / hists.sum(axis=1)
  var = np.array([hists[c] @ (levels - mean[c]) ** 2 for c in range(len(mean))]) / hists.sum(1)
  return tuple(float(m) for m in mean), tuple(max(float(np.sqrt(v)), 1e-3) for v in var)


# ---------------------------------------------------------------- decoding


def decode(encoded, channels):
  """Encoded JPEG/PNG bytes (tf.string scalar) -> uint8 [H, W, channels]."""
  image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
  return tf.ensure_shape(image, [None, None, channels])


def encoded_stream(split_listing, positions):
  """Dataset of the encoded images at ``positions`` (sorted int64) of a files/records listing."""
  if split_listing.kind == "files":
    paths = tf.constant([str(p) for p in split_listing.paths[positions]], tf.string)
    return tf.data.Dataset.from_tensor_slices(paths).map(
        tf.io.read_file, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  keep = np.zeros(len(split_listing.labels), bool)
  keep[positions] = True
  keep = tf.constant(keep)
  ds = split_listing.records().enumerate()
  ds = ds.filter(lambda i, _: keep[i]).map(lambda _, x: x)
  return ds


def _decode_stream(split_listing, positions):
  """Dataset of the uint8 [H, W, C] images at ``positions`` of a files/records listing."""
  channels = split_listing.channels
  return encoded_stream(split_listing, positions).map(
      lambda encoded: decode(encoded, channels), num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True)


def decode_subset(split_listing, positions, image_size=None, size_hw=None):
  """uint8 [len(positions), H, W, C]: the images at ``positions`` (sorted), decoded in parallel,
  fitted (``transforms.fit``) to image_size x image_size or to ``size_hw`` = (H, W) if given, else
  at their common size."""
  if size_hw is None and image_size is not None:
    size_hw = (image_size, image_size)
  if split_listing.kind == "memory":
    if size_hw is None:
      return split_listing.images[positions]
    ds = tf.data.Dataset.from_tensor_slices(split_listing.images[positions])
  else:
    ds = _decode_stream(split_listing, positions)
  if size_hw is not None:
    ds = ds.map(lambda x: transforms.fit(x, *size_hw), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
  out, filled = None, 0
  try:
    for x in ds.batch(256).prefetch(2).as_numpy_iterator():
      if out is None:  # one array filled in place: no second copy at the peak
        out = np.empty((len(positions),) + x.shape[1:], x.dtype)
      if x.shape[1:] != out.shape[1:]:
        raise tf.errors.InvalidArgumentError(None, None, "different shapes")
      out[filled:filled + len(x)] = x
      filled += len(x)
  except tf.errors.InvalidArgumentError as error:
    if "different shapes" in str(error) or "Cannot batch tensors" in str(error):
      raise ValueError(f"images of {split_listing.what} differ in size; pass image_size=S to "
                       "resize them (shorter side to S, centre crop S x S)") from None
    bad = _first_undecodable_of(split_listing, positions)
    if bad is not None:
      raise _unreadable(split_listing, bad, error) from None
    raise UndecodableImage(split_listing.what, error) from None
  if out is None:
    raise ValueError(f"{split_listing.what} holds no images")
  return out


def _first_undecodable_of(split_listing, positions):
  if split_listing.kind != "files":
    return None
  for path in sorted(split_listing.paths[positions]):  # the first in file-name order
    try:
      tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
    except tf.errors.OpError:
      return path
  return None


def _unreadable(split_listing, path, error):
  """The one-line ValueError for an image file of a folder that TF cannot decode."""
  root = split_listing.root
  return ValueError(f"folder:{root}: {os.path.relpath(path, root)} is not a readable image "
                    f"({UndecodableImage(path, error).reason}); remove it or replace it by a "
                    "JPEG/PNG")


def _probe_shape(split_listing):
  """(H, W, C) if ``PROBE`` images spread over the split share it, else None (sizes differ)."""
  n = len(split_listing.labels)
  positions = np.unique(np.linspace(0, n - 1, min(n, PROBE)).round().astype(np.int64))
  shapes = set()
  try:
    for image in _decode_stream(split_listing, positions).as_numpy_iterator():
      shapes.add(image.shape)
  except tf.errors.OpError as error:
    bad = _first_undecodable_of(split_listing, positions)
    if bad is None:
      raise UndecodableImage(split_listing.what, error) from None
    raise _unreadable(split_listing, bad, error) from None
  return shapes.pop() if len(shapes) == 1 else None


# ---------------------------------------------------------------- the sources


@functools.lru_cache(maxsize=8)
def _read_synthetic(options, split):
  options = dict(options)
  images, labels = synthetic.generate(split, **options)
  names = [f"class_{c}" for c in range(options["classes"])]
  return Listing("memory", labels, names, synthetic.SPLITS, images.shape[-1], images.shape[1:],
                 images=images, what=f"synthetic {split}")


@functools.lru_cache(maxsize=4)
def _read_embedded(split):
  path = os.path.join(EMBEDDED_DIR, f"{split}.npz")
  if split not in ("train", "test"):
    raise ValueError(f"split {split!r} not in {EMBEDDED}'s splits ['train', 'test']")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing: the embedded dataset was not installed; recreate "
                            "it with scripts/make_cifar10_mini.py")
  with np.load(path) as archive:
    jpeg, offsets = archive["jpeg"], archive["offsets"]
    labels, class_names = archive["label"], [str(c) for c in archive["class_names"]]
  blobs = [jpeg[a:b].tobytes() for a, b in zip(offsets[:-1], offsets[1:])]
  ds = tf.data.Dataset.from_tensor_slices(blobs).map(
      lambda b: tf.io.decode_jpeg(b, channels=3), num_parallel_calls=tf.data.AUTOTUNE)
  images = np.concatenate(list(ds.batch(1024).as_numpy_iterator()))
  return Listing("memory", labels, class_names, ("train", "test"), 3, images.shape[1:],
                 images=images, what=f"{EMBEDDED} {split}")


@functools.lru_cache(maxsize=8)
def _list_folder(root, split):
  splits, class_names = _check_folder(root)
  if split not in splits:
    raise ValueError(f"split {split!r} not found in folder:{root}; its splits are {splits}")
  items = []
  for label, cls in enumerate(class_names):
    directory = os.path.join(root, split, cls)
    names = sorted(f for f in os.listdir(directory) if f.lower().endswith(_IMAGE_EXTENSIONS))
    items.extend((os.path.join(directory, f), label) for f in names)
  # The order of tfds' ImageFolder: a shuffle seeded by the split name.
  random.Random(split).shuffle(items)
  paths = np.array([p for p, _ in items], dtype=object)
  labels = np.array([y for _, y in items], np.int64)
  out = Listing("files", labels, class_names, splits, 3, paths=paths,
                what=f"folder:{root} {split}")
  out.root = root
  out.image_shape = _probe_shape(out)
  return out


def _tfrecord_splits(pattern):
  """{split: sorted files} of a ``tfrecord:`` pattern; ValueError if it matches nothing."""
  accepted = (f"a glob with {{split}} in it, e.g. {TFRECORD_PREFIX}/data/in1k/{{split}}-*, "
              f"the splits being {', '.join(TFRECORD_SPLITS)}")
  pattern = os.path.expanduser(pattern)
  if "{split}" not in pattern:
    raise ValueError(f"{TFRECORD_PREFIX}{pattern}: the pattern has no {{split}}; accepted: "
                     f"{accepted}")
  found = {}
  for split in TFRECORD_SPLITS:
    files = sorted(f for f in glob.glob(pattern.replace("{split}", split)) if os.path.isfile(f))
    if files:
      found[split] = files
  if not found:
    raise ValueError(f"{TFRECORD_PREFIX}{pattern}: no file matches for any split; accepted: "
                     f"{accepted}")
  return found


def _tfrecord_dataset(files):
  reads = min(len(files), 4)  # interleaved reads, in a fixed order (the index order)
  ds = tf.data.TFRecordDataset(list(files), num_parallel_reads=reads if reads > 1 else None)
  spec = {TFRECORD_IMAGE: tf.io.FixedLenFeature([], tf.string)}
  return ds.map(lambda r: tf.io.parse_single_example(r, spec)[TFRECORD_IMAGE],
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


@functools.lru_cache(maxsize=16)
def _tfrecord_labels(pattern, files):
  spec = {TFRECORD_LABEL: tf.io.FixedLenFeature([], tf.int64)}
  reads = min(len(files), 4)
  ds = tf.data.TFRecordDataset(list(files), num_parallel_reads=reads if reads > 1 else None)
  ds = ds.map(lambda r: tf.io.parse_single_example(r, spec)[TFRECORD_LABEL],
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  try:
    labels = np.concatenate([np.zeros([0], np.int64)]
                            + list(ds.batch(65536).as_numpy_iterator()))
  except tf.errors.OpError as error:
    first = (str(getattr(error, "message", error)).strip().splitlines() or [""])[0]
    raise ValueError(f"{TFRECORD_PREFIX}{pattern}: cannot read its records as tf.train.Example "
                     f"with int64 {TFRECORD_LABEL!r} and bytes {TFRECORD_IMAGE!r} ({first})"
                     ) from None
  if not len(labels):
    raise ValueError(f"{TFRECORD_PREFIX}{pattern}: the files {files[0]}... hold no records")
  if labels.min() < 0:
    raise ValueError(f"{TFRECORD_PREFIX}{pattern}: label {labels.min()} < 0; labels must be in "
                     "[0, num_classes)")
  return labels


@functools.lru_cache(maxsize=8)
def _list_tfrecord(pattern, split):
  found = _tfrecord_splits(pattern)
  if split not in found:
    raise ValueError(f"split {split!r} not found for {TFRECORD_PREFIX}{pattern}; its splits are "
                     f"{sorted(found)}")
  files = tuple(found[split])
  labels = _tfrecord_labels(pattern, files)
  reference = _tfrecord_labels(pattern, tuple(found["train"])) if "train" in found else labels
  num_classes = int(max(reference.max(), labels.max())) + 1
  out = Listing("records", labels, [f"class_{c}" for c in range(num_classes)], sorted(found), 3,
                records=lambda: _tfrecord_dataset(files), what=f"{TFRECORD_PREFIX}{pattern} {split}")
  out.image_shape = _probe_shape(out)
  return out


@functools.lru_cache(maxsize=8)
def _list_tfds(name, split, data_dir):
  builder = _tfds_builder(name, data_dir)
  image_key, label_key = builder.info.supervised_keys
  features = builder.info.features
  if not builder.is_prepared():
    _download_or_fail(builder, name, data_dir)
  splits = sorted(builder.info.splits.keys())
  if split not in splits:
    raise ValueError(f"split {split!r} not in {name}'s splits {splits}")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  def examples():
    return builder.as_dataset(split=split, shuffle_files=False,
                              decoders={image_key: tfds.decode.SkipDecoding()},
                              read_config=tfds.ReadConfig(try_autocache=False))

  labels = examples().map(lambda ex: ex[label_key], num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=True)
  labels = np.concatenate([np.zeros([0], np.int64)]
                          + list(labels.batch(65536).as_numpy_iterator())).astype(np.int64)
  shape = features[image_key].shape
  channels = shape[-1] or 3
  out = Listing("records", labels, features[label_key].names, splits, channels,
                records=lambda: examples().map(lambda ex: ex[image_key]), what=f"{name} {split}")
  out.image_shape = tuple(shape) if None not in shape else _probe_shape(out)
  return out


def _check_folder(root):
  """Validates ``root/<split>/<class>/``; returns (splits, class names), both sorted."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"folder:{root}: no such directory (expected {root}/<split>/<class>/"
                            "<image>)")
  splits = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  if not splits:
    raise ValueError(f"folder:{root} has no split folders (expected {root}/<split>/<class>/"
                     "<image>)")
  classes = {}
  for s in splits:
    classes[s] = sorted(d for d in os.listdir(os.path.join(root, s))
                        if os.path.isdir(os.path.join(root, s, d)))
  first = splits[0]
  for s in splits[1:]:
    if classes[s] != classes[first]:
      only_first = sorted(set(classes[first]) - set(classes[s]))
      only_s = sorted(set(classes[s]) - set(classes[first]))
      raise ValueError(f"folder:{root}: classes differ between splits {first!r} and {s!r} "
                       f"(only in {first}: {only_first}; only in {s}: {only_s})")
  if not classes[first]:
    raise ValueError(f"folder:{root}: split {first!r} has no class folders")
  for s in splits:
    for c in classes[s]:
      files = os.listdir(os.path.join(root, s, c))
      if not any(f.lower().endswith(_IMAGE_EXTENSIONS) for f in files):
        raise ValueError(f"folder:{root}: class folder {s}/{c} is empty (no "
                         f"{'/'.join(_IMAGE_EXTENSIONS)} file)")
  return splits, classes[first]


def _tfds_builder(name, data_dir):
  """The tfds builder of an image-classification dataset ``name``; ValueError otherwise."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f"unknown dataset {name!r}; accepted: {', '.join(available())}") from None
  keys = builder.info.supervised_keys
  features = builder.info.features
  if (not keys or len(keys) != 2 or not isinstance(features[keys[0]], tfds.features.Image)
      or not isinstance(features[keys[1]], tfds.features.ClassLabel)):
    raise ValueError(f"tfds dataset {name!r} is not an image-classification dataset (its "
                     f"supervised keys are {keys}); accepted: {', '.join(available())}")
  return builder


def _download_or_fail(builder, name, data_dir):
  """Downloads and prepares a tfds dataset, or raises FileNotFoundError in seconds when offline."""
  where = data_dir or "tfds' default data_dir"
  if not _network_reachable():
    raise FileNotFoundError(f"tfds dataset {name!r} is not prepared in {where} and cannot be "
                            f"downloaded (no network); {_ALTERNATIVES}")
  try:
    builder.download_and_prepare()
  except Exception as error:  # any download/prepare failure gets the same one-line advice
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    raise FileNotFoundError(f"tfds dataset {name!r} is not prepared in {where} and downloading it "
                            f"failed ({first_line}); {_ALTERNATIVES}") from error


def _network_reachable():
  """True if a TCP connection to tfds' download host (or the configured proxy) opens in seconds."""
  host, port = _PROBE_HOST
  proxy = urllib.request.getproxies().get("https")
  if proxy:
    parsed = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
    host, port = parsed.hostname, parsed.port or 80
  try:
    socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S).close()
    return True
  except OSError:
    return False


class UndecodableImage(ValueError):
  """A file of a split is not an image TF can decode; ``reason`` is TF's own one-line account."""

  def __init__(self, what, error):
    first = (str(getattr(error, "message", error)).strip().splitlines() or [""])[0]
    self.reason = first.rsplit(": ", 1)[-1].strip() or type(error).__name__
    super().__init__(f"{what}: an image cannot be decoded ({self.reason})")


