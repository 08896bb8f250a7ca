"""``synthetic``: a small, deterministic, learnable image-classification dataset for tests.

Each class owns a template: a colour tint plus a coarse 4 x 4 pattern (nearest-upsampled and made
left-right symmetric, so horizontal flips keep it and 4-pixel shifts barely move it). An image is
its class template plus Gaussian pixel noise and a random brightness offset, stored as uint8. The
templates depend only on the number of classes, size and channels; train and test draw different
noise. A linear probe separates the classes well above chance; building 512 images takes
milliseconds.

Options are given in the name: ``synthetic:classes=10,train=512,test=128,size=32,channels=3``
(any subset, any order; the defaults are those values). Splits: ``train`` and ``test``.
"""
import numpy as np

DEFAULTS = {"classes": 10, "train": 512, "test": 128, "size": 32, "channels": 3}
SPLITS = ("train", "test")
_MINIMUM = {"classes": 2, "train": 1, "test": 1, "size": 4, "channels": 1}
_GRID = 4          # the template pattern is a _GRID x _GRID grid of cells
_TINT = 0.12       # std of a class's colour tint (pixel values in [0, 1])
_PATTERN = 0.12    # std of a class's pattern cells
_NOISE = 0.15      # std of the per-pixel noise
_BRIGHTNESS = 0.05  # std of the per-image brightness offset


def parse_options(spec):
  """``"classes=5,train=100"`` -> the full option dict (defaults filled in). "" -> DEFAULTS."""
  options = dict(DEFAULTS)
  for item in filter(None, (part.strip() for part in spec.split(","))):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or key not in DEFAULTS:
      accepted = ", ".join(f"{k}=INT" for k in DEFAULTS)
      raise ValueError(f"synthetic option {item!r} not understood; accepted: {accepted} "
                       "(e.g. synthetic:classes=10,train=512)")
    try:
      number = int(value)
    except ValueError:
      raise ValueError(f"synthetic option {key}={value!r} is not an integer") from None
    if number < _MINIMUM[key]:
      raise ValueError(f"synthetic option {key}={number} must be >= {_MINIMUM[key]}")
    options[key] = number
  return options


def _templates(classes, size, channels):
  """Class templates in [0, 1]: float32 [classes, size, size, channels]."""
  rng = np.random.default_rng([classes, size, channels])
  tint = rng.normal(0.0, _TINT, (classes, 1, 1, channels))
  cells = rng.normal(0.0, _PATTERN, (classes, _GRID, _GRID, channels))
  cells = 0.5 * (cells + cells[:, :, ::-1])  # left-right symmetric
  cell = -(-size // _GRID)  # ceil
  pattern = np.repeat(np.repeat(cells, cell, axis=1), cell, axis=2)[:, :size, :size]
  return (0.5 + tint + pattern).astype(np.float32)


def generate(split, classes, train, test, size, channels):
  """Images uint8 [N, size, size, channels] and labels int64 [N] of ``split`` ("train"/"test").

  Labels cycle through the classes (so every class has floor or ceil of N / classes images) in a
  fixed shuffled order.
  """
  if split not in SPLITS:
    raise ValueError(f"split {split!r} not in synthetic's splits {list(SPLITS)}")
  n = train if split == "train" else test
  templates = _templates(classes, size, channels)
  rng = np.random.default_rng([classes, size, channels, SPLITS.index(split) + 1])
  labels = rng.permutation(np.arange(n) % classes).astype(np.int64)
  noise = rng.normal(0.0, _NOISE, (n, size, size, channels)).astype(np.float32)
  brightness = rng.normal(0.0, _BRIGHTNESS, (n, 1, 1, 1)).astype(np.float32)
  images = templates[labels] + noise + brightness
  return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8), labels
