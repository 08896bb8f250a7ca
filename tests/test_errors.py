"""Bad input and bugs end differently (``kd_tf2.errors``, ``kd_tf2.cli``).

Bad input (``UsageError``): one line on stderr, exit code 2, a bench cell marked ``refused``. A bug
- any other exception, even a ``ValueError`` that TensorFlow raises while tracing - shows its
traceback and exits 1, and a bench cell is marked ``error``. The bug is injected by patching a
method's per-replica step (or the data pipeline) to raise a ``ValueError``.
"""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import tensorflow as tf

from kd_tf2 import cli
from kd_tf2 import data as kd_data
from kd_tf2.bench import table
from kd_tf2.engine import TrainConfig
from kd_tf2.engine import run as engine_run
from kd_tf2.errors import UsageError, raised_by_our_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = "synthetic:train=32,test=16,size=8"
TINY = ["--method=none", "--arch=resnet8", f"--dataset={DATA}", "--batch_size=16", "--epochs=1"]

# Runs train.py's main in this process for each case; "bug" cases first make method none's
# per-replica step raise a ValueError while TensorFlow traces it.
_DRIVER = textwrap.dedent("""
    import contextlib, importlib.util, io, json, sys
    root, cases = sys.argv[1], json.loads(sys.argv[2])
    spec = importlib.util.spec_from_file_location("kd_train", root + "/train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from kd_tf2 import cli, distillers
    cls = distillers.get("none")
    original = cls.train_step

    def broken(self, *args, **kwargs):
      raise ValueError("injected bug in the step")

    results = []
    for bug, argv in cases:
      cls.train_step = broken if bug else original
      module.FLAGS.unparse_flags()
      err, code = io.StringIO(), 0
      with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        sys.argv = ["train.py"] + argv
        try:
          module.main(cli.flags_parser(module.FLAGS)(sys.argv))
        except SystemExit as e:
          code = e.code
      results.append({"code": code, "stderr": err.getvalue()})
    print(json.dumps(results))
""")


def _drive(cases):
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run([sys.executable, "-c", _DRIVER, ROOT, json.dumps(cases)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_train_py_bad_input_is_one_line_and_a_bug_shows_its_traceback(tmp_path):
  bad, bug = _drive([
      (False, TINY + ["--epochs=0", f"--train_dir={tmp_path / 'bad'}"]),
      (True, TINY + [f"--train_dir={tmp_path / 'bug'}"]),
  ])
  lines = bad["stderr"].strip().splitlines()
  assert bad["code"] == 2 and len(lines) == 1, bad
  assert lines[0].startswith("train.py: error: --epochs=0: must be an integer >= 1"), lines
  assert not os.path.exists(tmp_path / "bad")
  assert bug["code"] == 1, bug
  err = bug["stderr"]
  assert "Traceback (most recent call last)" in err and "in broken" in err, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last == ("train.py: internal error (a bug, not bad input; traceback above): ValueError: "
                  "injected bug in the step"), last


@pytest.mark.parametrize("error,last", [
    (KeyError("x"), "prog: internal error (a bug, not bad input; traceback above): KeyError: 'x'"),
    (OSError(28, "No space left on device"), "prog: system error (not bad input; traceback "
     "above): OSError: [Errno 28] No space left on device"),
])
def test_report_bug_prints_the_traceback_then_one_line(capsys, error, last):
  with pytest.raises(SystemExit) as exit_info:
    try:
      raise error
    except Exception as e:  # pylint: disable=broad-except
      cli.report_bug(e, prog="prog")
  err = capsys.readouterr().err
  assert exit_info.value.code == 1
  assert err.startswith("Traceback") and "raise error" in err
  assert err.strip().splitlines()[-1] == last


def test_run_guarded_tells_bad_input_from_bugs(capsys):
  def bad():
    raise UsageError("--x=1: must be 2")

  def bug():
    raise ValueError("a plain ValueError is not bad input")

  with pytest.raises(SystemExit) as exit_info:
    cli.run_guarded(bad)
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.strip().endswith(": error: --x=1: must be 2")
  with pytest.raises(SystemExit) as exit_info:
    cli.run_guarded(bug)
  err = capsys.readouterr().err
  assert exit_info.value.code == 1 and "Traceback" in err
  assert "internal error (a bug, not bad input; traceback above): ValueError: a plain" in err


# ------------------------------------------------------------------ where errors are converted

def _traced_value_error():
  """TensorFlow's own ValueError while tracing (incompatible shapes)."""
  tf.function(lambda: tf.zeros([2]) + tf.zeros([3])).get_concrete_function()


def test_raised_by_our_checks():
  with pytest.raises(ValueError) as ours:
    kd_data.check("nope_ds")
  assert raised_by_our_checks(ours.value)
  with pytest.raises(ValueError) as theirs:
    _traced_value_error()
  assert not raised_by_our_checks(theirs.value)


def test_load_data_converts_only_our_checks(monkeypatch):
  config = TrainConfig(method="none", arch="resnet8", dataset=DATA, batch_size=16)
  with pytest.raises(UsageError, match=r"--dataset=nope_ds: unknown dataset 'nope_ds'"):
    engine_run._load_data(config.replace(dataset="nope_ds"), "train", 16)

  def broken_pipeline(*args, **kwargs):
    _traced_value_error()

  monkeypatch.setattr(kd_data.pipeline, "build", broken_pipeline)
  with pytest.raises(ValueError, match="Dimensions must be equal") as error:
    engine_run._load_data(config, "train", 16)
  assert not isinstance(error.value, UsageError)


# ------------------------------------------------------------------ the bench table

def _one_cell_sweep(tmp_path):
  flags = dict(dataset=DATA, arch="resnet8", epochs=1, batch_size=16, verbose=False)
  sweep = table.Sweep([], [1.0], [0], str(tmp_path), "inprocess", flags, log=lambda _: None)
  return sweep, sweep.cells[1]  # the student alone (method none)


@pytest.mark.parametrize("raised,status", [
    (UsageError("--x: bad"), table.REFUSED),
    (ValueError("Dimensions must be equal"), table.ERROR),
    (tf.errors.InternalError(None, None, "kaput"), table.ERROR),
])
def test_table_cell_refused_only_for_bad_input(tmp_path, monkeypatch, raised, status):
  def train(config):
    raise raised

  monkeypatch.setattr("kd_tf2.engine.train", train)
  sweep, cell = _one_cell_sweep(tmp_path)
  sweep._in_process(cell, "tag")
  assert cell.status == status, cell.message
  summary = sweep.summary()
  assert summary["rows"][1]["cells"]["1"]["status"] == status


def test_table_cell_process_exit_codes(monkeypatch, capsys):
  """``table-cell``: exit 2 (refused) for bad input only; a bug propagates (traceback, exit 1),
  which the sweep records as ``error``."""
  config = dataclasses.asdict(TrainConfig(method="none", arch="resnet8", dataset=DATA,
                                          batch_size=16))

  def refuse(config):
    raise UsageError("--x: bad")

  def bug(config):
    raise ValueError("not the user's")

  monkeypatch.setattr("kd_tf2.engine.train", refuse)
  assert table.cell_main(config) == 2
  assert capsys.readouterr().err.strip() == "refused: --x: bad"
  monkeypatch.setattr("kd_tf2.engine.train", bug)
  with pytest.raises(ValueError, match="not the user's"):
    table.cell_main(config)
  assert table._EXIT.get(1, table.ERROR) == table.ERROR

