"""Making, loading and exporting the nets of a run.

A net is a zoo name, or a ``.keras`` file of any Keras classifier (trained or not), adapted to the
``nets.Outputs`` contract by ``kd_tf2.adapt`` (taps by layer name: ``--student_features`` /
``--teacher_features``). A teacher comes from ``--teacher_ckpt``: a train dir (its exported
``student.keras`` or ``teacher.keras``), a ``.keras`` file, or a RepDistiller reference-weights file
(``.npz``, ``.pth``/``.pt``; ``nets`` importer, needs a zoo ``--teacher_arch``). Its architecture is
the checkpoint's; ``--teacher_arch``, when given, must match it. The class count must be the
dataset's.
"""
import os
import zipfile

import keras
import numpy as np
import tensorflow as tf

import nets
from kd_tf2.adapter import Adapted, adapt
from kd_tf2.engine import rundir
from kd_tf2.errors import UsageError

REFERENCE_WEIGHTS = (".npz", ".pth", ".pt")
TEACHER_FILE = "teacher.keras"  # what a teacher trained into TRAIN_DIR/teacher is exported as


def build_net(arch, num_classes, input_shape, synchronized_bn=False, features="",
              flag="--arch"):
  """The net ``arch`` for images of ``input_shape`` (H, W, C), every variable created: a zoo net
  (``nets.create``), or the Keras classifier in the ``.keras`` file ``arch`` (its weights as
  stored), adapted with the comma-separated layer names ``features`` (empty: automatic taps).
  Model files keep their own BatchNormalization (not synchronized across replicas)."""
  if str(arch).lower().endswith(".keras"):
    model = load_model(arch, flag)
    model.trainable = True
    model = adapted(model, features, flag, input_shape)
    check_classes(model, num_classes, f"{flag}={arch}")
    return model
  if features:
    raise UsageError(f"{flag}={arch} is a zoo net, its feature taps are fixed; drop the features "
                     "flag (it names layers of a .keras model)")
  model = nets.create(arch, num_classes, synchronized_bn=synchronized_bn)
  model.build((None,) + tuple(int(d) for d in input_shape))
  return model


def adapted(model, features, flag, input_shape=None):
  """``kd_tf2.adapt(model, features=...)`` with errors naming ``flag``; checks the image shape."""
  features_flag = "--teacher_features" if "teacher" in flag else "--student_features"
  try:
    model = adapt(model, features=features or None)
  except UsageError as e:
    raise UsageError(f"{flag}: {e} (layer names go to {features_flag})") from None
  if input_shape is not None:
    inputs = getattr(getattr(model, "source", None), "inputs", None)
    if inputs:
      want = tuple(int(d) for d in input_shape)
      have = tuple(inputs[0].shape[1:])
      fits = len(have) == len(want) and all(h in (None, w) for h, w in zip(have, want))
      if not fits:
        size = "x".join(str(d) for d in have)
        raise UsageError(f"{flag}: the model takes {size} images, the dataset's are "
                         f"{'x'.join(map(str, want))}")
  return model


def check_classes(model, num_classes, what):
  _, found = describe(model)
  if found is not None and found != num_classes:
    raise UsageError(f"{what} has {found} classes, the dataset has {num_classes}")


