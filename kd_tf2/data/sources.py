"""Where the images come from: every dataset name resolved to one decoded split in memory.

A split is read once per process and kept as uint8 ``images [N, H, W, C]`` with int64 ``labels
[N]``; position i in these arrays is sample i's ``index``. Accepted names:

- ``cifar10_mini``: the embedded offline subset of CIFAR-10 (kd_tf2/datasets/cifar10_mini, cut by
  scripts/make_cifar10_mini.py: 2,000 train and 500 test images per class, original JPEG bytes);
- ``synthetic[:options]``: see ``kd_tf2.data.synthetic``;
- ``folder:PATH``: ``PATH/<split>/<class>/<image>`` read with tfds' ``ImageFolder``;
- anything else: a tfds image-classification dataset (``cifar10``, ``cifar100``, ``imagenette``,
  ...), read from ``data_dir`` (tfds' default when None). If it is not prepared there and no network
  is reachable, loading fails at once instead of retrying downloads for minutes.

Images of different sizes (e.g. imagenette) need ``image_size=S``: each image's shorter side is
resized to S (bilinear, antialiased) and the centre S x S kept.
"""
import functools
import os
import socket
import urllib.parse
import urllib.request

import numpy as np
import tensorflow as tf

from kd_tf2.checks import is_int
from kd_tf2.data import synthetic

EMBEDDED = "cifar10_mini"
EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "datasets", EMBEDDED)
FOLDER_PREFIX = "folder:"
SYNTHETIC = "synthetic"
# The normalisation of the reference benchmark (RepDistiller's CIFAR loaders).
KNOWN_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
KNOWN_STATS[EMBEDDED] = KNOWN_STATS["cifar10"]
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # what tfds' ImageFolder reads
_PROBE_HOST = ("storage.googleapis.com", 443)    # where tfds fetches most datasets and metadata
_PROBE_TIMEOUT_S = 3.0
_ALTERNATIVES = ("pass --data_dir (data_dir=) pointing at pre-downloaded tfds data, or use "
                 "folder:PATH (an image folder) or cifar10_mini (embedded, offline)")


def available():
  """The accepted dataset names and name patterns."""
  return [EMBEDDED, SYNTHETIC, SYNTHETIC + ":KEY=VALUE,...", FOLDER_PREFIX + "PATH",
          "TFDS_NAME (a tfds image-classification dataset, e.g. cifar10, cifar100, imagenette)"]


class Split:
  """One decoded split: uint8 images [N, H, W, C], int64 labels [N], class names, split names."""

  def __init__(self, images, labels, class_names, splits):
    self.images = images
    self.labels = labels
    self.class_names = tuple(class_names)
    self.splits = tuple(splits)

  @functools.cached_property
  def tensor(self):
    """The images as one CPU tensor, made once and shared by every pipeline over this split."""
    with tf.init_scope(), tf.device("/cpu:0"):  # eager even if first used inside a tf.function
      return tf.constant(self.images)

  @functools.cached_property
  def pixel_stats(self):
    """Per-channel (mean, std) of the pixels on the [0, 1] scale, exact (from uint8 histograms)."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for c in range(self.images.shape[-1]):
      hist = np.bincount(self.images[..., c].ravel(), minlength=256).astype(np.float64)
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
  image: a bad synthetic option, a folder without the ``<split>/<class>/<image>`` layout, a tfds
  name that is not registered or not image classification. (Whether a tfds dataset is prepared or
  downloadable, and whether the images decode, is found out by ``read``.)"""
  name = _check_name(name)
  if name.startswith(FOLDER_PREFIX):
    _check_folder(os.path.abspath(os.path.expanduser(name[len(FOLDER_PREFIX):])))
  elif name.lower().split(":")[0] == SYNTHETIC:
    synthetic.parse_options(name.partition(":")[2])
  elif name.lower() != EMBEDDED:
    _tfds_builder(name, None if data_dir is None else os.fspath(data_dir))


def read(name, split, data_dir=None, image_size=None):
  """Decoded ``split`` of dataset ``name`` (cached per process)."""
  _check_name(name)
  if not isinstance(split, str) or not split:
    raise ValueError(f"split {split!r} is not a non-empty string (e.g. 'train', 'test')")
  if image_size is not None and (not is_int(image_size) or image_size < 1):
    raise ValueError(f"image_size={image_size!r} is not a positive int (or None: native size)")
  name = name.strip()
  if data_dir is not None:
    data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
  if name.startswith(FOLDER_PREFIX):
    root = os.path.abspath(os.path.expanduser(name[len(FOLDER_PREFIX):]))
    return _read_folder(root, split, image_size)
  if name.lower() == EMBEDDED:
    return _read_embedded(split, image_size)
  if name.lower().split(":")[0] == SYNTHETIC:
    options = synthetic.parse_options(name.partition(":")[2])
    return _read_synthetic(tuple(sorted(options.items())), split, image_size)
  return _read_tfds(name, split, data_dir, image_size)


def normalization(name, split_data, data_dir=None, image_size=None):
  """(mean, std) per channel, on the [0, 1] scale.

  The reference values for CIFAR-10/100 (and cifar10_mini); otherwise computed once from the
  ``train`` split (or, if the dataset has none, from the split at hand) and cached.
  """
  base = name.split("/")[0].split(":")[0].lower()
  if base in KNOWN_STATS and not name.startswith(FOLDER_PREFIX):
    return KNOWN_STATS[base]
  if "train" in split_data.splits:
    split_data = read(name, "train", data_dir, image_size)
  return split_data.pixel_stats


