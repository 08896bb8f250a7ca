"""``python -m kd_tf2.bench table``: test top-1 of every method at every training-set fraction.

    python -m kd_tf2.bench table --methods=all --fractions=1,0.5,0.25,0.1 --seeds=0,1 \\
        --runs_dir=runs/table --dataset=cifar10 --arch=resnet8 --teacher_arch=resnet32 --epochs=30

Every flag that is not the table's own (``--methods --fractions --seeds --runs_dir --executor``)
is a ``kd_tf2.engine.TrainConfig`` field, i.e. a ``train.py`` flag, and applies to every run.

One runs directory holds every training, so ``tensorboard --logdir RUNS`` shows them together:

    RUNS/frac0.25/seed0/teacher/     the teacher of this fraction and seed (--teacher_arch, method
                                     none, --teacher_epochs), trained once and shared
    RUNS/frac0.25/seed0/none/        the student trained alone (plain cross-entropy)
    RUNS/frac0.25/seed0/<METHOD>/    one train dir per method, with --teacher_ckpt=../teacher
                                     (but DML, whose peer trains with the student from scratch)
    RUNS/logs/<cell>.log             console output of each run (subprocess executor)
    RUNS/results.md, results.json    the table, rewritten after every run
    RUNS/results.png                 top-1 against the fraction, one line per method (plot.py)

A fraction's subset is chosen by the seed (``kd_tf2.data``), so each (fraction, seed) has its own
teacher, trained on the same images as its students. The teacher ignores the method's weights and
``--lr`` (as ``train.py`` does when it trains a teacher); the student-alone run ignores the loss
weights and ``--init_epochs`` (plain cross-entropy, the student's ``--lr``).

Resuming: a run is finished when its train dir holds ``results.json``; a rerun of the same command
skips finished runs (and says so), resumes interrupted ones from their last checkpoint and retries
failed ones. A finished run made with other experiment flags is reported as a conflict, never
mixed into the table.

Executors: ``subprocess`` (default) runs each training in a fresh Python process
(``python -m kd_tf2.bench table-cell``, which calls ``kd_tf2.engine.train``): TensorFlow state
(traced functions, Keras name counters, the mixed-precision policy, memory) never leaks from one
run into the next, a crash or out-of-memory kill loses one run, not the sweep, and Ctrl-C/SIGTERM
is forwarded once so the running training writes its checkpoint. ``inprocess`` calls
``kd_tf2.engine.train`` in this process (no TensorFlow start-up per run: faster for tiny runs such
as the tests).

Cells of the table: ``final / best`` test top-1 (%), i.e. the last epoch's and the best epoch's;
with several seeds, ``mean ± std`` over seeds (sample standard deviation), and ``(n=k)`` when only
k of them finished. A cell without any finished run shows why: ``refused`` (bad input, e.g. a pair
the method cannot distil), ``diverged``, ``error`` (a crash: a bug, see the run's log), ...
"""
import argparse
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

from kd_tf2.errors import UsageError

CONTROLLED = ("method", "fraction", "seed", "train_dir", "teacher_ckpt")
TEACHER = "teacher"
STUDENT = "none"
EXECUTORS = ("subprocess", "inprocess")
RESULTS_MD, RESULTS_JSON, RESULTS_PNG = "results.md", "results.json", "results.png"
# Flags the student trained alone does not take: it is plain cross-entropy.
_STUDENT_DROPS = ("ce_weight", "kd_weight", "method_weight", "temperature", "init_epochs")

# Status of a run (cell).
DONE, SKIPPED = "done", "skipped"
REFUSED, DIVERGED, ERROR = "refused", "diverged", "error"
INTERRUPTED, NO_TEACHER, CONFLICT, PENDING = "interrupted", "no teacher", "conflict", "pending"
_FINISHED = (DONE, SKIPPED)
# Exit codes of ``table-cell`` (``cell_main``).
_EXIT = {0: DONE, 2: REFUSED, 3: DIVERGED, 4: INTERRUPTED}


# ----------------------------------------------------------------------------- flags

