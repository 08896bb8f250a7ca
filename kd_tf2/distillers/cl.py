"""CL - collaborative learning: classifier heads over shared layers, each taught by the others.

Song & Chai, "Collaborative Learning for Deep Neural Networks", NeurIPS 2018, arXiv:1805.11761.
The heads are the branches of ``nets.branched`` (the student's last stage + classifier duplicated;
branch 0 is the student). Per head h (eq. 3-4):

    L_h = beta * CE(z_h, y) + (1 - beta) * T^2 * KL(mean_{j != h} softmax(z_j/T) || softmax(z_h/T))

with the other heads' targets detached (``kd_tf2.losses.collaborative_kl``). The paper's defaults:
beta = 0.5, T = 2. ``ce_weight`` is beta, ``method_weight`` is 1 - beta. Backpropagation
rescaling (sec. 3.3): the gradient flowing into the shared trunk from the H heads is multiplied by
1/H at the split point (``kd_tf2.losses.scale_gradient``), so the trunk's gradient does not grow
with H. Two heads by default (the paper's "simple" setting; more with ``branches``).
Deviation: we share the layers up to one split point (one level of the paper's hierarchical
"ILR sharing"). Per replica: per-sample terms only.
"""
import tensorflow as tf

from kd_tf2 import losses as kd_losses
from kd_tf2.distillers import register
from kd_tf2.distillers._online import BranchedDistiller, JointStep


@register("CL")
class CL(JointStep, BranchedDistiller):
  """{"ce": beta*CE(head 0), "head_ce": beta*sum_{h>0} CE, "cl": (1-beta)*sum_h T^2 KL(...)}."""
  ce_weight = 0.5
  method_weight = 0.5
  temperature = 2.0
  branches = 2

  def shared(self, images, training):
    x, feats, preacts = super().shared(images, training)
    scale = 1.0 / float(self.num_branches)
    return kd_losses.scale_gradient(x, scale), feats, preacts

  def all_terms(self, images, labels, training):
    outs = self.branch_outputs(self.shared(images, training), training)
    logits = [o.logits for o in outs]
    kl = tf.add_n([kd_losses.collaborative_kl(logits, h, self.temperature)
                   for h in range(len(logits))])
    terms = {"ce": self.ce_weight * self.cross_entropy(logits[0], labels),
             "head_ce": self.ce_weight * tf.add_n(
                 [self.cross_entropy(z, labels) for z in logits[1:]]),
             "cl": self.method_weight * kl}
    return terms, logits[0]
