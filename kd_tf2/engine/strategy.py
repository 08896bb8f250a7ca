"""Which ``tf.distribute`` strategy runs the steps (DESIGN.md contract 5).

    configure_cpu_replicas(2)          # before TensorFlow creates its devices
    strategy = make_strategy("auto")   # Mirrored over 2 logical CPUs here

Names: ``auto`` (Mirrored over all GPUs if there are several, else Mirrored over the logical CPUs if
``--cpu_replicas`` > 1, else one device), ``one_device``, ``mirrored`` (all GPUs, else all logical
CPUs), ``multi_worker`` (``MultiWorkerMirroredStrategy`` from ``TF_CONFIG``), ``tpu``.

``multi_worker``: TF 2.21 builds ``MultiWorkerMirroredStrategy`` only before TensorFlow initialises
its devices (so ``train.py`` builds it first thing; later calls return that one instance), and its
constructor waits forever - deaf to SIGTERM - for a task that never starts. So ``TF_CONFIG`` is
checked first (``read_tf_config``) and every other task's address must accept a TCP connection
within ``cluster_timeout`` seconds (``wait_for_peers``), else ``UsageError`` names the missing ones.
A task that passed that probe but dies before it registers would still leave the constructor
waiting: a watchdog (``_RegistrationWatchdog``) ends the process after another ``cluster_timeout``
seconds with one line naming the tasks that no longer answer (exit code 2). When a task dies
mid-training, TF aborts the survivors' collectives (``UnavailableError``) within about 10 s;
``lost_worker`` turns that into a ``WorkerLost`` naming the task, found by probing every peer's
address again.
"""
import dataclasses
import json
import os
import select
import signal
import socket
import sys
import threading
import time

import tensorflow as tf

from kd_tf2.checks import is_int, is_number
from kd_tf2.errors import UsageError, WorkerLost

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")
DEFAULT_CLUSTER_TIMEOUT = 300.0
# The jobs of a MultiWorkerMirroredStrategy cluster: every task of them joins the all-reduce.
COLLECTIVE_JOBS = ("chief", "worker")
_TF_CONFIG_EXAMPLE = ('{"cluster": {"worker": ["host1:port", "host2:port"]}, '
                      '"task": {"type": "worker", "index": 0}}')
_multi_worker = None  # this process's MultiWorkerMirroredStrategy, once built
_cluster_task = None  # and its ClusterTask (whom to probe when a collective breaks)
# This process's Mirrored strategies by device list. One per device list, reused by every run of the
# process (a teacher then its student; a bench sweep): two MirroredStrategy objects number their
# collective all-reduces from the same start, so the second one's synchronized BatchNorm reuses the
# first one's collective instance keys with other shapes and TF aborts the step ("Shape mismatch in
# the collective instance").
_mirrored = {}


def configure_cpu_replicas(n):
  """Split the first physical CPU into ``n`` logical devices (``/cpu:0`` ... ``/cpu:n-1``).

  Must run before TensorFlow initialises its devices (before any op); asking for a different
  split afterwards raises ``UsageError``. ``n <= 1`` leaves the CPU alone.
  """
  if not is_int(n) or n < 1:
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


@dataclasses.dataclass(frozen=True)
class ClusterTask:
  """This process's place in a multi-worker cluster: ``cluster`` maps each job (``chief``,
  ``worker``) to its tasks' ``host:port`` addresses; this task is ``cluster[task_type][index]``."""
  cluster: dict
  task_type: str
  index: int

  @property
  def address(self):
    return self.cluster[self.task_type][self.index]

  def peers(self):
    """``{"worker 1": "host:port", ...}``: every other task of the cluster."""
    return {f"{job} {i}": address for job, addresses in self.cluster.items()
            for i, address in enumerate(addresses) if (job, i) != (self.task_type, self.index)}


def split_address(address):
  """``"host:port"`` (or ``"[v6]:port"``) -> ``(host, port)``; ValueError if it is not one."""
  host, sep, port = address.rpartition(":")
  host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(address)
  return host, int(port)


