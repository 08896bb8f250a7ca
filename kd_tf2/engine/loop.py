"""The training loop: phases of distributed steps, evaluation, checkpoints, logging.

A run is a sequence of phases: the distiller's extra ``stages()`` (each with its own epochs, its own
optimiser and variables, constant learning rate) and then the ``main`` phase (the benchmark's
step-decay schedule). Epochs are counted globally across phases: TensorBoard's x axis, the
checkpoint's progress counter and ``resuming from epoch N`` all use that count.

One step is ``kd_tf2.engine.step.compile_step`` of the distiller's per-replica step
(``Distiller.train_step`` or ``stage_step``): the same function the speed benchmark times. The
reduced terms come back to Python after every step: the progress bar shows them and a non-finite value stops the run
before any checkpoint is written, so the last checkpoint always holds finite weights.
"""
import functools
import math
import signal
import sys
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from kd_tf2 import optim
from kd_tf2.engine.rundir import usable_checkpoint
from kd_tf2.engine import step as step_lib
from kd_tf2.engine.summaries import Progress, say
from kd_tf2.errors import TrainingDiverged, TrainingInterrupted, UsageError

MAIN = "main"


class Phase:
  """One phase: ``epochs`` of ``step(batch, ctx)`` updating ``variables`` with ``optimizer``."""

  def __init__(self, name, epochs, optimizer, variables, step):
    self.name, self.epochs = name, int(epochs)
    self.optimizer, self.variables, self.step = optimizer, list(variables), step


def _clock(seconds):
  """``h:mm:ss`` of a duration in seconds; ``?`` when unknown."""
  if seconds is None:
    return "?"
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def make_optimizer(learning_rate, variables, *, momentum=0.9, weight_decay=5e-4, loss_scale=False,
                   name=None):
  """The benchmark's PyTorch-exact SGD (``optim.TorchSGD``), wrapped in a
  ``LossScaleOptimizer`` under mixed float16, built on ``variables`` (call it in the strategy
  scope: a Keras optimiser only updates the variables it was built with, and building lazily inside
  a distributed step fails)."""
  opt = optim.TorchSGD(learning_rate, momentum=momentum, weight_decay=weight_decay, name=name)
  if loss_scale:
    opt = keras.optimizers.LossScaleOptimizer(opt, name=f"{name}_loss_scale" if name else None)
  opt.build(list(variables))
  return opt


def current_lr(optimizer):
  """The learning rate the optimiser's next update uses (schedules evaluated at ``iterations``)."""
  inner = getattr(optimizer, "inner_optimizer", optimizer)
  return float(keras.ops.convert_to_numpy(inner.learning_rate))


class Evaluator:
  """Top-1/top-5 accuracy and mean cross-entropy of ``model`` over a dataset, under ``strategy``.

  Every sample counts once (sums are reduced over replicas and divided at the end).
  """

  def __init__(self, model, strategy=None):
    self.model = model
    self.strategy = strategy or tf.distribute.get_strategy()
    self._step = tf.function(self._distributed_step)

  def _replica_step(self, batch):
    logits = tf.cast(self.model(batch["image"], training=False), tf.float32)
    labels = tf.cast(tf.reshape(batch["label"], [-1]), tf.int32)
    k = min(5, int(logits.shape[-1]))
    top = tf.math.top_k(logits, k=k).indices
    hits = tf.cast(tf.equal(top, labels[:, None]), tf.float32)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    return (tf.reduce_sum(hits[:, :1]), tf.reduce_sum(hits), tf.reduce_sum(ce),
            tf.cast(tf.shape(labels)[0], tf.float32))

  def _distributed_step(self, batch):
    out = self.strategy.run(self._replica_step, args=(batch,))
    return [self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for v in out]

  def __call__(self, dataset):
    """``{"top1", "top5", "loss", "n"}`` over ``dataset`` (batches of ``{"image", "label"}``);
    accuracies in percent."""
    sums = np.zeros(4, np.float64)
    for batch in self.strategy.experimental_distribute_dataset(dataset):
      sums += [float(v) for v in self._step(batch)]
    n = sums[3]
    if n == 0:
      raise ValueError("evaluation dataset is empty")
    return {"top1": float(100.0 * sums[0] / n), "top5": float(100.0 * sums[1] / n),
            "loss": float(sums[2] / n), "n": int(n)}


