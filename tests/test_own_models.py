"""train.py / test.py with Keras models of one's own (issue 11 items 4-5): .keras teacher and
student files, layer-name taps, the checkpoint's architecture, teacher.keras, did-you-mean, the
uint8 serving signature, the recorded preprocessing, and classifying an image file."""
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import kd_tf2
from kd_tf2.engine import config as cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from support import convnet

DATA = "synthetic:train=64,test=32"
COMMON = [f"--dataset={DATA}", "--batch_size=32", "--epochs=1"]


def run(script, args):
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, os.path.join(ROOT, script)] + list(args), cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600, check=False)


def ok(proc):
  assert proc.returncode == 0, (f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n"
                                f"{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  work = tmp_path_factory.mktemp("own")
  keras.utils.set_random_seed(0)
  teacher, student = str(work / "my_teacher.keras"), str(work / "my_student.keras")
  convnet([8, 16, 32, 64], name="myteacher", softmax=True).save(teacher)
  convnet([4, 8, 16], name="mystudent").save(student)
  return work, teacher, student


@pytest.fixture(scope="module")
def distilled(files):
  """AT from a .keras teacher (its last three stages named) into a .keras student."""
  work, teacher, student = files
  train_dir = str(work / "at")
  results = ok(run("train.py", COMMON + ["--method=AT", f"--arch={student}",
                                         f"--teacher_ckpt={teacher}",
                                         "--teacher_features=relu1,relu2,relu3"]
                   + [f"--train_dir={train_dir}"]))
  return train_dir, results


def test_keras_files_as_teacher_and_student(distilled):
  train_dir, results = distilled
  assert results["method"] == "AT" and results["teacher_arch"] == "myteacher"
  assert 0 <= results["top1"] <= 100 and "teacher_top1" in results
  # exported as the student's own functional model (logits out): plain Keras loads it
  student = keras.saving.load_model(os.path.join(train_dir, "student.keras"))
  assert type(student).__name__ == "Functional" and student.name == "mystudent"
  assert {type(l).__module__.split(".")[0] for l in student.layers} == {"keras"}
  # results.json records what a deployment needs to feed raw images
  assert results["image_shape"] == [32, 32, 3] and len(results["class_names"]) == 10
  assert len(results["mean"]) == len(results["std"]) == 3


def test_saved_model_serves_raw_uint8_images_normalised_inside(distilled):
  train_dir, results = distilled
  student = keras.saving.load_model(os.path.join(train_dir, "student.keras"))
  served = tf.saved_model.load(os.path.join(train_dir, "saved_model"))
  pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
  x = (pixels / 255.0 - np.array(results["mean"])) / np.array(results["std"])
  want = student(x.astype(np.float32), training=False).numpy()
  raw = served.signatures["serving_default"](images=tf.constant(pixels))
  np.testing.assert_allclose(list(raw.values())[0].numpy(), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(served.serve_uint8(pixels).numpy(), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(served.serve(x.astype(np.float32)).numpy(), want, rtol=1e-4,
                             atol=1e-4)


def test_predict_and_test_py_classify_an_image_file(distilled, tmp_path):
  train_dir, results = distilled
  pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3)).astype(np.uint8)
  png = str(tmp_path / "img.png")
  tf.io.write_file(png, tf.io.encode_png(pixels))
  top = kd_tf2.predict(train_dir, png, top=3)[0]
  assert len(top) == 3 and all(name in results["class_names"] for name, _ in top)
  served = tf.saved_model.load(os.path.join(train_dir, "saved_model"))
  probs = tf.nn.softmax(served.serve_uint8(pixels[None])).numpy()[0]
  assert top[0][0] == results["class_names"][int(np.argmax(probs))]
  assert top[0][1] == pytest.approx(float(probs.max()), abs=1e-4)
  out = ok(run("test.py", [f"--model={train_dir}", f"--image={png}", "--top=2"]))
  assert [c for c, _ in out["predictions"][png]] == [c for c, _ in top[:2]]


def test_teacher_architecture_from_a_file_is_trained_first_and_exported_as_teacher_keras(files):
  work, teacher, student = files
  train_dir = str(work / "st")
  results = ok(run("train.py", COMMON + ["--method=ST", f"--arch={student}",
                                         f"--teacher_arch={teacher}", "--teacher_epochs=1",
                                         f"--train_dir={train_dir}"]))
  assert os.path.isfile(os.path.join(train_dir, "teacher", "teacher.keras"))
  assert not os.path.exists(os.path.join(train_dir, "teacher", "student.keras"))
  assert results["teacher_arch"] == "myteacher"


def test_own_model_refusals_name_the_flag_and_suggest(files):
  work, teacher, student = files
  proc = run("train.py", COMMON + ["--method=AT", f"--arch={student}", f"--teacher_ckpt={teacher}",
                                   "--teacher_arch=resnet8", f"--train_dir={work / 'bad'}"])
  assert proc.returncode == 2
  assert "is a myteacher, but --teacher_arch=resnet8" in proc.stderr
  assert "drop --teacher_arch" in proc.stderr
  proc = run("train.py", COMMON + ["--method=AT", f"--arch={student}", f"--teacher_ckpt={teacher}",
                                   "--student_features=relu9", f"--train_dir={work / 'bad2'}"])
  assert proc.returncode == 2 and "has no layer of that name; did you mean relu" in proc.stderr
  assert "--student_features" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
  assert not os.path.exists(work / "bad") and not os.path.exists(work / "bad2")


@pytest.mark.parametrize("changes, message", [
    (dict(method="ATT"), "did you mean AT?"),
    (dict(method="fitnets"), "did you mean FitNet?"),
    (dict(arch="resnet9"), "did you mean resnet8"),
    (dict(teacher_arch="wrn_40_3x"), "did you mean"),
    (dict(arch="nowhere.keras"), "no such model file"),
])
def test_unknown_names_get_a_suggestion(changes, message):
  with pytest.raises(kd_tf2.UsageError) as err:
    cfg.validate(cfg.TrainConfig(**changes))
  assert message in str(err.value)
