"""Bad input, beyond test_cli's tables: damaged files and dirs, impossible pairs, odd datasets, the
bench's command lines and the library's entry points.

Every case is (input, pattern): one line naming the bad value, exit code 2 (library: a
``ValueError``/``FileNotFoundError``, which the scripts turn into that line), no traceback, and
nothing written to the train dir.
"""
import json
import os

import numpy as np
import pytest

import nets
from kd_tf2 import cli, data as kd_data, distillers
from kd_tf2.bench import __main__ as bench_main
from kd_tf2.engine import TrainConfig, config as cfg
from support import COMMON, DATA, _assert_table_refused

SHAPE = (None, 32, 32, 3)


def _net(arch, classes=10):
  model = nets.create(arch, classes)
  model.build(SHAPE)
  return model


def _folder(root, file_name, content):
  for split in ("train", "test"):
    for label in ("a", "b"):
      os.makedirs(root / split / label)
      (root / split / label / file_name).write_bytes(content)
  return root


def _snapshot(path):
  return sorted((os.path.relpath(os.path.join(d, f), path), os.path.getmtime(os.path.join(d, f)))
                for d, _, files in os.walk(path) for f in files)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Damaged and mismatched inputs, made without training anything."""
  work = tmp_path_factory.mktemp("bad")
  out = {"work": work, "ten": str(work / "ten.keras")}
  _net("resnet8").save(out["ten"])
  keras_bytes = open(out["ten"], "rb").read()
  (work / "truncated.keras").write_bytes(keras_bytes[:len(keras_bytes) // 2])
  np.savez(work / "hundred.npz", **nets.reference_state(_net("resnet8", 100)))
  (work / "garbage.npz").write_bytes(os.urandom(2048))
  npz = (work / "hundred.npz").read_bytes()
  (work / "truncated.npz").write_bytes(npz[:len(npz) // 2])
  (work / "empty_folder").mkdir()
  _folder(work / "non_images", "x.jpg", b"not an image")
  _folder(work / "text_only", "notes.txt", b"hello")
  (work / "unfinished").mkdir()
  (work / "unfinished" / "flags.json").write_text("{}")
  return out


def _damaged_train_dirs(work):
  """Train dirs of the command ``COMMON --method=none`` that a crash or an edit left unusable."""
  def settings(train_dir):
    config = TrainConfig(method="none", arch="resnet8", teacher_arch="resnet8", dataset=DATA,
                         batch_size=32, epochs=1, train_dir=train_dir)
    return cfg.settings(cfg.validate(config))

  dirs = {}
  for name in ("corrupt_flags", "not_a_run", "bad_checkpoints", "other_subset"):
    dirs[name] = work / name
    dirs[name].mkdir()
  (dirs["corrupt_flags"] / "flags.json").write_text('{"settings": ')
  (dirs["not_a_run"] / "notes.txt").write_text("mine")
  for name in ("bad_checkpoints", "other_subset"):
    record = {"flags": {}, "settings": settings(str(dirs[name]))}
    if name == "other_subset":
      record["subset"] = {"images": 128, "fingerprint": "0123456789abcdef"}
    (dirs[name] / "flags.json").write_text(json.dumps(record))
  checkpoints = dirs["bad_checkpoints"] / "checkpoints"
  checkpoints.mkdir()
  (checkpoints / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\n')
  (checkpoints / "ckpt-1.index").write_bytes(os.urandom(512))
  (checkpoints / "ckpt-1.data-00000-of-00001").write_bytes(os.urandom(512))
  return {k: str(v) for k, v in dirs.items()}


def test_train_py_more_bad_inputs(files):
  w = files["work"]
  dirs = _damaged_train_dirs(w)
  fresh = str(w / "never_written")
  at = ["--method=AT"]
  table = [
      (at + [f"--teacher_ckpt={w}/hundred.npz"],
       r"hundred.npz does not hold resnet8 weights for 10 classes: .*'fc.weight' has shape "
       r"\(100, 64\), expected \(10, 64\)"),
      (at + [f"--teacher_ckpt={w}/garbage.npz"], r"garbage.npz is not a readable .npz state dict"),
      (at + [f"--teacher_ckpt={w}/truncated.npz"],
       r"truncated.npz is not a readable .npz state dict \(File is not a zip file\)"),
      (at + [f"--teacher_ckpt={w}/unfinished"], r"unfinished holds no exported model"),
      (at + [f"--teacher_ckpt={files['ten']}", "--dataset=synthetic:channels=1,train=64,test=32"],
       r"ten.keras takes 32x32x3 images \(3 channels\), the images of .* have 1 channels"),
      (["--method=FSP", "--teacher_arch=wrn_16_2"],
       r"FSP cannot distil resnet8 -> wrn_16_2: channel counts differ"),
      (["--method=KD_SVD", "--teacher_arch=wrn_16_2"],
       r"KD_SVD needs equal channel counts per stage"),
      (["--method=DML", f"--teacher_ckpt={files['ten']}"],
       r"method DML trains its resnet8 peer from scratch"),
      (["--method=none", f"--teacher_ckpt={files['ten']}"],
       r"ten.keras: method none reads no teacher \(it would be ignored\)"),
      ([f"--dataset=folder:{w}/empty_folder"], r"empty_folder has no split folders"),
      ([f"--dataset=folder:{w}/non_images"],
       r"non_images: train/a/x.jpg is not a readable image \(Unknown image file format"),
      ([f"--dataset=folder:{w}/text_only"], r"class folder test/a is empty \(no .jpg/.jpeg/.png"),
      ([f"--dataset=folder:{w}/missing"], r"folder:.*missing: no such directory"),
      (["--dataset=synthetic:classes=x"], r"synthetic option classes='x' is not an integer"),
      (["--fraction=0.01"], r"batch_size=32 exceeds the 10 samples"),
      (["--lr=0"], r"--lr=0.0: must be a number > 0"),
      (["--seed=-1"], r"--seed=-1: must be an integer >= 0"),
      (["--batch_size=0"], r"--batch_size=0: must be an integer >= 1"),
      (["--temperature=0"], r"--temperature=0.0: must be a number > 0"),
      (["--cpu_replicas=0"], r"cpu_replicas=0: must be an integer >= 1"),
      (["--method=FitNet", "--init_epochs=-1"], r"--init_epochs=-1: must be an integer >= 0"),
      ([f"--train_dir={dirs['corrupt_flags']}"], r"flags.json is unreadable or corrupt"),
      ([f"--train_dir={dirs['not_a_run']}"], r"is not empty and is not a kd_tf2 train dir"),
      ([f"--train_dir={dirs['bad_checkpoints']}"],
       r"no checkpoint in .*checkpoints can be read \(ckpt-1: .*\); move that directory away"),
      ([f"--train_dir={dirs['other_subset']}"],
       r"was trained on another subset of the training split \(128 images, fingerprint "
       r"0123456789abcdef\) than --dataset/--fraction/--seed select now \(128 images"),
  ]
  before = {name: _snapshot(path) for name, path in dirs.items()}
  default = ["--method=none", f"--train_dir={fresh}"]
  _assert_table_refused("train.py", table, prefix=COMMON + default)
  assert not os.path.exists(fresh)
  assert {name: _snapshot(path) for name, path in dirs.items()} == before


def test_test_py_more_bad_inputs(files):
  w, ten = files["work"], files["ten"]
  table = [
      ([f"--model={w}/truncated.keras", f"--dataset={DATA}"], r"cannot load model .*truncated"),
      ([f"--model={ten}", f"--dataset={DATA}", "--batch_size=0"], r"--batch_size=0: must be"),
      ([f"--model={ten}", f"--dataset=folder:{w}/non_images"],
       r"test/a/x.jpg is not a readable image"),
      ([f"--model={ten}", "--dataset=synthetic:channels=1,test=8"],
       r"the model takes 32x32x3 images \(3 channels\), .* have 1 channels"),
      ([f"--model={w}/hundred.npz", f"--dataset={DATA}"], r"expected a train dir or a .keras file"),
      ([f"--model={ten}", f"--dataset={DATA}", "extra"], r"unexpected arguments \['extra'\]"),
      ([f"--model={ten}", "--dataset=nope_ds", f"--data_dir={w}/empty_folder"],
       r"unknown dataset 'nope_ds'"),
  ]
  _assert_table_refused("test.py", table)


def test_bench_more_bad_inputs(files, capsys):
  w = files["work"]
  runs = str(w / "runs_never_written")
  table = [
      ([], r"the following arguments are required"),
      (["speed", f"--json={w}"], r"--json=.* exists and is not a file"),
      (["speed", "--timeout=-1"], r"--timeout=-1.0: must be a number of seconds > 0"),
      (["speed", "--methods=nope"], r"unknown method 'nope'; available:"),
      (["speed", "--num_classes=1"], r"--num_classes=1: must be an integer >= 2"),
      (["speed", "--jit_compile=maybe"], r"'maybe' is not a boolean"),
      (["table", "--methods=AT", f"--runs_dir={files['ten']}"],
       r"--runs_dir=.*ten.keras exists and is not a directory"),
      (["table", "--methods=AT", "--dataset=nope_ds", f"--runs_dir={runs}"],
       r"--dataset=nope_ds: unknown dataset 'nope_ds'"),
      (["table", "--methods=AT", f"--dataset=folder:{w}/empty_folder", f"--runs_dir={runs}"],
       r"empty_folder has no split folders"),
      (["table", "--methods=AT", "--seeds=-1", f"--runs_dir={runs}"], r"'-1' is not an integer"),
      (["table", "--methods=AT", "--fraction=0.5", f"--runs_dir={runs}"],
       r"unrecognized arguments: --fraction=0.5"),  # no abbreviation of --fractions
  ]
  import re  # pylint: disable=import-outside-toplevel
  for argv, pattern in table:
    with pytest.raises(SystemExit) as exit_info:
      bench_main.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, (argv, err)
    assert len(err.splitlines()) == 1 and err.startswith("kd_tf2.bench: error:"), err
    assert re.search(pattern, err), (pattern, err)
  assert not os.path.exists(runs)


def test_library_bad_inputs(files, tmp_path):
  w = files["work"]
  student, wide = _net("resnet8"), _net("wrn_16_2")
  table = [
      (lambda: nets.create(42, 10), r"unknown net 42; known nets:"),
      (lambda: nets.create("resnet8", 0), r"num_classes must be a positive integer, got 0"),
      (lambda: nets.create("resnet8", "10"), r"num_classes must be a positive integer, got '10'"),
      (lambda: kd_data.load("synthetic", "validation"), r"split 'validation' not in synthetic"),
      (lambda: kd_data.load(42, "train"), r"dataset name 42 is not a non-empty string"),
      (lambda: kd_data.load("synthetic", "train", batch_size="64"), r"batch_size='64' is not"),
      (lambda: kd_data.check(f"folder:{w}/missing"), r"missing: no such directory"),
      (lambda: kd_data.check("nope_ds"), r"unknown dataset 'nope_ds'"),
      (lambda: distillers.create("FSP", student, wide), r"FSP cannot distil resnet8 -> wrn_16_2"),
      (lambda: distillers.create("AT", student, None), r"method AT needs a teacher"),
      (lambda: distillers.create("AT", student, wide, method_weight="x"), r"method_weight='x'"),
      (lambda: nets.read_state(str(w / "garbage.npz")), r"is not a readable .npz state dict"),
      (lambda: nets.read_state(str(w / "ten.h5")), r"no such state dict file"),
      (lambda: nets.load_reference_weights(student, nets.read_state(str(w / "hundred.npz"))),
       r"key 'fc.weight' has shape \(100, 64\), expected \(10, 64\)"),
  ]
  import re  # pylint: disable=import-outside-toplevel
  for call, pattern in table:
    with pytest.raises(cli.INPUT_ERRORS) as error:
      call()
    message = str(error.value)
    assert "\n" not in message.strip() and re.search(pattern, message), (pattern, message)


def test_unwritable_train_dir_is_refused(tmp_path):
  if os.geteuid() == 0:
    pytest.skip("root writes into a 0o500 directory: chmod does not bite")
  from kd_tf2 import engine  # pylint: disable=import-outside-toplevel
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  try:
    config = TrainConfig(method="none", arch="resnet8", dataset=DATA, batch_size=32, epochs=1,
                         train_dir=str(locked / "run"))
    with pytest.raises(cli.INPUT_ERRORS, match=r"cannot be created: .*locked is not a writable"):
      engine.train(config)
    assert os.listdir(locked) == []
  finally:
    locked.chmod(0o700)