def _field_type(field):
  kinds = {"str": str, "int": int, "float": float, "bool": bool}
  return kinds.get(field.type, field.type) if isinstance(field.type, str) else field.type


def train_fields():
  """The ``TrainConfig`` fields the command line may set: (name, type) pairs."""
  from kd_tf2.engine import TrainConfig  # pylint: disable=import-outside-toplevel
  return [(f.name, _field_type(f)) for f in dataclasses.fields(TrainConfig)
          if f.name not in CONTROLLED]


def add_parser(subparsers, add_bool):
  """Register the ``table`` sub-command on an argparse ``subparsers``."""
  p = subparsers.add_parser(
      "table", help="train every (method, fraction, seed) and tabulate test top-1",
      description="Train every (method, fraction, seed) into one runs directory and write "
      "results.md / results.json (kd_tf2.bench.table). Other flags are train.py's.")
  p.add_argument("--methods", required=True,
                 help="'all' or a comma-separated list; the teacher and the student alone "
                 "(none) are always included")
  p.add_argument("--fractions", default="1,0.5,0.25,0.1", help="training-set fractions in (0, 1]")
  p.add_argument("--seeds", default="0", help="comma-separated seeds (mean ± std over them)")
  p.add_argument("--runs_dir", default=os.path.join("runs", "table"),
                 help="where every run, the logs and the results go")
  p.add_argument("--executor", default="subprocess", choices=EXECUTORS,
                 help="subprocess: each run in a fresh process (default); inprocess: faster "
                 "start-up, shared TensorFlow state")
  group = p.add_argument_group("train.py flags (applied to every run)")
  for name, kind in train_fields():
    if kind is bool:
      add_bool(group, name, f"train.py --{name}")
    else:
      group.add_argument(f"--{name}", type=kind, default=argparse.SUPPRESS,
                         help=f"train.py --{name}")
  return p


def train_flags(args):
  """The train.py flags given on the command line: ``{name: value}``."""
  return {name: getattr(args, name) for name, _ in train_fields() if hasattr(args, name)}


def _usage_error(message):
  return UsageError(message)


def parse_fractions(text):
  """``"1,0.5"`` -> ``[1.0, 0.5]`` (order kept, duplicates dropped); each in (0, 1]."""
  out = []
  for part in str(text).split(","):
    part = part.strip()
    try:
      value = float(part)
    except ValueError:
      value = float("nan")
    if not 0.0 < value <= 1.0:
      raise _usage_error(f"--fractions={text!r}: {part!r} is not a number in (0, 1]")
    if value not in out:
      out.append(value)
  return out


def parse_seeds(text):
  """``"0,1"`` -> ``[0, 1]``; each an integer >= 0."""
  out = []
  for part in str(text).split(","):
    part = part.strip()
    if not part.isdigit():
      raise _usage_error(f"--seeds={text!r}: {part!r} is not an integer >= 0")
    if int(part) not in out:
      out.append(int(part))
  return out


def parse_methods(text):
  """``"all"`` -> every registered method but ``none``; else canonical names, order kept.
  ``none`` is dropped from the list: the table always has the student-alone row."""
  from kd_tf2 import distillers  # pylint: disable=import-outside-toplevel
  if str(text).strip().lower() == "all":
    names = distillers.available()
  else:
    names = [distillers.canonical_name(p.strip()) for p in str(text).split(",") if p.strip()]
    if not names:
      raise _usage_error(f"--methods={text!r}: give 'all' or a comma-separated list "
                         f"({', '.join(distillers.available())})")
  out = []
  for name in names:
    if name != STUDENT and name not in out:
      out.append(name)
  return out


def fraction_label(fraction):
  return f"{100.0 * fraction:g}%"


# ----------------------------------------------------------------------------- cells

@dataclasses.dataclass
class Cell:
  """One training: ``row`` is ``teacher``, ``none`` or a method."""
  row: str
  fraction: float
  seed: int
  config: object  # a TrainConfig
  status: str = PENDING
  message: str = ""
  results: dict = None

  @property
  def name(self):
    return f"frac{self.fraction:g}/seed{self.seed}/{self.row}"

  @property
  def train_dir(self):
    return self.config.train_dir


