"""ST - soft targets (aliases KD, Soft_logits).

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep Learning
workshop, arXiv:1503.02531. METHODS.md §2.1: KL(softmax(z_t/T) || softmax(z_s/T)) * T^2,
batch-mean over [B, K] logits.

The soft-target term is the engine's ``kd`` term (``Distiller.total_terms``), shared by every
method; ST itself only sets RepDistiller's defaults: ``0.1 * CE + 0.9 * KD_T``, T = 4
(``-r 0.1 -a 0.9 -b 0``, METHODS.md §3). The ImageNet pairs take mdistiller's
``configs/imagenet/*/kd.yaml`` instead: ``0.5 * CE + 0.5 * KD_T``, T = 1 (``_pairs``; flags win).
"""
from kd_tf2.distillers import register
from kd_tf2.distillers._pairs import apply_pair_defaults, describe
from kd_tf2.distillers.base import Distiller

_IMAGENET = {"ce_weight": 0.5, "kd_weight": 0.5, "temperature": 1.0}


@register("ST", "KD", "Soft_logits")
class SoftTarget(Distiller):
  """L = ce_weight * CE + kd_weight * T^2 KL(p_t || p_s); no method term of its own."""
  ce_weight = 0.1
  kd_weight = 0.9
  method_weight = 0.0
  temperature = 4.0
  pair_defaults = {("resnet18_imagenet", "resnet34_imagenet"): _IMAGENET, ("mobilenetv1_imagenet", "resnet50_imagenet"): _IMAGENET}
  pair_sources = {("resnet18_imagenet", "resnet34_imagenet"): "mdistiller configs/imagenet/r34_r18/kd.yaml",
                  ("mobilenetv1_imagenet", "resnet50_imagenet"): "mdistiller configs/imagenet/r50_mv1/kd.yaml"}

  def __init__(self, student, teacher, **kwargs):
    super().__init__(student, teacher, **kwargs)
    self._pair_applied = apply_pair_defaults(self, {k: kwargs.get(k) for k in _IMAGENET})

  def hparams(self):
    out = super().hparams()
    if self._pair_applied:
      out["pair_defaults"] = describe(self, self._pair_applied)
    return out
