"""The ``Distiller`` base class: what a distillation method is, for the engine (DESIGN.md contract 3).

A method is a ``keras.layers.Layer`` subclass. Being a Layer, every connector / regressor /
embedding it assigns as an attribute is tracked: its weights are checkpointed with the run,
optimised together with the student, and never exported with the student.

The total loss of one training step (RepDistiller ``train_student.py``; METHODS.md §0):

    L = ce_weight * CE(z_s, y)  +  kd_weight * ST_T(z_s, z_t)  +  sum(self.terms(...).values())

``ce_weight``, ``kd_weight`` (RepDistiller ``-r``, ``-a``), ``method_weight`` (``-b``) and
``temperature`` default to the class attributes of the method (METHODS.md §3) and are overridden
by ``--ce_weight/--kd_weight/--method_weight/--temperature``. ``terms`` returns the method's terms
already multiplied by ``self.method_weight``; ``total_terms`` adds ``"ce"`` and ``"kd"`` (the latter
only when ``kd_weight != 0``), and the engine logs every term under its own name.

Writing a method (see also the package docstring):

    @register("AT")
    class AT(Distiller):
      \"\"\"Zagoruyko & Komodakis, ICLR 2017, arXiv:1612.03928.\"\"\"
      method_weight = 1000.0                      # METHODS.md §3 default (-b)

      def terms(self, s, t, batch, *, training=True):
        pairs = zip(s.features[1:], t.features[1:])
        return {"at": self.method_weight * tf.add_n([L.attention_transfer(a, b) for a, b in pairs])}

Hooks, from the most to the least common:

* ``terms(s, t, batch, *, training)`` -> ``{name: scalar}``. ``s`` / ``t`` are
  ``nets.Outputs`` cast to float32 (``t`` is ``None`` when the method has ``uses_teacher = False``
  and ``kd_weight == 0``; teacher tensors are already stop-gradient). Each value is the mean over
  this replica's batch (batch-relational losses are computed per replica); the engine divides by the
  number of replicas, which makes it the global-batch average. Call your connectors with
  ``training=training`` (BatchNorm inside them needs it). ``batch`` is this replica's whole batch
  (``{"image": [B,H,W,C], "label": [B], "index": [B], ...}``), so index- or pair-based methods
  need no special step. (Not ``losses``: that name is Keras' ``Layer.losses`` property.)
* ``build_connectors(s, t)``: create the method's Keras layers from the shapes of a dummy batch's
  ``Outputs`` (``s.features[i].shape`` ...). ``setup`` then calls ``terms`` once on that batch so
  every layer creates its weights before the optimiser is built. Refuse a pair the method cannot
  handle by raising ``UsageError`` naming the method, both nets and the mismatch.
* ``stages()`` -> ``[Stage, ...]``: extra phases run before the main one, each with its own
  epochs, its own optimiser, its own variables and its own terms, logged as its own phase.
* ``after_step(batch, s, t)``: state updates that follow a step's forward pass (CRD's memory
  banks). Called by ``train_step`` after the gradients are computed and before they are applied,
  with the step's ``Outputs`` (so connectors read the weights the loss was computed with).
* ``variables_to_train()``: the variables the main phase optimises (default: the student's and
  the distiller's trainable variables; never the teacher's).
* ``extra_exports()`` -> ``{name: model}``: further trained nets to export (DML's peer); with
  ``pretrained_teacher = False`` the "teacher" is such a net, trained from scratch with the student.
* ``train_step(batch, ctx)`` / ``stage_step(stage, batch, ctx)``: the whole per-replica step, for
  methods that need more than one forward pass (DML, BSS, Sobolev, LwM) or their own gradient
  algebra (MHGD). Run it under a ``tf.GradientTape`` and finish with ``ctx.minimize(loss, tape)``;
  return ``StepOutput(terms, logits)``. The engine still owns the strategy, the optimiser, the
  schedule and the logging (``kd_tf2.engine.step.compile_step``).

Constructor keywords the engine supplies are named in the class attribute ``engine_hparams``
(``train_labels``: int [split_size], the label of every sample index of the training split, -1
outside the ``--fraction`` subset; ``jit_compiled``: whether the step is compiled with XLA).

State the engine sets: ``self.epoch`` (a float32 variable, the 0-based epoch of the running phase;
assign-only by the engine, read it in terms to build schedules) and ``self.epochs`` (int, the
length of the main phase).
"""
import dataclasses
import inspect
from typing import Callable, Dict, List, NamedTuple, Optional

