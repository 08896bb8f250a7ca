"""Staying up: kill -9 at any moment, a damaged newest checkpoint, a resumed fraction run's subset,
mixed precision end to end.

One train dir lives through a whole crash story (``crash_story``): train.py is SIGKILLed the moment
its first checkpoint starts to be written, the rerun is stopped by SIGTERM mid-epoch, the newest
checkpoint is then truncated as a crash mid-write on a disk without ordered writes would leave it,
and the last rerun has to fall back to the previous complete checkpoint and finish. It is a 10%
run, so the same story checks that every process trained on the subset chosen by (fraction, seed)
alone.
"""
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import nets
from kd_tf2 import data as kd_data
from kd_tf2.data import subset
from support import ROOT, _env, metrics, ok, run

# 2,560 images, 10% kept: 260 (26 a class), 16 steps of 16 per epoch (long enough to signal mid-epoch).
FULL = "synthetic:train=2560,test=32"
FRACTION, SEED, EPOCHS = 0.1, 0, 3
ARGS = ["--method=none", "--arch=resnet8", f"--dataset={FULL}", f"--fraction={FRACTION}",
        f"--seed={SEED}", "--batch_size=16", f"--epochs={EPOCHS}"]


def _popen(args):
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + args, cwd=ROOT,
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_when_checkpointing(args, checkpoints):
  """Start train.py and SIGKILL it as soon as its checkpoint directory appears (the first save
  has begun); returns the entries of that directory at the kill."""
  proc = _popen(args)
  try:
    while proc.poll() is None and not os.path.isdir(checkpoints):
      time.sleep(0.001)
    proc.kill()
    entries = sorted(os.listdir(checkpoints)) if os.path.isdir(checkpoints) else []
  finally:
    proc.communicate(timeout=600)
  assert proc.returncode == -signal.SIGKILL, "train.py ended before its first checkpoint"
  return entries


def _terminate_mid_epoch(args):
  """Start train.py and SIGTERM it right after the first epoch it finishes; returns (the epoch
  line that triggered it, stdout, stderr)."""
  proc = _popen(args)
  trigger = None
  for line in proc.stdout:
    if line.startswith("epoch "):
      trigger = line
      proc.send_signal(signal.SIGTERM)
      break
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return trigger, out, err