def read_tf_config(text):
  """Parse and check ``TF_CONFIG`` for ``multi_worker``; returns a ``ClusterTask``.

  Expects ``{"cluster": {"chief": [one address], "worker": ["host:port", ...]}, "task": {"type":
  "worker", "index": 0}}`` (a chief is optional). Raises ``UsageError`` (one line) otherwise.
  """
  if not text:
    raise UsageError(f"strategy=multi_worker needs the TF_CONFIG environment variable (e.g. "
                     f"{_TF_CONFIG_EXAMPLE})")
  try:
    spec = json.loads(text)
  except ValueError:
    raise UsageError(f"TF_CONFIG is not JSON: {text!r}") from None
  if not isinstance(spec, dict):
    raise UsageError(f"TF_CONFIG={text!r} is not a JSON object; expected e.g. {_TF_CONFIG_EXAMPLE}")
  cluster = spec.get("cluster")
  if not isinstance(cluster, dict) or not cluster:
    raise UsageError(f'TF_CONFIG "cluster"={cluster!r}: must map jobs ({", ".join(COLLECTIVE_JOBS)})'
                     ' to lists of "host:port" addresses')
  seen = {}
  for job, addresses in cluster.items():
    if job not in COLLECTIVE_JOBS:
      raise UsageError(f'TF_CONFIG cluster job {job!r} is not supported by --strategy=multi_worker;'
                       f' accepted jobs: {", ".join(COLLECTIVE_JOBS)}')
    if (not isinstance(addresses, list) or not addresses
        or not all(isinstance(a, str) for a in addresses)):
      raise UsageError(f'TF_CONFIG cluster job {job!r}: {addresses!r} is not a non-empty list of '
                       '"host:port" strings')
    for i, address in enumerate(addresses):
      try:
        split_address(address)
      except ValueError:
        raise UsageError(f'TF_CONFIG cluster address {address!r} ({job} {i}) is not "host:port" '
                         '(port 1-65535)') from None
      if address in seen:
        raise UsageError(f"TF_CONFIG cluster address {address} is given twice ({seen[address]} and "
                         f"{job} {i}); every task needs its own host:port")
      seen[address] = f"{job} {i}"
  if len(cluster.get("chief", ())) > 1:
    raise UsageError(f"TF_CONFIG cluster has {len(cluster['chief'])} chief tasks; at most one")
  task = spec.get("task")
  if not isinstance(task, dict):
    raise UsageError(f'TF_CONFIG "task"={task!r}: must be {{"type": JOB, "index": N}} naming this '
                     "process's task in the cluster")
  task_type, index = task.get("type"), task.get("index", 0)
  if task_type not in cluster:
    raise UsageError(f'TF_CONFIG task type {task_type!r} is not a job of the cluster '
                     f'(jobs: {", ".join(cluster)})')
  n = len(cluster[task_type])
  if not is_int(index) or not 0 <= index < n:
    raise UsageError(f"TF_CONFIG task index {index!r} is out of range: job {task_type!r} has {n} "
                     f"task(s), indices 0..{n - 1}")
  return ClusterTask({job: tuple(a) for job, a in cluster.items()}, task_type, index)


def _accepts_connection(address, timeout):
  try:
    with socket.create_connection(split_address(address), timeout=timeout):
      return True
  except OSError:
    return False


def _placeholder_listener(task):
  """Listen on this task's port (all interfaces, as TF's gRPC server will) until the real server
  starts, so that peers probing us see us arrive: without it every task would wait for the others'
  servers, which start only after their own probes succeed."""
  _, port = split_address(task.address)
  try:
    if socket.has_dualstack_ipv6():
      listener = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
    else:
      listener = socket.create_server(("", port))
  except OSError as e:
    raise UsageError(f"TF_CONFIG task {task.task_type} {task.index} ({task.address}): cannot listen "
                     f"on port {port} ({e.strerror or e}); is another process using it?") from None
  listener.setblocking(False)
  return listener


def _drain(listener):
  """Accept and close the probes that reached us (keeps the backlog from filling)."""
  while True:
    try:
      connection, _ = listener.accept()
    except OSError:  # BlockingIOError: nobody waiting
      return
    connection.close()


