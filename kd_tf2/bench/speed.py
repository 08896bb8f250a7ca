"""``python -m kd_tf2.bench speed``: what one training step of each method costs.

    python -m kd_tf2.bench speed --arch=wrn_16_2 --teacher_arch=wrn_40_2 --methods=all \\
        [--batch_size=64 --steps=20 --warmup=5 --jit_compile --mixed_precision --threads=N
         --json=PATH]

Every row is measured in its own child process (``python -m kd_tf2.bench speed-child``), because
``resource.getrusage(...).ru_maxrss`` only ever grows within a process: a fresh process per row is
the only way to give each method its own peak. The child:

1. builds the student and (when the method reads one) the teacher from ``nets`` for random
   ``[batch, size, size, 3]`` images of ``num_classes`` classes, the distiller with
   ``kd_tf2.distillers.create`` (methods with ``--peers`` get one peer of the student's
   architecture; CRD gets the ``train_labels`` of a pretend ``train_size``-image
   training split, as the engine would pass them: its memory banks have that many rows), the
   engine's optimiser (``kd_tf2.engine.make_optimizer``, PyTorch's SGD), and compiles the step with
   the engine's own ``kd_tf2.engine.step.compile_step`` - the function ``train.py`` trains with
   (with ``--jit_compile``, the forward/backward pass in an XLA-compiled function and the optimiser
   update outside it). Only the main phase's step is timed (FitNet/AB/FSP/FT/MHGD init stages are
   separate phases, not part of it);
2. runs ``warmup`` steps (tracing, oneDNN kernel choice) and reads the peak RSS: the process's
   peak with TensorFlow, the nets, the distiller and one steady-state step of this method;
3. builds two references on their own copies of the nets: the student trained alone (method
   ``none``) and the *floor*, one ``none`` step plus one teacher forward pass
   (``Distiller.teacher_outputs``, returned from the step so it is not pruned);
4. times ``steps`` steps of the method and of each reference, interleaved step by step (method,
   student, floor, method, ...), each step ended by reading its loss back to Python.

``ms_per_step`` is the median over the timed steps (robust to the spikes of a shared machine);
``images_per_sec`` is ``batch / median``. The two ratios are paired: the median over rounds of
(method step time / reference step time of the same round), steps a few hundred milliseconds apart,
so the load of a shared machine, which changes on the scale of seconds, cancels out of them - the
absolute numbers of different rows, measured minutes apart, do not enjoy that. The same statistics
are also computed from the CPU time of the process during each step (``time.process_time``, all
threads): ``cpu_ms_per_step``, ``cpu_ratio_to_student``, ``cpu_ratio_to_floor``. CPU time counts
the work done, not the time spent waiting for a core, so on a loaded machine it is the steadier
measure of what a method costs (it still includes thread-pool spinning); wall time is what a user
waits. The ``none`` and
``floor`` rows are children of their own (their ratio to themselves is 1 by definition). A method that refuses the pair (``UsageError``) or cannot be compiled with XLA under
``--jit_compile`` is reported as refused, and any other failure as an error, without stopping the
other rows.

``threads`` (``--threads=N``) sets both of TensorFlow's thread pools (intra-op and inter-op) of
every child to N threads; 0 (the default) keeps TensorFlow's own choice, one thread per core the
process may run on (``taskset -c 0`` therefore gives one thread). The row records the intra-op
threads the child ran with (``threads``).
"""
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from kd_tf2.checks import is_int

STUDENT = "none"
FLOOR = "floor"
RESULT_PREFIX = "KD_TF2_SPEED_RESULT "
KEYS = ("method", "images_per_sec", "ms_per_step", "peak_rss_mb", "ratio_to_student",
        "ratio_to_floor")
# The same step times measured in CPU time of the process (all threads) instead of wall time.
CPU_KEYS = ("cpu_ms_per_step", "cpu_ratio_to_student", "cpu_ratio_to_floor")


@dataclasses.dataclass
class SpeedConfig:
  """What is measured: the pair, the batch, the number of steps and how the step is compiled."""
  arch: str = "resnet8x4"
  teacher_arch: str = "resnet32x4"
  batch_size: int = 64
  steps: int = 20
  warmup: int = 5
  jit_compile: bool = False
  mixed_precision: bool = False
  num_classes: int = 100
  image_size: int = 32
  train_size: int = 50000
  seed: int = 0
  adapt: bool = False
  threads: int = 0  # TensorFlow's intra- and inter-op threads; 0 = TensorFlow's default