import keras
import tensorflow as tf

from kd_tf2.checks import is_int, is_number
from kd_tf2.errors import UsageError


class StepOutput(NamedTuple):
  """What one per-replica step returns.

  terms:  {name: float32 scalar} - the loss terms, each the mean over this replica's batch
          (the engine logs them averaged over replicas; include ``"ce"`` / ``"kd"`` if computed).
  logits: [B_replica, K] student logits used for the training accuracy, or None.
  """
  terms: Dict[str, tf.Tensor]
  logits: Optional[tf.Tensor]


@dataclasses.dataclass(frozen=True)
class Stage:
  """One extra training phase that runs before the main phase (METHODS.md §4: FitNet hint stage,
  AB/FSP initialisation, FT paraphraser, MHGD attention module).

  name:          short identifier; the phase is logged as ``stage_<name>``.
  epochs:        how many epochs (0 skips the stage).
  terms:         ``fn(s, t, batch, *, training) -> {name: scalar}`` like ``Distiller.terms``;
                 the engine adds nothing (no cross-entropy) to these terms.
  variables:     ``fn() -> [variables]`` the stage optimises; None = student + distiller trainables.
                 Variables that get no gradient are left untouched (no weight decay either, as in
                 PyTorch where parameters with ``grad None`` are skipped).
  learning_rate: constant learning rate of the stage; None = the main phase's base rate
                 (RepDistiller's init stage uses the base rate without decay).
  uses_student:  False when the stage does not need the student's forward pass (``s`` is None).
  uses_teacher:  False when the stage does not need the teacher's forward pass (``t`` is None).
  """
  name: str
  epochs: int
  terms: Callable[..., Dict[str, tf.Tensor]]
  variables: Optional[Callable[[], List[tf.Variable]]] = None
  learning_rate: Optional[float] = None
  uses_student: bool = True
  uses_teacher: bool = True


class StepContext:
  """Handed by the engine to every per-replica step: how to turn a loss into an update.

  optimizer:    the phase's optimiser (already built on ``variables``).
  variables:    the phase's trainable variables.
  num_replicas: replicas in sync; each replica's loss is divided by it so that the SUM all-reduce
                of the gradients equals the gradient of the global-batch mean
                (= ``tf.nn.compute_average_loss`` for equal per-replica batches).
  jit_compiled: read-only; whether the step's forward/backward pass is compiled with XLA.

  ``apply`` / ``minimize`` record (gradient, variable) pairs; ``kd_tf2.engine.step`` takes them
  (``take_pending``) and applies them with the optimiser once the step's pass has returned. This is
  the one way gradients are applied, with or without XLA (XLA cannot run the distributed update).
  """

  def __init__(self, optimizer, variables, num_replicas=1, jit_compiled=False):
    self.optimizer = optimizer
    self.variables = list(variables)
    self.num_replicas = int(num_replicas)
    self._jit_compiled = bool(jit_compiled)
    self._pending = []

  @property
  def jit_compiled(self):
    return self._jit_compiled

  def loss_scale(self):
    """Mixed-float16 loss scale of a ``keras.optimizers.LossScaleOptimizer``, else 1."""
    if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
      return tf.cast(self.optimizer.dynamic_scale, tf.float32)
    return tf.constant(1.0, tf.float32)

  def gradients(self, loss, tape, variables=None):
    """Gradients of ``loss / num_replicas`` (times the loss scale) w.r.t. ``variables``.

    Returns a list aligned with ``variables`` (None where a variable gets no gradient).
    """
    variables = self.variables if variables is None else list(variables)
    loss = tf.cast(loss, tf.float32)
    scale = self.loss_scale() / float(self.num_replicas)
    return tape.gradient(loss, variables, output_gradients=scale)

  def apply(self, grads, variables=None):
    """Record gradients from ``gradients`` for the update (pairs without a gradient are skipped)."""
    variables = self.variables if variables is None else list(variables)
    pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
    if not pairs:
      raise ValueError("no variable of this phase received a gradient")
    self._pending.append(pairs)

  def minimize(self, loss, tape, variables=None):
    """``apply(gradients(loss, tape))``: one optimiser update from a per-replica loss."""
    self.apply(self.gradients(loss, tape, variables), variables)

  def take_pending(self):
    """The (gradient, variable) pairs recorded since the last call (the engine applies them)."""
    pending, self._pending = [pair for pairs in self._pending for pair in pairs], []
    return pending


