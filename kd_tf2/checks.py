"""Type checks for numbers that a user or a caller passes: in Python ``True`` is an ``int``, but it
is not a count, an epoch or a weight, so every check refuses bools.

    if not is_int(epochs) or epochs < 1: raise UsageError(...)
    if not is_number(weight) or weight < 0: raise UsageError(...)

Python numbers only (``kd_tf2.optim`` also takes NumPy scalars, for Keras' schedules).
"""


def is_int(value):
  """An ``int`` and not a ``bool``."""
  return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
  """An ``int`` or a ``float`` and not a ``bool`` (NaN and inf pass: compare to exclude them)."""
  return isinstance(value, (int, float)) and not isinstance(value, bool)