def wait_for_peers(task, timeout, poll=0.2):
  """Return once every other task of ``task``'s cluster accepts TCP connections on its address.

  Meanwhile this task listens on its own port. Peers are retried until ``timeout`` seconds have
  passed (their servers may start after ours); then ``UsageError`` names those still unreachable.
  """
  pending = task.peers()
  if not pending:
    return
  deadline = time.monotonic() + timeout
  listener = _placeholder_listener(task)
  try:
    while True:
      _drain(listener)
      left = deadline - time.monotonic()
      pending = {name: address for name, address in pending.items()
                 if not _accepts_connection(address, timeout=max(0.05, min(1.0, left)))}
      if not pending:
        return
      if time.monotonic() >= deadline:
        raise UsageError(f"--cluster_timeout={timeout:g}s passed and TF_CONFIG's "
                         f"{_names(pending)} still refuse(s) connections; start every task of the "
                         "cluster, or raise --cluster_timeout")
      time.sleep(max(0.0, min(poll, deadline - time.monotonic())))
  finally:
    listener.close()


def unreachable_peers(task, timeout=1.0):
  """``{"worker 1": "host:port", ...}``: the other tasks that refuse a TCP connection now."""
  return {name: address for name, address in task.peers().items()
          if not _accepts_connection(address, timeout=timeout)}


def _names(peers):
  return ", ".join(f"{address} ({name})" for name, address in peers.items())


class _RegistrationWatchdog:
  """Bounds the wait in TF's strategy constructor, which blocks until every task has registered
  and holds the GIL (and TF catches SIGTERM) meanwhile, so no Python thread or handler of this
  process can run until it returns.

  A forked child watches instead: if the constructor has not returned within ``timeout`` seconds,
  it writes one line to ``report_fd`` naming the peers that no longer accept connections (or, if
  all do, saying that they did not join) and sends SIGINT, for which this process has installed
  libc's ``_exit`` as a C-level handler for the duration: the process ends with exit code 2 (2 is
  SIGINT's number), as a missing peer at start-up does. Without that handler it is SIGKILLed.
  """

  def __init__(self, task, timeout, report_fd=2):
    self.task, self.timeout, self.report_fd = task, timeout, report_fd
    self.pid, self.pipe, self.previous = None, None, None

  def __enter__(self):
    exit_on_sigint = self._install_exit_on_sigint()
    read_end, self.pipe = os.pipe()
    self.pid = os.fork()
    if self.pid == 0:  # the child: never returns
      try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.close(self.pipe)
        self._watch(read_end, os.getppid(), exit_on_sigint)
      finally:
        os._exit(0)  # pylint: disable=protected-access
    os.close(read_end)
    return self

  def __exit__(self, *exc):
    os.close(self.pipe)  # the child wakes up (end of file) and leaves
    os.waitpid(self.pid, 0)
    if self.previous is not None:
      signal.signal(signal.SIGINT, self.previous)
    return False

  def _install_exit_on_sigint(self):
    """SIGINT -> libc ``_exit(2)`` (no GIL needed); False where that cannot be done."""
    if threading.current_thread() is not threading.main_thread():
      return False  # Python's handler could not be put back (signal.signal: main thread only)
    try:
      import ctypes  # pylint: disable=import-outside-toplevel
      libc = ctypes.CDLL(None)
      libc.signal.restype, libc.signal.argtypes = ctypes.c_void_p, [ctypes.c_int, ctypes.c_void_p]
      handler = ctypes.cast(libc._exit, ctypes.c_void_p).value  # pylint: disable=protected-access
      previous = signal.getsignal(signal.SIGINT)
      if libc.signal(signal.SIGINT, handler) == ctypes.c_void_p(-1).value:
        return False
    except (OSError, AttributeError, ValueError):
      return False
    self.previous = signal.default_int_handler if previous is None else previous
    return True

  def _watch(self, read_end, parent, exit_on_sigint):
    if select.select([read_end], [], [], self.timeout)[0]:
      return  # the constructor returned (or the parent died)
    gone = unreachable_peers(self.task)
    if gone:
      what = (f"{_names(gone)} went away after the start-up check and no longer accept(s) "
              "connections; start every task of the cluster again")
    else:
      what = (f"the other tasks ({_names(self.task.peers())}) accept connections but did not "
              "join the cluster; restart every task with the same TF_CONFIG cluster")
    line = (f"{os.path.basename(sys.argv[0])}: error: --cluster_timeout={self.timeout:g}s passed "
            f"while TF_CONFIG's tasks registered with each other: {what}\n")
    if select.select([read_end], [], [], 0)[0]:
      return
    os.write(self.report_fd, line.encode())
    os.kill(parent, signal.SIGINT if exit_on_sigint else signal.SIGKILL)


