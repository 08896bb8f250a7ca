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

Cohorts (the paper's eq. 10, K >= 2 nets): with ``peers`` (``--peers=arch1,arch2``) the teacher
slot stays empty and every net k gets CE + w * (1/(K-1)) sum_{l != k} KL(p_l || p_k)
(``kd_tf2.losses.cohort_kl``); with one peer this is the two-net loss above. The peers are
sub-layers of the distiller (checkpointed with it), exported as ``peer<i>.keras``.

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
  """{"dml": w * KL(p_peer || p_s), "peer_ce": r * CE(z_p), "peer_dml": w * KL(p_s || p_peer)};
  with ``peers`` (a cohort of K >= 1 peers): {"dml": w * cohort_kl(student),
  "peer<i>_ce", "peer<i>_dml": w * cohort_kl(peer i)}."""
  method_weight = 1.0
  pretrained_teacher = False  # the peer trains from its initialisation, with the student

  def __init__(self, student, teacher, *, peers=None, **kwargs):
    super().__init__(student, teacher, **kwargs)
    peers = list(peers or [])
    if peers and teacher is not None:
      raise ValueError("DML: pass either a teacher-slot peer or peers, not both")
    if not peers and teacher is None:
      raise UsageError("method DML needs a peer: --teacher_arch (one peer) or --peers")
    for p in peers or [teacher]:
      p.trainable = True  # create() froze the teacher slot; here every net is trained
    self.peers = peers  # tracked: checkpointed and optimised with the distiller
    self._names = ["peer"] if not peers else [f"peer{i}" for i in range(1, len(peers) + 1)]

  @property
  def peer(self):
    """The first peer (the teacher slot without --peers)."""
    return self.cohort()[1]

  def cohort(self):
    """[student, peer(s)]: every net trained."""
    return [self.student] + (list(self.peers) or [self.teacher])

  def variables_to_train(self):
    """Student, peers and distiller trainables (each once)."""
    seen, out = set(), []
    for v in (list(self.student.trainable_variables) + list(self.peer.trainable_variables)
              + list(self.trainable_variables)):
      if id(v) not in seen:
        seen.add(id(v))
        out.append(v)
    return out

  def extra_exports(self):
    """Networks the engine exports beside the student: ``{"peer": model}`` or ``peer<i>``."""
    return dict(zip(self._names, self.cohort()[1:]))

  def build_connectors(self, s, t):
    for name, p in zip(self._names, self.cohort()[1:]):
      if s.logits.shape[-1] != p.num_classes:
        raise UsageError(f"DML needs the same classes in every net: {_arch(self.student)} has "
                         f"{s.logits.shape[-1]}, the {name} {_arch(p)} has {p.num_classes}")

  def terms(self, s, t, batch, *, training=True):
    if t is None:
      return {}
    return {"dml": self.method_weight * kd_losses.dml_kl(s.logits, t.logits)}

  def train_step(self, batch, ctx):
    images, labels = batch["image"], batch["label"]
    with tf.GradientTape() as tape:
      outs = [as_float32(n(images, training=True, features=True)) for n in self.cohort()]
      logits = [o.logits for o in outs]
      terms = self.total_terms(outs[0], tf.nest.map_structure(tf.stop_gradient, outs[1]),
                               batch, training=True)
      if len(outs) > 2:
        terms["dml"] = self.method_weight * kd_losses.cohort_kl(logits, 0)
      for k, name in enumerate(self._names, start=1):
        terms[f"{name}_ce"] = self.ce_weight * self.cross_entropy(logits[k], labels)
        terms[f"{name}_dml"] = self.method_weight * kd_losses.cohort_kl(logits, k)
      loss = tf.add_n(list(terms.values()))
    ctx.minimize(loss, tape)
    return StepOutput(terms, logits[0])