def _run_signature(config):
  """The resolved experiment settings of ``config`` (what a finished run must match)."""
  from kd_tf2.engine import config as cfg  # pylint: disable=import-outside-toplevel
  return cfg.settings(cfg.validate(config))


def finished(cell):
  """``(True, results)`` if the cell's train dir holds a results file made with the cell's
  settings; ``(True, None)`` with ``cell.message`` set if it was made with others; else
  ``(False, None)``."""
  from kd_tf2.engine import rundir  # pylint: disable=import-outside-toplevel
  run = rundir.RunDir(cell.train_dir)
  if not os.path.isfile(run.join(rundir.RESULTS_FILE)):
    return False, None
  try:
    diff = run.settings_diff(_run_signature(cell.config))
    results = run.results()
  except (OSError, ValueError, KeyError, TypeError) as e:
    cell.message = f"unreadable run: {e}"
    return True, None
  if diff:
    cell.message = ("finished with other flags (" + ", ".join(
        f"{k}={there!r} there vs {now!r} now" for k, there, now in diff) +
                    "); use another --runs_dir")
    return True, None
  return True, results


def cell_main(config_dict):
  """``python -m kd_tf2.bench table-cell CONFIG_JSON``: one training in this fresh process.

  Exit code 0 finished, 2 bad input / refused pair (``UsageError``, message on stderr), 3
  diverged, 4 interrupted (checkpoint written); anything else is a crash (exit 1, traceback).
  """
  from kd_tf2 import cli  # pylint: disable=import-outside-toplevel
  cli.start_tensorflow(config_dict.get("cpu_replicas"))
  from kd_tf2 import engine  # pylint: disable=import-outside-toplevel
  from kd_tf2.errors import TrainingDiverged, TrainingInterrupted  # pylint: disable=import-outside-toplevel
  try:
    engine.train(engine.TrainConfig(**config_dict))
  except UsageError as e:
    print(f"refused: {_one_line(e)}", file=sys.stderr, flush=True)
    return 2
  except TrainingDiverged as e:
    print(f"diverged: {_one_line(e)}", file=sys.stderr, flush=True)
    return 3
  except TrainingInterrupted as e:
    print(f"interrupted: {_one_line(e)}", file=sys.stderr, flush=True)
    return 4
  return 0


def _one_line(error):
  return " ".join(str(error).split()) or type(error).__name__


def _last_line(path):
  try:
    with open(path, errors="replace") as f:
      lines = [line.strip() for line in f if line.strip()]
  except OSError:
    return ""
  return lines[-1] if lines else ""


class _Forward:
  """While a child runs: SIGINT/SIGTERM to this process are forwarded to it (once) as SIGTERM,
  which makes the engine write a checkpoint and stop; the sweep then stops."""

  def __init__(self):
    self.proc, self.signal, self._previous = None, None, {}

  def __enter__(self):
    import threading  # pylint: disable=import-outside-toplevel
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is None and self.proc is not None and self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


# ----------------------------------------------------------------------------- the sweep

@dataclasses.dataclass
class Outcome:
  results: dict
  markdown: str
  interrupted: bool


