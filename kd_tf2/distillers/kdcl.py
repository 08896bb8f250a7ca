"""KDCL - online knowledge distillation via collaborative learning: peers taught by their ensemble.

Guo, Wang, Wu, Yu, Liang, Hu, Luo, "Online Knowledge Distillation via Collaborative Learning",
CVPR 2020. Two or more nets, possibly of different architectures (``--arch=resnet32
--peers=wrn_16_2``), train together; every step a teacher is ensembled from their logits and
distilled into each of them:

    L = sum_m [ CE(z_m, y) + w * T^2 * KL(softmax(z_t/T) || softmax(z_m/T)) ],  z_m = net_m(x^m)

with z_t detached. Each net m sees its own augmentation x^m of the image (sec. 3 and Fig. 1: the
input of every net is distorted separately), and the teacher is built from the nets' logits on
their own views, z_t = ensemble(z_1(x^1), ..., z_M(x^M)); CE and KL of net m are on x^m. The
engine asks the pipeline for one view per net (``batch_views = "per_net"``: ``views``
[B, M, H, W, C], student first; ``image`` is view 0, the student's). Default
``views=True``, the paper's setting; ``views=False`` (``--method_args=views=false``; the engine then
loads one image per sample) feeds every net the same batch ``image``, as DML does. Batches without
a ``views`` entry (hand-made datasets, ``bench speed``) also give every net ``image``.
Ensembles (``ensemble=``): ``minlogit`` (default; sec. 3.2, each net's logits minus its own target
logit, element-wise minimum over nets: ``kd_tf2.losses.kdcl_min_logit``) and ``naive`` (per
sample, the logits of the net with the lowest cross-entropy: ``kd_tf2.losses.kdcl_naive``).
Defaults w = 1, T = 2 (our reading of the paper; its ImageNet code is not public).
Deviation: the Linear and General ensembles (learned weights, a held-out split) are not built.
Per replica: per-sample terms only (a replica's rows carry all their views).
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
  batch_views = "per_net"

  def __init__(self, student, teacher, *, ensemble="minlogit", views=True, **kwargs):
    super().__init__(student, teacher, **kwargs)
    key = str(ensemble).lower()
    if key not in ENSEMBLES:
      raise UsageError(f"ensemble={ensemble!r} for KDCL; accepted: {', '.join(ENSEMBLES)}")
    if not isinstance(views, bool):
      raise UsageError(f"views={views!r} for KDCL; accepted: True (one augmented view per net), "
                       "False (the same batch for every net)")
    self.ensemble, self.views = key, views

  def step_images(self, batch):
    """Net m's input: view m of ``batch["views"]`` [B, K, H, W, C] (K >= nets), or ``image``."""
    if not self.views or "views" not in batch:
      return batch["image"]
    nets_, k = len(self.cohort()), batch["views"].shape[1]
    if k < nets_:
      raise UsageError(f"KDCL trains {nets_} nets but the batch holds {k} views of each image; "
                       f"load the data with views={nets_} (or create KDCL with views=False)")
    return [batch["views"][:, m] for m in range(nets_)]

  def all_terms(self, images, labels, training):
    logits = [o.logits for o in self.cohort_outputs(images, training)]
    target = ENSEMBLES[self.ensemble](logits, labels)
    terms = {}
    for name, z in zip([""] + [f"{n}_" for n in self.peer_names()], logits):
      terms[f"{name}ce"] = self.ce_weight * self.cross_entropy(z, labels)
      terms[f"{name}kdcl"] = self.method_weight * kd_losses.soft_target(z, target,
                                                                         self.temperature)
    return terms, logits[0]
