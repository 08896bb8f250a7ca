"""``--method_args``: a method's own constructor keywords from the command line (ONE's branches,
KDCL's ensemble, ...), parsed, checked against the method's signature and recorded for resume."""
import json
import os

import pytest

from kd_tf2.engine import TrainConfig, config as cfg
from support import COMMON, _assert_table_refused, ok, run


def test_values_are_typed_sorted_and_formatted_back():
  args = cfg.parse_method_args(" split=1, branches=4 ", "ONE")
  assert args == {"branches": 4, "split": 1}
  assert list(args) == ["branches", "split"]
  assert cfg.parse_method_args("ensemble=naive", "KDCL") == {"ensemble": "naive"}
  assert cfg.parse_method_args("alpha=0.5", "BYOT") == {"alpha": 0.5}
  assert cfg.parse_method_args("", "ONE") == {}
  assert cfg.format_method_args({"split": None, "branches": 4}) == "branches=4,split=none"
  assert cfg._arg_value("True") is True and cfg._arg_value("1e-3") == 1e-3


def test_validate_canonicalises_and_settings_record_only_when_given():
  base = dict(arch="resnet8", dataset="synthetic", epochs=1, train_dir="x")
  given = cfg.validate(TrainConfig(method="one", method_args="split=1,branches=2", **base))
  assert given.method_args == "branches=2,split=1"
  assert cfg.settings(given)["method_args"] == "branches=2,split=1"
  assert "method_args" not in cfg.settings(cfg.validate(TrainConfig(method="ONE", **base)))
  assert cfg.teacher_config(given).method_args == ""


def test_keys_each_method_may_set_exclude_flags_and_engine_keywords():
  assert "branches" in cfg.method_arg_names("ONE")
  assert "ensemble" in cfg.method_arg_names("KDCL")
  for flagged in ("temperature", "method_weight", "peers", "init_epochs"):
    assert flagged not in cfg.method_arg_names("KDCL")
  assert "train_labels" not in cfg.method_arg_names("CRD")  # filled by the engine


def test_bad_method_args_are_refused_in_one_line():
  table = [
      (["--method=ONE", "--method_args=branchez=4"],
       r"--method_args: method ONE has no argument 'branchez'; accepted: .*branches.* - did you "
       r"mean branches\?"),
      (["--method=ONE", "--method_args=branches"], r"'branches' is not KEY=VALUE"),
      (["--method=ONE", "--method_args=temperature=2"],
       r"set temperature with --temperature, not in --method_args"),
      (["--method=ONE", "--method_args=branches=2,branches=3"], r"branches given twice"),
      (["--method=ONE", "--method_args=branches=1"], r"branches=1 for method ONE: must be an "
       r"integer >= 2"),
      (["--method=KDCL", "--peers=resnet8", "--method_args=ensemble=mean"],
       r"ensemble='mean' for KDCL; accepted: minlogit, naive"),
  ]
  _assert_table_refused("train.py", table, prefix=COMMON)


def test_method_args_reach_the_method_and_resume_checks_them(tmp_path):
  train_dir = str(tmp_path / "one")
  args = COMMON + ["--method=ONE", "--method_args=branches=2", f"--train_dir={train_dir}"]
  results = ok(run("train.py", args))
  assert results["branch1_top1"] >= 0
  assert "branch2_top1" not in results
  assert os.path.exists(os.path.join(train_dir, "branch1.keras"))
  assert not os.path.exists(os.path.join(train_dir, "branch2.keras"))
  # ONE's gated ensemble is a model of its own: test.py evaluates it like any .keras classifier
  ensemble = os.path.join(train_dir, "ensemble.keras")
  assert results["ensemble_keras_file"] == ensemble
  evaluated = ok(run("test.py", [f"--model={ensemble}", f"--dataset={COMMON[0].split('=', 1)[1]}"]))
  assert evaluated["top1"] == pytest.approx(results["ensemble_top1"], abs=1e-6)
  with open(os.path.join(train_dir, "flags.json")) as f:
    assert json.load(f)["settings"]["method_args"] == "branches=2"
  rerun = run("train.py", COMMON + ["--method=ONE", "--method_args=branches=3",
                                    f"--train_dir={train_dir}"])
  assert rerun.returncode == 2
  assert "method_args" in rerun.stderr


def test_library_config_takes_the_same_text():
  config = cfg.validate(TrainConfig(method="ONE", arch="resnet8", dataset="synthetic",
                                    method_args="branches=3", train_dir="x"))
  assert cfg.method_kwargs(config) == {"branches": 3}
