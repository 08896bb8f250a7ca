"""kd_tf2: knowledge-distillation benchmark and toolkit for TensorFlow 2 / Keras 3."""
from kd_tf2.errors import UsageError  # noqa: F401

__version__ = "0.1.0"
