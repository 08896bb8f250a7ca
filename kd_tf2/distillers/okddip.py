"""OKDDip - online knowledge distillation with diverse peers: attention-weighted peer targets and a
group leader taught by the peers.

Chen, Mei, Wang, Feng, Chen, "Online Knowledge Distillation with Diverse Peers", AAAI 2020,
arXiv:1912.00350. The student is split before its last stage (``nets.branched``) into the group
leader (branch 0, the exported student) and m = 3 auxiliary peers (branches 1..3). Each peer i
has a query and a key (two FC layers on its pooled embedding e_i, [B, d] -> [B, d]); its target
is an attention-weighted sum of the peers' logits (sec. 3.2):

    a_ij = softmax_j(q(e_i) . k(e_j)),   t_i = sum_j a_ij z_j     (z_j detached; a learns)

First-level distillation: T^2 sum_i KL(softmax(t_i/T) || softmax(z_i/T)). Second-level: the leader
learns from the peers' ensemble (mean of their logits, detached): T^2 KL(softmax(z_bar/T) ||
softmax(z_leader/T)). Plus the CE of every branch; T = 3, ``method_weight`` scales both KL sums.
Our choices where the text leaves room: the peers' logits inside the targets are constants (the
attention layers learn from the first-level KL), and the leader's target is the mean of logits.
Per replica: per-sample terms only.
"""
import tensorflow as tf

from kd_tf2 import losses as kd_losses
from kd_tf2.distillers import register
from kd_tf2.distillers._online import BranchedDistiller, JointStep, dense


@register("OKDDip")
class OKDDip(JointStep, BranchedDistiller):
  """{"ce": CE(leader), "peer_ce": sum CE(peers), "okd_peer": w*T^2 sum KL(t_i||p_i),
  "okd_leader": w*T^2 KL(mean peers||leader)}."""
  method_weight = 1.0
  temperature = 3.0
  branches = 4  # the leader + 3 peers
  max_levels = 1

  def build_connectors(self, s, t):
    del t
    width = int(s.embedding.shape[-1])
    self.query = dense(width, "query")
    self.key = dense(width, "key")
    self.query.build((None, width))
    self.key.build((None, width))

  def peer_targets(self, peer_outs):
    """[B, m, K] attention-aggregated logits of the peers (their logits detached)."""
    emb = tf.stack([o.embedding for o in peer_outs], axis=1)  # [B, m, d]
    z = tf.stack([o.logits for o in peer_outs], axis=1)       # [B, m, K]
    return kd_losses.attention_targets(z, self.query(emb), self.key(emb))

  def ensemble_logits(self, outs, shared, training):
    del shared, training
    return tf.add_n([o.logits for o in outs[1:]]) / float(len(outs) - 1)

  def all_terms(self, images, labels, training):
    outs = self.branch_outputs(self.shared(images, training), training)
    leader, peers = outs[0], outs[1:]
    z = tf.stack([p.logits for p in peers], axis=1)
    first = kd_losses.okddip_peer_kl(self.peer_targets(peers), z, self.temperature)
    second = kd_losses.soft_target(leader.logits, self.ensemble_logits(outs, None, None),
                                   self.temperature)
    terms = {"ce": self.ce_weight * self.cross_entropy(leader.logits, labels),
             "peer_ce": self.ce_weight * tf.add_n([self.cross_entropy(p.logits, labels)
                                                   for p in peers]),
             "okd_peer": self.method_weight * first,
             "okd_leader": self.method_weight * second}
    return terms, leader.logits
