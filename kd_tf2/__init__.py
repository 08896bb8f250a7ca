"""kd_tf2: knowledge-distillation benchmark and toolkit for TensorFlow 2 / Keras 3.

``kd_tf2.adapt`` (any Keras classifier -> the ``nets.Outputs`` contract), ``kd_tf2.Distillation``
(a ``keras.Model`` for ``compile``/``fit`` around any method) and ``kd_tf2.predict`` (classify image
files with an exported model) are imported on first use, so ``import kd_tf2`` stays free of
TensorFlow until they are needed.
"""
import importlib

from kd_tf2.errors import UsageError  # noqa: F401

__version__ = "0.1.0"

_LAZY = {"adapt": "kd_tf2.adapter", "Adapted": "kd_tf2.adapter",
         "Distillation": "kd_tf2.keras_model", "predict": "kd_tf2.serving"}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'kd_tf2' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY))