def validate(config):
  """Check the numbers and canonicalise the net names; ``UsageError`` otherwise."""
  import nets  # pylint: disable=import-outside-toplevel
  from kd_tf2.errors import UsageError  # pylint: disable=import-outside-toplevel
  for name, low in (("batch_size", 1), ("steps", 1), ("warmup", 0), ("num_classes", 2),
                    ("image_size", 8), ("train_size", 2), ("seed", 0),
                    ("threads", 0)):
    value = getattr(config, name)
    if not is_int(value) or value < low:
      raise UsageError(f"--{name}={value!r}: must be an integer >= {low}")
  if config.train_size < config.batch_size:
    raise UsageError(f"--train_size={config.train_size} is smaller than --batch_size="
                     f"{config.batch_size}: a batch holds distinct samples of the split")
  names = {}
  for flag in ("arch", "teacher_arch"):
    try:
      names[flag] = nets.canonical_name(getattr(config, flag))
    except ValueError as e:
      raise UsageError(f"--{flag}: {e}") from None
  return dataclasses.replace(config, **names)


def resolve_methods(spec):
  """``"all"`` or ``"A,B,..."`` -> the rows to measure: ``none``, ``floor``, then each method once
  (canonical names, in the given order; ``all`` = every registered method)."""
  from kd_tf2 import distillers  # pylint: disable=import-outside-toplevel
  from kd_tf2.errors import UsageError  # pylint: disable=import-outside-toplevel
  if spec.strip().lower() == "all":
    names = distillers.available()
  else:
    names = [part.strip() for part in spec.split(",") if part.strip()]
    if not names:
      raise UsageError(f"--methods={spec!r}: give 'all' or a comma-separated list of methods "
                       f"({', '.join(distillers.available())})")
    names = [distillers.canonical_name(n) for n in names]
  rows = [STUDENT, FLOOR]
  for name in names:
    if name not in rows:
      rows.append(name)
  return rows


# ----------------------------------------------------------------------------- the child

def _peak_rss_mb():
  """Peak resident set size of this process so far, MB (Linux reports kB, macOS bytes)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


class _Nets:
  """A student and (built on first use) a teacher for ``config``'s images."""

  def __init__(self, config):
    from kd_tf2 import engine  # pylint: disable=import-outside-toplevel
    self.config = config
    self.shape = (config.image_size, config.image_size, 3)
    self.student = self._maybe_adapted(
        engine.build_net(config.arch, config.num_classes, self.shape))
    self._teacher = None

  def _maybe_adapted(self, net):
    """With ``adapt``: the zoo net's layers as a functional model, through ``kd_tf2.adapt``."""
    if not self.config.adapt:
      return net
    from kd_tf2.adapter import adapt, functional_zoo_net  # pylint: disable=import-outside-toplevel
    return adapt(functional_zoo_net(net, self.shape))

  @property
  def teacher(self):
    if self._teacher is None:
      from kd_tf2 import engine  # pylint: disable=import-outside-toplevel
      self._teacher = self._maybe_adapted(engine.build_net(
          self.config.teacher_arch, self.config.num_classes, self.shape))
    return self._teacher


def _compile(step_fn, variables, jit_compile, loss_scale):
  """``batch -> (terms, metrics)``: ``step_fn(batch, ctx)`` compiled by the engine's own
  ``kd_tf2.engine.step.compile_step`` under the default (one-device) strategy."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from kd_tf2 import engine  # pylint: disable=import-outside-toplevel
  from kd_tf2.engine import step as step_lib  # pylint: disable=import-outside-toplevel
  optimizer = engine.make_optimizer(0.01, variables, loss_scale=loss_scale, name="sgd_bench")
  return step_lib.compile_step(tf.distribute.get_strategy(), step_fn, optimizer, variables,
                               jit_compile=jit_compile)


def _method_step(method, nets_, config, loss_scale):
  """The compiled main-phase step of ``method`` on ``nets_`` (``UsageError`` if refused)."""
  from kd_tf2 import distillers, engine  # pylint: disable=import-outside-toplevel
  from kd_tf2.errors import UsageError  # pylint: disable=import-outside-toplevel
  cls = distillers.get(method)
  if config.jit_compile and cls.jit_unsupported:
    raise UsageError(f"{cls.method_name} cannot be compiled with XLA: {cls.jit_unsupported}")
  teacher = nets_.teacher if cls.reads_teacher() else None
  peers = {}
  if getattr(cls, "min_peers", 0):  # online methods with peers: one peer like the student
    peers["peers"] = [engine.build_net(config.arch, config.num_classes, nets_.shape)]
  distiller = distillers.create(method, nets_.student, teacher, input_shape=nets_.shape,
                                **_engine_hparams(cls, config), **peers)
  return _compile(distiller.train_step, distiller.variables_to_train(), config.jit_compile,
                  loss_scale)


def _train_labels(config):
  """Labels of the pretend training split: index ``i`` has class ``i % num_classes``."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  return np.arange(config.train_size, dtype=np.int64) % config.num_classes


