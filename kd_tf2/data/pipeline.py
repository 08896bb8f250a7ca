"""The tf.data pipeline over a decoded split: shuffle, batch, augment, normalise, prefetch.

The pipeline streams sample *indices*; each batch gathers its uint8 images from one shared
in-memory tensor, then augments and normalises the whole batch at once (vectorised, parallel
across batches). Augmentation is the reference benchmark's (RepDistiller's CIFAR transform):
4-pixel zero padding, a random crop back to H x W, a random horizontal flip. Zero padding happens
on the raw pixels, before normalisation, as torchvision's ``RandomCrop(32, padding=4)`` does.

Randomness comes from two seeded tf.data sources (``shuffle`` and ``Dataset.random``, both
re-randomised on every iteration): the sequence of epochs is fixed by ``seed`` (and by TF's global
seed, if the program sets one). Iterating the dataset again is the next epoch.
"""
import numpy as np
import tensorflow as tf

from kd_tf2.data import paired

PAD = 4


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


def _sub_seeds(seed):
  """Two independent op seeds from one user seed (the shuffle's and the augmentation's)."""
  state = np.random.SeedSequence(seed).generate_state(2)
  return int(state[0]), int(state[1])


def build(images, labels, indices, *, batch_size, mean, std, seed, shuffle, augment,
          drop_remainder, rows=None, pair_by_class=False):
  """A one-pass ``tf.data.Dataset`` of ``{"image", "label", "index"}`` batches.

  images: uint8 tensor [N, H, W, C] (the whole split); labels: int64 [N]; indices: int64 [M],
  the positions to stream. Batches: image float32 [B, H, W, C] ((x / 255 - mean) / std), label
  int64 [B], index int64 [B].

  rows: ``(start, stop, size)`` keeps rows [start, stop) of every ``batch_size`` batch (after the
  shuffle and the augmentation draws, which every shard makes alike) and streams them as batches
  of ``size``: one input pipeline's share of each global batch, split into its replicas' batches.
  """
  labels = tf.constant(labels, tf.int64)
  channels = images.shape[-1]
  scale = tf.constant(1.0 / (255.0 * np.asarray(std, np.float32)), shape=[channels])
  shift = tf.constant(np.asarray(mean, np.float32) / np.asarray(std, np.float32), shape=[channels])
  shuffle_seed, augment_seed = _sub_seeds(seed)

  ds = tf.data.Dataset.from_tensor_slices(tf.constant(indices, tf.int64))
  if shuffle:
    ds = ds.shuffle(len(indices), seed=shuffle_seed, reshuffle_each_iteration=True)
  if pair_by_class:  # CS-KD: [anchor, partner of its class, ...] (kd_tf2.data.paired)
    ds = paired.class_partners(ds, labels.numpy(), indices, shuffle_seed + 1)
  if augment:
    randoms = tf.data.Dataset.random(seed=augment_seed, rerandomize_each_iteration=True)
    ds = tf.data.Dataset.zip(ds, randoms)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  if rows is not None:
    start, stop, size = rows
    ds = ds.map(lambda *parts: tuple(p[start:stop] for p in parts))
    ds = ds.unbatch().batch(size, drop_remainder=drop_remainder)

  def make_batch(index, randoms=None):
    pixels = tf.gather(images, index)
    if randoms is not None:
      pixels = crop_and_flip(pixels, randoms)
    x = tf.cast(pixels, tf.float32) * scale - shift
    return {"image": x, "label": tf.gather(labels, index), "index": index}

  ds = ds.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.prefetch(tf.data.AUTOTUNE)
