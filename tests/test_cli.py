"""train.py and test.py end to end on synthetic data (tiny nets, one short epoch per run).

A resnet8 teacher is trained once per module (``--method=none``) and shared; every method run
distils a resnet8 student from it. The error table runs train.py/test.py's ``main`` in one helper
process per script (a fresh interpreter per case would cost a TensorFlow start-up each), plus a
few real command lines for the cases that need a fresh process.
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from support import COMMON, DATA, ROOT, _assert_one_line_error, _assert_table_refused, _env, metrics, ok, run, tensorboard_tags  # noqa: E402

@pytest.fixture(scope="module")
def work(tmp_path_factory):
  return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def teacher(work):
  """A trained resnet8 (method none): (train dir, its results)."""
  train_dir = str(work / "teacher")
  results = ok(run("train.py", COMMON + ["--method=none", f"--train_dir={train_dir}"]))
  return train_dir, results


@pytest.fixture(scope="module")
def method_runs(work, teacher):
  """Runs each method once, on demand: method -> (train dir, results, process)."""
  cache = {}

  def get(method):
    if method not in cache:
      train_dir = str(work / method)
      args = COMMON + [f"--method={method}", f"--train_dir={train_dir}"]
      if method == "ST":  # the one-command path: the teacher is trained into TRAIN_DIR/teacher
        args.append("--teacher_epochs=1")
      elif method == "FitNet":  # the paper's hint stage first, teacher given as a .keras file
        args += ["--init_epochs=1", f"--teacher_ckpt={teacher[0]}/student.keras"]
      else:
        args.append(f"--teacher_ckpt={teacher[0]}")
      proc = run("train.py", args)
      cache[method] = (train_dir, ok(proc), proc)
    return cache[method]

  return get


def test_plain_training_writes_everything(teacher):
  train_dir, results = teacher
  assert results["method"] == "none" and results["epochs"] == 1 and "teacher_top1" not in results
  assert 0.0 <= results["top1"] <= results["top5"] <= 100.0 and results["n"] == 64
  assert results["best_top1"] == results["top1"]  # one epoch: last and best coincide
  for name in ("flags.json", "results.json", "metrics.jsonl", "student.keras",
               "saved_model/saved_model.pb", "checkpoints/checkpoint"):
    assert os.path.exists(os.path.join(train_dir, name)), name
  tags = tensorboard_tags(train_dir)
  for tag in ("main/train/ce", "main/train/loss", "main/train/top1", "main/lr",
              "main/images_per_sec", "main/epoch_time_s", "test/top1", "test/top5", "test/loss"):
    assert tags.get(tag) == "scalars", tag
  assert tags.get("flags") == "text"
  assert "hparams" in tags.values()


@pytest.mark.parametrize("method,terms", [("ST", {"ce", "kd"}), ("AT", {"ce", "at"}),
                                          ("FitNet", {"ce", "hint"})])
def test_methods_train_end_to_end(method_runs, teacher, method, terms):
  train_dir, results, _ = method_runs(method)
  assert results["method"] == method and np.isfinite(results["loss"])
  main = [m for m in metrics(train_dir) if m["phase"] == "main"]
  assert len(main) == 1
  assert {k[len("train/"):] for k in main[0] if k.startswith("train/")} == terms | {"loss", "top1"}
  tags = tensorboard_tags(train_dir)
  for term in terms:
    assert tags.get(f"main/train/{term}") == "scalars", term
  if method == "ST":
    own = json.load(open(os.path.join(train_dir, "teacher", "results.json")))
    assert own["method"] == "none" and results["teacher_top1"] == pytest.approx(own["top1"])
  else:  # the given teacher was loaded: the student run measures the teacher's own accuracy
    assert results["teacher_top1"] == pytest.approx(teacher[1]["top1"])
  if method == "FitNet":
    phases = [m["phase"] for m in metrics(train_dir)]
    assert phases == ["stage_hint", "main"] and results["epochs"] == 2
    assert tags.get("stage_hint/train/hint") == "scalars"
    assert "stage_hint/train/ce" not in tags  # the hint stage has no cross-entropy


def test_test_py_agrees_with_the_engine(method_runs):
  train_dir, results, _ = method_runs("AT")
  by_dir = ok(run("test.py", [f"--model={train_dir}"]))
  by_file = ok(run("test.py", [f"--model={train_dir}/student.keras", f"--dataset={DATA}",
                               "--split=test", "--batch_size=7"]))
  for got in (by_dir, by_file):
    assert set(got) == {"top1", "top5", "loss", "n"}
    assert got["n"] == results["n"] == 64
    assert got["top1"] == pytest.approx(results["top1"])
    assert got["top5"] == pytest.approx(results["top5"])
    assert got["loss"] == pytest.approx(results["loss"], rel=1e-4)


def test_saved_model_serves_the_keras_model(method_runs):
  import keras  # pylint: disable=import-outside-toplevel
  import nets  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import (registers the zoo)
  train_dir, _, _ = method_runs("AT")
  x = tf.random.stateless_normal((3, 32, 32, 3), seed=(1, 2))
  want = keras.saving.load_model(os.path.join(train_dir, "student.keras"))(x, training=False)
  served = tf.saved_model.load(os.path.join(train_dir, "saved_model"))
  np.testing.assert_allclose(served.serve(x).numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def test_rerun_reuses_and_other_flags_are_refused(method_runs, teacher):
  train_dir, results, _ = method_runs("AT")
  before = sorted(os.listdir(train_dir))
  args = COMMON + ["--method=AT", f"--train_dir={train_dir}", f"--teacher_ckpt={teacher[0]}"]
  again = run("train.py", args)
  assert ok(again)["top1"] == results["top1"] and "already trained" in again.stdout
  changed = run("train.py", [a if a != "--epochs=1" else "--epochs=2" for a in args])
  assert changed.returncode == 2
  assert changed.stderr.strip().splitlines() == [
      f"train.py: error: --train_dir={train_dir} was made with different flags (--epochs=1 there "
      "vs 2 now); rerun with the same flags to resume, or choose another --train_dir"]
  assert sorted(os.listdir(train_dir)) == before


def test_sigterm_then_rerun_resumes(work, teacher):
  train_dir = str(work / "resume")
  args = ["--dataset=synthetic:train=512,test=64", "--arch=resnet8", "--teacher_arch=resnet8",
          "--batch_size=32", "--epochs=2", "--method=AT", f"--teacher_ckpt={teacher[0]}",
          f"--train_dir={train_dir}"]
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + args, cwd=ROOT,
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if line.startswith("epoch 1/2"):
      proc.send_signal(signal.SIGTERM)
      break
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert "stopped by signal 15 at epoch 2 step" in err and "Traceback" not in err
  assert not os.path.exists(os.path.join(train_dir, "results.json"))
  resumed = run("train.py", args)
  results = ok(resumed)
  assert "resuming from epoch 1 (step " in resumed.stdout
  assert results["epochs"] == 2
  assert [m["epoch"] for m in metrics(train_dir)] == [1, 2]


# ----------------------------------------------------------------------- errors

def test_train_py_bad_inputs(work, teacher, method_runs):
  at_dir, _, _ = method_runs("AT")
  corrupt = work / "corrupt.keras"
  corrupt.write_bytes(b"not a keras file")
  a_file = work / "a_file"
  a_file.write_text("x")
  empty = work / "empty_data_dir"
  empty.mkdir()
  fresh = str(work / "never_written")
  base = COMMON + [f"--train_dir={fresh}"]
  given = [f"--teacher_ckpt={teacher[0]}"]
  table = [
      (["--method=nope"], r"unknown method 'nope'; available: .*AT.*FitNet.*none.*ST"),
      (["--arch=resnet9"], r"--arch: unknown net 'resnet9'; known nets: resnet8"),
      (["--teacher_arch=nonet"], r"--teacher_arch: unknown net 'nonet'"),
      (["--dataset=nope_ds", f"--data_dir={empty}"], r"unknown dataset 'nope_ds'; accepted:"),
      (["--fraction=0"], r"--fraction=0.0: must be in \(0, 1\]"),
      (["--fraction=1.5"], r"--fraction=1.5: must be in \(0, 1\]"),
      (["--epochs=0"], r"--epochs=0: must be an integer >= 1"),
      (["--strategy=gpu"], r"--strategy='gpu': accepted: auto, one_device, mirrored"),
      (["--kd_weight=-1"], r"--kd_weight=-1.0: must be a number >= 0"),
      (["--method=AT", "--init_epochs=2"], r"method AT has no init stage \(methods with one:"),
      (["--method=AT", "--teacher_arch=resnet20"] + given,
       r"is a resnet8, but --teacher_arch=resnet20"),
      (["--method=AT", "--dataset=synthetic:classes=5,train=128,test=64"] + given,
       r"has 10 classes, the dataset has 5"),
      (["--method=AT", "--teacher_ckpt=/nonexistent/t.keras"], r"no such model file"),
      (["--method=AT", f"--teacher_ckpt={corrupt}"], r"cannot load model .*corrupt.keras"),
      (["--method=AT", "--teacher_ckpt=/nonexistent/t.npz"], r"--teacher_ckpt: no such file"),
      (["--method=AT", f"--train_dir={a_file}"] + given, r"exists and is not a directory"),
      (["--method=AT", f"--train_dir={at_dir}", "--epochs=3"] + given,
       r"was made with different flags \(--epochs=1 there vs 3 now\)"),
      (["stray_argument"], r"unexpected arguments \['stray_argument'\]"),
  ]
  _assert_table_refused("train.py", table, prefix=base)
  assert not os.path.exists(fresh)  # nothing was written by any refused command


def test_train_py_bad_inputs_in_a_fresh_process():
  """Cases needing their own process: logical devices, and flag parsing (absl) errors."""
  fresh = os.path.join(ROOT, "runs", "never_written_by_tests")
  cases = [(["--cpu_replicas=2", "--batch_size=33"],
            r"--batch_size=33 is not divisible by the 2 replicas"),
           (["--cpu_replicas=2", "--jit_compile"], r"--jit_compile with 2 replicas is not supported"),
           (["--epochs=abc"], r"flag --epochs=abc: invalid literal for int"),
           (["--no_such_flag=1"], r"Unknown command line flag 'no_such_flag'")]
  for args, pattern in cases:
    proc = run("train.py", [f"--dataset={DATA}", "--method=none", "--arch=resnet8",
                            f"--train_dir={fresh}"] + args)
    _assert_one_line_error({"code": proc.returncode, "stderr": proc.stderr}, pattern, "train.py")
  assert not os.path.exists(fresh)


def test_test_py_bad_inputs(method_runs, work):
  at_dir, _, _ = method_runs("AT")
  table = [
      ([], r"--model is required"),
      (["--model=/nonexistent/m.keras", f"--dataset={DATA}"], r"no such model file"),
      ([f"--model={at_dir}/flags.json", f"--dataset={DATA}"],
       r"expected a train dir or a .keras file"),
      ([f"--model={at_dir}/student.keras"], r"--dataset is required"),
      ([f"--model={at_dir}", "--dataset=synthetic:classes=5"],
       r"the model has 10 classes, --dataset=synthetic:classes=5 has 5"),
      ([f"--model={at_dir}", "--split=nope"], r"nope"),
      ([f"--model={work}"], r"holds no exported model"),
  ]
  _assert_table_refused("test.py", table)
