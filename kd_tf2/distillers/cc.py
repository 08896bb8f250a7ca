"""CC - correlation congruence (Gaussian RBF kernel, Taylor-expanded).

Peng et al., "Correlation Congruence for Knowledge Distillation",
ICCV 2019, arXiv:1904.01802. METHODS.md §2.8 / §3 / §5.3: the Zoo's kernel form,
``method_weight * correlation_congruence(e_s, e_t, gamma, order)`` on the penultimate embeddings
(``Outputs.embedding``, [B, D_s] and [B, D_t]; D may differ), gamma 0.4, order P = 2, weight 100
(Zoo). No learnable layer.

Differences, by catalog choice: RepDistiller's "CC" (trainable 128-d embeddings on both nets and a
product of absolute differences, ``-b 0.02``) is a different loss and is not this method. The paper
adds an instance-level KD term (use ``--kd_weight``) and a class-aware batch sampler (not done, as
the Zoo).

Per replica: the B x B correlation matrices relate this replica's samples only; the value depends
on the per-replica batch.
"""
from kd_tf2 import losses as kd_losses
from kd_tf2.checks import is_int, is_number
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller
from kd_tf2.errors import UsageError


@register("CC")
class CC(Distiller):
  """{"cc": method_weight * correlation_congruence(embedding_s, embedding_t, gamma, order)}."""
  method_weight = 100.0

  def __init__(self, student, teacher, *, gamma=0.4, order=2, **kwargs):
    super().__init__(student, teacher, **kwargs)
    if not is_number(gamma) or gamma <= 0:
      raise UsageError(f"CC gamma={gamma!r}: must be a number > 0 (default 0.4)")
    if not is_int(order) or order < 0:
      raise UsageError(f"CC order={order!r}: must be an integer >= 0 (default 2)")
    self.gamma, self.order = float(gamma), order

  def terms(self, s, t, batch, *, training=True):
    loss = kd_losses.correlation_congruence(s.embedding, t.embedding, gamma=self.gamma,
                                            order=self.order)
    return {"cc": self.method_weight * loss}

  def hparams(self):
    return dict(super().hparams(), gamma=self.gamma, order=self.order)
