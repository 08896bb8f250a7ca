"""``kd_tf2.predict``: classify image files with a trained model, normalised as in training.

    kd_tf2.predict("runs/cifar10/AT_t_s_seed0", ["cat.png", "ship.jpg"])
    # -> [[("cat", 0.81), ("dog", 0.09), ...], [("ship", 0.95), ...]]

``model`` is a train dir, a ``.keras`` file (with its run's ``results.json`` beside it), or a
``keras.Model`` given together with ``mean``/``std``/``class_names``. Each image (any format
``tf.io.decode_image`` reads: PNG, JPEG, GIF, BMP) is resized to the model's input size, scaled to
[0, 1] and normalised with the training data's per-channel ``mean``/``std`` (``results.json``).
"""
import json
import os

import numpy as np
import tensorflow as tf

from kd_tf2.errors import UsageError

__all__ = ["predict", "preprocessing_of"]

RESULTS_FILE = "results.json"


def preprocessing_of(path):
  """``{"mean", "std", "image_shape", "class_names"}`` recorded by the run of ``path`` (a train
  dir, or a ``.keras`` file inside one); ``UsageError`` if there is none."""
  path = os.path.abspath(os.path.expanduser(path))
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  results = os.path.join(folder, RESULTS_FILE)
  try:
    with open(results) as f:
      recorded = json.load(f)
    return {k: recorded[k] for k in ("mean", "std", "image_shape", "class_names")}
  except (OSError, ValueError, KeyError, TypeError):
    raise UsageError(f"{path}: no {RESULTS_FILE} with mean/std/image_shape/class_names beside "
                     "it; pass mean=, std= and class_names= (and image_shape=)") from None


def _read(path, image_shape):
  try:
    data = tf.io.read_file(path)
    image = tf.io.decode_image(data, channels=int(image_shape[-1]), expand_animations=False)
  except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UsageError(f"cannot read image {path}: {first}") from None
  size = [int(image_shape[0]), int(image_shape[1])]
  if list(image.shape[:2]) != size:
    image = tf.image.resize(image, size, antialias=True)
  return tf.cast(image, tf.float32)


def predict(model, images, *, top=5, mean=None, std=None, class_names=None, image_shape=None):
  """Top-``top`` (class name, probability) pairs for each image file in ``images`` (a path or a
  list of paths). Preprocessing not given is read from the run's ``results.json``."""
  from kd_tf2.engine import models  # pylint: disable=import-outside-toplevel
  given = dict(mean=mean, std=std, class_names=class_names, image_shape=image_shape)
  if isinstance(model, (str, os.PathLike)):
    path = os.fspath(model)
    if any(v is None for v in given.values()):
      recorded = preprocessing_of(path)
      given = {k: recorded[k] if v is None else v for k, v in given.items()}
    model = models.load_model(path)
  if given["mean"] is None or given["std"] is None or given["class_names"] is None:
    raise UsageError("predict: give mean=, std= and class_names= with a model object (or pass "
                     "a train dir)")
  if given["image_shape"] is None:
    given["image_shape"] = tuple(model.inputs[0].shape[1:]) if getattr(model, "inputs", None) \
        else (32, 32, 3)
  if isinstance(images, (str, os.PathLike)):
    images = [images]
  batch = tf.stack([_read(os.fspath(p), given["image_shape"]) for p in images])
  std_ = np.asarray(given["std"], np.float32)
  x = (batch / 255.0 - np.asarray(given["mean"], np.float32)) / std_
  probs = tf.nn.softmax(tf.cast(model(x, training=False), tf.float32)).numpy()
  names = list(given["class_names"])
  if probs.shape[-1] != len(names):
    raise UsageError(f"predict: the model has {probs.shape[-1]} classes but {len(names)} class "
                     "names were given")
  out = []
  for row in probs:
    order = np.argsort(-row)[:max(1, int(top))]
    out.append([(names[i], float(row[i])) for i in order])
  return out
