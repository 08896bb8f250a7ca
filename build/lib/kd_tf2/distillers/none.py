"""``none``: plain supervised training, L = ce_weight * CE (baselines and teachers).

No teacher is read unless ``--kd_weight`` is set, which turns it into soft-target KD.
"""
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller


@register("none")
class NoDistillation(Distiller):
  """Cross-entropy only; the teacher may be None."""
  ce_weight = 1.0
  kd_weight = 0.0
  uses_teacher = False
