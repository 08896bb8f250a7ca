"""The tf.data pipeline over a listed split: shuffle, batch, decode, augment, normalise, prefetch.

The pipeline streams *references* to samples - a sample's ``index`` and where its image is (a row
of an in-memory tensor, a file, or its encoded bytes from a TFRecord stream) - and shuffles, batches
and shards those. Only then are the images produced, so a fraction or a worker's share decodes only
its own images:

- in memory, ``cifar`` style at the stored size (CIFAR, cifar10_mini, synthetic, small folders
  cached decoded): each batch gathers its uint8 images from one shared tensor and is augmented and
  normalised at once (vectorised);
- otherwise each sample is decoded (files, records) or gathered (memory) and transformed on its own
  (``kd_tf2.data.transforms``) in a parallel map (``AUTOTUNE``, deterministic order), then batched
  and normalised.

``cifar`` augmentation is the reference benchmark's (RepDistiller's CIFAR transform): 4-pixel zero
padding, a random crop back to H x W, a random horizontal flip, on the raw pixels before
normalisation as torchvision's ``RandomCrop(32, padding=4)``. ``imagenet`` augmentation is
``transforms.random_resized_crop``.

Randomness comes from two seeded tf.data sources (``shuffle`` and ``Dataset.random``, both
re-randomised on every iteration): the sequence of epochs is fixed by ``seed`` (and by TF's global
seed, if the program sets one). Iterating the dataset again is the next epoch.

``views=K`` (K > 1; KDCL, Guo et al., CVPR 2020, sec. 3) gives each training sample K independent
augmentations of its one decoded image, by the same rule and normalisation: the batch gains
``views`` float32 [B, K, H, W, C], and ``image`` is view 0 - the image the pipeline gives without
views (view 0 keeps the sample's own random integer; views 1..K-1 take theirs from a third seeded
``Dataset.random``). Without augmentation the K views are copies of the image. Random-access
sources (memory, files) are shuffled globally; TFRecord streams (read in index order) through a
buffer of ``SHUFFLE_BUFFER`` samples.
"""
import numpy as np
import tensorflow as tf

from kd_tf2.data import paired, sources, transforms

PAD = 4
SHUFFLE_BUFFER = 4096   # samples held by the shuffle of a TFRecord stream
# Test hook: a callable run once per image decoded from a file or a record (None: no hook). Read
# when a pipeline is built.
decode_hook = None


def crop_and_flip(images, randoms, pad=PAD):
  """Pad-and-random-crop plus random horizontal flip of a batch, as one pair of gathers.

  images: uint8 (or any dtype) [B, H, W, C]; randoms: int64 [B], one random integer per image,
  split into a row offset and a column offset in [0, 2*pad] and a flip bit. Returns [B, H, W, C].
  """
  h, w = images.shape[1], images.shape[2]
  span = 2 * pad + 1
  top = tf.math.floormod(randoms, span)
  left = tf.math.floormod(tf.math.floordiv(randoms, span), span)
  flip = tf.math.floormod(tf.math.floordiv(randoms, span * span), 2) == 1
  padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
  rows = top[:, None] + tf.range(h, dtype=tf.int64)                  # [B, H]
  cols = tf.where(flip[:, None],
                  left[:, None] + tf.range(w - 1, -1, -1, dtype=tf.int64),
                  left[:, None] + tf.range(w, dtype=tf.int64))      # [B, W]
  out = tf.gather(padded, rows, axis=1, batch_dims=1)                # [B, H, W + 2*pad, C]
  return tf.gather(out, cols, axis=2, batch_dims=1)                  # [B, H, W, C]


def crop_and_flip_views(images, randoms, pad=PAD):
  """``crop_and_flip`` of K views of each image: uint8 [B, H, W, C], randoms int64 [B, K] ->
  [B, K, H, W, C] (view k of image b uses randoms[b, k])."""
  k = randoms.shape[1]
  out = crop_and_flip(tf.repeat(images, k, axis=0), tf.reshape(randoms, [-1]), pad)
  return tf.reshape(out, tf.concat([[-1, k], tf.shape(out)[1:]], 0))


def _view_randoms(seed, views):
  """A dataset of one random int64 per sample (views == 1), or of a pair (int64, int64
  [views - 1]): view 0's from the augmentation's stream ``seed`` (as without views), the other
  views' from ``seed + 1``. ``_per_view`` joins the pair (after batching: no per-sample map)."""
  first = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
  if views == 1:
    return first
  others = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)
  return tf.data.Dataset.zip(first, others.batch(views - 1, drop_remainder=True))


def _per_view(randoms):
  """``_view_randoms``' pair (int64 [...], [..., K - 1]) -> int64 [..., K]; a tensor as is."""
  if not isinstance(randoms, tuple):
    return randoms
  first, others = randoms
  return tf.concat([first[..., None], others], -1)


def _sub_seeds(seed):
  """Two independent op seeds from one user seed (the shuffle's and the augmentation's)."""
  state = np.random.SeedSequence(seed).generate_state(2)
  return int(state[0]), int(state[1])


def _count(image):
  """``image``, after calling ``decode_hook`` (a test-only counter) if one is set."""
  if decode_hook is None:
    return image
  hook = decode_hook

  def call():
    hook()
    return np.int64(0)
  done = tf.numpy_function(call, [], tf.int64, stateful=True)
  with tf.control_dependencies([done]):
    return tf.identity(image)


