"""Bases of the online methods: several trainable nets in one run, no frozen teacher.

``PeersDistiller``: the student plus K peer nets (``--peers=arch1,arch2``; possibly different
architectures), each a whole zoo net trained from scratch together with the student.
``BranchedDistiller``: the student (any zoo net) forked after chosen stages into a tree of heads
sharing its trunk (``nets.branched``); head 0 is the student.

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
from kd_tf2.checks import is_int, is_number
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
  """The student split into a tree of heads (``nets.branched.Tree``); head 0 is the student.

  Keywords (also as ``--method_args`` values): ``splits`` - the counts of shared stages where the
  net forks, an int or increasing ints as a tuple or a string "1-2" / "1/2"; ``split`` - the same
  for one level (ONE, OKDDip); ``branches`` - children per fork, an int (every level) or one per
  split in the same forms. Defaults: ``default_tree(student)``. Methods whose papers fork once set
  ``max_levels = 1``. Methods whose ensemble is a model of its own set ``exports_ensemble``: it is
  exported as ``ensemble.keras`` (``nets.ensembles``, one level), the mean of the branches
  ``ensemble_members`` (None: all) or, with a ``gate`` layer, their gated sum."""
  uses_teacher = False
  branches = 3
  max_levels = None
  exports_ensemble = False
  ensemble_members = None

  def __init__(self, student, teacher, *, branches=None, splits=None, split=None, **kwargs):
    super().__init__(student, teacher, **kwargs)
    if split is not None and splits is not None:
      raise UsageError(f"split={split!r} and splits={splits!r} for method {self.method_name}: "
                       "give one of them")
    splits = split if splits is None else splits
    try:
      nb.check_branchable(student)
    except ValueError as e:
      raise UsageError(f"method {self.method_name}: {e}") from None
    who = f" for method {self.method_name}"
    default_splits, default_branches = self.default_tree(student)
    splits = default_splits if splits is None else int_tuple("splits", splits, self.method_name)
    if branches is None:
      branches = default_branches if splits == default_splits else (type(self).branches,)
    else:
      branches = int_tuple("branches", branches, self.method_name)
      if min(branches) < 2:
        raise UsageError(f"branches={nb.joined(branches)}{who}: must be an integer >= 2 (the "
                         "children of each fork: one count, or one per split level)")
    if len(branches) == 1 and len(splits) > 1:
      branches = branches * len(splits)
    if self.max_levels is not None and len(splits) > self.max_levels:
      raise UsageError(f"splits={nb.joined(splits)}{who}: it forks at one split point; give one "
                       "count of shared stages")
    self.tree = nb.Tree(splits, branches)
    try:
      nb.check_tree(student, self.tree, who)
    except ValueError as e:
      raise UsageError(str(e)) from None
    self.num_branches, self.split = self.tree.heads, splits[0]
    clones = []
    for h in range(1, self.tree.heads):
      net = nets.create(student.arch, student.num_classes,
                        synchronized_bn=student.synchronized_bn)
      nb.freeze_unused(self.tree, h, net)
      clones.append(net)
    self.clones = clones

  def default_tree(self, student):
    """(splits, branches) without keywords: fork once before the last stage into ``branches``."""
    return (nb.default_split(student),), (type(self).branches,)

  def setup(self, input_shape):
    self.image_shape = tuple(int(d) for d in input_shape)
    for net in self.clones:
      net.build((None,) + self.image_shape)
    return super().setup(input_shape)

  def branch_nets(self):
    return [self.student] + list(self.clones)

  def shared(self, images, training):
    """The trunk's ``Trace`` (map, features, preacts) up to the first split, once per step."""
    return nb.trunk(self.student, images, training, self.split)

  def at_split(self, x, children):
    """Applied to a node's output map where it forks into ``children`` (override; identity)."""
    del children
    return x

  def branch_outputs(self, shared, training):
    """``Outputs`` (float32) of every head on the trunk's trace ``shared``, head 0 first."""
    outs = nb.tree_outputs(self.branch_nets(), self.tree, shared, training, self.at_split)
    return [as_float32(o) for o in outs]

  def branch_names(self):
    return [f"branch{i}" for i in range(1, self.num_branches)]

  def extra_exports(self):
    """Heads 1..H-1 as plain zoo nets (the parts they share copied in), and the ensemble as one
    model when the method has one (``exports_ensemble``)."""
    out = {name: nb.export_head(self.branch_nets(), self.tree, h)
           for h, name in enumerate(self.branch_names(), start=1)}
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
    def one(h):
      return _View(lambda x, training: nb.head_outputs(self.branch_nets(), self.tree, h, x,
                                                       training).logits)

    def ensemble(x, training):
      shared = self.shared(x, training)
      return self.ensemble_logits(self.branch_outputs(shared, training), shared, training)

    views = {name: one(h) for h, name in enumerate(self.branch_names(), start=1)}
    return {**views, "ensemble": _View(ensemble)}

  def hparams(self):
    return {**super().hparams(), "splits": nb.joined(self.tree.splits),
            "branches": nb.joined(self.tree.branches)}


def int_tuple(key, value, method):
  """``value`` (an int, a sequence of ints, or ints joined by '-' or '/' in a string) -> tuple of
  ints; ``UsageError`` naming ``key`` and the accepted forms otherwise."""
  out = None
  if isinstance(value, str):
    parts = value.replace("/", "-").split("-")
    if all(p.strip().isdigit() for p in parts):
      out = tuple(int(p) for p in parts)
  elif is_int(value):
    out = (int(value),)
  elif isinstance(value, (list, tuple)) and all(is_int(v) for v in value):
    out = tuple(int(v) for v in value)
  if not out:
    raise UsageError(f"{key}={value!r} for method {method}: give an int, or ints joined by '-' "
                     "or '/' (e.g. 1-2)")
  return out


def rampup_epochs(value, method):
  """``rampup=`` of ONE and OKDDip (epochs of their code's consistency ramp-up, >= 0) as a float;
  ``UsageError`` otherwise."""
  if not is_number(value) or value < 0:
    raise UsageError(f"rampup={value!r} for {method}: must be a number of epochs >= 0")
  return float(value)


def dense(units, name):
  """A plain Dense layer (PyTorch-like default init is not needed for gates/heads)."""
  return keras.layers.Dense(units, name=name)
