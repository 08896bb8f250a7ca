"""The package installs (pyproject.toml) and exported models load without the checkout (issue 11
item 5): ``pip install`` puts kd_tf2, nets and op_util (and the embedded dataset) into a target
directory; a fresh interpreter that has only that directory and TensorFlow - the checkout is off
``sys.path`` and is not the working directory - loads an exported adapted student with plain
``keras.saving.load_model`` before importing anything of ours, a zoo student once ``nets`` is
imported, and an ``Adapted`` model once ``kd_tf2.adapter`` is."""
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import kd_tf2
import nets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from support import convnet


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  target = tmp_path_factory.mktemp("site")
  build = tmp_path_factory.mktemp("build")
  # A copy of the checkout: setuptools writes build/ and *.egg-info next to the sources.
  source = str(build / "src")
  shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
      ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
  proc = subprocess.run(
      [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
       "--target", str(target), source], cwd=str(build), capture_output=True, text=True,
      timeout=600, check=False,
      env=dict(os.environ, PIP_NO_INDEX="1", TMPDIR=str(build)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return str(target)


def _run_outside(site, code, cwd):
  """Run ``code`` in a fresh interpreter whose sys.path has ``site`` but not the checkout."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(PYTHONPATH=site, TF_CPP_MIN_LOG_LEVEL="2", PYTHONNOUSERSITE="1")
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600, check=False)


def test_installed_package_imports_and_loads_exported_students(installed, tmp_path):
  for name in ("kd_tf2", "nets", "op_util"):
    assert os.path.isdir(os.path.join(installed, name)), name
  assert os.path.isfile(os.path.join(installed, "kd_tf2", "datasets", "cifar10_mini", "test.npz"))
  x = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
  zoo = nets.create("resnet8", 10)
  zoo.build((None, 32, 32, 3))
  zoo.save(str(tmp_path / "zoo.keras"))
  own = kd_tf2.adapt(convnet([4, 8], softmax=True))
  own.logits_model().save(str(tmp_path / "own.keras"))   # how the engine exports adapted students
  own.save(str(tmp_path / "adapted.keras"))
  np.save(tmp_path / "x.npy", x)
  np.save(tmp_path / "zoo.npy", zoo(x, training=False).numpy())
  np.save(tmp_path / "own.npy", own(x, training=False).numpy())
  proc = _run_outside(installed, f"""
      import sys, numpy as np, keras
      assert not any(p and p.rstrip("/") == {ROOT!r} for p in sys.path), sys.path
      x = np.load("x.npy")
      own = keras.saving.load_model("own.keras")         # plain Keras: nothing of ours imported
      np.testing.assert_allclose(own(x, training=False), np.load("own.npy"), atol=1e-5)
      assert "kd_tf2" not in sys.modules and "nets" not in sys.modules
      import nets                                        # registers the zoo's classes
      zoo = keras.saving.load_model("zoo.keras")
      np.testing.assert_allclose(zoo(x, training=False), np.load("zoo.npy"), atol=1e-5)
      import kd_tf2.adapter                              # registers kd_tf2.Adapted
      adapted = keras.saving.load_model("adapted.keras")
      np.testing.assert_allclose(adapted(x, training=False), np.load("own.npy"), atol=1e-5)
      import kd_tf2, op_util
      assert kd_tf2.__file__.startswith({installed!r}), kd_tf2.__file__
      from kd_tf2 import distillers, data
      assert len(distillers.available()) >= 27
      ds, info = data.load("cifar10_mini", "test", batch_size=8)
      print("ok", type(own).__name__, type(zoo).__name__, type(adapted).__name__, info.num_classes)
      """, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["ok", "Functional", "CifarResNet", "Adapted", "10"]