@pytest.fixture(scope="module")
def crash_story(tmp_path_factory):
  train_dir = str(tmp_path_factory.mktemp("stayup") / "run")
  checkpoints = os.path.join(train_dir, "checkpoints")
  args = ARGS + [f"--train_dir={train_dir}"]
  story = {"train_dir": train_dir, "at_kill": _kill_when_checkpointing(args, checkpoints)}
  with open(os.path.join(train_dir, "flags.json")) as f:
    story["recorded"] = json.load(f)["subset"]
  story["trigger"], _, story["term_err"] = _terminate_mid_epoch(args)
  names = sorted(n for n in os.listdir(checkpoints) if n.endswith(".index"))
  story["kept"] = names
  newest = max(names, key=lambda n: int(n[len("ckpt-"):-len(".index")]))[:-len(".index")]
  data_file = os.path.join(checkpoints, newest + ".data-00000-of-00001")
  with open(data_file, "r+b") as f:  # half of the tensors' bytes made it to the disk
    f.truncate(os.path.getsize(data_file) // 2)
  story["damaged"] = newest
  story["final"] = run("train.py", args)
  return story


def test_sigkill_during_a_checkpoint_then_reruns_finish_the_run(crash_story):
  """Whatever the kill left (nothing, a temp dir, a complete ckpt-1), the reruns resume and the
  run ends with every epoch trained and logged exactly once."""
  results = ok(crash_story["final"])
  assert results["epochs"] == EPOCHS
  assert [m["epoch"] for m in metrics(crash_story["train_dir"])] == list(range(1, EPOCHS + 1))
  assert os.path.exists(os.path.join(crash_story["train_dir"], "student.keras"))
  # The SIGTERMed rerun either resumed from the SIGKILLed process's checkpoint or started over.
  assert "stopped by signal 15 at epoch" in crash_story["term_err"]


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(crash_story):
  final = crash_story["final"]
  assert len(crash_story["kept"]) == 2  # the end-of-epoch checkpoint and the mid-epoch one
  warning = [line for line in final.stderr.splitlines() if "is damaged" in line]
  assert len(warning) == 1 and crash_story["damaged"] in warning[0], final.stderr[-2000:]
  assert "falling back to the previous one" in warning[0]
  # The mid-epoch checkpoint (epoch N+1, step k) is lost: the run resumes at the end of epoch N.
  done = int(crash_story["trigger"].split()[1].split("/")[0])
  assert f"resuming from epoch {done}\n" in final.stdout, final.stdout[-2000:]


def _fingerprint_of_an_epoch(fraction, seed, batch_size):
  ds, info = kd_data.load(FULL, "train", fraction=fraction, seed=seed, batch_size=batch_size,
                          drop_remainder=False)
  seen = np.concatenate([batch["index"].numpy() for batch in ds])
  assert len(seen) == len(set(seen.tolist())) == info.num_examples
  return subset.fingerprint(seen), info.num_examples


def test_resumed_fraction_run_trains_on_the_same_subset(crash_story):
  """The first process recorded the indices its subset streams (count and fingerprint); each
  resumed process refuses to train unless its own subset has the same fingerprint, and both
  resumptions went through. Here the indices one epoch streams are drawn again in this process
  with another batch size: same fingerprint; another seed or fraction: another subset."""
  recorded = crash_story["recorded"]
  assert recorded["images"] == 260  # 26 of each class's 256
  assert ok(crash_story["final"])["train_dir"] == crash_story["train_dir"]
  assert _fingerprint_of_an_epoch(FRACTION, SEED, 7) == (recorded["fingerprint"], 260)
  assert _fingerprint_of_an_epoch(FRACTION, SEED + 1, 16)[0] != recorded["fingerprint"]
  assert _fingerprint_of_an_epoch(0.2, SEED, 16)[0] != recorded["fingerprint"]


# ----------------------------------------------------------------------- mixed precision

MIXED_METHODS = ("ST", "FitNet", "CRD", "RKD")  # logits, a connector, memory banks, relations


def test_mixed_bfloat16_end_to_end_for_several_methods(tmp_path, monkeypatch):
  """train(mixed_precision=True) on CPU: the nets compute in bfloat16, every loss term the
  distiller returns is float32 and finite, for feature, relation, contrastive and logit methods."""
  from kd_tf2 import engine  # pylint: disable=import-outside-toplevel
  from kd_tf2.engine import step as step_lib  # pylint: disable=import-outside-toplevel
  teacher = nets.create("resnet8", 10)  # shared by every run; its accuracy does not matter here
  teacher.build((None, 32, 32, 3))
  teacher_file = str(tmp_path / "teacher.keras")
  teacher.save(teacher_file)

  seen = {}
  compile_step = step_lib.compile_step

  def spying_compile(strategy, step_fn, optimizer, variables, **kwargs):
    def recorded(batch, ctx):
      out = step_fn(batch, ctx)
      seen[current].update({k: v.dtype.name for k, v in out.terms.items()})
      return out

    distiller = getattr(step_fn, "__self__", None)  # the main phase's bound train_step
    if distiller is not None:
      seen[current]["_policy"] = distiller.student.dtype_policy.name
    return compile_step(strategy, recorded, optimizer, variables, **kwargs)

  monkeypatch.setattr(step_lib, "compile_step", spying_compile)
  for current in MIXED_METHODS:
    seen[current] = {}
    config = engine.TrainConfig(
        method=current, arch="resnet8", teacher_arch="resnet8", teacher_ckpt=teacher_file,
        dataset="synthetic:train=64,test=32", batch_size=32, epochs=1, verbose=False,
        mixed_precision=True, train_dir=str(tmp_path / current))
    results = engine.train(config)
    assert np.isfinite(results["loss"]), current
    logged = [m for m in metrics(config.train_dir) if m["phase"] == "main"][0]
    terms = {k: v for k, v in logged.items() if k.startswith("train/") and k != "train/top1"}
    assert len(terms) >= 2 and all(np.isfinite(v) for v in terms.values()), (current, terms)
  assert keras.mixed_precision.global_policy().name == "float32"  # restored after each run
  for method, dtypes in seen.items():
    assert dtypes.pop("_policy") == "mixed_bfloat16", method
    assert dtypes and set(dtypes.values()) == {"float32"}, (method, dtypes)