def model_file(path):
  """The ``.keras`` file behind ``path`` (a train dir or the file itself); ``UsageError`` if none."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(path):
    for name in (rundir.KERAS_FILE, TEACHER_FILE):
      candidate = os.path.join(path, name)
      if os.path.isfile(candidate):
        return candidate
    raise UsageError(f"{path} holds no exported model ({rundir.KERAS_FILE} or {TEACHER_FILE}): "
                     "the run has not finished, or it is not a train dir")
  if not os.path.exists(path):
    raise UsageError(f"no such model file or train dir: {path}")
  if not path.endswith(".keras"):
    raise UsageError(f"{path}: expected a train dir or a .keras file")
  return path


def load_model(path, flag=None):
  """Load a trained classifier from a train dir or a ``.keras`` file."""
  try:
    path = model_file(path)
  except UsageError as e:
    raise UsageError(f"{flag}: {e}" if flag else str(e)) from None
  try:
    return keras.saving.load_model(path, compile=False)
  except (ValueError, OSError, KeyError, TypeError, zipfile.BadZipFile) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UsageError(f"cannot load model {path}: {first}") from None


def describe(model):
  """(architecture name, class count) of a zoo net."""
  arch = getattr(model, "arch", None) or model.name
  num_classes = getattr(model, "num_classes", None)
  if num_classes is None:
    num_classes = int(model.outputs[0].shape[-1]) if getattr(model, "outputs", None) else None
  return arch, num_classes


def load_teacher(path, arch, num_classes, input_shape, features=""):
  """The teacher stored at ``path`` (train dir, ``.keras``, ``.npz``/``.pth``) with
  ``num_classes`` classes, adapted (``features``: comma-separated layer names), frozen
  (``trainable = False``). ``arch`` (None: whatever the checkpoint holds) is checked when given."""
  path = os.path.abspath(os.path.expanduser(path))
  if path.lower().endswith(REFERENCE_WEIGHTS):
    if not os.path.isfile(path):
      raise UsageError(f"--teacher_ckpt: no such file: {path}")
    if not arch or str(arch).lower().endswith(".keras"):
      raise UsageError(f"--teacher_ckpt={path} holds reference weights without an architecture; "
                       "name its zoo net with --teacher_arch")
    model = build_net(arch, num_classes, input_shape)
    try:
      state = nets.read_state(path)
      nets.load_reference_weights(model, state)
    except (ValueError, KeyError, ImportError, OSError, zipfile.BadZipFile) as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise UsageError(f"--teacher_ckpt={path} does not hold {arch} weights for "
                       f"{num_classes} classes: {first}") from None
  else:
    try:
      model = load_model(path)
    except UsageError as e:
      raise UsageError(f"--teacher_ckpt: {e}") from None
    model = adapted(model, features, "--teacher_ckpt", input_shape)
    found_arch, found_classes = describe(model)
    if arch:
      want = describe(load_model(arch))[0] if str(arch).lower().endswith(".keras") else arch
      same = (nets.canonical_name(found_arch) == nets.canonical_name(want)
              if _known(found_arch) else found_arch == want)
      if not same:
        raise UsageError(f"--teacher_ckpt={path} is a {found_arch}, but --teacher_arch={arch}; "
                         "drop --teacher_arch (the checkpoint's architecture is used) or pass "
                         "another checkpoint")
    if found_classes != num_classes:
      raise UsageError(f"--teacher_ckpt={path} has {found_classes} classes, the dataset has "
                       f"{num_classes}")
  if features and path.lower().endswith(REFERENCE_WEIGHTS):
    raise UsageError(f"--teacher_features: {arch} is a zoo net, its feature taps are fixed")
  model.trainable = False
  return model


def _known(name):
  try:
    nets.canonical_name(name)
    return True
  except ValueError:
    return False


def export(model, run, input_shape, keras_file=None, info=None):
  """Write the model as ``keras_file`` (default ``student.keras``) and a serving ``saved_model/``
  into ``run``. The SavedModel's ``serve`` takes normalised float32 images [B, H, W, C];
  with ``info`` (the dataset's ``mean``/``std``) its ``serving_default`` (= ``serve_uint8``) takes
  raw uint8 pixels and normalises them as training did: ``(x / 255 - mean) / std``."""
  # An adapted model is saved as its own functional logits model: built-in Keras layers only, so
  # it loads with keras.saving.load_model where only Keras is installed. Zoo nets need ``nets``.
  to_save = model.logits_model() if isinstance(model, Adapted) else model
  to_save.save(keras_file or run.keras_file)
  shape = (None,) + tuple(int(d) for d in input_shape)
  archive = keras.export.ExportArchive()
  archive.track(model)
  float_spec = tf.TensorSpec(shape, tf.float32, name="images")
  if info is None:
    archive.add_endpoint("serve", lambda x: model(x, training=False), [float_spec])
  else:
    scale, shift = normalization(info.mean, info.std)
    uint8_spec = tf.TensorSpec(shape, tf.uint8, name="images")

    def raw(images):
      return model(tf.cast(images, tf.float32) * scale - shift, training=False)

    archive.add_endpoint("serving_default", raw, [uint8_spec])
    archive.add_endpoint("serve", lambda x: model(x, training=False), [float_spec])
    archive.add_endpoint("serve_uint8", raw, [uint8_spec])
  archive.write_out(run.saved_model, verbose=False)


def normalization(mean, std):
  """(scale, shift) float32 [C] with ``x * scale - shift == (x / 255 - mean) / std``."""
  std = np.asarray(std, np.float32)
  return (tf.constant(1.0 / (255.0 * std)),
          tf.constant(np.asarray(mean, np.float32) / std))


def preprocessing(info):
  """What ``results.json`` records so an exported model can be fed raw images."""
  return {"mean": [float(v) for v in info.mean], "std": [float(v) for v in info.std],
          "image_shape": [int(d) for d in info.image_shape],
          "class_names": [str(c) for c in info.class_names]}