class _StopRequest:
  """SIGTERM/SIGINT set a flag that the loop checks between steps (main thread only)."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C does not wait for the step to end
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


class Trainer:
  """Runs the phases of one distillation (or plain training) run.

  Args:
    strategy: the ``tf.distribute`` strategy (student, teacher and distiller were made in its scope).
    student, distiller: the student and its ``Distiller`` (``kd_tf2.distillers.create``).
    train_data: a ``tf.data.Dataset`` of global batches, or ``fn(input_context) -> dataset`` of
      per-replica batches (``kd_tf2.data.dataset_fn``, for multi-worker input sharding).
    test_data: a ``tf.data.Dataset`` evaluated after every epoch.
    steps_per_epoch, global_batch: for the schedule, the progress bar and images/s.
    epochs, base_lr, momentum, weight_decay: the main phase's schedule and optimiser.
    schedule: ``(milestones, reference_epochs)``: the learning rate drops x0.1 at those epochs of a
      ``reference_epochs``-epoch run, scaled to ``epochs`` (default: the CIFAR benchmark's).
    jit_compile: compile the per-replica step with XLA.
    loss_scale: wrap the optimisers in a ``LossScaleOptimizer`` (mixed float16).
    checkpoint_dir: where ``tf.train.CheckpointManager`` keeps checkpoints (None: none).
    restore_dir: where to look for the checkpoint to resume from (default ``checkpoint_dir``;
      multi-worker non-chief workers save to a scratch dir but resume from the chief's).
    summaries: a ``Summaries`` (TensorBoard) or None; metrics_sink: ``fn(record)`` or None.
    verbose: progress bar and one line per epoch.
    extra_checkpointed: further variables to checkpoint (e.g. a peer trained with the student).
    resume_from: ``(prefix, damaged)`` - the checkpoint to resume from (None: start from epoch
      0) and the newer damaged ones skipped - as ``RunDir.state`` chose it; default: look in
      ``restore_dir`` (``rundir.usable_checkpoint``).
    log_every: train scalars (``<phase>/step/<term>``, against the global step) and a console
      line with the ETA every ``log_every`` steps within an epoch; 0 = per epoch only.
    checkpoint_every_steps, checkpoint_every_minutes: also checkpoint within an epoch, every that
      many steps / minutes since the last checkpoint (0 = off); a rerun resumes at that step.
    on_start: ``fn(epochs_done)`` called once the starting point is known (0 without a checkpoint),
      e.g. to drop the metrics of epochs logged by a killed process but lost with its checkpoint,
      which are trained again; or None.
  """

  def __init__(self, *, strategy, student, distiller, train_data, test_data, steps_per_epoch,
               global_batch, epochs, base_lr, schedule=((150, 180, 210), 240), momentum=0.9,
               weight_decay=5e-4, jit_compile=False, loss_scale=False, checkpoint_dir=None,
               restore_dir=None, summaries=None, metrics_sink=None, verbose=True, extra_checkpointed=(), on_start=None,
               resume_from=None, log_every=0, checkpoint_every_steps=0,
               checkpoint_every_minutes=0.0):
    self.strategy, self.student, self.distiller = strategy, student, distiller
    self.train_data, self.test_data = train_data, test_data
    self.steps_per_epoch, self.global_batch = int(steps_per_epoch), int(global_batch)
    self.replicas = strategy.num_replicas_in_sync
    self.jit_compile, self.verbose = bool(jit_compile), bool(verbose)
    self.summaries, self.metrics_sink, self.on_start = summaries, metrics_sink, on_start
    distiller.epochs = int(epochs)
    sgd = dict(momentum=momentum, weight_decay=weight_decay, loss_scale=loss_scale)
    with strategy.scope():
      self.phases = []
      for stage in distiller.stages():
        if stage.epochs <= 0:
          continue
        variables = distiller.stage_variables(stage)
        lr = base_lr if stage.learning_rate is None else stage.learning_rate
        opt = make_optimizer(lr, variables, name=f"sgd_stage_{stage.name}", **sgd)
        step = functools.partial(distiller.stage_step, stage)
        self.phases.append(Phase(f"stage_{stage.name}", stage.epochs, opt, variables, step))
      milestones, reference_epochs = schedule
      schedule = optim.step_decay_schedule(base_lr, int(epochs), self.steps_per_epoch,
                                           milestones=milestones,
                                           total_reference_epochs=reference_epochs)
      variables = distiller.variables_to_train()
      opt = make_optimizer(schedule, variables, name="sgd_main", **sgd)
      self.phases.append(Phase(MAIN, epochs, opt, variables, distiller.train_step))
      # [epochs completed (all phases), steps completed in the running epoch]
      self.progress = tf.Variable([0, 0], dtype=tf.int64, trainable=False, name="progress")
      # [best main-phase test top-1, its (global, 1-based) epoch]
      self.best = tf.Variable([-1.0, 0.0], dtype=tf.float64, trainable=False, name="best")
    self.total_epochs = sum(p.epochs for p in self.phases)
    self.evaluator = Evaluator(student, strategy)
    # the other trained nets of an online method (peers, branches, ensemble), logged every epoch
    self.extra_evaluators = {name: Evaluator(model, strategy)
                             for name, model in distiller.eval_models().items()}
    self._steps = {}
    # Variables are listed explicitly: TF's object graph does not follow the Python lists in which
    # Keras models keep nested layers (a net's blocks), so Checkpoint(student=model) would silently
    # miss e.g. their BatchNorm moving statistics.
    tracked = dict(student=list(student.weights), distiller=list(distiller.weights),
                   progress=self.progress, best=self.best)
    if extra_checkpointed:
      tracked["extra"] = list(extra_checkpointed)
    tracked.update({f"optimizer_{p.name}": list(p.optimizer.variables) for p in self.phases})
    self.checkpoint = tf.train.Checkpoint(**tracked)
    self.manager = None
    self.restore_dir = restore_dir or checkpoint_dir
    self.resume_from = resume_from
    self.log_every = int(log_every)
    self.checkpoint_every_steps = int(checkpoint_every_steps)
    self.checkpoint_every_seconds = 60.0 * float(checkpoint_every_minutes)
    self._last_save = time.time()
    self._run_start = None  # (time, steps to go when this process started training)
    if checkpoint_dir:
      self.manager = tf.train.CheckpointManager(self.checkpoint, checkpoint_dir, max_to_keep=2)

  # ------------------------------------------------------------------ steps
  def distributed_step(self, phase=MAIN):
    """The compiled distributed step of the phase named ``phase`` (``"main"`` or
    ``"stage_<name>"``): ``step(distributed_batch) -> (terms, metrics)`` of
    ``kd_tf2.engine.step.compile_step``. One optimiser update per call."""
    if phase not in self._steps:
      by_name = {p.name: p for p in self.phases}
      if phase not in by_name:
        raise ValueError(f"unknown phase {phase!r}; this run has {', '.join(by_name)}")
      p = by_name[phase]
      self._steps[phase] = step_lib.compile_step(self.strategy, p.step, p.optimizer, p.variables,
                                                 jit_compile=self.jit_compile)
    return self._steps[phase]

  def _distributed_train_data(self, skip):
    if callable(self.train_data) and not isinstance(self.train_data, tf.data.Dataset):
      make = self.train_data
      return self.strategy.distribute_datasets_from_function(lambda ic: make(ic).skip(skip))
    return self.strategy.experimental_distribute_dataset(self.train_data.skip(skip))

  def _fast_forward_input(self, epochs):
    """Draw, and drop, the randomness of the ``epochs`` epochs a resumed run already trained.

    Every iteration of the training data reshuffles and re-augments it (seeded by ``--seed``, in
    the order of iterations); creating an iterator is what draws them. So a run resumed at epoch
    ``e`` (step ``s``) creates ``e`` iterators first, then trains epoch ``e`` on the batches an
    uninterrupted run would have had, skipping the ``s`` already trained: the same batches,
    sample for sample."""
    for _ in range(epochs):
      iter(self._distributed_train_data(0))

  # ------------------------------------------------------------------ loop
  def _locate(self, epoch):
    """(phase, epoch within the phase) of global 0-based ``epoch``."""
    for phase in self.phases:
      if epoch < phase.epochs:
        return phase, epoch
      epoch -= phase.epochs
    raise IndexError(epoch)

  def restore(self):
    """Restore the newest checkpoint that reads back whole, if any; returns (epochs done, steps
    done in the next). Newer damaged checkpoints (a crash mid-write) are named and skipped; if
    there are checkpoints but none is readable, ``UsageError``."""
    prefix, damaged = self.resume_from or usable_checkpoint(self.restore_dir)
    for name, reason in damaged:
      print(f"warning: checkpoint {name} in {self.restore_dir} is damaged ({reason}); falling "
            "back to the previous one", file=sys.stderr, flush=True)
    if prefix is None:
      if damaged:
        raise UsageError(f"no checkpoint in {self.restore_dir} can be read; move it away to "
                         "restart from epoch 0")
      return 0, 0
    self.checkpoint.restore(prefix).assert_consumed()
    done, steps = (int(v) for v in self.progress.numpy())
    return done, steps

  def _save(self, epochs_done, steps_done=0):
    self.progress.assign([epochs_done, steps_done])
    if self.manager is not None:
      self.manager.save()
    self._last_save = time.time()

  def _save_due(self, steps):
    """A mid-epoch checkpoint is due after ``steps`` steps of the running epoch."""
    if 0 < steps < self.steps_per_epoch:
      if self.checkpoint_every_steps and steps % self.checkpoint_every_steps == 0:
        return True
      if self.checkpoint_every_seconds:
        return time.time() - self._last_save >= self.checkpoint_every_seconds
    return False

  def _eta(self, epoch, steps):
    """Seconds to the end of the run at the speed of this process so far (None at first)."""
    to_go = (self.total_epochs - epoch) * self.steps_per_epoch - steps
    started, to_go_then = self._run_start
    done = to_go_then - to_go
    if done <= 0:
      return None
    return to_go * (time.time() - started) / done

  def _log_steps(self, phase, epoch, steps, window, seconds):
    """The mean terms of the last ``window`` steps: TensorBoard and one console line."""
    n = max(window.pop("_steps"), 1)
    means = {k: v / n for k, v in window.items()}
    speed = n * self.global_batch / max(seconds, 1e-9)
    if self.summaries is not None:
      values = {f"{phase.name}/step/{k}": v for k, v in means.items()}
      values[f"{phase.name}/step/images_per_sec"] = speed
      self.summaries.scalars(epoch * self.steps_per_epoch + steps, values)
    eta = self._eta(epoch, steps)
    terms = " ".join(f"{k} {v:.4g}" for k, v in means.items())
    say(f"epoch {epoch + 1}/{self.total_epochs} step {steps}/{self.steps_per_epoch} "
        f"[{phase.name}] {terms} | {speed:.0f} img/s | run ETA {_clock(eta)}", self.verbose)

  def _train_epoch(self, phase, epoch, local, skip, stop):
    """Train one epoch; returns its stats, or raises TrainingInterrupted/TrainingDiverged."""
    step = self.distributed_step(phase.name)
    sums, correct, count, steps = {}, 0.0, 0.0, skip
    desc = f"epoch {epoch + 1}/{self.total_epochs} {phase.name}"
    bar = Progress(self.steps_per_epoch - skip, desc, enabled=self.verbose)
    start = window_start = time.time()
    window = {"_steps": 0}
    if self._run_start is None:
      self._run_start = (start, (self.total_epochs - epoch) * self.steps_per_epoch - skip)
    try:
      for batch in self._distributed_train_data(skip):
        if steps >= self.steps_per_epoch:  # equal step counts on every worker
          break
        terms, metrics = step(batch)
        out = {k: float(v) for k, v in terms.items()}
        steps += 1
        for key, value in out.items():
          if not math.isfinite(value):
            kept = f"the last checkpoint (epoch {epoch}{f' step {skip}' if skip else ''}) is kept"
            if not epoch and not skip:
              kept = "there is no checkpoint yet"
            raise TrainingDiverged(f"non-finite loss term {key!r} = {value} at epoch {epoch + 1} "
                                   f"step {steps} ({phase.name}); stopped without saving: {kept}")
          sums[key] = sums.get(key, 0.0) + value
          window[key] = window.get(key, 0.0) + value
        window["_steps"] += 1
        correct += float(metrics["correct"])
        count += float(metrics["count"])
        bar.update({"loss": out["loss"], "acc": 100.0 * correct / max(count, 1.0)})
        if self.log_every and steps % self.log_every == 0 and steps < self.steps_per_epoch:
          self._log_steps(phase, epoch, steps, window, time.time() - window_start)
          window, window_start = {"_steps": 0}, time.time()
        if self._save_due(steps):
          self._save(epoch, steps)
        if stop.signal is not None:
          self._save(epoch, steps)
          raise TrainingInterrupted(
              f"stopped by signal {stop.signal} at epoch {epoch + 1} step {steps}; checkpoint "
              "written, rerun the same command to resume")
    finally:
      bar.close()
    seconds = time.time() - start
    n = max(steps - skip, 1)
    stats = {f"train/{k}": v / n for k, v in sums.items()}
    stats["train/top1"] = 100.0 * correct / max(count, 1.0)
    stats["images_per_sec"] = (steps - skip) * self.global_batch / max(seconds, 1e-9)
    stats["epoch_time_s"] = seconds
    return stats

  def fit(self):
    """Run (or resume) every phase. Returns the results dict (last and best test accuracy...)."""
    done, skip = self.restore()
    self._fast_forward_input(done)
    if self.on_start is not None:
      self.on_start(done)
    if done or skip:
      where = f" (step {skip})" if skip else ""
      say(f"resuming from epoch {done}{where}", self.verbose)
    last, speeds = None, []
    with _StopRequest() as stop:
      for epoch in range(done, self.total_epochs):
        phase, local = self._locate(epoch)
        lr = current_lr(phase.optimizer)
        self.distiller.epoch.assign(float(local))
        stats = self._train_epoch(phase, epoch, local, skip, stop)
        skip = 0
        test = self.evaluator(self.test_data)
        for name, evaluator in self.extra_evaluators.items():
          test[f"{name}_top1"] = evaluator(self.test_data)["top1"]
        last = test
        if phase.name == MAIN:
          speeds.append(stats["images_per_sec"])
          if test["top1"] > float(self.best[0]):
            self.best.assign([test["top1"], float(epoch + 1)])
        self._log(phase, epoch, lr, stats, test)
        self._save(epoch + 1)
    if last is None:
      last = self.evaluator(self.test_data)
    best_top1, best_epoch = (float(v) for v in self.best.numpy())
    if best_top1 < 0:
      best_top1, best_epoch = last["top1"], float(self.total_epochs)
    steady = speeds[1:] if len(speeds) > 1 else speeds
    return {"top1": last["top1"], "top5": last["top5"], "loss": last["loss"], "n": last["n"],
            "best_top1": best_top1, "best_epoch": int(best_epoch),
            "epochs": self.total_epochs,
            "images_per_sec": float(np.mean(steady)) if steady else None,
            **{k: v for k, v in last.items() if k.endswith("_top1") and k != "best_top1"}}

  def _log(self, phase, epoch, lr, stats, test):
    p = phase.name
    values = {f"{p}/{k}": v for k, v in stats.items()}
    values.update({f"{p}/lr": lr, **{f"test/{k}": v for k, v in test.items() if k != "n"}})
    if self.summaries is not None:
      self.summaries.scalars(epoch + 1, values)
    if self.metrics_sink is not None:
      self.metrics_sink(dict(epoch=epoch + 1, phase=p, lr=lr, **{k: v for k, v in stats.items()},
                             **{f"test/{k}": v for k, v in test.items()}))
    terms = " ".join(f"{k[len('train/'):]} {v:.4g}" for k, v in stats.items()
                     if k.startswith("train/") and k != "train/top1")
    extra = "".join(f" | {k[:-len('_top1')]} {v:.2f}" for k, v in test.items()
                    if k.endswith("_top1"))
    say(f"epoch {epoch + 1}/{self.total_epochs} [{p}] {terms} | train top1 "
        f"{stats['train/top1']:.2f} | test top1 {test['top1']:.2f} top5 {test['top5']:.2f} "
        f"loss {test['loss']:.4f}{extra} | lr {lr:.4g} | {stats['images_per_sec']:.0f} img/s "
        f"{stats['epoch_time_s']:.1f}s | run ETA {_clock(self._eta(epoch + 1, 0))}", self.verbose)
