"""``kd_tf2.Distillation``: any registered method as a ``keras.Model`` for ``compile``/``fit``.

    d = kd_tf2.Distillation("AT", student, teacher)        # any Keras classifiers (kd_tf2.adapt)
    d.compile()                                            # the reference SGD when no optimizer
    history = d.fit(x_train, y_train, batch_size=64, epochs=10, validation_data=(x_test, y_test),
                    callbacks=[keras.callbacks.EarlyStopping("val_accuracy", patience=3)])
    d.student.save("student.keras")                        # the trained student

Each training step is the engine's per-replica step: the distiller's ``train_step`` (or
``stage_step``) with a ``StepContext`` over the phase's optimiser and variables, which Keras runs
under its distribution strategy (``fit`` inside ``strategy.scope()``) as the engine does.

Data: ``(x, y)`` arrays, a ``tf.data`` of ``(x, y)``, or our dict batches ``{"image", "label",
"index"}`` (``kd_tf2.data.load``). ``x`` may be a dict ``{"image": ..., "index": ...}``: methods
that need sample indices (CRD's memory bank) read ``index``; CRD also needs
``train_labels=y_train`` as a hyper-parameter.

Logs: every loss term of the running phase (``ce``, ``kd``, ``at`` ...), ``loss`` (their sum) and
``accuracy`` (training top-1 of the student, in [0, 1]), each averaged over the epoch; with
``validation_data``, ``val_loss`` (cross-entropy) and ``val_accuracy``. Stage terms are logged as
``<stage>/<term>`` (e.g. ``hint/hint``), so ``history.history`` has them for the stage epochs only.

Stages (FitNet hint, AB/FSP init, FT paraphraser, MHGD attention): ``fit(epochs=E)`` runs E epochs
in all: first each stage for its ``init_epochs`` (the method's default, or ``init_epochs=`` given
to the constructor), then the main phase for the rest; a callback switches phases at epoch
boundaries (``initial_epoch`` resumes in the right phase). Each stage has its own optimiser, the
reference SGD at the stage's learning rate (else the compiled optimiser's initial rate).

The default optimiser is the reference benchmark's (``kd_tf2.optim.TorchSGD``, lr 0.05, momentum
0.9, weight decay 5e-4) at a constant learning rate; pass a schedule or a
``keras.callbacks.LearningRateScheduler`` for decay.
"""
import keras
import tensorflow as tf
from keras.src.trainers import compile_utils

from kd_tf2 import distillers, optim
from kd_tf2.adapter import adapt
from kd_tf2.distillers.base import StepContext
from kd_tf2.engine import step as step_lib
from kd_tf2.errors import UsageError

__all__ = ["Distillation"]

DEFAULT_LR = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4


class _Phase:
  def __init__(self, name, epochs, step, variables, optimizer=None, stage=None):
    self.name, self.epochs, self.step = name, int(epochs), step
    self.variables, self.optimizer, self.stage = variables, optimizer, stage
    self.trackers = {}


class _PhaseSwitch(keras.callbacks.Callback):
  """Selects the phase of each epoch (stages first, then the main phase) before it starts."""

  def __init__(self, owner):
    super().__init__()
    self.owner = owner

  def on_epoch_begin(self, epoch, logs=None):
    self.owner._enter(epoch)  # pylint: disable=protected-access


