"""Every registered method trains one short epoch end to end through the engine (issue 6).

``kd_tf2.engine.train`` is what ``train.py`` calls after parsing its flags (the flag layer itself is
covered by tests/test_cli.py). One tiny resnet8 teacher is trained once and shared; each method then
distils a resnet8 student from it on a small synthetic set, staged methods with one-epoch stages.
Runs are in-process: one TensorFlow start-up for the whole file.
"""
import json
import math
import os

import pytest

from kd_tf2 import distillers, engine

DATA = "synthetic:train=64,test=32"
COMMON = dict(arch="resnet8", teacher_arch="resnet8", dataset=DATA, batch_size=16, epochs=1,
              verbose=False)
STAGED = {"FitNet", "FSP", "FT", "AB", "MHGD"}
PEER_TRAINED = {"DML"}  # the "teacher" is a peer trained from scratch with the student


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  train_dir = str(tmp_path_factory.mktemp("methods") / "teacher")
  engine.train(engine.TrainConfig(method="none", train_dir=train_dir, **COMMON))
  return train_dir


def test_all_catalog_keys_are_registered():
  keys = {"none", "ST", "Logits", "AT", "FitNet", "NST", "PKT", "FSP", "FT", "RKD", "AB", "SP",
          "Sobolev", "BSS", "CC", "LwM", "IRG", "VID", "OFD", "AFD", "CRD", "DML", "KD_SVD", "MHGD",
          "DKD", "DIST", "ReviewKD", "ONE", "CL", "KDCL", "BYOT", "CSKD",
          "OKDDip"}
  assert set(distillers.available()) == keys
  for alias, key in (("kd", "ST"), ("soft_logits", "ST"), ("co", "OFD"), ("rEvIeWkD", "ReviewKD"),
                     ("cs-kd", "CSKD")):
    assert distillers.canonical_name(alias) == key


@pytest.mark.parametrize("method", distillers.available())
def test_method_trains_one_epoch(method, teacher_dir, tmp_path):
  train_dir = str(tmp_path / method)
  extra = {}
  if method in STAGED:
    extra["init_epochs"] = 1
  cls = distillers.get(method)
  if method not in PEER_TRAINED and cls.reads_teacher():  # none, online methods: no teacher
    extra["teacher_ckpt"] = teacher_dir
  if getattr(cls, "min_peers", 0):
    extra["peers"] = "resnet8"
  results = engine.train(engine.TrainConfig(method=method, train_dir=train_dir, **COMMON, **extra))
  assert results["method"] == method
  assert math.isfinite(results["loss"]) and 0.0 <= results["top1"] <= 100.0
  assert results["n"] == 32
  assert os.path.isfile(os.path.join(train_dir, "student.keras"))
  with open(os.path.join(train_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  phases = {row["phase"] for row in rows}
  assert "main" in phases
  if method in STAGED:
    assert len(phases) == 2, phases  # the stage ran as its own logged phase
  main = [row for row in rows if row["phase"] == "main"][0]
  terms = {k for k in main if k.startswith("train/")}
  assert all(math.isfinite(main[k]) for k in terms)
  if method not in ("none", "FSP", "AB"):  # FSP/AB: CE only after their init stage
    assert len(terms - {"train/loss", "train/top1", "train/ce"}) >= 1, terms