class Sweep:
  """Every (row, fraction, seed) run of one table, in order: per (fraction, seed) the teacher,
  the student alone, then each method."""

  def __init__(self, methods, fractions, seeds, runs_dir, executor, train_flags, log=None):
    from kd_tf2.engine import TrainConfig  # pylint: disable=import-outside-toplevel
    if executor not in EXECUTORS:
      raise _usage_error(f"--executor={executor!r}: accepted: {', '.join(EXECUTORS)}")
    unknown = sorted(set(train_flags) - {name for name, _ in train_fields()})
    if unknown:
      raise _usage_error(f"not train flags of the table: {', '.join(unknown)}; the table sets "
                         f"{', '.join(CONTROLLED)} itself")
    self.methods, self.fractions, self.seeds = list(methods), list(fractions), list(seeds)
    self.runs_dir = os.path.abspath(os.path.expanduser(runs_dir))
    self.executor, self.flags = executor, dict(train_flags)
    self.log = log or (lambda message: print(message, flush=True))
    self.stop_requested = False
    self.base = TrainConfig(**self.flags)
    # Bad flags fail now, before anything is trained.
    from kd_tf2.engine import config as cfg  # pylint: disable=import-outside-toplevel
    base = cfg.validate(self._student_config(self.fractions[0], self.seeds[0]))
    self.base = self.base.replace(arch=base.arch, teacher_arch=base.teacher_arch)
    self.cells = []
    for fraction in self.fractions:
      for seed in self.seeds:
        self.cells.append(Cell(TEACHER, fraction, seed, self._teacher_config(fraction, seed)))
        self.cells.append(Cell(STUDENT, fraction, seed, self._student_config(fraction, seed)))
        for method in self.methods:
          self.cells.append(Cell(method, fraction, seed,
                                 self._method_config(method, fraction, seed)))

  @classmethod
  def from_flags(cls, *, methods, fractions, seeds, runs_dir, executor, train_flags, log=None):
    """A sweep from the command line's strings (``--methods=all --fractions=1,0.5 ...``)."""
    return cls(parse_methods(methods), parse_fractions(fractions), parse_seeds(seeds), runs_dir,
               executor, train_flags, log=log)

  def _dir(self, fraction, seed, row):
    return os.path.join(self.runs_dir, f"frac{fraction:g}", f"seed{seed}", row)

  def _config(self, drops, **fields):
    from kd_tf2.engine import TrainConfig  # pylint: disable=import-outside-toplevel
    kept = {k: v for k, v in self.flags.items() if k not in drops}
    return TrainConfig(**{**kept, **fields})

  def _teacher_config(self, fraction, seed):
    from kd_tf2.engine import config as cfg  # pylint: disable=import-outside-toplevel
    run = self._config((), fraction=fraction, seed=seed, teacher_arch=self.base.teacher_arch)
    return cfg.teacher_config(run, train_dir=self._dir(fraction, seed, TEACHER))

  def _student_config(self, fraction, seed):
    return self._config(_STUDENT_DROPS, method=STUDENT, fraction=fraction, seed=seed,
                        train_dir=self._dir(fraction, seed, STUDENT))

  def _method_config(self, method, fraction, seed):
    from kd_tf2 import distillers  # pylint: disable=import-outside-toplevel
    # A method that trains its "teacher" with the student (DML's peer) takes no checkpoint.
    shared = getattr(distillers.get(method), "pretrained_teacher", True)
    return self._config((), method=method, fraction=fraction, seed=seed,
                        teacher_ckpt=self._dir(fraction, seed, TEACHER) if shared else "",
                        train_dir=self._dir(fraction, seed, method))

  # --------------------------------------------------------------- running
  def run(self):
    """Run (or resume, or skip) every cell; write the results after each. Returns an Outcome."""
    os.makedirs(self.runs_dir, exist_ok=True)
    teachers = {}
    interrupted = False
    for i, cell in enumerate(self.cells, 1):
      tag = f"[{i}/{len(self.cells)}] {cell.name}"
      if interrupted:
        break
      if cell.config.teacher_ckpt and teachers.get((cell.fraction, cell.seed)) is False:
        cell.status, cell.message = NO_TEACHER, "the teacher of this fraction did not finish"
        self.log(f"{tag}: not run, {cell.message}")
        continue
      self._run_cell(cell, tag)
      if cell.row == TEACHER:
        teachers[(cell.fraction, cell.seed)] = cell.status in _FINISHED
      interrupted = cell.status == INTERRUPTED or self.stop_requested
      self.write()
    outcome = self.write()
    outcome.interrupted = interrupted
    return outcome

  def _run_cell(self, cell, tag):
    try:
      _run_signature(cell.config)  # refuses bad flags for this cell before any process starts
      done, results = finished(cell)
    except UsageError as e:  # the cell's flags are refused (e.g. --init_epochs here)
      cell.status, cell.message = REFUSED, _one_line(e)
      self.log(f"{tag}: refused: {cell.message}")
      return
    if done:
      if results is None:
        cell.status = CONFLICT
        self.log(f"{tag}: {cell.status}: {cell.message}")
      else:
        cell.status, cell.results = SKIPPED, results
        self.log(f"{tag}: skipped, already finished (top1 {results['top1']:.2f}, best "
                 f"{results['best_top1']:.2f})")
      return
    start = time.time()
    if self.executor == "inprocess":
      self._in_process(cell, tag)
    else:
      self._subprocess(cell, tag)
    took = time.time() - start
    if cell.status == DONE:
      r = cell.results
      self.log(f"{tag}: done in {took:.0f} s (top1 {r['top1']:.2f}, best {r['best_top1']:.2f})")
    else:
      self.log(f"{tag}: {cell.status} after {took:.0f} s: {cell.message}")

  def _results_of(self, cell):
    from kd_tf2.engine import rundir  # pylint: disable=import-outside-toplevel
    try:
      return rundir.RunDir(cell.train_dir).results()
    except (OSError, ValueError):
      return None

  def _in_process(self, cell, tag):
    import keras  # pylint: disable=import-outside-toplevel
    from kd_tf2 import engine  # pylint: disable=import-outside-toplevel
    from kd_tf2.errors import TrainingDiverged, TrainingInterrupted  # pylint: disable=import-outside-toplevel
    self.log(f"{tag}: training in this process into {cell.train_dir}")
    try:
      cell.results = engine.train(cell.config)
      cell.status = DONE
    except UsageError as e:
      cell.status, cell.message = REFUSED, _one_line(e)
    except TrainingDiverged as e:
      cell.status, cell.message = DIVERGED, _one_line(e)
    except TrainingInterrupted as e:
      cell.status, cell.message = INTERRUPTED, _one_line(e)
    except Exception as e:  # pylint: disable=broad-except  (a bug)
      cell.status, cell.message = ERROR, f"{type(e).__name__}: {_one_line(e)}"
    finally:
      keras.backend.clear_session()

  def log_path(self, cell):
    return os.path.join(self.runs_dir, "logs", cell.name.replace("/", "_") + ".log")

  def _subprocess(self, cell, tag):
    log_path = self.log_path(cell)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    self.log(f"{tag}: training in a subprocess into {cell.train_dir} (log {log_path})")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "kd_tf2.bench", "table-cell",
           json.dumps(dataclasses.asdict(cell.config))]
    with open(log_path, "a") as out, _Forward() as forward:
      out.write(f"$ {' '.join(cmd)}\n")
      out.flush()
      # Its own session: a terminal's Ctrl-C reaches only this process, which forwards it once.
      forward.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)
      code = forward.proc.wait()
    status = _EXIT.get(code, ERROR)
    if forward.signal is not None:
      self.stop_requested = True
      if status != DONE:
        status = INTERRUPTED
    cell.results = self._results_of(cell) if status == DONE else None
    if status == DONE and cell.results is None:
      status = ERROR
    cell.status = status
    cell.message = "" if status == DONE else f"exit code {code}: {_last_line(log_path)}"

  # --------------------------------------------------------------- results
  def rows(self):
    return [TEACHER, STUDENT] + self.methods

  def summary(self):
    """The results.json dict: per row and fraction, final and best top-1 over seeds; every run."""
    table = []
    for row in self.rows():
      cells = {}
      for fraction in self.fractions:
        group = [c for c in self.cells if c.row == row and c.fraction == fraction]
        done = [c for c in group if c.status in _FINISHED and c.results]
        entry = {"n": len(done), "seeds": [c.seed for c in done],
                 "final": _stats([c.results["top1"] for c in done]),
                 "best": _stats([c.results["best_top1"] for c in done])}
        if not done:
          entry["status"] = _worst([c.status for c in group])
        cells[f"{fraction:g}"] = entry
      table.append({"row": row, "label": self._label(row), "cells": cells})
    runs = []
    for c in self.cells:
      r = c.results or {}
      runs.append({"row": c.row, "fraction": c.fraction, "seed": c.seed, "status": c.status,
                   "message": c.message, "train_dir": os.path.relpath(c.train_dir, self.runs_dir),
                   "top1": r.get("top1"), "best_top1": r.get("best_top1"),
                   "best_epoch": r.get("best_epoch"), "teacher_top1": r.get("teacher_top1")})
    b = self.base
    return {"dataset": b.dataset, "arch": b.arch, "teacher_arch": b.teacher_arch,
            "epochs": b.epochs, "teacher_epochs": b.teacher_epochs or b.epochs,
            "batch_size": b.batch_size, "fractions": self.fractions, "seeds": self.seeds,
            "methods": self.methods, "train_flags": self.flags, "rows": table, "runs": runs}

  def _label(self, row):
    if row == TEACHER:
      return f"teacher ({self.base.teacher_arch})"
    if row == STUDENT:
      return f"none (student {self.base.arch} alone)"
    return row

  def markdown(self, summary):
    b = self.base
    seeds = ", ".join(str(s) for s in self.seeds)
    lines = [
        f"# Test top-1 (%) by training-set fraction: {b.teacher_arch} -> {b.arch} on {b.dataset}",
        "",
        f"{b.epochs} epochs (teacher {b.teacher_epochs or b.epochs}), batch {b.batch_size}, "
        f"seed(s) {seeds}. Each cell: last-epoch / best-epoch test top-1"
        + (", mean ± std over seeds." if len(self.seeds) > 1 else "."),
        "",
        "| method | " + " | ".join(fraction_label(f) for f in self.fractions) + " |",
        "|---|" + "---:|" * len(self.fractions)]
    for row in summary["rows"]:
      texts = [_cell_text(row["cells"][f"{f:g}"], len(self.seeds)) for f in self.fractions]
      lines.append(f"| {row['label']} | " + " | ".join(texts) + " |")
    lines += ["", f"Command: `{self.command()}`"]
    return "\n".join(lines) + "\n"

  def command(self):
    """The command line that reproduces (or resumes) this table."""
    parts = ["python -m kd_tf2.bench table", f"--methods={','.join(self.methods) or 'none'}",
             f"--fractions={','.join(f'{f:g}' for f in self.fractions)}",
             f"--seeds={','.join(str(s) for s in self.seeds)}", f"--runs_dir={self.runs_dir}"]
    for key, value in sorted(self.flags.items()):
      if isinstance(value, bool):
        parts.append(f"--{key}" if value else f"--no{key}")
      else:
        parts.append(f"--{key}={value}")
    return " ".join(parts)

  def write(self):
    """Write results.json and results.md into the runs directory; returns an Outcome."""
    summary = self.summary()
    text = self.markdown(summary)
    _atomic_write(os.path.join(self.runs_dir, RESULTS_JSON),
                  json.dumps(summary, indent=2, sort_keys=True) + "\n")
    _atomic_write(os.path.join(self.runs_dir, RESULTS_MD), text)
    from kd_tf2.bench import plot  # pylint: disable=import-outside-toplevel
    tmp = os.path.join(self.runs_dir, RESULTS_PNG + ".tmp.png")
    if plot.plot_fractions(summary, tmp):
      os.replace(tmp, os.path.join(self.runs_dir, RESULTS_PNG))
    return Outcome(summary, text, False)


_SEVERITY = (ERROR, DIVERGED, REFUSED, CONFLICT, NO_TEACHER, INTERRUPTED, PENDING)


def _worst(statuses):
  """The status that best explains an empty cell (the first of ``_SEVERITY`` present)."""
  for status in _SEVERITY:
    if status in statuses:
      return status
  return PENDING


def _stats(values):
  """``{"mean", "std", "values"}`` (sample std, 0 for one value) or None for no values."""
  if not values:
    return None
  mean = sum(values) / len(values)
  var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
  return {"mean": mean, "std": math.sqrt(var), "values": list(values)}


def _cell_text(entry, seeds):
  if entry["n"] == 0:
    return entry["status"]
  final, best = entry["final"], entry["best"]
  if seeds == 1:
    return f"{final['mean']:.2f} / {best['mean']:.2f}"
  text = (f"{final['mean']:.2f} ± {final['std']:.2f} / {best['mean']:.2f} ± {best['std']:.2f}")
  return text if entry["n"] == seeds else f"{text} (n={entry['n']})"


def _atomic_write(path, text):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)
