"""DIST - distillation from a stronger teacher (inter- and intra-class relations).

Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022,
arXiv:2205.10536. METHODS.md §2.16: ``method_weight * dist(z_s, z_t, beta, gamma, T)`` on the
logits [B, K] (equal K): T^2 * (beta * (1 - mean row Pearson) + gamma * (1 - mean column Pearson))
of softmax(z / T). Defaults = the authors' classification setting (METHODS.md): beta = gamma = 1,
T = 1 (the class ``temperature``, so ``--temperature`` sets it and any KD term added with
``--kd_weight`` uses the same T), CE weight 1, method weight 1. The catalog leaves the paper's
CIFAR-100 settings unverified; pass ``beta`` / ``gamma`` / ``--temperature`` to change them.

Per replica: the intra-class term correlates each class column across this replica's samples
only (needs a per-replica batch >= 2); the value depends on the per-replica batch.
"""
from kd_tf2 import losses as kd_losses
from kd_tf2.checks import is_number
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller
from kd_tf2.errors import UsageError


def _weight(name, value):
  if not is_number(value) or value < 0:
    raise UsageError(f"DIST {name}={value!r}: must be a number >= 0")
  return float(value)


@register("DIST")
class DIST(Distiller):
  """{"dist": method_weight * T^2 * (beta * inter + gamma * intra)}."""
  method_weight = 1.0
  temperature = 1.0

  def __init__(self, student, teacher, *, beta=1.0, gamma=1.0, **kwargs):
    super().__init__(student, teacher, **kwargs)
    self.beta = _weight("beta", beta)
    self.gamma = _weight("gamma", gamma)

  def build_connectors(self, s, t):
    if s.logits.shape[-1] != t.logits.shape[-1]:
      raise UsageError(f"DIST needs the same number of classes: student {self.student.arch} "
                       f"has {s.logits.shape[-1]}, teacher {self.teacher.arch} has "
                       f"{t.logits.shape[-1]}")

  def terms(self, s, t, batch, *, training=True):
    loss = kd_losses.dist(s.logits, t.logits, beta=self.beta, gamma=self.gamma,
                          temperature=self.temperature)
    return {"dist": self.method_weight * loss}

  def hparams(self):
    return dict(super().hparams(), beta=self.beta, gamma=self.gamma)