def _engine_hparams(cls, config):
  """The constructor keywords the engine hands to methods that ask for them
  (``Distiller.engine_hparams``): CRD's ``train_labels`` are those of a ``train_size``-sample
  split (CIFAR's 50000 by default)."""
  from kd_tf2 import distillers  # pylint: disable=import-outside-toplevel
  return distillers.engine_kwargs(cls, train_labels=lambda: _train_labels(config),
                                  jit_compiled=lambda: config.jit_compile,
                                  protocol=lambda: "cifar")


def _floor_step(nets_, config, loss_scale):
  """One student step (method ``none``) plus one teacher forward pass, compiled together."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from kd_tf2 import distillers  # pylint: disable=import-outside-toplevel
  from kd_tf2.distillers import StepOutput  # pylint: disable=import-outside-toplevel
  distiller = distillers.create(STUDENT, nets_.student, nets_.teacher, input_shape=nets_.shape)

  def step_fn(batch, ctx):
    t = distiller.teacher_outputs(batch["image"])
    out = distiller.train_step(batch, ctx)
    terms = dict(out.terms)
    terms["teacher_logits_sum"] = tf.reduce_sum(t.logits)  # an output: the pass is not pruned
    return StepOutput(terms, out.logits)

  return _compile(step_fn, distiller.variables_to_train(), config.jit_compile, loss_scale)


def _random_batch(config):
  """Normal images; ``batch_size`` distinct sample indices of the pretend training split and
  their labels (``_train_labels``)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  b, s = config.batch_size, config.image_size
  index = tf.random.shuffle(tf.range(config.train_size, dtype=tf.int64), seed=config.seed)[:b]
  return {"image": tf.random.normal([b, s, s, 3], seed=config.seed),
          "label": index % config.num_classes, "index": index}


def _run(step, batch):
  """One step, finished: every output read back to Python. Returns its wall time and the CPU
  time of this process (all threads) during it, in seconds."""
  wall, cpu = time.perf_counter(), time.process_time()
  terms, _ = step(batch)
  for value in terms.values():
    value.numpy()
  return time.perf_counter() - wall, time.process_time() - cpu


