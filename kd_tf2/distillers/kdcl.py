"""KDCL - online knowledge distillation via collaborative learning: peers taught by their ensemble.

Guo, Wang, Wu, Yu, Liang, Hu, Luo, "Online Knowledge Distillation via Collaborative Learning",
CVPR 2020. Two or more nets, possibly of different architectures (``--arch=resnet32
--peers=wrn_16_2``), train together; every step a teacher is ensembled from their logits and
distilled into each of them:

    L = sum_m [ CE(z_m, y) + w * T^2 * KL(softmax(z_t/T) || softmax(z_m/T)) ]

with z_t detached. Ensembles (``ensemble=``): ``minlogit`` (default; sec. 3.2, each net's logits
minus its own target logit, element-wise minimum over nets: ``kd_tf2.losses.kdcl_min_logit``) and
``naive`` (per sample, the logits of the net with the lowest cross-entropy:
``kd_tf2.losses.kdcl_naive``). Defaults w = 1, T = 2 (our reading of the paper; its ImageNet code
is not public).
Deviations: the paper feeds each net a differently augmented copy of the image; we feed all nets
the same batch. The Linear and General ensembles (learned weights, a held-out split) are not built.
Per replica: per-sample terms only.
"""

from kd_tf2 import losses as kd_losses
from kd_tf2.distillers import register
from kd_tf2.distillers._online import JointStep, PeersDistiller
from kd_tf2.errors import UsageError

ENSEMBLES = {"minlogit": kd_losses.kdcl_min_logit, "naive": kd_losses.kdcl_naive}


@register("KDCL")
class KDCL(JointStep, PeersDistiller):
  """{"ce": CE(student), "kdcl": w*T^2 KL(p_t || p_s), "peer<i>_ce", "peer<i>_kdcl"}."""
  method_weight = 1.0
  temperature = 2.0

  def __init__(self, student, teacher, *, ensemble="minlogit", **kwargs):
    super().__init__(student, teacher, **kwargs)
    key = str(ensemble).lower()
    if key not in ENSEMBLES:
      raise UsageError(f"ensemble={ensemble!r} for KDCL; accepted: {', '.join(ENSEMBLES)}")
    self.ensemble = key

  def all_terms(self, images, labels, training):
    logits = [o.logits for o in self.cohort_outputs(images, training)]
    target = ENSEMBLES[self.ensemble](logits, labels)
    terms = {}
    for name, z in zip([""] + [f"{n}_" for n in self.peer_names()], logits):
      terms[f"{name}ce"] = self.ce_weight * self.cross_entropy(z, labels)
      terms[f"{name}kdcl"] = self.method_weight * kd_losses.soft_target(z, target,
                                                                         self.temperature)
    return terms, logits[0]
