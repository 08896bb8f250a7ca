"""kd_tf2.bench: the results table over fractions (resume, shape) and the speed benchmark (JSON).

The two end-to-end tests train/step tiny nets (resnet14 -> resnet8) on the ``synthetic`` dataset;
everything else is flag parsing and bookkeeping.
"""
import json
import math
import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from kd_tf2 import distillers  # noqa: E402
from kd_tf2.bench import speed, table  # noqa: E402
from kd_tf2.bench import __main__ as bench_main  # noqa: E402
from kd_tf2.errors import UsageError  # noqa: E402

DATASET = "synthetic:train=64,test=32"
TINY = dict(dataset=DATASET, arch="resnet8", teacher_arch="resnet14", epochs=1, batch_size=32,
            verbose=False)


# ----------------------------------------------------------------------------- parsing

def test_parse_fractions_seeds_methods():
  assert table.parse_fractions("1, 0.5,0.5,0.1") == [1.0, 0.5, 0.1]
  assert table.parse_seeds("3,0,3") == [3, 0]
  for bad in ("0", "1.5", "half", "1,,0.5"):
    with pytest.raises(UsageError, match="--fractions"):
      table.parse_fractions(bad)
  for bad in ("-1", "x", "0.5"):
    with pytest.raises(UsageError, match="--seeds"):
      table.parse_seeds(bad)
  # Aliases resolve, duplicates and the always-present baseline are dropped, order is kept.
  assert table.parse_methods("kd,AT,st,none") == ["ST", "AT"]
  everything = table.parse_methods("all")
  assert "none" not in everything
  assert sorted(everything + ["none"]) == sorted(distillers.available())
  with pytest.raises(UsageError, match="no_such_method"):
    table.parse_methods("AT,no_such_method")


def test_speed_methods_always_start_with_the_references():
  assert speed.resolve_methods("AT,kd,AT") == ["none", "floor", "AT", "ST"]
  assert speed.resolve_methods("none") == ["none", "floor"]
  with pytest.raises(UsageError, match="bogus"):
    speed.resolve_methods("bogus")


def test_table_flags_are_train_flags_absl_style():
  parser = bench_main.build_parser()
  args = parser.parse_args(["table", "--methods=AT", "--epochs=3", "--nojit_compile",
                            "--verbose=false", "--mixed_precision", "--lr", "0.1"])
  # Only the flags given are forwarded (absent booleans must not appear, in particular not True).
  assert table.train_flags(args) == {"epochs": 3, "jit_compile": False, "verbose": False,
                                     "mixed_precision": True, "lr": 0.1}
  assert table.train_flags(parser.parse_args(["table", "--methods=AT"])) == {}
  args = parser.parse_args(["speed", "--methods=AT"])
  assert args.jit_compile is False and args.mixed_precision is False and args.batch_size == 64


