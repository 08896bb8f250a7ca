"""RKD - relational knowledge distillation (distance and angle potentials).

Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019, arXiv:1904.05068.
METHODS.md §2.6 / §3: on the penultimate embeddings (RepDistiller ``feat[-1]`` =
``Outputs.embedding``, [B, D_s] and [B, D_t]; D may differ),
``method_weight * (distance_weight * rkd_distance + angle_weight * rkd_angle)`` with the paper's
25 / 50 and RepDistiller's ``-b 1`` (= mdistiller, Zoo). The two terms are logged separately as
``rkd_distance`` and ``rkd_angle`` (each already weighted); a zero weight drops its term.

Per replica: distances and angles relate this replica's samples only (B x B and B x B x B
potentials of the per-replica batch), as in single-GPU RepDistiller.
"""
from kd_tf2 import losses as kd_losses
from kd_tf2.checks import is_number
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller
from kd_tf2.errors import UsageError


def _weight(name, value):
  if not is_number(value) or value < 0:
    raise UsageError(f"RKD {name}={value!r}: must be a number >= 0")
  return float(value)


@register("RKD")
class RKD(Distiller):
  """{"rkd_distance": b * w_d * rkd_distance, "rkd_angle": b * w_a * rkd_angle} on embeddings."""
  method_weight = 1.0

  def __init__(self, student, teacher, *, distance_weight=25.0, angle_weight=50.0, **kwargs):
    super().__init__(student, teacher, **kwargs)
    self.distance_weight = _weight("distance_weight", distance_weight)
    self.angle_weight = _weight("angle_weight", angle_weight)

  def terms(self, s, t, batch, *, training=True):
    terms = {}
    if self.distance_weight:
      terms["rkd_distance"] = (self.method_weight * self.distance_weight
                               * kd_losses.rkd_distance(s.embedding, t.embedding))
    if self.angle_weight:
      terms["rkd_angle"] = (self.method_weight * self.angle_weight
                            * kd_losses.rkd_angle(s.embedding, t.embedding))
    return terms

  def hparams(self):
    return dict(super().hparams(), distance_weight=self.distance_weight,
                angle_weight=self.angle_weight)
