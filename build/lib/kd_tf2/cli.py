"""What ``train.py`` and ``test.py`` share: one-line errors, flag parsing, a quiet TensorFlow start.

Bad input ends a script with ``<script>: error: <one line>`` on stderr and exit code 2 - never a
traceback (``KD_TF2_TRACEBACK=1`` re-raises for debugging). TensorFlow's C++ start-up chatter
(oneDNN, CUDA probing) is sent to /dev/null while TensorFlow loads; ``KD_TF2_VERBOSE=1`` keeps it.
"""
import os
import sys

USAGE_EXIT = 2
# What bad input raises (UsageError is a ValueError).
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                PermissionError)


def fail(message, code=USAGE_EXIT):
  """Print ``<script>: error: <message on one line>`` to stderr and exit with ``code``."""
  text = " ".join(str(message).split()) or "unknown error"
  print(f"{os.path.basename(sys.argv[0])}: error: {text}", file=sys.stderr, flush=True)
  sys.exit(code)


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
                    else cluster_timeout)
    tf.config.list_logical_devices()
  finally:
    if quiet:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      os.close(devnull)
  tf.get_logger().setLevel("WARNING")


def run_guarded(fn, *args, **kwargs):
  """Call ``fn``; turn bad-input exceptions into one-line errors (exit 2)."""
  try:
    return fn(*args, **kwargs)
  except INPUT_ERRORS as e:
    if os.environ.get("KD_TF2_TRACEBACK"):
      raise
    fail(e)