@pytest.mark.parametrize("argv, needle", [
    (["table", "--methods=AT", "--teacher_ckpt=x"], "--teacher_ckpt"),
    (["table", "--methods=AT", "--epochs=two"], "--epochs"),
    (["table"], "--methods"),
    (["speed", "--steps=0"], "--steps=0"),
    (["speed", "--arch=resnet9000"], "resnet9000"),
    (["table", "--methods=AT", "--fractions=2"], "--fractions"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, needle, capsys):
  with pytest.raises(SystemExit) as exit_info:
    bench_main.main(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("kd_tf2.bench: error:")
  assert needle in err


# ----------------------------------------------------------------------------- table bookkeeping

def test_stats_and_cell_text_against_numpy():
  values = [71.5, 70.25, 73.0]
  stats = table._stats(values)
  assert stats["mean"] == pytest.approx(np.mean(values))
  assert stats["std"] == pytest.approx(np.std(values, ddof=1))
  assert table._stats([42.0])["std"] == 0.0 and table._stats([]) is None
  entry = {"n": 2, "final": table._stats([70.0, 72.0]), "best": table._stats([71.0, 73.0])}
  assert table._cell_text(entry, seeds=2) == "71.00 ± 1.41 / 72.00 ± 1.41"
  assert table._cell_text(entry, seeds=3).endswith("(n=2)")
  assert table._cell_text({"n": 0, "status": "refused"}, seeds=1) == "refused"
  assert table._worst(["done", "diverged", "refused"]) == "diverged"


def test_sweep_layout_teacher_sharing_and_drops(tmp_path):
  flags = dict(TINY, lr=0.2, kd_weight=0.5, teacher_epochs=3)
  sweep = table.Sweep(["AT", "DML"], [1.0, 0.25], [0, 1], str(tmp_path), "inprocess", flags)
  assert len(sweep.cells) == 2 * 2 * 4
  by_name = {c.name: c for c in sweep.cells}
  teacher = by_name["frac0.25/seed1/teacher"].config
  student = by_name["frac0.25/seed1/none"].config
  at = by_name["frac0.25/seed1/AT"].config
  dml = by_name["frac0.25/seed1/DML"].config
  assert teacher.train_dir == str(tmp_path / "frac0.25" / "seed1" / "teacher")
  assert (teacher.method, teacher.arch, teacher.epochs, teacher.lr) == ("none", "resnet14", 3, None)
  assert (teacher.fraction, teacher.seed) == (0.25, 1)
  assert (student.method, student.arch, student.lr, student.kd_weight) == ("none", "resnet8", 0.2,
                                                                         None)
  assert at.teacher_ckpt == teacher.train_dir and (at.lr, at.kd_weight) == (0.2, 0.5)
  assert dml.teacher_ckpt == ""  # DML's peer is trained from scratch with the student
  with pytest.raises(UsageError, match="fraction"):
    table.Sweep(["AT"], [1.0], [0], str(tmp_path), "inprocess", dict(TINY, fraction=0.5))
  with pytest.raises(UsageError, match="--epochs"):
    table.Sweep(["AT"], [1.0], [0], str(tmp_path), "inprocess", dict(TINY, epochs=0))


# ----------------------------------------------------------------------------- table end to end

def _mtimes(runs_dir):
  out = {}
  for root, _, files in os.walk(runs_dir):
    if "results.json" in files and root != str(runs_dir):
      out[os.path.relpath(root, runs_dir)] = os.stat(os.path.join(root, "results.json")).st_mtime_ns
  return out


def test_table_trains_shares_teachers_tabulates_and_resumes(tmp_path):
  runs = tmp_path / "runs"
  lines = []

  def sweep(executor="inprocess", **extra):
    return table.Sweep.from_flags(methods="AT,ST", fractions="1,0.5", seeds="0",
                                  runs_dir=str(runs), executor=executor,
                                  train_flags=dict(TINY, **extra), log=lines.append)

  outcome = sweep().run()
  assert not outcome.interrupted
  cells = ["teacher", "none", "AT", "ST"]
  expected = {f"frac{f}/seed0/{c}" for f in ("1", "0.5") for c in cells}
  assert set(_mtimes(runs)) == expected
  summary = json.loads((runs / "results.json").read_text())
  assert [r["row"] for r in summary["rows"]] == cells
  assert summary["fractions"] == [1.0, 0.5]
  for row in summary["rows"]:
    assert set(row["cells"]) == {"1", "0.5"}
    for key, cell in row["cells"].items():
      run = json.loads((runs / f"frac{key}" / "seed0" / row["row"] / "results.json").read_text())
      assert cell["n"] == 1
      assert cell["final"]["values"] == [run["top1"]]
      assert cell["best"]["values"] == [run["best_top1"]]
      assert 0.0 <= run["top1"] <= run["best_top1"] <= 100.0
  # One teacher per fraction, trained once and read by every distillation run of that fraction.
  for frac in ("1", "0.5"):
    teacher = json.loads((runs / f"frac{frac}" / "seed0" / "teacher" / "results.json").read_text())
    for method in ("AT", "ST"):
      flags = json.loads((runs / f"frac{frac}" / "seed0" / method / "flags.json").read_text())
      assert flags["settings"]["teacher_ckpt"] == str(runs / f"frac{frac}" / "seed0" / "teacher")
      run = json.loads((runs / f"frac{frac}" / "seed0" / method / "results.json").read_text())
      assert run["teacher_top1"] == pytest.approx(teacher["top1"])
    assert not (runs / f"frac{frac}" / "seed0" / "AT" / "teacher").exists()
  # results.md: one column per fraction, one row per table row, the numbers of results.json.
  md = (runs / "results.md").read_text().splitlines()
  header = next(i for i, line in enumerate(md) if line.startswith("| method"))
  assert md[header] == "| method | 100% | 50% |"
  body = [line for line in md[header + 2:] if line.startswith("|")]
  assert len(body) == 4
  assert body[0].startswith("| teacher (resnet14) |") and body[1].startswith("| none (student")
  for line, row in zip(body, summary["rows"]):
    cells_text = [c.strip() for c in line.strip("|").split("|")][1:]
    assert len(cells_text) == 2
    for text, key in zip(cells_text, ("1", "0.5")):
      final, best = (float(x) for x in re.findall(r"\d+\.\d+", text))
      assert final == pytest.approx(row["cells"][key]["final"]["mean"], abs=0.006)
      assert best == pytest.approx(row["cells"][key]["best"]["mean"], abs=0.006)

  # results.png: the curves drawn (a real PNG of the figure's size).
  png = tf.io.decode_png(tf.io.read_file(str(runs / "results.png"))).numpy()
  assert png.shape[:2] == (540, 840) and png.std() > 0

  # A rerun trains nothing: every cell is skipped and no results file is rewritten.
  before = _mtimes(runs)
  lines.clear()
  sweep().run()
  assert _mtimes(runs) == before
  assert sum("skipped, already finished" in line for line in lines) == 8
  assert not any("training" in line for line in lines)

  # An unfinished cell is resumed in a subprocess; only it runs, the others stay untouched.
  os.remove(runs / "frac0.5" / "seed0" / "AT" / "results.json")
  lines.clear()
  outcome = sweep(executor="subprocess").run()
  after = _mtimes(runs)
  assert set(after) == expected
  assert {k for k in after if after[k] != before.get(k)} == {"frac0.5/seed0/AT"}
  assert sum("skipped, already finished" in line for line in lines) == 7
  assert os.listdir(runs / "logs") == ["frac0.5_seed0_AT.log"]
  assert json.loads((runs / "results.json").read_text())["rows"][2]["cells"]["0.5"]["n"] == 1

  # Other experiment flags in the same runs dir: nothing is trained, nothing is mixed in (the
  # teachers and students alone conflict; the methods then have no teacher to read).
  lines.clear()
  sweep(epochs=2).run()
  assert _mtimes(runs) == after
  assert sum(": conflict: finished with other flags (epochs=1" in line for line in lines) == 4
  assert sum("not run, the teacher of this fraction did not finish" in line for line in lines) == 4
  conflict = json.loads((runs / "results.json").read_text())
  statuses = [[c["status"] for c in row["cells"].values()] for row in conflict["rows"]]
  assert statuses == [["conflict"] * 2, ["conflict"] * 2, ["no teacher"] * 2, ["no teacher"] * 2]
  assert all(c["n"] == 0 for row in conflict["rows"] for c in row["cells"].values())


# ----------------------------------------------------------------------------- speed

def test_speed_two_methods_emit_valid_json(tmp_path):
  config = speed.SpeedConfig(arch="resnet8", teacher_arch="resnet14", batch_size=8, steps=2,
                             warmup=1, num_classes=10, train_size=64)
  path = tmp_path / "speed.json"
  rows, text = speed.run(config, speed.resolve_methods("ST,AT"), json_path=str(path),
                         log=lambda message: None)
  data = json.loads(path.read_text())
  assert data == json.loads(json.dumps(rows))
  assert [r["method"] for r in data] == ["none", "floor", "ST", "AT"]
  for r in data:
    assert set(speed.KEYS) <= set(r), r
    assert r["status"] == "ok", r
    for key in speed.KEYS[1:] + speed.CPU_KEYS:
      assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert len(r["samples_ms"][r["method"]]) == 2  # --steps
    assert r["images_per_sec"] * r["ms_per_step"] / 1000.0 == pytest.approx(8.0)
  assert data[0]["ratio_to_student"] == 1.0 and data[1]["ratio_to_floor"] == 1.0
  assert data[0]["cpu_ratio_to_student"] == 1.0 and data[1]["cpu_ratio_to_floor"] == 1.0
  table_lines = [line for line in text.splitlines() if line.startswith("| ")]
  assert len(table_lines) == 1 + 4 and "ms/step" in table_lines[0]


def test_speed_reports_refusals_and_crashes_without_stopping(tmp_path, monkeypatch):
  def fake_child(config, main, timeout=None):
    if main == "AT":
      return {"main": main, "status": "refused", "message": "AT cannot pair these nets"}
    if main == "ST":
      return {"main": main, "status": "error", "message": "child exited with code -9: Killed"}
    # Three rounds; the load doubles every step times in round 2: paired ratios ignore it.
    ms = {"none": [10.0, 20.0, 12.0], "floor": [16.0, 32.0, 15.0], "FitNet": [20.0, 40.0, 30.0]}
    cpu = {"none": [9.0, 9.0, 9.0], "floor": [15.0, 15.0, 15.0], "FitNet": [18.0, 18.0, 30.0]}
    kinds = (main, "none", "floor")
    return {"main": main, "status": "ok", "peak_rss_mb": 700.0,
            "ms": {k: v for k, v in ms.items() if k in kinds},
            "cpu_ms": {k: v for k, v in cpu.items() if k in kinds}}

  monkeypatch.setattr(speed, "_run_child", fake_child)
  config = speed.SpeedConfig(arch="resnet8", teacher_arch="resnet14", batch_size=8)
  rows, text = speed.run(config, ["none", "floor", "AT", "ST", "FitNet"],
                         json_path=str(tmp_path / "s.json"), log=lambda message: None)
  by = {r["method"]: r for r in rows}
  assert by["AT"]["status"] == "refused" and by["AT"]["ms_per_step"] is None
  assert by["ST"]["status"] == "error"
  assert by["FitNet"]["ms_per_step"] == pytest.approx(30.0)  # median of 20, 40, 30
  assert by["FitNet"]["images_per_sec"] == pytest.approx(8 * 1000.0 / 30.0)
  assert by["FitNet"]["ratio_to_student"] == pytest.approx(2.0)  # median of 2, 2, 2.5
  assert by["FitNet"]["ratio_to_floor"] == pytest.approx(1.25)  # median of 1.25, 1.25, 2
  assert by["floor"]["ratio_to_student"] == pytest.approx(1.6)  # median of 1.6, 1.6, 1.25
  assert by["none"]["ratio_to_floor"] == pytest.approx(0.625)
  assert by["FitNet"]["cpu_ms_per_step"] == pytest.approx(18.0)
  assert by["FitNet"]["cpu_ratio_to_floor"] == pytest.approx(1.2)  # median of 1.2, 1.2, 2
  assert by["FitNet"]["cpu_ratio_to_student"] == pytest.approx(2.0)
  assert by["AT"]["cpu_ratio_to_floor"] is None
  with pytest.raises(ValueError, match="aligned"):
    speed.paired_ratio([1.0, 2.0], [1.0])
  assert "refused: AT cannot pair these nets" in text
  assert len(json.loads((tmp_path / "s.json").read_text())) == 5


def test_speed_child_refuses_unknown_method_in_process():
  config = speed.SpeedConfig(arch="resnet8", teacher_arch="resnet14", batch_size=4, steps=1,
                             warmup=0, num_classes=10, train_size=16)
  result = speed.measure(config, "no_such_method")
  assert result["status"] == "refused" and "no_such_method" in result["message"]


def _summary(rows):
  return {"fractions": [1.0, 0.5, 0.1], "dataset": "folder:/data/cifar10", "arch": "resnet8",
          "teacher_arch": "resnet32", "epochs": 3,
          "rows": [{"row": name, "label": name,
                    "cells": {f"{f:g}": {"final": None if v is None else
                                         {"mean": v, "std": 0.5, "values": [v]}}
                              for f, v in zip((1.0, 0.5, 0.1), values)}}
                   for name, values in rows]}


def test_results_png_draws_one_line_per_row(tmp_path):
  from kd_tf2.bench import plot
  empty = _summary([("teacher", [None] * 3), ("AT", [None] * 3)])
  assert plot.plot_fractions(empty, str(tmp_path / "none.png")) is None
  assert not (tmp_path / "none.png").exists()
  images = []
  for at in ([70.0, 65.0, 50.0], [40.0, 30.0, None]):
    summary = _summary([("teacher", [75.0, 70.0, 55.0]), ("none", [60.0, 55.0, 40.0]),
                        ("AT", at)])
    path = str(tmp_path / f"{len(images)}.png")
    assert plot.plot_fractions(summary, path) == path
    images.append(tf.io.decode_png(tf.io.read_file(path)).numpy())
  assert images[0].shape == images[1].shape and not np.array_equal(images[0], images[1])
