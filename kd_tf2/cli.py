"""What ``train.py``, ``test.py`` and ``python -m kd_tf2.bench`` share: how a script ends, flag
parsing, a quiet TensorFlow start.

How a script ends (``kd_tf2.errors``): bad input (``UsageError``) with ``<script>: error: <one
line>`` on stderr and exit code 2, never a traceback (``KD_TF2_TRACEBACK=1`` re-raises for
debugging); a lost multi-worker task with one line naming it, exit code 1; any other exception is
a bug: its traceback, then ``<script>: internal error ...`` and exit code 1. TensorFlow's C++
start-up chatter (oneDNN, CUDA probing) is sent to /dev/null while TensorFlow loads;
``KD_TF2_VERBOSE=1`` keeps it.
"""
import os
import sys
import traceback

from kd_tf2.errors import TrainingDiverged, TrainingInterrupted, UsageError, WorkerLost

USAGE_EXIT = 2
BUG_EXIT = 1
# What the library raises for a bad argument (UsageError is a ValueError). The scripts report only
# UsageError as bad input: the engine converts the others where they are about the user's input.
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                PermissionError)


def fail(message, code=USAGE_EXIT, prog=None):
  """Print ``<prog>: error: <message on one line>`` to stderr and exit with ``code``. ``prog``
  defaults to the script's file name."""
  text = " ".join(str(message).split()) or "unknown error"
  prog = prog or os.path.basename(sys.argv[0])
  print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
  sys.exit(code)


def report_bug(error, prog=None):
  """Print the traceback of ``error`` (being handled), then one line saying it is a bug (or, for an
  ``OSError``, a system error), and exit with code 1."""
  traceback.print_exc()
  # TensorFlow's errors from traced code end with "<Type>: <message>" after the user-code frames.
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  text = lines[-1][:300] if lines else ""
  if not text.startswith(f"{type(error).__name__}:"):
    text = f"{type(error).__name__}: {text}"
  prog = prog or os.path.basename(sys.argv[0])
  if isinstance(error, OSError):  # disk full, a file removed under the run: the system's
    kind = "system error (not bad input; traceback above)"
  else:
    kind = "internal error (a bug, not bad input; traceback above)"
  print(f"{prog}: {kind}: {text}", file=sys.stderr, flush=True)
  sys.exit(BUG_EXIT)


def flags_parser(flag_values):
  """An ``app.run(flags_parser=...)`` that reports a bad or unknown flag in one line."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  def parse(argv):
    try:
      return flag_values(argv)
    except flags.Error as e:
      fail(e)

  return parse


def start_tensorflow(cpu_replicas=None, strategy=None, cluster_timeout=None):
  """Import TensorFlow quietly and initialise its devices (after splitting the CPU into
  ``cpu_replicas`` logical devices if asked). Python logging is set to warnings and above.

  ``strategy="multi_worker"`` first builds the process's ``MultiWorkerMirroredStrategy`` (TF builds
  it only before its devices exist), waiting up to ``cluster_timeout`` seconds for the other tasks.
  """
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.WARNING)
  quiet = not os.environ.get("KD_TF2_VERBOSE")
  if quiet:
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
  try:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    if cpu_replicas is not None:
      from kd_tf2.engine.strategy import configure_cpu_replicas  # pylint: disable=import-outside-toplevel
      configure_cpu_replicas(cpu_replicas)
    if strategy == "multi_worker":
      from kd_tf2.engine.strategy import DEFAULT_CLUSTER_TIMEOUT, make_strategy  # pylint: disable=import-outside-toplevel
      make_strategy(strategy, cluster_timeout=DEFAULT_CLUSTER_TIMEOUT if cluster_timeout is None
                    else cluster_timeout, report_fd=saved if quiet else 2)
    tf.config.list_logical_devices()
  finally:
    if quiet:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      os.close(devnull)
  tf.get_logger().setLevel("WARNING")


def run_guarded(fn, *args, **kwargs):
  """Call ``fn``: a ``UsageError`` ends the script in one line (exit 2); a lost multi-worker task
  in one line naming it (exit 1); ``TrainingDiverged`` and ``TrainingInterrupted`` are the caller's;
  any other exception is a bug (``report_bug``)."""
  try:
    return fn(*args, **kwargs)
  except UsageError as e:
    if os.environ.get("KD_TF2_TRACEBACK"):
      raise
    fail(e)
  except WorkerLost as e:
    fail(e, code=1)
  except (TrainingDiverged, TrainingInterrupted):
    raise  # the caller says how the run ended
  except Exception as e:  # pylint: disable=broad-except
    lost = _lost_worker(e)
    if lost is not None:
      fail(lost, code=1)
    report_bug(e)


def _lost_worker(error):
  """A ``WorkerLost`` naming the tasks that went away if ``error`` is TensorFlow's report of a
  broken multi-worker collective and some peer no longer accepts connections; else None."""
  if "tensorflow" not in sys.modules:
    return None
  from kd_tf2.engine import strategy  # pylint: disable=import-outside-toplevel
  return strategy.lost_worker(error)
