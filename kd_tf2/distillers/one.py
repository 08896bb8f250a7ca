"""ONE - on-the-fly native ensemble: one net, m branches, a gated ensemble teaching every branch.

Lan, Zhu, Gong, "Knowledge Distillation by On-the-Fly Native Ensemble", NeurIPS 2018,
arXiv:1806.04606. The student shares its stem and every stage but the last; the last stage and
the classifier are duplicated into m = 3 branches (``nets.branched``). A gate - one FC layer and a
softmax over the trunk's globally pooled map [B, c] -> [B, m] - weights the branches' logits into
the ensemble's (``kd_tf2.losses.gate_ensemble``). The loss (eq. 6):

    L = sum_i CE(z_i, y) + CE(z_e, y) + w(e) T^2 sum_i KL(softmax(z_e/T) || softmax(z_i/T)),  T = 3

with the ensemble detached in the KL terms and + 1e-7 on its probabilities, as in the authors' code
(Lan1991Xu/ONE_NeurIPS2018, ``loss/kl_loss.py``; ``kd_tf2.losses.one_loss``); ``method_weight``
scales the KL sum (default 1), and w(e) is the code's consistency ramp-up over the first
``rampup`` = 80 epochs, exp(-5 (1 - min(e, 80) / 80)^2) at 0-based epoch e
(``cifar_one.py``; ``kd_tf2.losses.sigmoid_rampup``; ``rampup=0`` gives w = 1; the paper does not
mention it). The gate learns from CE(z_e) only. Branch 0 is exported as the student;
branches 1..m-1 as ``branch<i>.keras``; the ensemble's test accuracy is logged.
Deviation: the authors' code puts BatchNorm + ReLU between the gate's FC and its softmax; we follow
the paper's text (FC + softmax).

Per replica: all terms are per-sample means; the gate is per sample (no batch statistics).
"""
import tensorflow as tf

from kd_tf2 import losses as kd_losses
from kd_tf2.distillers import register
from kd_tf2.distillers._online import BranchedDistiller, JointStep, dense, rampup_epochs


@register("ONE")
class ONE(JointStep, BranchedDistiller):
  """{"ce": CE(branch 0), "branch_ce": sum_{i>0} CE(z_i), "ensemble_ce": CE(z_e),
  "one": method_weight * w(e) * T^2 sum_i KL(p_e || p_i)}."""
  method_weight = 1.0
  temperature = 3.0
  branches = 3
  max_levels = 1
  exports_ensemble = True  # ensemble.keras: the gated ensemble (nets.ensembles)

  def __init__(self, student, teacher, *, rampup=80.0, **kwargs):
    super().__init__(student, teacher, **kwargs)
    self.rampup = rampup_epochs(rampup, "ONE")

  def build_connectors(self, s, t):
    del t
    self.gate = dense(self.num_branches, "gate")
    self.gate.build((None, int(s.features[self.split].shape[-1])))

  def gate_weights(self, shared):
    """[B, m] softmax weights from the trunk's pooled map."""
    pooled = tf.reduce_mean(tf.cast(shared[0], tf.float32), axis=[1, 2])
    return tf.nn.softmax(tf.cast(self.gate(pooled), tf.float32), axis=-1)

  def ensemble_logits(self, outs, shared, training):
    del training
    return kd_losses.gate_ensemble([o.logits for o in outs], self.gate_weights(shared))

  def all_terms(self, images, labels, training):
    shared = self.shared(images, training)
    outs = self.branch_outputs(shared, training)
    logits = [o.logits for o in outs]
    ens = self.ensemble_logits(outs, shared, training)
    terms = {"ce": self.ce_weight * self.cross_entropy(logits[0], labels),
             "branch_ce": self.ce_weight * tf.add_n(
                 [self.cross_entropy(z, labels) for z in logits[1:]]),
             "ensemble_ce": self.ce_weight * self.cross_entropy(ens, labels),
             "one": self.method_weight * kd_losses.sigmoid_rampup(self.epoch, self.rampup)
                    * kd_losses.one_loss(logits, ens, self.temperature)}
    return terms, logits[0]

  def hparams(self):
    return {**super().hparams(), "rampup": self.rampup}
