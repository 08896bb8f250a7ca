"""PKT - probabilistic knowledge transfer.

Passalis, Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018,
arXiv:1803.10837. METHODS.md §2.5 / §3: ``method_weight * pkt(e_s, e_t)`` on the penultimate
embeddings (RepDistiller ``feat[-1]`` = ``Outputs.embedding``, [B, D_s] and [B, D_t]; D may differ),
weight 30000 (RepDistiller ``-b 30000``, mdistiller 30000; the Zoo uses 10000 and eps 1e-6).
``eps`` (default 1e-7, RepDistiller) is exposed (catalog choice §5.2).

Per replica: the B x B cosine-similarity distributions are built from this replica's samples only,
so the value depends on the per-replica batch (as in single-GPU RepDistiller).
"""
from kd_tf2 import losses as kd_losses
from kd_tf2.checks import is_number
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller
from kd_tf2.errors import UsageError


@register("PKT")
class PKT(Distiller):
  """{"pkt": method_weight * pkt(embedding_s, embedding_t, eps)}."""
  method_weight = 30000.0

  def __init__(self, student, teacher, *, eps=1e-7, **kwargs):
    super().__init__(student, teacher, **kwargs)
    if not is_number(eps) or not 0 < eps < 1:
      raise UsageError(f"PKT eps={eps!r}: must be a number in (0, 1), e.g. 1e-7")
    self.eps = float(eps)

  def terms(self, s, t, batch, *, training=True):
    return {"pkt": self.method_weight * kd_losses.pkt(s.embedding, t.embedding, eps=self.eps)}

  def hparams(self):
    return dict(super().hparams(), eps=self.eps)