def lost_worker(error, wait=5.0, poll=0.25):
  """``WorkerLost`` naming the tasks of this process's cluster that went away, if ``error`` (raised
  by TensorFlow during multi-worker training) came with some peer no longer accepting connections
  within ``wait`` seconds; None otherwise (no multi-worker strategy here, not a TensorFlow error,
  or every peer is still up: then ``error`` is not explained by a lost task)."""
  if _cluster_task is None or not isinstance(error, tf.errors.OpError):
    return None
  deadline = time.monotonic() + wait
  while True:
    gone = unreachable_peers(_cluster_task)
    if gone:
      return WorkerLost(
          f"{_names(gone)} went away during training (no longer accept(s) connections), so "
          f"{_cluster_task.task_type} {_cluster_task.index} stopped too "
          f"({type(error).__name__}); relaunch every task of the cluster with the same command to "
          "resume from the chief's last checkpoint")
    if time.monotonic() >= deadline:
      return None
    time.sleep(poll)


def check_cluster_timeout(seconds):
  ok = is_number(seconds) and seconds > 0
  if not ok:
    raise UsageError(f"--cluster_timeout={seconds!r}: must be a number of seconds > 0")


def check_multi_worker_replicas(cpu_replicas):
  """``MultiWorkerMirroredStrategy`` runs one replica per CPU worker: refuse a CPU split."""
  if cpu_replicas > 1:
    raise UsageError(f"--cpu_replicas={cpu_replicas} does not apply to --strategy=multi_worker "
                     "(each CPU worker runs one replica); drop --cpu_replicas")


def _make_multi_worker(cluster_timeout, report_fd=2):
  """This process's ``MultiWorkerMirroredStrategy`` (built once; see the module docstring)."""
  global _multi_worker, _cluster_task
  if _multi_worker is not None:
    return _multi_worker
  check_cluster_timeout(cluster_timeout)
  task = read_tf_config(os.environ.get("TF_CONFIG", ""))
  split = tf.config.get_logical_device_configuration(tf.config.list_physical_devices("CPU")[0])
  check_multi_worker_replicas(len(split or ()))
  wait_for_peers(task, cluster_timeout)
  try:
    with _RegistrationWatchdog(task, cluster_timeout, report_fd):
      _multi_worker = tf.distribute.MultiWorkerMirroredStrategy()
    _cluster_task = task
  except RuntimeError as e:
    if "startup" not in str(e):
      raise
    raise UsageError("--strategy=multi_worker: TensorFlow already initialised its devices in this "
                     "process; build the strategy first (make_strategy('multi_worker') before any "
                     "op, as train.py does)") from None
  return _multi_worker


def make_strategy(name="auto", cluster_timeout=DEFAULT_CLUSTER_TIMEOUT, report_fd=2):
  """The strategy called ``name`` (see the module docstring).

  ``cluster_timeout``: seconds ``multi_worker`` waits for the other tasks of ``TF_CONFIG``, first
  to accept connections, then to register. ``report_fd``: where the registration watchdog writes
  its one line (``kd_tf2.cli`` passes the real stderr while TensorFlow's start-up is muted).
  """
  if name not in STRATEGIES:
    raise UsageError(f"unknown strategy {name!r}; accepted: {', '.join(STRATEGIES)}")
  if name == "multi_worker":
    return _make_multi_worker(cluster_timeout, report_fd)
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
  if name == "one_device":
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else cpus[0].name)
  if name == "mirrored" or len(gpus) > 1 or (not gpus and len(cpus) > 1):
    devices = tuple(d.name for d in gpus) if gpus else tuple(d.name for d in cpus)
    if devices not in _mirrored:
      _mirrored[devices] = tf.distribute.MirroredStrategy(list(devices))
    return _mirrored[devices]
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
