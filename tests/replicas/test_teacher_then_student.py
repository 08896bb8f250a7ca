"""A teacher trained, then a student distilled from it, in one process under 2 replicas.

Before the fix every strategy-making call built a new MirroredStrategy; the second one numbered
its collective all-reduces from the same start as the first and the student's synchronized
BatchNorm aborted at its first step ("Shape mismatch in the collective instance"). Covered: a
plain method, a connector method, a staged method, a custom-step method, and the benchmark
table's sweep (teachers and students trained in one process).
"""
import json
import math
import os

import pytest

from kd_tf2 import engine
from kd_tf2.bench import table

DATA = "synthetic:train=64,test=32"
COMMON = dict(arch="resnet8", teacher_arch="resnet8", dataset=DATA, batch_size=16, epochs=1,
              teacher_epochs=1, strategy="mirrored", cpu_replicas=2, verbose=False)


@pytest.mark.parametrize("method, extra", [
    ("AT", {}),                     # plain: a loss on the features
    ("VID", {}),                    # connectors
    ("FT", {"init_epochs": 1}),     # a stage of its own before the main phase
    ("BSS", {}),                    # its own train_step
])
def test_teacher_then_student_on_two_replicas(method, extra, tmp_path, mirrored):
  train_dir = str(tmp_path / method)
  results = engine.train(engine.TrainConfig(method=method, train_dir=train_dir, **COMMON, **extra))
  assert results["method"] == method and math.isfinite(results["loss"])
  assert os.path.isfile(os.path.join(train_dir, "teacher", "teacher.keras"))  # trained first
  assert results["teacher_top1"] >= 0 and os.path.isfile(os.path.join(train_dir, "student.keras"))
  with open(os.path.join(train_dir, "metrics.jsonl")) as f:
    phases = [json.loads(line)["phase"] for line in f]
  assert phases[-1] == "main" and (len(set(phases)) == 2) == ("init_epochs" in extra)


def test_bench_table_sweep_on_two_replicas(tmp_path, mirrored):
  flags = dict(COMMON, dataset=DATA)
  flags.pop("teacher_epochs")
  sweep = table.Sweep(["AT"], [1.0], [0], str(tmp_path / "runs"), "inprocess", flags,
                      log=lambda message: None)
  outcome = sweep.run()
  statuses = {cell.name: cell.status for cell in sweep.cells}
  assert set(statuses.values()) == {table.DONE}, (statuses, outcome)
  assert len(statuses) == 3  # teacher, student alone, AT
