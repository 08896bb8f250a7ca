"""Which ``tf.distribute`` strategy runs the steps (DESIGN.md contract 5).

    configure_cpu_replicas(2)          # before TensorFlow creates its devices
    strategy = make_strategy("auto")   # Mirrored over 2 logical CPUs here

Names: ``auto`` (Mirrored over all GPUs if there are several, else Mirrored over the logical CPUs if
``--cpu_replicas`` > 1, else one device), ``one_device``, ``mirrored`` (all GPUs, else all logical
CPUs), ``multi_worker`` (``MultiWorkerMirroredStrategy`` from ``TF_CONFIG``), ``tpu``.
"""
import json
import os

import tensorflow as tf

from kd_tf2.errors import UsageError

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")


def configure_cpu_replicas(n):
  """Split the first physical CPU into ``n`` logical devices (``/cpu:0`` ... ``/cpu:n-1``).

  Must run before TensorFlow initialises its devices (before any op); asking for a different
  split afterwards raises ``UsageError``. ``n <= 1`` leaves the CPU alone.
  """
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise UsageError(f"cpu_replicas={n!r}: must be an integer >= 1")
  cpus = tf.config.list_physical_devices("CPU")
  current = tf.config.get_logical_device_configuration(cpus[0])
  if n == 1 and not current:
    return
  if current is not None and len(current) == n:
    return
  try:
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
  except RuntimeError:
    have = len(tf.config.list_logical_devices("CPU"))
    raise UsageError(f"cpu_replicas={n}: TensorFlow already initialised {have} CPU device(s) in "
                     "this process; set it before anything runs (a fresh process)") from None


def make_strategy(name="auto"):
  """The strategy called ``name`` (see the module docstring)."""
  if name not in STRATEGIES:
    raise UsageError(f"unknown strategy {name!r}; accepted: {', '.join(STRATEGIES)}")
  gpus = tf.config.list_logical_devices("GPU")
  cpus = tf.config.list_logical_devices("CPU")
  if name == "tpu":
    try:
      resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
      tf.config.experimental_connect_to_cluster(resolver)
      tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as e:
      raise UsageError(f"strategy=tpu: no TPU found ({str(e).splitlines()[0]})") from None
    return tf.distribute.TPUStrategy(resolver)
  if name == "multi_worker":
    if not os.environ.get("TF_CONFIG"):
      raise UsageError("strategy=multi_worker needs the TF_CONFIG environment variable "
                       '(e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, '
                       '"task": {"type": "worker", "index": 0}})')
    try:
      json.loads(os.environ["TF_CONFIG"])
    except ValueError:
      raise UsageError(f"TF_CONFIG is not JSON: {os.environ['TF_CONFIG']!r}") from None
    return tf.distribute.MultiWorkerMirroredStrategy()
  if name == "one_device":
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else cpus[0].name)
  if name == "mirrored" or len(gpus) > 1 or (not gpus and len(cpus) > 1):
    devices = [d.name for d in gpus] if gpus else [d.name for d in cpus]
    return tf.distribute.MirroredStrategy(devices)
  return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else cpus[0].name)


def is_chief(strategy):
  """Whether this process writes checkpoints, summaries and exports (always, but in multi-worker
  training only the chief - or worker 0 when there is no chief - does)."""
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return True
  resolver = strategy.cluster_resolver
  task_type, task_id = resolver.task_type, resolver.task_id
  if task_type in (None, "chief"):
    return True
  has_chief = "chief" in resolver.cluster_spec().as_dict()
  return task_type == "worker" and task_id == 0 and not has_chief
