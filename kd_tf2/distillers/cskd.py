"""CS-KD - class-wise self-knowledge distillation: a sample learns its class-mate's prediction.

Yun, Park, Lee, Shin, "Regularizing Class-wise Predictions via Self-knowledge Distillation",
CVPR 2020, arXiv:2003.13964. The batches are class-paired (``kd_tf2.data.paired``: the engine
asks the pipeline for them because ``paired_batches = True``): rows 0, 2, 4, ... are anchors x,
rows 1, 3, 5, ... a random training sample x' of the same class. The loss (eq. 3):

    L = CE(z(x), y) + lambda * T^2 * KL(softmax(z(x')/T) || softmax(z(x)/T)),  T = 4, lambda = 1

with the partner's prediction detached (``kd_tf2.losses.cs_kd``); the CE is over the anchors, as
in the authors' code. One forward pass over the whole batch (training mode): the BatchNorm
statistics of a step mix anchors and partners (the authors run the partners in a second pass).
No teacher. Per replica: a replica's share of the batch holds whole pairs (its size must be even).
"""
from kd_tf2 import losses as kd_losses
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller


@register("CSKD", "CS-KD")
class CSKD(Distiller):
  """{"ce": CE(anchors), "cs_kd": lambda * T^2 KL(p(x') || p(x))}."""
  uses_teacher = False
  paired_batches = True
  method_weight = 1.0
  temperature = 4.0

  def total_terms(self, s, t, batch, *, training=True):
    del t, training
    anchors, partners = s.logits[0::2], s.logits[1::2]
    return {"ce": self.ce_weight * self.cross_entropy(anchors, batch["label"][0::2]),
            "cs_kd": self.method_weight * kd_losses.cs_kd(anchors, partners, self.temperature)}

  def terms(self, s, t, batch, *, training=True):
    out = self.total_terms(s, t, batch, training=training)
    return {"cs_kd": out["cs_kd"]}
