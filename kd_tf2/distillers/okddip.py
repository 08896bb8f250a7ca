"""OKDDip - online knowledge distillation with diverse peers: attention-weighted peer targets and a
group leader taught by the peers.

Chen, Mei, Wang, Feng, Chen, "Online Knowledge Distillation with Diverse Peers", AAAI 2020,
arXiv:1912.00350; where the paper leaves room we follow the authors' code (DefangChen/OKDDip,
``train_GL.py``, ``models/model_cifar/resnet_GL.py``). The student is split before its last stage
(``nets.branched``) into the group leader (branch 0, the exported student) and m = 3 auxiliary
peers (branches 1..3). One query and one key layer, shared by the peers (FC without bias,
[B, d] -> [B, d / 8], on each peer's pooled embedding e_i), give each peer its target (sec. 3.2):

    a_ij = softmax_j(q(e_i) . k(e_j)),   t_i = sum_j a_ij z_j

First level: T^2 sum_i KL(t_i || z_i); second level: T^2 KL(mean_i z_i || z_leader), at T = 3.
Loss (``train_GL.py``): sum_i CE(z_i) + CE(z_leader) + w(epoch) * (first + second), where
``method_weight`` (1) scales both KL terms and w ramps up over the first ``rampup`` = 80 epochs:
w = exp(-5 (1 - min(epoch, rampup) / rampup)^2), epoch 0-based (``kd_tf2.losses.sigmoid_rampup``,
the code's ``get_current_consistency_weight``; ``rampup=0`` gives w = 1). As in the code, no
target is detached: the targets' gradient reaches the attention layers and the peers, and the
target probabilities get + 1e-7 (``kd_tf2.losses.okddip_peer_kl`` / ``okddip_leader_kl``).
The authors' schedule (300 epochs, batch 128, lr 0.1, Nesterov) is not copied: every method
runs the benchmark's protocol. Per replica: per-sample terms only.
"""
import keras
import tensorflow as tf

from kd_tf2 import losses as kd_losses
from kd_tf2.checks import is_int
from kd_tf2.distillers import register
from kd_tf2.distillers._online import BranchedDistiller, JointStep, rampup_epochs
from kd_tf2.errors import UsageError


@register("OKDDip")
class OKDDip(JointStep, BranchedDistiller):
  """{"ce": CE(leader), "peer_ce": sum CE(peers), "okd_peer": w(e)*T^2 sum KL(t_i||p_i),
  "okd_leader": w(e)*T^2 KL(mean peers||leader)}."""
  method_weight = 1.0
  temperature = 3.0
  branches = 4  # the leader + 3 peers
  max_levels = 1
  exports_ensemble = True  # ensemble.keras: the mean of the peers' logits (nets.ensembles)

  def __init__(self, student, teacher, *, rampup=80.0, factor=8, **kwargs):
    super().__init__(student, teacher, **kwargs)
    if not is_int(factor) or factor < 1:
      raise UsageError(f"factor={factor!r} for OKDDip: must be an integer >= 1 (the query/key "
                       "width is the embedding's divided by it)")
    self.rampup, self.factor = rampup_epochs(rampup, "OKDDip"), int(factor)
    self.ensemble_members = tuple(range(1, self.num_branches))  # the peers

  def build_connectors(self, s, t):
    del t
    width = int(s.embedding.shape[-1])
    if width // self.factor < 1:
      raise UsageError(f"factor={self.factor} for OKDDip: the embedding has only {width} channels")
    self.query = keras.layers.Dense(width // self.factor, use_bias=False, name="query")
    self.key = keras.layers.Dense(width // self.factor, use_bias=False, name="key")
    self.query.build((None, width))
    self.key.build((None, width))

  def peer_targets(self, peer_outs):
    """[B, m, K] attention-aggregated logits of the peers."""
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
    weight = self.method_weight * kd_losses.sigmoid_rampup(self.epoch, self.rampup)
    terms = {"ce": self.ce_weight * self.cross_entropy(leader.logits, labels),
             "peer_ce": self.ce_weight * tf.add_n([self.cross_entropy(p.logits, labels)
                                                   for p in peers]),
             "okd_peer": weight * kd_losses.okddip_peer_kl(self.peer_targets(peers), z,
                                                           self.temperature),
             "okd_leader": weight * kd_losses.okddip_leader_kl(leader.logits, z,
                                                               self.temperature)}
    return terms, leader.logits

  def hparams(self):
    return {**super().hparams(), "rampup": self.rampup, "factor": self.factor}