def _policy(mixed_precision):
  """The engine's precision: mixed_float16 with loss scaling on GPU, mixed_bfloat16 on CPU."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  if not mixed_precision:
    return "float32", False
  if tf.config.list_logical_devices("GPU"):
    return "mixed_float16", True
  return "mixed_bfloat16", False


def measure(config, main):
  """Measure row ``main`` (a method, or ``FLOOR``) in this process; see the module docstring.

  Returns ``{"main", "status": "ok", "peak_rss_mb", "ms": {kind: [wall ms of each timed step]},
  "cpu_ms": {kind: [process CPU ms of each timed step]}}`` (the kinds' lists are aligned: entry i
  of each is round i) or
  ``{"main", "status": "refused"|"error", "message"}``.
  """
  import keras  # pylint: disable=import-outside-toplevel
  from kd_tf2.errors import UsageError  # pylint: disable=import-outside-toplevel
  policy, loss_scale = _policy(config.mixed_precision)
  keras.mixed_precision.set_global_policy(policy)
  keras.utils.set_random_seed(config.seed)
  try:
    batch = _random_batch(config)
    main_nets = _Nets(config)
    if main == FLOOR:
      steps = {main: _floor_step(main_nets, config, loss_scale)}
    else:
      steps = {main: _method_step(main, main_nets, config, loss_scale)}
    for _ in range(max(config.warmup, 1)):  # at least one: the trace is never timed
      _run(steps[main], batch)
    peak = _peak_rss_mb()
    refs = _Nets(config)
    if main != STUDENT:
      steps[STUDENT] = _method_step(STUDENT, refs, config, loss_scale)
    if main != FLOOR:
      steps[FLOOR] = _floor_step(refs, config, loss_scale)
    for kind in steps:
      if kind != main:
        for _ in range(max(config.warmup, 1)):
          _run(steps[kind], batch)
    times = {kind: [] for kind in steps}
    for _ in range(config.steps):
      for kind, step in steps.items():
        times[kind].append(_run(step, batch))
  except UsageError as e:
    return {"main": main, "status": "refused", "message": _one_line(e)}
  except Exception as e:  # pylint: disable=broad-except
    return {"main": main, "status": "error", "message": f"{type(e).__name__}: {_one_line(e)}"}
  ms = {kind: [round(1000.0 * wall, 4) for wall, _ in values] for kind, values in times.items()}
  cpu_ms = {kind: [round(1000.0 * cpu, 4) for _, cpu in values]
            for kind, values in times.items()}
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return {"main": main, "status": "ok", "peak_rss_mb": peak, "ms": ms, "cpu_ms": cpu_ms,
          "threads": _threads_in_use(tf)}


def _threads_in_use(tf):
  """The intra-op threads TensorFlow runs ops with (its default when not set: the usable cores)."""
  chosen = tf.config.threading.get_intra_op_parallelism_threads()
  if chosen:
    return chosen
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _one_line(error):
  text = " ".join(str(error).split())
  return text[:500] or type(error).__name__


def child_main(config_json, main):
  """Entry point of ``python -m kd_tf2.bench speed-child CONFIG_JSON MAIN``: prints one result
  line (``RESULT_PREFIX`` + JSON) on stdout."""
  from kd_tf2 import cli  # pylint: disable=import-outside-toplevel
  config = SpeedConfig(**json.loads(config_json))
  if config.threads:  # before TensorFlow initialises its runtime (start_tensorflow does)
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.config.threading.set_intra_op_parallelism_threads(config.threads)
    tf.config.threading.set_inter_op_parallelism_threads(config.threads)
  cli.start_tensorflow()
  result = measure(config, main)
  print(RESULT_PREFIX + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- the parent

def _run_child(config, main, timeout=None):
  """Measure ``main`` in a fresh process; a crash becomes an ``error`` result."""
  cmd = [sys.executable, "-m", "kd_tf2.bench", "speed-child",
         json.dumps(dataclasses.asdict(config)), main]
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)
  except subprocess.TimeoutExpired:
    return {"main": main, "status": "error", "message": f"timed out after {timeout} s"}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  last = [line for line in (proc.stderr or "").splitlines() if line.strip()]
  why = last[-1].strip() if last else "no output"
  return {"main": main, "status": "error",
          "message": f"child exited with code {proc.returncode}: {why}"}


def row_from_result(result, batch_size):
  """One JSON row from a child's result: ``KEYS``, ``status``, ``note`` and ``samples_ms`` (every
  timed step of the row and of its references, round by round, for other statistics)."""
  main = result["main"]
  row = {"method": main, **{k: None for k in KEYS[1:] + CPU_KEYS}, "status": result["status"],
         "threads": result.get("threads"),
         "note": "", "samples_ms": result.get("ms", {}), "samples_cpu_ms": result.get("cpu_ms", {})}
  if result["status"] != "ok":
    row["note"] = result.get("message", "")
    return row
  ms = result["ms"]
  median = statistics.median(ms[main])
  row.update(images_per_sec=batch_size * 1000.0 / median, ms_per_step=median,
             peak_rss_mb=result["peak_rss_mb"],
             ratio_to_student=1.0 if main == STUDENT else paired_ratio(ms[main], ms[STUDENT]),
             ratio_to_floor=1.0 if main == FLOOR else paired_ratio(ms[main], ms[FLOOR]))
  cpu = result.get("cpu_ms")
  if cpu:
    row.update(cpu_ms_per_step=statistics.median(cpu[main]),
               cpu_ratio_to_student=1.0 if main == STUDENT else paired_ratio(cpu[main],
                                                                             cpu[STUDENT]),
               cpu_ratio_to_floor=1.0 if main == FLOOR else paired_ratio(cpu[main], cpu[FLOOR]))
  if main == FLOOR:
    row["note"] = "one student step + one teacher forward pass"
  elif main == STUDENT:
    row["note"] = "student trained alone"
  elif _custom_step(main):
    row["note"] = "own train_step"
  return row


def paired_ratio(times, reference):
  """Median over rounds i of ``times[i] / reference[i]`` (aligned lists of step times)."""
  if len(times) != len(reference) or not times:
    raise ValueError(f"paired_ratio needs two aligned non-empty lists, got {len(times)} and "
                     f"{len(reference)} values")
  return statistics.median(a / b for a, b in zip(times, reference))


def _custom_step(method):
  from kd_tf2 import distillers  # pylint: disable=import-outside-toplevel
  return distillers.get(method).train_step is not distillers.Distiller.train_step


def machine_label():
  """CPU model, core count (and the pinning, if any) and TensorFlow version, for the caption."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  cpus = f"{os.cpu_count()} CPU(s)"
  if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) < (os.cpu_count() or 0):
    cpus += f", this benchmark pinned to {len(os.sched_getaffinity(0))} of them (taskset)"
  return f"{model}, {cpus}, TensorFlow {tf.__version__}"


