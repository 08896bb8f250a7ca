"""Per-image transforms of the streaming pipeline: fit to a size, and the ImageNet-style ones.

Two styles of augmentation (``STYLES``), picked by ``style_for`` from the output size S:

- ``cifar`` (S < 64): the reference CIFAR transform, 4-pixel pad + random crop + flip, done on whole
  batches by ``pipeline.crop_and_flip``; evaluation sees the image unchanged. Images whose size is
  not S x S are fitted first (``fit``: shorter side to S, centre crop).
- ``imagenet`` (S >= 64): training ``random_resized_crop`` (scale 0.08-1, aspect ratio 3/4-4/3,
  then S x S) + horizontal flip, as torchvision's ``RandomResizedCrop(S)`` +
  ``RandomHorizontalFlip()``; evaluation ``resize_and_centre_crop``: shorter side to
  round(S * 256 / 224), centre crop S x S, as torchvision's ``Resize(256) + CenterCrop(224)``
  scaled to S.

Randomness: each image carries one random int64 (drawn by the pipeline from its seed); every
random number of its transform is a stateless draw from it, so a transform is a pure function of
(image, random) - the same on every worker and for every cache mode.

Shapes: images are [H, W, C] (any H, W); outputs are float32 [S, S, C] on the 0-255 scale (not
rounded), except ``fit`` which returns uint8.
"""
import math

import tensorflow as tf

STYLES = ("imagenet", "cifar")
IMAGENET_MIN_SIZE = 64      # images this large (output side) get the ImageNet-style transforms
SCALE = (0.08, 1.0)         # RandomResizedCrop's area range (fraction of the image)
RATIO = (3.0 / 4.0, 4.0 / 3.0)  # and its aspect-ratio range (width / height)
ATTEMPTS = 10               # torchvision's number of tries before the centre-crop fallback
EVAL_RESIZE = 256.0 / 224.0  # evaluation: shorter side to round(S * 256 / 224), then crop S


def style_for(size):
  """The automatic augmentation style for an output side of ``size`` pixels."""
  return "imagenet" if size >= IMAGENET_MIN_SIZE else "cifar"


def eval_resize_size(size):
  """The shorter side before the evaluation centre crop: round(size * 256 / 224)."""
  return int(math.floor(size * EVAL_RESIZE + 0.5))


def fit(image, height, width):
  """uint8 [h, w, C] -> uint8 [height, width, C]: unchanged if already that size, else scaled so
  that it covers height x width (bilinear, antialiased, rounded) and centre-cropped."""
  shape = tf.shape(image)

  def resize():
    hw = tf.cast(shape[:2], tf.float32)
    factor = tf.maximum(height / hw[0], width / hw[1])
    scaled = tf.maximum(tf.cast(tf.math.round(hw * factor), tf.int32), [height, width])
    resized = tf.image.resize(image, scaled, antialias=True)
    top = (scaled[0] - height) // 2
    left = (scaled[1] - width) // 2
    cropped = resized[top:top + height, left:left + width]
    return tf.cast(tf.clip_by_value(tf.math.round(cropped), 0, 255), tf.uint8)

  same = tf.logical_and(tf.equal(shape[0], height), tf.equal(shape[1], width))
  out = tf.cond(same, lambda: image, resize)
  return tf.ensure_shape(out, [height, width, image.shape[-1]])


def random_resized_crop_box(height, width, seed):
  """(top, left, crop_h, crop_w) int32 of torchvision's ``RandomResizedCrop.get_params``.

  Up to ``ATTEMPTS`` candidates (area uniform in SCALE of the image, log aspect ratio uniform in
  log RATIO, sides rounded); the first that fits is placed uniformly at random. If none fits,
  the whole image cropped centrally to the nearest allowed aspect ratio. seed: int [2].
  """
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  draws = tf.random.stateless_uniform([ATTEMPTS, 4], seed=seed)
  area = h * w * (SCALE[0] + (SCALE[1] - SCALE[0]) * draws[:, 0])
  log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * draws[:, 1])
  crop_w = tf.math.round(tf.sqrt(area * aspect))
  crop_h = tf.math.round(tf.sqrt(area / aspect))
  fits = (crop_w > 0) & (crop_w <= w) & (crop_h > 0) & (crop_h <= h)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  # torchvision: randint(0, h - ch + 1): uniform over the valid offsets.
  top = tf.floor(draws[first, 2] * (h - crop_h[first] + 1.0))
  left = tf.floor(draws[first, 3] * (w - crop_w[first] + 1.0))
  found = tf.stack([top, left, crop_h[first], crop_w[first]])
  # Fallback: the whole image, trimmed to the nearest aspect ratio in RATIO, centred.
  in_ratio = w / h
  fb_w = tf.where(in_ratio < RATIO[0], w, tf.where(in_ratio > RATIO[1], tf.math.round(h * RATIO[1]), w))
  fb_h = tf.where(in_ratio < RATIO[0], tf.math.round(w / RATIO[0]), h)
  fallback = tf.stack([tf.floor((h - fb_h) / 2.0), tf.floor((w - fb_w) / 2.0), fb_h, fb_w])
  box = tf.where(tf.reduce_any(fits), found, fallback)
  return tf.unstack(tf.cast(box, tf.int32))


def random_resized_crop(image, size, random):
  """Training transform of the ``imagenet`` style: uint8 [H, W, C] -> float32 [size, size, C].

  random: int64 scalar; the crop box and the flip are stateless draws seeded by it.
  """
  seed = tf.stack([random, tf.constant(1, tf.int64)])
  shape = tf.shape(image)
  top, left, crop_h, crop_w = random_resized_crop_box(shape[0], shape[1], seed)
  crop = image[top:top + crop_h, left:left + crop_w]
  out = tf.image.resize(crop, [size, size], antialias=True)
  flip = tf.random.stateless_uniform([], seed=tf.stack([random, tf.constant(2, tf.int64)])) < 0.5
  out = tf.cond(flip, lambda: tf.reverse(out, axis=[1]), lambda: out)
  return tf.ensure_shape(out, [size, size, image.shape[-1]])


def resize_and_centre_crop(image, size):
  """Evaluation transform of the ``imagenet`` style: uint8 [H, W, C] -> float32 [size, size, C].

  Shorter side to round(size * 256 / 224), the longer one in proportion (truncated, as
  torchvision's ``Resize(int)``), then the centre size x size (offsets rounded, as ``CenterCrop``).
  """
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  short = eval_resize_size(size)
  hf, wf = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
  new_h = tf.where(h <= w, short, tf.cast(tf.floor(short * hf / wf), tf.int32))
  new_w = tf.where(h <= w, tf.cast(tf.floor(short * wf / hf), tf.int32), short)
  resized = tf.image.resize(image, tf.stack([new_h, new_w]), antialias=True)
  top = tf.cast(tf.math.round(tf.cast(new_h - size, tf.float64) / 2.0), tf.int32)
  left = tf.cast(tf.math.round(tf.cast(new_w - size, tf.float64) / 2.0), tf.int32)
  out = resized[top:top + size, left:left + size]
  return tf.ensure_shape(out, [size, size, image.shape[-1]])
