"""``python -m kd_tf2.bench table|speed [flags]`` (see ``kd_tf2.bench``; ``--help`` on each).

Bad input ends with ``kd_tf2.bench: error: <one line>`` on stderr and exit code 2; a bug with its
traceback and exit code 1 (``kd_tf2.cli``).
"""
import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from kd_tf2 import cli  # noqa: E402  (no TensorFlow yet)

PROG = "python -m kd_tf2.bench"
NAME = "kd_tf2.bench"  # how its error lines start


class _Parser(argparse.ArgumentParser):
  """argparse with one-line errors and no abbreviations (``--fraction`` is not ``--fractions``)."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("allow_abbrev", False)
    super().__init__(*args, **kwargs)

  def error(self, message):
    cli.fail(f"{message} (see {self.prog} --help)", prog=NAME)


def parse_bool(text):
  low = str(text).strip().lower()
  if low in ("1", "true", "yes", "on"):
    return True
  if low in ("0", "false", "no", "off"):
    return False
  raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true/false)")


def add_bool(parser, name, help_text, default=argparse.SUPPRESS):
  """absl-style boolean: ``--name``, ``--name=true|false`` or ``--noname``."""
  parser.add_argument(f"--{name}", dest=name, nargs="?", const=True, type=parse_bool,
                      default=default, help=help_text)
  parser.add_argument(f"--no{name}", dest=name, action="store_false", default=argparse.SUPPRESS,
                      help=argparse.SUPPRESS)


def _speed_parser(sub):
  p = sub.add_parser("speed", help="time one training step of each method on random data",
                     description="Time one training step of each method (kd_tf2.bench.speed).")
  p.add_argument("--arch", default="resnet8x4", help="student architecture")
  p.add_argument("--teacher_arch", default="resnet32x4", help="teacher architecture")
  p.add_argument("--methods", default="all", help="'all' or a comma-separated list; the "
                 "student alone (none) and the floor are always measured")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--steps", type=int, default=20, help="timed steps per measured step kind")
  p.add_argument("--warmup", type=int, default=5, help="untimed steps first (tracing)")
  add_bool(p, "jit_compile", "compile the per-replica step with XLA", default=False)
  add_bool(p, "mixed_precision", "mixed_bfloat16 on CPU, mixed_float16 on GPU", default=False)
  p.add_argument("--num_classes", type=int, default=100)
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--train_size", type=int, default=50000,
                 help="training-split size for CRD's memory bank (CIFAR: 50000)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--timeout", type=float, default=None, help="seconds per row (default: none)")
  p.add_argument("--json", default="", help="write the rows as a JSON list here")
  return p


def _check_output(flag, path, is_dir):
  """``UsageError`` now, not after hours of work, if ``path`` (a file, or a directory when
  ``is_dir``) cannot be written: it is the wrong kind of entry, or no writable directory holds it."""
  from kd_tf2.errors import UsageError  # pylint: disable=import-outside-toplevel
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(path) and os.path.isdir(path) != is_dir:
    kind = "a file" if os.path.isdir(path) else "a directory"
    raise UsageError(f"--{flag}={path} exists and is not {kind}")
  parent = path if os.path.isdir(path) else os.path.dirname(path)
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
    raise UsageError(f"--{flag}={path} cannot be written: {parent} is not a writable directory")


def _check_dataset(train_flags):
  """The sweep's ``--dataset`` names a dataset (checked without reading it: every run of the
  table would otherwise be refused one by one)."""
  from kd_tf2 import data  # pylint: disable=import-outside-toplevel
  from kd_tf2.engine import TrainConfig  # pylint: disable=import-outside-toplevel
  from kd_tf2.errors import UsageError  # pylint: disable=import-outside-toplevel
  name = train_flags.get("dataset", TrainConfig.dataset)
  try:
    data.check(name, train_flags.get("data_dir") or None)
  except (ValueError, FileNotFoundError) as e:
    raise UsageError(f"--dataset={name}: {e}") from None


def _speed(args):
  from kd_tf2.bench import speed  # pylint: disable=import-outside-toplevel
  from kd_tf2.errors import UsageError  # pylint: disable=import-outside-toplevel
  if args.timeout is not None and not args.timeout > 0:
    raise UsageError(f"--timeout={args.timeout}: must be a number of seconds > 0")
  if args.json:
    _check_output("json", args.json, is_dir=False)
  config = speed.SpeedConfig(
      arch=args.arch, teacher_arch=args.teacher_arch, batch_size=args.batch_size,
      steps=args.steps, warmup=args.warmup, jit_compile=args.jit_compile,
      mixed_precision=args.mixed_precision, num_classes=args.num_classes,
      image_size=args.image_size, train_size=args.train_size, seed=args.seed)
  config = speed.validate(config)
  methods = speed.resolve_methods(args.methods)
  _, table = speed.run(config, methods, json_path=args.json or None, timeout=args.timeout)
  print(table, flush=True)


def _table(args, train_flags):
  from kd_tf2.bench import table  # pylint: disable=import-outside-toplevel
  _check_output("runs_dir", args.runs_dir, is_dir=True)
  _check_dataset(train_flags)
  sweep = table.Sweep.from_flags(
      methods=args.methods, fractions=args.fractions, seeds=args.seeds, runs_dir=args.runs_dir,
      executor=args.executor, train_flags=train_flags)
  outcome = sweep.run()
  print(outcome.markdown, flush=True)
  if outcome.interrupted:
    print("kd_tf2.bench: interrupted; rerun the same command to resume", file=sys.stderr)


def _cpu_replicas(argv):
  """``--cpu_replicas`` from the raw command line (the CPU must be split before TensorFlow
  starts, i.e. before the flags are parsed); None if absent or not an integer."""
  for i, arg in enumerate(argv):
    value = None
    if arg.startswith("--cpu_replicas="):
      value = arg.split("=", 1)[1]
    elif arg == "--cpu_replicas" and i + 1 < len(argv):
      value = argv[i + 1]
    if value is not None:
      return int(value) if value.strip().isdigit() and int(value) >= 1 else None
  return None


def build_parser():
  """The ``table`` and ``speed`` command lines (imports the engine, hence TensorFlow)."""
  from kd_tf2.bench import table  # pylint: disable=import-outside-toplevel
  parser = _Parser(prog=PROG, description="kd_tf2 benchmarks: the results table over dataset "
                   "fractions, and the speed of every method.")
  sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="{table,speed}")
  sub.required = True
  table.add_parser(sub, add_bool)
  _speed_parser(sub)
  return parser


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  from kd_tf2.errors import TrainingInterrupted, UsageError  # pylint: disable=import-outside-toplevel
  if argv[:1] == ["speed-child"]:  # internal: one row of the speed benchmark
    from kd_tf2.bench import speed  # pylint: disable=import-outside-toplevel
    speed.child_main(*argv[1:])
    return
  if argv[:1] == ["table-cell"]:  # internal: one training of the table, in a fresh process
    from kd_tf2.bench import table  # pylint: disable=import-outside-toplevel
    sys.exit(table.cell_main(json.loads(argv[1])))
  cli.start_tensorflow(_cpu_replicas(argv))  # quietly, before the flags import the engine
  from kd_tf2.bench import table  # pylint: disable=import-outside-toplevel
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    if args.command == "speed":
      _speed(args)
    else:
      _table(args, table.train_flags(args))
  except UsageError as e:
    cli.fail(e, prog=NAME)
  except TrainingInterrupted as e:
    print(f"kd_tf2.bench: {e}", file=sys.stderr, flush=True)
  except KeyboardInterrupt:
    print("kd_tf2.bench: interrupted; rerun the same command to resume", file=sys.stderr,
          flush=True)
    sys.exit(130)
  except Exception as e:  # pylint: disable=broad-except
    cli.report_bug(e, prog=NAME)


if __name__ == "__main__":
  main()
