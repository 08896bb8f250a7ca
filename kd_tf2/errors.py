"""The exceptions that decide how a run ends, and what ``train.py``, ``test.py`` and
``python -m kd_tf2.bench`` then print (``kd_tf2.cli``):

- ``UsageError``: bad input from the user. One line on stderr, exit code 2, no traceback.
- ``TrainingDiverged``: a loss became NaN/inf. One line, exit code 1.
- ``TrainingInterrupted``: SIGTERM/Ctrl-C; a checkpoint was written. Exit code 0.
- ``WorkerLost``: a task of a multi-worker cluster went away mid-training. One line, exit code 1.

Anything else (including a ``ValueError`` that TensorFlow raises while tracing a step) is a bug:
the traceback and exit code 1. Library functions may also raise a plain ``ValueError`` or
``FileNotFoundError`` for a bad argument; the engine turns the ones about the user's input into
``UsageError`` where it calls them.
"""
import os


class UsageError(ValueError):
  """Bad input from the user (flag, file, name, incompatible pair). The message is one line that
  names the bad value and what is accepted; the scripts print it and exit with code 2."""


class TrainingDiverged(RuntimeError):
  """A loss term became NaN/inf: the run stopped without checkpointing the bad weights."""


class TrainingInterrupted(RuntimeError):
  """SIGTERM/SIGINT during training: a checkpoint was written, a rerun resumes from it."""


class WorkerLost(RuntimeError):
  """A multi-worker task went away mid-training (killed, crashed, its host lost). The message names
  it; relaunching every task with the same command resumes from the chief's last checkpoint."""


_OURS = tuple(os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + room + os.sep
              for room in ("kd_tf2", "nets"))


def raised_by_our_checks(error):
  """Whether ``error`` was raised by a ``raise`` statement of kd_tf2 or nets (an input check),
  rather than inside TensorFlow, Keras or NumPy: the innermost frame of its traceback is ours.

  Used where a library call both checks the user's input and builds TensorFlow graphs (``data.load``
  validates names, paths and fractions, then traces the pipeline): only the former is bad input.
  """
  tb, last = error.__traceback__, None
  while tb is not None:
    last, tb = tb, tb.tb_next
  return last is not None and os.path.abspath(last.tb_frame.f_code.co_filename).startswith(_OURS)
