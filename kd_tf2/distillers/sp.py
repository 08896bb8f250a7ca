"""SP - similarity-preserving knowledge distillation.

Tung, Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019, arXiv:1907.09682.
METHODS.md §2.7 / §3: ``method_weight * similarity_preserving(f_s, f_t)`` on the last stage output
of both nets (RepDistiller ``feat[-2]`` = ``Outputs.features[-1]``, [B, H, W, C]; shapes may
differ, each map is flattened per sample), weight 3000 (RepDistiller ``-b 3000``, mdistiller 3000).
The paper (gamma = 3000) sums over several layer pairs and the Zoo averages three stages; the
catalog follows RepDistiller's single pair.

Per replica: the B x B similarity matrices relate this replica's samples only, as in single-GPU
RepDistiller; the value depends on the per-replica batch.
"""
from kd_tf2 import losses as kd_losses
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller


@register("SP")
class SP(Distiller):
  """{"sp": method_weight * similarity_preserving(features_s[-1], features_t[-1])}."""
  method_weight = 3000.0

  def terms(self, s, t, batch, *, training=True):
    loss = kd_losses.similarity_preserving(s.features[-1], t.features[-1])
    return {"sp": self.method_weight * loss}
