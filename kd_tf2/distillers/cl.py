"""CL - collaborative learning: classifier heads over hierarchically shared layers, each taught by
the others.

Song & Chai, "Collaborative Learning for Deep Neural Networks", NeurIPS 2018, arXiv:1805.11761.
The heads are the leaves of a ``nets.branched.Tree`` over the student (head 0 is the student):
"hierarchical ILR sharing" (sec. 3) forks the net at increasing stage counts ``splits`` into
``branches`` children per fork, so heads of one group share the layers between two forks. Per head
h (eq. 3-4):

    L_h = beta * CE(z_h, y) + (1 - beta) * T^2 * KL(mean_{j != h} softmax(z_j/T) || softmax(z_h/T))

with the other heads' targets detached (``kd_tf2.losses.collaborative_kl``); the loss is the sum
over heads. The paper's defaults: beta = 0.5, T = 2 (``ce_weight`` is beta, ``method_weight``
1 - beta).

Backpropagation rescaling (sec. 3.3): where a node's output map forks into g children, the
gradient flowing back into it (the sum of its children's) is multiplied by 1/g
(``kd_tf2.losses.scale_gradient``), an identity forward. Over the tree the gradient reaching the
root trunk is therefore (1/b_1)(1/b_2)... = 1/H times the heads' summed gradient - the mean over
the heads - and a middle stage shared by a group receives its group's mean, so no shared layer's
gradient grows with the number of heads below it.

Default tree (``default_tree``): the paper's CIFAR setting, four heads by hierarchical sharing with
two heads at each of two split points - for a net of n >= 3 stages the forks sit before its last
two stages (``splits=(n-2, n-1)``, ``branches=(2, 2)``; CIFAR ResNets: after stages 1 and 2).
Nets of fewer stages fork once before the last stage into two heads. One level as before:
``splits=2, branches=2`` (``--method_args=splits=2,branches=2``). Accepted forms: ``splits`` an
int or increasing ints joined by '-' or '/' ("1-2"); ``branches`` an int (every level) or one
int per split ("2-2"). Per replica: per-sample terms only.
Unverified: the tree above, the 1/g rule and the target as the mean of the other heads' softened
probabilities (the issue's formula; eq. 3 may average logits instead) are our reading of the paper,
whose full text and code were not available to us (README deviations).
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

  def default_tree(self, student):
    n = student.num_stages
    if n >= 3:
      return (n - 2, n - 1), (2, 2)
    return super().default_tree(student)

  def at_split(self, x, children):
    return kd_losses.scale_gradient(x, 1.0 / float(children))

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
