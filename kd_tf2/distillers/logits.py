"""Logits - regression on the logits.

Ba, Caruana, "Do Deep Nets Really Need to be Deep?", NIPS 2014, arXiv:1312.6184.
METHODS.md §2.2 / §3: ``method_weight * mean_{b,k} (z_s - z_t)^2`` on the logits [B, K] of both
nets (equal K), added to the cross-entropy; weight 0.1 as the Zoo (``CE + 0.1 * Logits``).
RepDistiller has no such method. The paper regresses on the logits without any cross-entropy; the
catalog keeps the Zoo's CE + weighted MSE (``--ce_weight 0`` gives the paper's objective).

Per replica: the mean is over this replica's samples (no batch relation).
"""

from kd_tf2 import losses as kd_losses
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller
from kd_tf2.errors import UsageError


@register("Logits")
class Logits(Distiller):
  """{"logits": method_weight * MSE(z_s, z_t)}."""
  method_weight = 0.1

  def build_connectors(self, s, t):
    if s.logits.shape[-1] != t.logits.shape[-1]:
      raise UsageError(f"Logits needs the same number of classes: student {self.student.arch} "
                       f"has {s.logits.shape[-1]}, teacher {self.teacher.arch} has "
                       f"{t.logits.shape[-1]}")

  def terms(self, s, t, batch, *, training=True):
    return {"logits": self.method_weight * kd_losses.logit_mse(s.logits, t.logits)}