def _resized(split_data, image_size):
  """An in-memory (uniform) dataset at another resolution, if asked."""
  if image_size is None or split_data.images.shape[1:3] == (image_size, image_size):
    return split_data
  ds = tf.data.Dataset.from_tensor_slices((split_data.images, split_data.labels))
  images, labels = _collect(ds, image_size, "resize")
  return Split(images, labels, split_data.class_names, split_data.splits)


@functools.lru_cache(maxsize=8)
def _read_synthetic(options, split, image_size):
  options = dict(options)
  images, labels = synthetic.generate(split, **options)
  names = [f"class_{c}" for c in range(options["classes"])]
  return _resized(Split(images, labels, names, synthetic.SPLITS), image_size)


@functools.lru_cache(maxsize=4)
def _read_embedded(split, image_size):
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
      lambda b: (tf.io.decode_jpeg(b, channels=3), tf.constant(0, tf.int64)),
      num_parallel_calls=tf.data.AUTOTUNE)
  images, _ = _collect(ds, image_size, f"{EMBEDDED} {split}")
  return Split(images, labels.astype(np.int64), class_names, ("train", "test"))


@functools.lru_cache(maxsize=8)
def _read_folder(root, split, image_size):
  splits, class_names = _check_folder(root)
  if split not in splits:
    raise ValueError(f"split {split!r} not found in folder:{root}; its splits are {splits}")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.folder_dataset.ImageFolder(root)
  if list(builder.info.features["label"].names) != class_names:  # cannot differ after the check
    raise ValueError(f"folder:{root}: tfds found classes {builder.info.features['label'].names}, "
                     f"expected {class_names}")
  ds = builder.as_dataset(split=split, shuffle_files=False, as_supervised=True)
  try:
    images, labels = _collect(ds, image_size, f"folder:{root} {split}")
  except UndecodableImage as error:
    bad = _first_undecodable(os.path.join(root, split))
    if bad is None:
      raise
    raise ValueError(f"folder:{root}: {os.path.join(split, bad)} is not a readable image "
                     f"({error.reason}); remove it or replace it by a JPEG/PNG") from None
  counts = np.bincount(labels, minlength=len(class_names))
  if not counts.all():
    empty = [class_names[c] for c in np.flatnonzero(counts == 0)]
    raise ValueError(f"folder:{root}: class folder(s) {empty} of split {split!r} hold no readable "
                     f"image ({'/'.join(_IMAGE_EXTENSIONS)})")
  return Split(images, labels, class_names, splits)


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


def _first_undecodable(directory):
  """Path (relative to ``directory``) of the first image file TF cannot decode, or None."""
  for parent, _, files in sorted(os.walk(directory)):
    for name in sorted(files):
      if not name.lower().endswith(_IMAGE_EXTENSIONS):
        continue
      path = os.path.join(parent, name)
      try:
        tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
      except tf.errors.OpError:
        return os.path.relpath(path, directory)
  return None


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


@functools.lru_cache(maxsize=8)
def _read_tfds(name, split, data_dir, image_size):
  builder = _tfds_builder(name, data_dir)
  keys, features = builder.info.supervised_keys, builder.info.features
  if not builder.is_prepared():
    _download_or_fail(builder, name, data_dir)
  splits = sorted(builder.info.splits.keys())
  if split not in splits:
    raise ValueError(f"split {split!r} not in {name}'s splits {splits}")
  ds = builder.as_dataset(split=split, shuffle_files=False, as_supervised=True)
  images, labels = _collect(ds, image_size, f"{name} {split}")
  return Split(images, labels, features[keys[1]].names, splits)


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


def _resize_shorter_and_centre_crop(image, size):
  """uint8 [H, W, C] -> uint8 [size, size, C]: shorter side to ``size``, centre crop."""
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  scaled = tf.cast(tf.math.round(hw * (size / tf.reduce_min(hw))), tf.int32)
  scaled = tf.maximum(scaled, size)
  resized = tf.image.resize(image, scaled, antialias=True)
  top = (scaled[0] - size) // 2
  left = (scaled[1] - size) // 2
  cropped = resized[top:top + size, left:left + size]
  return tf.cast(tf.clip_by_value(tf.math.round(cropped), 0, 255), tf.uint8)


def _collect(ds, image_size, what):
  """Runs a dataset of (uint8 image, label) to the end: numpy images [N, H, W, C], labels [N]."""
  if image_size is not None:
    ds = ds.map(lambda x, y: (_resize_shorter_and_centre_crop(x, image_size), y),
                num_parallel_calls=tf.data.AUTOTUNE)
  images, labels = [], []
  try:
    for x, y in ds.batch(1024).prefetch(2).as_numpy_iterator():
      images.append(x)
      labels.append(y)
  except tf.errors.InvalidArgumentError as error:
    if "different shapes" not in str(error):
      raise UndecodableImage(what, error) from None
    raise ValueError(f"images of {what} differ in size; pass image_size=S to resize them "
                     "(shorter side to S, centre crop S x S)") from None
  if not images:
    raise ValueError(f"{what} holds no images")
  return np.concatenate(images), np.concatenate(labels).astype(np.int64)
