"""Bases of the online methods: several trainable nets in one run, no frozen teacher.

``PeersDistiller``: the student plus K peer nets (``--peers=arch1,arch2``; possibly different
architectures), each a whole zoo net trained from scratch together with the student.
``BranchedDistiller``: the student split after a stage into m branches sharing its trunk
(``nets.branched``); branch 0 is the student.

Both keep their extra nets as sub-layers of the distiller, so the engine checkpoints, restores and
optimises them with the distiller's own variables (``variables_to_train`` = student + distiller
trainables). One optimiser (one SGD with per-variable momentum) updates every net: PyTorch's usual
single optimizer over all parameters, which the papers' code bases use (ONE, CL, OKDDip, KDCL);
with per-variable state and coupled weight decay it equals one SGD per net. Exported beside the
student: ``extra_exports()`` (``peer<i>`` / ``branch<i>``, 1-based); evaluated after every epoch:
``eval_models()`` (those nets plus ``ensemble``).
"""
import keras
import tensorflow as tf

import nets
from nets import branched as nb
from nets import ensembles
from kd_tf2.distillers.base import Distiller, StepOutput, arch_name, as_float32
from kd_tf2.errors import UsageError


class _View:
  """A callable ``view(images, training=False) -> logits [B, K]`` for ``Evaluator``."""

  def __init__(self, fn):
    self._fn = fn

  def __call__(self, images, training=False):
    return self._fn(images, training)


class JointStep:
  """Mixin of the methods whose every trained net comes out of one pass: the subclass defines
  ``all_terms(images, labels, training) -> ({name: weighted term}, student logits [B, K])``,
  the student's cross-entropy as ``"ce"``; ``terms`` is that without ``"ce"`` (the base adds it),
  ``train_step`` one update on their sum. ``all_terms`` gets ``step_images(batch)``: the batch's
  ``image`` (override to give the nets other inputs, e.g. KDCL's one view per net)."""

  def step_images(self, batch):
    return batch["image"]

  def terms(self, s, t, batch, *, training=True):
    del s, t
    terms, _ = self.all_terms(self.step_images(batch), batch["label"], training)
    return {k: v for k, v in terms.items() if k != "ce"}

  def train_step(self, batch, ctx):
    with tf.GradientTape() as tape:
      terms, logits = self.all_terms(self.step_images(batch), batch["label"], True)
      loss = tf.add_n(list(terms.values()))
    ctx.minimize(loss, tape)
    return StepOutput(terms, logits)


class PeersDistiller(Distiller):
  """Student + ``peers`` (a list of zoo nets, built by the engine from ``--peers``)."""
  uses_teacher = False
  min_peers = 1

  def __init__(self, student, teacher, *, peers=None, **kwargs):
    super().__init__(student, teacher, **kwargs)
    peers = list(peers or [])
    if len(peers) < self.min_peers:
      raise UsageError(f"method {self.method_name} needs at least {self.min_peers} peer(s) "
                       f"(--peers=ARCH[,ARCH...]); got {len(peers)}")
    for p in peers:
      p.trainable = True
      if getattr(p, "num_classes", None) != getattr(student, "num_classes", None):
        raise UsageError(f"{self.method_name}: peer {arch_name(p)} has {p.num_classes} classes, "
                         f"the student {arch_name(student)} has {student.num_classes}")
    self.peers = peers

  def cohort(self):
    """[student, peer1, ...]: every net trained."""
    return [self.student] + list(self.peers)

  def peer_names(self):
    return [f"peer{i}" for i in range(1, len(self.peers) + 1)]

  def extra_exports(self):
    return dict(zip(self.peer_names(), self.peers))

  def eval_models(self):
    nets_ = self.cohort()
    mean = _View(lambda x, training: tf.add_n(
        [tf.cast(n(x, training=training), tf.float32) for n in nets_]) / float(len(nets_)))
    return {**self.extra_exports(), "ensemble": mean}

  def cohort_outputs(self, images, training):
    """``Outputs`` (float32) of every net of the cohort, student first; ``images``: one batch
    [B, H, W, C] for all, or a list of one per net."""
    nets_ = self.cohort()
    inputs = images if isinstance(images, (list, tuple)) else [images] * len(nets_)
    return [as_float32(n(x, training=training, features=True)) for n, x in zip(nets_, inputs)]


