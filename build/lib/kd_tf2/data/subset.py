"""Class-balanced, seed-deterministic subsets of a training split (the benchmark's ``fraction``).

For each class c with n_c samples, keep exactly max(1, round(fraction * n_c)) of them (rounded half
up). Which ones is decided by a single permutation of the split drawn from ``seed`` alone: each
class keeps its members that come first in that permutation. The subset therefore depends only on
(labels, fraction, seed) -- never on the method, the nets, the batch size or the run -- so every
method of a 25% comparison trains on identical images. (Because a class keeps a prefix of one
permutation, smaller fractions happen to be nested in larger ones with the same seed; nothing
relies on it.) tfds' split slicing (``train[:25%]``) is deterministic but not class-balanced, which
is why it is not used here.
"""
import hashlib
import math

import numpy as np


def check_fraction(fraction):
  """Returns ``fraction`` as a float, or raises ValueError unless it is a number in (0, 1]."""
  try:
    value = float(fraction)
  except (TypeError, ValueError):
    raise ValueError(f"fraction={fraction!r} is not a number; accepted: a number in "
                     "(0, 1]") from None
  if isinstance(fraction, bool) or not 0.0 < value <= 1.0:
    raise ValueError(f"fraction={fraction!r} is outside the accepted range (0, 1]")
  return value


def per_class_count(fraction, n):
  """How many of a class's ``n`` samples a ``fraction`` keeps: round half up, at least one."""
  return max(1, int(math.floor(fraction * n + 0.5)))


def balanced_subset(labels, class_names, fraction, seed):
  """Sorted int64 positions of the kept samples of a split.

  labels: int [N] in [0, len(class_names)). Raises ValueError if a class has no sample (a fraction
  could then not keep one of it).
  """
  fraction = check_fraction(fraction)
  labels = np.asarray(labels)
  counts = np.bincount(labels, minlength=len(class_names))
  empty = [class_names[c] for c in np.flatnonzero(counts == 0)]
  if empty:
    raise ValueError(f"class(es) {empty} have no samples in the training split, so fraction="
                     f"{fraction} cannot keep any of them; every class needs at least one image")
  if fraction == 1.0:
    return np.arange(len(labels), dtype=np.int64)
  order = np.random.default_rng(seed).permutation(len(labels))
  kept = []
  for c, n in enumerate(counts):
    members = order[labels[order] == c]  # class c's positions, in permutation order
    kept.append(members[:per_class_count(fraction, n)])
  return np.sort(np.concatenate(kept)).astype(np.int64)


def fingerprint(indices):
  """A short hex digest of a set of sample positions (order and repeats ignored): what a train dir
  records to check that a resumed run streams the subset it started on."""
  kept = np.unique(np.asarray(indices, np.int64)).astype("<i8")
  return hashlib.sha256(kept.tobytes()).hexdigest()[:16]