def build(source, indices, *, batch_size, mean, std, seed, shuffle, augment, drop_remainder,
          style="cifar", size=None, rows=None, image_rows=None, pair_by_class=False, views=1):
  """A one-pass ``tf.data.Dataset`` of ``{"image", "label", "index"}`` batches.

  source: a ``sources.Listing`` (memory, files or records); indices: sorted int64 [M], the
  positions of the split to stream; image_rows: for a memory source, the row of ``source.images``
  holding each of them (default: ``indices``). style: ``cifar`` or ``imagenet``; size: output
  (H, W) (default: the stored size of a memory source). Batches: image float32 [B, H, W, C]
  ((x / 255 - mean) / std), label int64 [B], index int64 [B].

  rows: ``(start, stop, size)`` keeps rows [start, stop) of every ``batch_size`` batch (after the
  shuffle and the augmentation draws, which every shard makes alike, and before any image is
  read) and streams them as batches of ``size``: one input pipeline's share of each global batch,
  split into its replicas' batches.

  views: K >= 1; K > 1 adds ``views`` float32 [B, K, H, W, C] (K augmentations of each sample's
  image; ``image`` is view 0).
  """
  if style not in transforms.STYLES:
    raise ValueError(f"style={style!r} not in {transforms.STYLES}")
  indices = np.asarray(indices, np.int64)
  labels = tf.constant(source.labels, tf.int64)
  channels = source.channels
  scale = tf.constant(1.0 / (255.0 * np.asarray(std, np.float32)), shape=[channels])
  shift = tf.constant(np.asarray(mean, np.float32) / np.asarray(std, np.float32), shape=[channels])
  shuffle_seed, augment_seed = _sub_seeds(seed)
  if size is None:
    size = tuple(source.images.shape[1:3])
  size = tuple(int(d) for d in size)

  if source.kind == "records":
    keep = np.zeros(len(source.labels), bool)
    keep[indices] = True
    keep = tf.constant(keep)
    ds = source.records().enumerate().filter(lambda i, _: keep[i])
    buffer = min(len(indices), SHUFFLE_BUFFER)
  else:
    # Where each image is: its row of source.images (memory) or of source.paths (files).
    payload = indices if image_rows is None else np.asarray(image_rows, np.int64)
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(indices), tf.constant(payload)))
    buffer = len(indices)
  if shuffle:
    ds = ds.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=True)
  if pair_by_class:  # CS-KD: [anchor, partner of its class, ...] (kd_tf2.data.paired)
    if source.kind == "records":
      raise ValueError("class-paired batches (CS-KD) need random access to the samples: a folder "
                       "or in-memory data, not a TFRecord stream")
    ds = paired.class_partners(ds, source.labels, indices, payload, shuffle_seed + 1)
  if augment:  # one random int64 per sample (views == 1), or one per view
    ds = tf.data.Dataset.zip(ds, _view_randoms(augment_seed, views))
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  out_size = batch_size
  if rows is not None:
    start, stop, out_size = rows
    ds = ds.map(lambda *parts: tf.nest.map_structure(lambda p: p[start:stop], parts))

  def finish(pixels, index, randoms=None):
    """pixels [B, H, W, C] (or [B, K, H, W, C]: views already made) -> the batch dict."""
    if randoms is not None:
      randoms = _per_view(randoms)
      pixels = crop_and_flip(pixels, randoms) if views == 1 else crop_and_flip_views(pixels,
                                                                                     randoms)
    x = tf.cast(pixels, tf.float32) * scale - shift
    out = {"image": x, "label": tf.gather(labels, index), "index": index}
    if views > 1:
      if x.shape.rank == 4:  # not augmented: K copies
        x = tf.repeat(x[:, None], views, axis=1)
      out.update(image=x[:, 0], views=x)
    return out

  vectorised = (source.kind == "memory" and style == "cifar"
                and tuple(source.images.shape[1:3]) == size)
  if vectorised:
    images = source.tensor
    if rows is not None:
      ds = ds.unbatch().batch(out_size, drop_remainder=drop_remainder)

    def whole_batch(*parts):
      (index, row), randoms = _split(parts, augment)
      return finish(tf.gather(images, row), index, randoms)
    ds = ds.map(whole_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)

  read = _reader(source)
  side = size[0]

  def one(*parts):
    (index, where), random = _split(parts, augment)
    image = read(where)
    if style == "imagenet":
      if not augment:
        return (transforms.resize_and_centre_crop(image, side), index)
      if views == 1:
        return (transforms.random_resized_crop(image, side, random), index)
      random = _per_view(random)
      return (tf.stack([transforms.random_resized_crop(image, side, random[k])
                        for k in range(views)]), index)
    image = transforms.fit(image, *size)
    return (image, index) if random is None else (image, index, random)

  ds = ds.unbatch().map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(out_size, drop_remainder=drop_remainder)
  ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.prefetch(tf.data.AUTOTUNE)


def _split(parts, augment):
  """``((index, where), random)`` of an element, augmented ``((index, where), random)`` or not
  ``(index, where)``."""
  return (parts[0], parts[1]) if augment else (parts, None)


def _reader(source):
  """``where -> uint8 [H, W, C]``: a row of memory, a file (by position), or encoded bytes."""
  channels = source.channels
  if source.kind == "memory":
    images = source.tensor
    return lambda row: tf.gather(images, row)
  if source.kind == "files":
    paths = tf.constant([str(p) for p in source.paths], tf.string)
    return lambda position: _count(sources.decode(tf.io.read_file(paths[position]), channels))
  return lambda encoded: _count(sources.decode(encoded, channels))