class BranchedDistiller(Distiller):
  """The student split after stage ``split`` (default: before its last stage) into ``branches``
  branches (``nets.branched``); branch 0 is the student. Methods whose ensemble is a model of its
  own set ``exports_ensemble``: it is exported as ``ensemble.keras`` (``nets.ensembles``), the
  mean of the branches ``ensemble_members`` (None: all) or, with a ``gate`` layer, their gated
  sum."""
  uses_teacher = False
  branches = 3
  exports_ensemble = False
  ensemble_members = None

  def __init__(self, student, teacher, *, branches=None, split=None, **kwargs):
    super().__init__(student, teacher, **kwargs)
    m = type(self).branches if branches is None else branches
    if isinstance(m, bool) or not isinstance(m, int) or m < 2:
      raise UsageError(f"branches={m!r} for method {self.method_name}: must be an integer >= 2")
    split = nb.default_split(student) if split is None and hasattr(student, "stages") else split
    try:
      nb.check_branchable(student, split)
    except ValueError as e:
      raise UsageError(f"method {self.method_name}: {e}") from None
    self.num_branches, self.split = m, split
    clones = []
    for _ in range(m - 1):
      net = nets.create(student.arch, student.num_classes,
                        synchronized_bn=student.synchronized_bn)
      nb.freeze_trunk(net, split)
      clones.append(net)
    self.clones = clones

  def setup(self, input_shape):
    self.image_shape = tuple(int(d) for d in input_shape)
    for net in self.clones:
      net.build((None,) + self.image_shape)
    return super().setup(input_shape)

  def branch_nets(self):
    return [self.student] + list(self.clones)

  def shared(self, images, training):
    """The trunk's (map, features, preacts), computed once per step."""
    return nb.trunk(self.student, images, training, self.split)

  def branch_outputs(self, shared, training):
    """``Outputs`` (float32) of every branch on the trunk output ``shared``."""
    return [as_float32(nb.branch(n, shared, training, self.split)) for n in self.branch_nets()]

  def branch_names(self):
    return [f"branch{i}" for i in range(1, self.num_branches)]

  def extra_exports(self):
    """Branches 1..m-1 as plain zoo nets (the trunk copied in), and the ensemble as one model
    when the method has one (``exports_ensemble``)."""
    out = {name: nb.export_branch(self.student, net, self.split)
           for name, net in zip(self.branch_names(), self.clones)}
    if self.exports_ensemble:
      out["ensemble"] = ensembles.BranchEnsemble.of(
          self.branch_nets(), self.split, self.image_shape, members=self.ensemble_members,
          gate=getattr(self, "gate", None))
    return out

  def ensemble_logits(self, outs, shared, training):
    """Logits of the branches' ensemble (override; default: mean of the branches' logits)."""
    del shared, training
    return tf.add_n([o.logits for o in outs]) / float(len(outs))

  def eval_models(self):
    def one(i):
      def fn(x, training):
        return nb.branch(self.branch_nets()[i], self.shared(x, training), training,
                         self.split).logits
      return _View(fn)

    def ensemble(x, training):
      shared = self.shared(x, training)
      return self.ensemble_logits(self.branch_outputs(shared, training), shared, training)

    views = {name: one(i) for i, name in enumerate(self.branch_names(), start=1)}
    return {**views, "ensemble": _View(ensemble)}


def dense(units, name):
  """A plain Dense layer (PyTorch-like default init is not needed for gates/heads)."""
  return keras.layers.Dense(units, name=name)
