"""kd_tf2: knowledge-distillation benchmark and toolkit for TensorFlow 2 / Keras 3."""
__version__ = "0.1.0"
