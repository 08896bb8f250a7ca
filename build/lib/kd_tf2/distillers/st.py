"""ST - soft targets (aliases KD, Soft_logits).

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep Learning
workshop, arXiv:1503.02531. METHODS.md §2.1: KL(softmax(z_t/T) || softmax(z_s/T)) * T^2,
batch-mean over [B, K] logits.

The soft-target term is the engine's ``kd`` term (``Distiller.total_terms``), shared by every
method; ST itself only sets RepDistiller's defaults: ``0.1 * CE + 0.9 * KD_T``, T = 4
(``-r 0.1 -a 0.9 -b 0``, METHODS.md §3).
"""
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller


@register("ST", "KD", "Soft_logits")
class SoftTarget(Distiller):
  """L = ce_weight * CE + kd_weight * T^2 KL(p_t || p_s); no method term of its own."""
  ce_weight = 0.1
  kd_weight = 0.9
  method_weight = 0.0
  temperature = 4.0