def _fmt(value, spec):
  return "—" if value is None else format(value, spec)


def markdown(rows, caption):
  """The rows as a markdown table under a one-paragraph caption."""
  lines = [caption, "",
           "| method | images/s | ms/step | peak RSS MB | × student | × floor | CPU ms/step | "
           "× student (CPU) | × floor (CPU) | note |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
  for r in rows:
    note = r["note"] if r["status"] == "ok" else f"{r['status']}: {r['note']}"
    lines.append(f"| {r['method']} | {_fmt(r['images_per_sec'], '.1f')} | "
                 f"{_fmt(r['ms_per_step'], '.1f')} | {_fmt(r['peak_rss_mb'], '.0f')} | "
                 f"{_fmt(r['ratio_to_student'], '.2f')} | {_fmt(r['ratio_to_floor'], '.2f')} | "
                 f"{_fmt(r.get('cpu_ms_per_step'), '.1f')} | "
                 f"{_fmt(r.get('cpu_ratio_to_student'), '.2f')} | "
                 f"{_fmt(r.get('cpu_ratio_to_floor'), '.2f')} | {note.replace('|', '/')} |")
  return "\n".join(lines)


def _load():
  try:
    return os.getloadavg()[0]
  except OSError:
    return float("nan")


def run(config, methods, json_path=None, log=None, timeout=None):
  """Measure every row of ``methods`` (``resolve_methods``) in its own child; returns the rows.

  Prints progress through ``log`` (``fn(str)``), writes the JSON list to ``json_path`` if given.
  """
  log = log or (lambda message: print(message, file=sys.stderr, flush=True))
  config = validate(config)
  load_start = _load()
  rows = []
  for i, main in enumerate(methods, 1):
    start = time.time()
    result = _run_child(config, main, timeout)
    row = row_from_result(result, config.batch_size)
    rows.append(row)
    what = (f"{row['ms_per_step']:.1f} ms/step, x{row['ratio_to_floor']:.2f} floor"
            if row["status"] == "ok" else f"{row['status']}: {row['note']}")
    log(f"[{i}/{len(methods)}] {main}: {what} ({time.time() - start:.0f} s)")
  load_end = _load()
  precision = "mixed precision" if config.mixed_precision else "float32"
  compiled = "tf.function + XLA" if config.jit_compile else "tf.function (no XLA)"
  adapted = " (kd_tf2.adapt of functional copies)" if config.adapt else ""
  threads = (f"TensorFlow threads {config.threads} (--threads)" if config.threads else
             "TensorFlow's default threads (one per usable core)")
  caption = (f"Training-step speed, {config.teacher_arch} -> {config.arch}{adapted}, batch "
             f"{config.batch_size}, {config.image_size}x{config.image_size} random images, "
             f"{config.num_classes} classes, {precision}, {compiled}, {threads}; median of "
             f"{config.steps} steps after {config.warmup} warm-up, each row in its own process; "
             f"ratios are medians of per-round ratios to references interleaved step by step in "
             f"that process (absolute "
             f"times of different rows were measured minutes apart: compare rows by their "
             f"ratios). Machine: {machine_label()}; load average {load_start:.1f} at start, "
             f"{load_end:.1f} at end.")
  if json_path:
    directory = os.path.dirname(os.path.abspath(json_path))
    os.makedirs(directory, exist_ok=True)
    with open(json_path, "w") as f:
      json.dump(rows, f, indent=2)
      f.write("\n")
  return rows, markdown(rows, caption)
