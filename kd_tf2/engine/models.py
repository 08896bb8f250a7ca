"""Making, loading and exporting the nets of a run.

A teacher comes from ``--teacher_ckpt``: a train dir (its exported ``student.keras``), a ``.keras``
file, or a RepDistiller reference-weights file (``.npz``, ``.pth``/``.pt``; ``nets`` importer).
Whatever its source, its architecture and class count must be the ones the run expects.
"""
import os
import zipfile

import keras
import tensorflow as tf

import nets
from kd_tf2.engine import rundir
from kd_tf2.errors import UsageError

REFERENCE_WEIGHTS = (".npz", ".pth", ".pt")


def build_net(arch, num_classes, input_shape, synchronized_bn=False):
  """``nets.create`` plus variable creation for images of ``input_shape`` (H, W, C)."""
  model = nets.create(arch, num_classes, synchronized_bn=synchronized_bn)
  model.build((None,) + tuple(int(d) for d in input_shape))
  return model


def model_file(path):
  """The ``.keras`` file behind ``path`` (a train dir or the file itself); ``UsageError`` if none."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(path):
    candidate = os.path.join(path, rundir.KERAS_FILE)
    if not os.path.isfile(candidate):
      raise UsageError(f"{path} holds no exported model ({rundir.KERAS_FILE}): the run has not "
                       "finished, or it is not a train dir")
    return candidate
  if not os.path.exists(path):
    raise UsageError(f"no such model file or train dir: {path}")
  if not path.endswith(".keras"):
    raise UsageError(f"{path}: expected a train dir or a .keras file")
  return path


def load_model(path):
  """Load a trained classifier from a train dir or a ``.keras`` file."""
  path = model_file(path)
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


def load_teacher(path, arch, num_classes, input_shape):
  """The teacher stored at ``path`` (train dir, ``.keras``, ``.npz``/``.pth``), checked to be an
  ``arch`` net with ``num_classes`` classes, frozen (``trainable = False``)."""
  path = os.path.abspath(os.path.expanduser(path))
  if path.lower().endswith(REFERENCE_WEIGHTS):
    if not os.path.isfile(path):
      raise UsageError(f"--teacher_ckpt: no such file: {path}")
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
    found_arch, found_classes = describe(model)
    same = (nets.canonical_name(found_arch) == nets.canonical_name(arch)
            if _known(found_arch) else found_arch == arch)
    if not same:
      raise UsageError(f"--teacher_ckpt={path} is a {found_arch}, but --teacher_arch={arch}; "
                       f"pass --teacher_arch={found_arch} or another checkpoint")
    if found_classes != num_classes:
      raise UsageError(f"--teacher_ckpt={path} has {found_classes} classes, the dataset has "
                       f"{num_classes}")
  model.trainable = False
  return model


def _known(name):
  try:
    nets.canonical_name(name)
    return True
  except ValueError:
    return False


def export(model, run, input_shape):
  """Write ``student.keras`` and the serving ``saved_model/`` of ``model`` into ``run``."""
  model.save(run.keras_file)
  spec = tf.TensorSpec((None,) + tuple(int(d) for d in input_shape), tf.float32, name="images")
  model.export(run.saved_model, format="tf_saved_model", input_signature=[spec], verbose=False)
