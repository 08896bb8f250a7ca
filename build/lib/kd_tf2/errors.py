"""The one exception type for bad user input.

``UsageError`` is a ``ValueError``: library code raises it (or a plain ``ValueError`` /
``FileNotFoundError``) for a bad name, value, path or pair; ``train.py`` and ``test.py`` catch it
and print its message as one line on stderr with a non-zero exit code, never a traceback. The
message names the bad value and what is accepted.
"""


class UsageError(ValueError):
  """Bad input from the user (flag, file, name, incompatible pair): print the message, exit 1."""


class TrainingDiverged(RuntimeError):
  """A loss term became NaN/inf: the run stopped without checkpointing the bad weights."""


class TrainingInterrupted(RuntimeError):
  """SIGTERM/SIGINT during training: a checkpoint was written, a rerun resumes from it."""