class Distillation(keras.Model):
  """Distil ``teacher`` into ``student`` with ``method`` through Keras' ``compile``/``fit``.

  method:      a registered method name (``kd_tf2.distillers.available()``, any case, aliases).
  student:     any Keras classifier (adapted with ``kd_tf2.adapt``; zoo nets as they are).
  teacher:     any Keras classifier, or None for methods without one (``none``).
  input_shape: (H, W, C) of one image; default: the student's input shape.
  hparams:     the method's keywords (``method_weight``, ``temperature``, ``init_epochs``...).

  ``.student`` is the student being trained (a ``kd_tf2.adapt`` model when it was adapted; its
  ``.source`` is the model you passed, sharing the weights); ``.distiller`` the method.
  ``call(x)`` returns the student's logits.
  """

  def __init__(self, method, student, teacher=None, *, input_shape=None, **hparams):
    super().__init__(name=f"distillation_{str(method).lower()}")
    student = adapt(student)
    teacher = adapt(teacher) if teacher is not None else None
    if input_shape is None:
      input_shape = _input_shape(student)
    self.input_shape_ = tuple(int(d) for d in input_shape)
    self.student = student
    self.teacher = teacher
    cls = distillers.get(method)
    if "train_labels" in cls.engine_hparams and hparams.get("train_labels") is None:
      raise UsageError(f"method {cls.method_name} needs train_labels=: the integer label of every "
                       "training sample, indexed by the sample's 'index' (e.g. y_train)")
    if "jit_compiled" in cls.engine_hparams:
      hparams.setdefault("jit_compiled", False)  # compile(jit_compile=True) is refused for these
    self.distiller = distillers.create(method, student, teacher, input_shape=self.input_shape_,
                                       **hparams)
    self._phases = None
    self._current = None
    self.built = True  # every weight exists once the distiller is set up

  # ------------------------------------------------------------------ Keras API
  def call(self, inputs, training=False):
    if isinstance(inputs, dict):
      inputs = inputs["image"]
    return self.student(inputs, training=training)

  def compile(self, optimizer=None, jit_compile=False, **kwargs):
    """``keras.Model.compile``; ``optimizer=None`` is the reference SGD (lr 0.05, momentum 0.9,
    weight decay 5e-4, PyTorch's update rule). ``loss`` and ``metrics`` are not taken: the
    method defines the loss and the student's accuracy is always logged."""
    for key in ("loss", "metrics", "loss_weights", "weighted_metrics"):
      if kwargs.get(key) is not None:
        raise UsageError(f"Distillation.compile does not take {key}=: method "
                         f"{self.distiller.method_name} defines the loss; its terms, the loss "
                         "and the accuracy are logged")
      kwargs.pop(key, None)
    if jit_compile is True:
      raise UsageError("Distillation.compile(jit_compile=True) is not supported: Keras would "
                       "compile the optimiser update too; train.py --jit_compile compiles the "
                       "forward/backward pass only")
    if optimizer is None:
      optimizer = optim.TorchSGD(DEFAULT_LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                 name="sgd_main")
    super().compile(optimizer=optimizer, jit_compile=jit_compile, **kwargs)
    self._phases = None

  def fit(self, x=None, y=None, *, epochs=1, callbacks=None, initial_epoch=0, **kwargs):
    """``keras.Model.fit``; ``epochs`` counts the stages' epochs too (module docstring)."""
    if self.optimizer is None:
      self.compile()
    phases = self._make_phases(epochs)
    callbacks = list(callbacks or [])
    if len(phases) > 1 or initial_epoch:
      callbacks.insert(0, _PhaseSwitch(self))
    self._enter(initial_epoch)
    return super().fit(x, y, epochs=epochs, callbacks=callbacks, initial_epoch=initial_epoch,
                       **kwargs)

  @property
  def metrics(self):
    # One MetricsList: Keras resets it every epoch, and EarlyStopping / ModelCheckpoint read the
    # direction of "accuracy" (up) and of the loss terms (down) from it.
    # The validation trackers are reset by ``evaluate`` (their names are the training ones).
    trackers = list(self._current.trackers.values()) if self._current is not None else []
    return [_Trackers(trackers)] if trackers else []

  def evaluate(self, *args, **kwargs):
    """``keras.Model.evaluate``: ``loss`` (the student's cross-entropy) and ``accuracy``."""
    for tracker in getattr(self, "_val_trackers", {}).values():
      tracker.reset_state()
    return super().evaluate(*args, **kwargs)

  def train_step(self, data):
    """Keras runs this per replica: the engine's per-replica function (``kd_tf2.engine.step``:
    the phase's step with a ``StepContext``, then the optimiser update), then the trackers."""
    phase = self._current
    batch = self._batch(data)
    terms, correct, count = phase.replica(batch)
    prefix = "" if phase.stage is None else f"{phase.stage.name}/"
    logs = {}
    for key, value in terms.items():
      tracker = phase.trackers[prefix + key]
      tracker.update_state(value)
      logs[prefix + key] = tracker.result()
    if "accuracy" in phase.trackers:
      phase.trackers["accuracy"].update_state(correct / count, sample_weight=count)
      logs["accuracy"] = phase.trackers["accuracy"].result()
    return logs

  def test_step(self, data):
    batch = self._batch(data)
    logits = tf.cast(self.student(batch["image"], training=False), tf.float32)
    labels = tf.cast(tf.reshape(batch["label"], [-1]), tf.int32)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    if not hasattr(self, "_val_trackers"):
      raise UsageError("Distillation.evaluate: call compile() first")
    self._val_trackers["loss"].update_state(tf.reduce_mean(ce))
    self._val_trackers["accuracy"].update_state(_correct(logits, labels))
    return {k: t.result() for k, t in self._val_trackers.items()}

  def save(self, filepath, *args, **kwargs):
    """Refused: the wrapper is a training harness. Save ``.student`` (the trained classifier), or
    the wrapper's weights (``save_weights`` / ``ModelCheckpoint(save_weights_only=True)``)."""
    del args, kwargs
    raise UsageError(f"Distillation.save({filepath!r}): save the trained student "
                     "(distill.student.save(...)); to checkpoint training use save_weights or "
                     "keras.callbacks.ModelCheckpoint(..., save_weights_only=True)")

  def predict_step(self, data):
    x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
    return self.call(x, training=False)

  # ------------------------------------------------------------------ phases
  def _make_phases(self, epochs):
    d = self.distiller
    stages = [s for s in d.stages() if s.epochs > 0]
    stage_epochs = sum(s.epochs for s in stages)
    if not isinstance(epochs, int) or epochs <= stage_epochs:
      raise UsageError(f"fit(epochs={epochs!r}): method {d.method_name} runs {stage_epochs} stage "
                       f"epoch(s) first ({', '.join(f'{s.name}: {s.epochs}' for s in stages)}); "
                       f"give epochs > {stage_epochs}, or init_epochs= to the constructor")
    d.epochs = epochs - stage_epochs
    if self._phases is not None and self._phases_for == epochs:
      return self._phases
    base_lr = _initial_lr(self.optimizer)
    phases = []
    with tf.distribute.get_strategy().scope():
      for stage in stages:
        variables = d.stage_variables(stage)
        lr = stage.learning_rate if stage.learning_rate is not None else base_lr
        opt = optim.TorchSGD(lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                             name=f"sgd_stage_{stage.name}")
        opt.build(variables)
        phases.append(_Phase(stage.name, stage.epochs, _bind(d.stage_step, stage), variables,
                             opt, stage))
      variables = d.variables_to_train()
      if not self.optimizer.built:
        self.optimizer.build(variables)
      phases.append(_Phase("main", d.epochs, d.train_step, variables, self.optimizer))
      for phase in phases:
        prefix = "" if phase.stage is None else f"{phase.stage.name}/"
        names, has_logits = self._term_names(phase)
        for name in names + ["loss"]:
          phase.trackers[prefix + name] = _mean(prefix + name, "down")
        if has_logits:
          phase.trackers["accuracy"] = _mean("accuracy", "up")
      self._val_trackers = {"loss": _mean("loss", "down"), "accuracy": _mean("accuracy", "up")}
    replicas = self.distribute_strategy.num_replicas_in_sync
    for phase in phases:
      phase.replica = step_lib._replica_fn(  # pylint: disable=protected-access
          phase.step, phase.optimizer, phase.variables, replicas, False)
    self._phases, self._phases_for = phases, epochs
    return phases

  def _term_names(self, phase):
    """The names of the terms ``phase.step`` returns, from one trace (nothing is executed)."""
    n = 2
    batch = {"image": tf.zeros((n,) + self.input_shape_, tf.float32),
             "label": tf.zeros([n], tf.int64), "index": tf.zeros([n], tf.int64)}
    found = {}

    def trace(b):
      out = phase.step(b, StepContext(phase.optimizer, phase.variables))  # gradients not applied
      found["names"] = list(out.terms)
      found["logits"] = out.logits is not None
      return 0

    tf.function(trace).get_concrete_function(batch)
    return found["names"], found["logits"]

  def _enter(self, epoch):
    """Make the phase of global 0-based ``epoch`` the running one (retrace if it changed)."""
    if self._phases is None:
      return
    local = epoch
    for phase in self._phases:
      if local < phase.epochs or phase is self._phases[-1]:
        break
      local -= phase.epochs
    self.distiller.epoch.assign(float(local))
    if phase is not self._current:
      self._current = phase
      if self.train_function is not None:
        self.make_train_function(force=True)

  @staticmethod
  def _batch(data):
    """Our dict batch from what Keras hands the step: a dict batch, or (x, y[, w])."""
    if isinstance(data, dict):
      batch = dict(data)
    else:
      x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
      batch = dict(x) if isinstance(x, dict) else {"image": x}
      if y is not None:
        batch["label"] = y
    if "image" not in batch or "label" not in batch:
      raise UsageError(f"Distillation.fit: a batch needs images and labels; got {sorted(batch)} "
                       "(give (x, y), or dicts with 'image' and 'label')")
    label = batch["label"]
    if len(label.shape) == 2 and label.shape[-1] != 1:  # one-hot
      label = tf.argmax(label, axis=-1)
    batch["label"] = tf.reshape(label, [-1])
    batch["image"] = tf.cast(batch["image"], tf.float32)
    if "index" not in batch:
      batch["index"] = tf.fill(tf.shape(batch["label"]), tf.constant(-1, tf.int64))
    return batch


