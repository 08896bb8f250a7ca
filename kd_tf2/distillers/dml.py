"""DML - deep mutual learning: two networks trained together, each taught by the other.

Zhang, Xiang, Hospedales, Lu, "Deep Mutual Learning", CVPR 2018, arXiv:1706.00384.
METHODS.md §2.20 and §4 (Zoo DML, lambda 1): the "teacher" handed to the distiller is the *peer*,
a second network trained from the same forward pass as the student:

    L_student = ce_weight * CE(z_s, y) + method_weight * KL(p_peer || p_s)
    L_peer    = ce_weight * CE(z_p, y) + method_weight * KL(p_s || p_peer)

with plain softmax (no temperature; ``kd_tf2.losses.dml_kl``) and the other network's logits
detached in each KL. Both networks run in training mode. One optimiser update on
``L_student + L_peer`` over the student's and the peer's variables is the Zoo's two synchronous
updates (the detached KLs make each net's gradient depend on its own loss only; the optimiser keeps
per-variable state). An optional soft-target term (``kd_weight``) teaches the student only.

Contract with the engine: ``distillers.create`` freezes the teacher (``trainable = False``), which
would also put its BatchNorm in inference mode; DML's constructor sets it back to ``True`` because
the peer is trained. ``variables_to_train`` includes the peer's variables. The peer starts untrained
(``pretrained_teacher = False``: the engine should neither load nor pre-train it), must be
checkpointed with the run and exported beside the student (``extra_exports()``).

Per replica: each replica computes both losses on its own batch; nothing is batch-relational.
"""
import tensorflow as tf

from kd_tf2 import losses as kd_losses
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller, StepOutput, as_float32
from kd_tf2.distillers.base import arch_name as _arch
from kd_tf2.errors import UsageError


@register("DML")
class DML(Distiller):
  """{"dml": w * KL(p_peer || p_s), "peer_ce": r * CE(z_p), "peer_dml": w * KL(p_s || p_peer)}."""
  method_weight = 1.0
  pretrained_teacher = False  # the peer trains from its initialisation, with the student

  def __init__(self, student, teacher, **kwargs):
    super().__init__(student, teacher, **kwargs)
    teacher.trainable = True  # create() froze it; here it is the peer, trained with the student

  @property
  def peer(self):
    """The second network (passed as the teacher)."""
    return self.teacher

  def variables_to_train(self):
    """Student, peer and distiller trainables (each once)."""
    seen, out = set(), []
    for v in (list(self.student.trainable_variables) + list(self.peer.trainable_variables)
              + list(self.trainable_variables)):
      if id(v) not in seen:
        seen.add(id(v))
        out.append(v)
    return out

  def extra_exports(self):
    """Networks the engine exports beside the student: ``{"peer": model}``."""
    return {"peer": self.peer}

  def build_connectors(self, s, t):
    if s.logits.shape[-1] != t.logits.shape[-1]:
      raise UsageError(f"DML needs the same classes in both nets: {_arch(self.student)} has "
                       f"{s.logits.shape[-1]}, the peer {_arch(self.peer)} has "
                       f"{t.logits.shape[-1]}")

  def terms(self, s, t, batch, *, training=True):
    return {"dml": self.method_weight * kd_losses.dml_kl(s.logits, t.logits)}

  def train_step(self, batch, ctx):
    images, labels = batch["image"], batch["label"]
    with tf.GradientTape() as tape:
      s = self.student_outputs(images, training=True)
      p = as_float32(self.peer(images, training=True, features=True))
      p_const = tf.nest.map_structure(tf.stop_gradient, p)
      terms = self.total_terms(s, p_const, batch, training=True)
      terms["peer_ce"] = self.ce_weight * self.cross_entropy(p.logits, labels)
      terms["peer_dml"] = self.method_weight * kd_losses.dml_kl(p.logits,
                                                                 tf.stop_gradient(s.logits))
      loss = tf.add_n(list(terms.values()))
    ctx.minimize(loss, tape)
    return StepOutput(terms, s.logits)