class _NetRefs:
  """Plain holder so the student/teacher are reachable from the distiller without being tracked
  as its sublayers (they must not be checkpointed twice nor counted as distiller variables)."""

  def __init__(self, student, teacher):
    self.student = student
    self.teacher = teacher


def as_float32(outputs):
  """``outputs`` (any nest of tensors, e.g. ``nets.Outputs``) with every tensor cast to float32."""
  if outputs is None:
    return None
  return tf.nest.map_structure(
      lambda x: tf.cast(x, tf.float32) if x.dtype != tf.float32 else x, outputs)


class Distiller(keras.layers.Layer):
  """Base of every distillation method. Subclass it, override ``terms`` (and whatever else the
  method needs, see the module docstring), decorate with ``@register("NAME", "ALIAS", ...)``.

  Class attributes (METHODS.md §3 defaults of the method):
    ce_weight, kd_weight, method_weight, temperature: the loss weights (``-r``, ``-a``, ``-b``, T).
    init_epochs: default length of the method's extra stages; None = the method has no stages
      (then ``--init_epochs`` is refused).
    uses_teacher: False for methods that never read the teacher (``none``); the teacher then runs
      only when ``kd_weight != 0``.
    jit_unsupported: None, or the reason the method's step cannot be compiled with XLA.
    pretrained_teacher: False for methods whose "teacher" is trained with the student from its
      initialisation (DML's peer): the engine then neither loads nor pre-trains it, builds it like
      the student (synchronized BatchNorm under replicas) and checkpoints its weights.
    engine_hparams: names of the constructor keywords the engine fills (see the module
      docstring: ``train_labels``, ``jit_compiled``); each is also a keyword of ``__init__``.
  """
  method_name = "?"  # set by @register
  ce_weight = 1.0
  kd_weight = 0.0
  method_weight = 0.0
  temperature = 4.0
  init_epochs = None
  uses_teacher = True
  jit_unsupported = None
  pretrained_teacher = True
  engine_hparams = ()

  def __init__(self, student, teacher, *, ce_weight=None, kd_weight=None, method_weight=None,
               temperature=None, init_epochs=None, name=None):
    super().__init__(name=name or "distiller_" + self.method_name.lower())
    self._nets = _NetRefs(student, teacher)
    weights = dict(ce_weight=ce_weight, kd_weight=kd_weight, method_weight=method_weight)
    for key, value in weights.items():
      if value is None:
        continue
      if not is_number(value) or value < 0:
        raise UsageError(f"{key}={value!r} for method {self.method_name}: must be a number >= 0")
      setattr(self, key, float(value))
    if temperature is not None:
      if not is_number(temperature) or temperature <= 0:
        raise UsageError(f"temperature={temperature!r}: must be a number > 0")
      self.temperature = float(temperature)
    if init_epochs is not None:
      if type(self).init_epochs is None:
        from kd_tf2.distillers import with_stages  # the registry owns the list
        raise UsageError(f"init_epochs={init_epochs!r}: method {self.method_name} has no init "
                         f"stage (methods with one: {', '.join(with_stages())})")
      if not is_int(init_epochs) or init_epochs < 0:
        raise UsageError(f"init_epochs={init_epochs!r}: must be an integer >= 0")
      self.init_epochs = init_epochs
    self.epochs = 1
    self.epoch = self.add_weight(shape=(), dtype="float32", initializer="zeros",
                                 trainable=False, name="epoch")

  # ----------------------------------------------------------------- nets
  @property
  def student(self):
    return self._nets.student

  @property
  def teacher(self):
    return self._nets.teacher

  @property
  def synchronized_bn(self):
    """Whether connectors' BatchNorm should be synchronized (the student's is: replicas > 1)."""
    return bool(getattr(self.student, "synchronized_bn", False))

  def extra_exports(self):
    """Trained networks besides the student that the engine exports: ``{name: keras.Model}``
    (written as ``TRAIN_DIR/<name>.keras``; e.g. DML's peer)."""
    return {}

  def eval_models(self):
    """Nets besides the student whose test accuracy is logged every epoch and reported:
    ``{name: model}``, each ``model(images, training=False) -> logits`` (default: the exports;
    online methods add their branches and ensemble)."""
    return self.extra_exports()

  @classmethod
  def reads_teacher(cls, kd_weight=None):
    """Whether a run of this method reads a teacher: the method uses one, or the KD term is on
    (``kd_weight``: the run's ``--kd_weight``, None = the method's default). The one place
    that decides whether a run needs a teacher."""
    kd = cls.kd_weight if kd_weight is None else kd_weight
    return bool(cls.uses_teacher or kd)

  @property
  def needs_teacher(self):
    """Whether the main phase runs the teacher (the method reads it, or the KD term is on)."""
    return self.reads_teacher(self.kd_weight)

  def student_outputs(self, images, training):
    """The student's ``Outputs``, cast to float32 (gradients flow)."""
    return as_float32(self.student(images, training=training, features=True))

  def teacher_outputs(self, images):
    """The teacher's ``Outputs`` in inference mode, stop-gradient, float32."""
    out = self.teacher(images, training=False, features=True)
    return as_float32(tf.nest.map_structure(tf.stop_gradient, out))

  # ------------------------------------------------------- method hooks
  def build_connectors(self, s, t):
    """Create the method's layers from a dummy batch's ``Outputs`` (override if any)."""
    del s, t

  def terms(self, s, t, batch, *, training=True):
    """The method's own terms, already weighted: ``{name: scalar}`` (override)."""
    del s, t, batch, training
    return {}

  def after_step(self, batch, s, t):
    """State updates after a step's forward pass (override; e.g. memory banks). ``s``/``t`` are the
    step's ``Outputs``; runs after the gradients are taken and before they are applied."""
    del batch, s, t

  def stages(self):
    """Extra phases run before the main one (override): a list of ``Stage``."""
    return []

  def variables_to_train(self):
    """Variables the main phase optimises: student + distiller trainables (never the teacher)."""
    return _unique(list(self.student.trainable_variables) + list(self.trainable_variables))

  # -------------------------------------------------- the loss of a step
  def cross_entropy(self, logits, labels):
    """Mean softmax cross-entropy over this replica's batch (float32)."""
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=tf.cast(logits, tf.float32))
    return tf.reduce_mean(per_example)

  def total_terms(self, s, t, batch, *, training=True):
    """``{"ce": r*CE, "kd": a*ST_T, **terms}``, every term weighted; "kd" only if ``a != 0``."""
    from kd_tf2 import losses as kd_losses  # resolved at call time (the losses land separately)
    out = {"ce": self.ce_weight * self.cross_entropy(s.logits, batch["label"])}
    if self.kd_weight != 0:
      out["kd"] = self.kd_weight * kd_losses.soft_target(s.logits, t.logits, self.temperature)
    for key, value in self.terms(s, t, batch, training=training).items():
      if key in out:
        raise ValueError(f"{self.method_name}.terms returned the reserved term name {key!r}")
      out[key] = tf.cast(value, tf.float32)
    return out

  # -------------------------------------------------------- the steps
  def train_step(self, batch, ctx):
    """One per-replica step of the main phase (override for multi-pass methods)."""
    images = batch["image"]
    t = self.teacher_outputs(images) if self.needs_teacher else None
    with tf.GradientTape() as tape:
      s = self.student_outputs(images, training=True)
      terms = self.total_terms(s, t, batch, training=True)
      loss = tf.add_n(list(terms.values()))
    ctx.minimize(loss, tape)
    self.after_step(batch, s, t)
    return StepOutput(terms, s.logits)

  def stage_step(self, stage, batch, ctx):
    """One per-replica step of an extra ``stage`` (override for stages with a special step)."""
    images = batch["image"]
    t = self.teacher_outputs(images) if stage.uses_teacher else None
    with tf.GradientTape() as tape:
      s = self.student_outputs(images, training=True) if stage.uses_student else None
      terms = {k: tf.cast(v, tf.float32)
               for k, v in stage.terms(s, t, batch, training=True).items()}
      loss = tf.add_n(list(terms.values()))
    ctx.minimize(loss, tape)
    return StepOutput(terms, None if s is None else s.logits)

  def stage_variables(self, stage):
    """The variables ``stage`` optimises."""
    if stage.variables is None:
      return self.variables_to_train()
    return _unique(list(stage.variables()))

  # -------------------------------------------------------------- setup
  def setup(self, input_shape):
    """Create every weight: run both nets on a dummy batch of 2 zero images of ``input_shape``
    (H, W, C), call ``build_connectors`` then ``terms`` and every stage's terms once in
    inference mode. Call it inside the strategy scope (``create`` does)."""
    images = tf.zeros([2] + [int(d) for d in input_shape], tf.float32)
    batch = {"image": images, "label": tf.zeros([2], tf.int32),
             "index": tf.zeros([2], tf.int64)}
    s = self.student_outputs(images, training=False)
    t = self.teacher_outputs(images) if self.teacher is not None else None
    self.build_connectors(s, t)
    self.terms(s, t, batch, training=False)
    for stage in self.stages():
      stage.terms(s if stage.uses_student else None, t if stage.uses_teacher else None,
                  batch, training=False)
    self.built = True
    return self

  @classmethod
  def accepted_hparams(cls):
    """Keyword arguments the method's constructor accepts (for clear error messages)."""
    names = set()
    for klass in cls.__mro__:
      if klass is keras.layers.Layer or not issubclass(klass, Distiller):
        continue
      sig = inspect.signature(klass.__init__)
      for p in sig.parameters.values():
        if p.kind == p.KEYWORD_ONLY or (p.kind == p.POSITIONAL_OR_KEYWORD
                                        and p.name not in ("self", "student", "teacher")):
          names.add(p.name)
    names.discard("name")
    return sorted(names)

  def hparams(self):
    """The effective loss weights and temperature (for logging)."""
    out = dict(ce_weight=self.ce_weight, kd_weight=self.kd_weight,
               method_weight=self.method_weight, temperature=self.temperature)
    if self.init_epochs is not None:
      out["init_epochs"] = self.init_epochs
    return out


def _unique(variables):
  seen, out = set(), []
  for v in variables:
    key = id(v)
    if key not in seen:
      seen.add(key)
      out.append(v)
  return out


def arch_name(net):
  """The zoo name of a net (``nets`` models carry ``.arch``), else its Keras name: for messages."""
  return getattr(net, "arch", net.name)


def feature_variables(student):
  """The student's trainable variables except its classifier's (RepDistiller ``get_feat_modules``)."""
  head = {id(v) for v in student.classifier.trainable_variables}
  return [v for v in student.trainable_variables if id(v) not in head]