class _Trackers(compile_utils.MetricsList):
  """Keras' list of metrics, whose result is the dict of its members' results."""

  def result(self):
    return self.get_result()


def _mean(name, direction):
  tracker = keras.metrics.Mean(name=name)
  tracker._direction = direction  # pylint: disable=protected-access
  return tracker


def _bind(fn, stage):
  def step(batch, ctx):
    return fn(stage, batch, ctx)
  return step


def _correct(logits, labels):
  labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
  pred = tf.argmax(logits, axis=-1, output_type=tf.int64)
  return tf.cast(tf.equal(pred, labels), tf.float32)


def _initial_lr(optimizer):
  inner = getattr(optimizer, "inner_optimizer", optimizer)
  lr = inner._learning_rate  # pylint: disable=protected-access
  if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
    return float(keras.ops.convert_to_numpy(lr(0)))
  return float(keras.ops.convert_to_numpy(inner.learning_rate))


def _input_shape(model):
  inputs = getattr(getattr(model, "source", model), "inputs", None)
  if inputs and None not in tuple(inputs[0].shape[1:]):
    return tuple(inputs[0].shape[1:])
  built = (model.get_build_config() or {}).get("input_shape") if model.built else None
  if built and None not in tuple(built[1:]):
    return tuple(built[1:])
  raise UsageError(f"Distillation: cannot tell the image shape of {model.name}; pass "
                   "input_shape=(H, W, C)")

