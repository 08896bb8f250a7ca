"""One command, the whole job: validate, (train the teacher,) distil, export, report.

``train(config)`` checks every input before it writes anything (bad input raises ``UsageError``
and leaves the train dir untouched), then:

1. without ``teacher_ckpt`` (and when the method needs a teacher), trains a ``--teacher_arch`` net
   with ``none`` into ``TRAIN_DIR/teacher`` - or resumes / reuses it;
2. builds student, teacher and distiller inside the strategy scope (synchronized BatchNorm when
   replicas > 1), resumes from the latest checkpoint if there is one, trains every phase;
3. exports the student (``student.keras`` and ``saved_model/``) and writes ``results.json``.
"""
import dataclasses
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

from kd_tf2 import data as kd_data
from kd_tf2 import distillers
from kd_tf2.engine import config as cfg
from kd_tf2.engine import models
from kd_tf2.engine.loop import Evaluator, Trainer
from kd_tf2.engine.rundir import DONE, RunDir
from kd_tf2.engine.strategy import configure_cpu_replicas, is_chief, make_strategy
from kd_tf2.engine.summaries import Summaries, say
from kd_tf2.errors import UsageError

EVAL_SPLITS = ("test", "validation", "val")


def _load_data(config, split, batch_size, **kwargs):
  try:
    return kd_data.load(config.dataset, split, batch_size=batch_size,
                        data_dir=config.data_dir or None, **kwargs)
  except (ValueError, FileNotFoundError) as e:
    raise UsageError(f"--dataset={config.dataset}: {e}") from None


def eval_split(splits):
  """The split evaluated after each epoch: ``test`` if the dataset has one, else ``validation``."""
  for name in EVAL_SPLITS:
    if name in splits:
      return name
  raise UsageError(f"the dataset has no evaluation split (one of {', '.join(EVAL_SPLITS)}); "
                   f"its splits: {', '.join(splits)}")


def engine_hparams(method_cls, config):
  """Constructor keywords a method asks the engine for (``Distiller`` docstring), by name."""
  accepted = set(method_cls.accepted_hparams())
  out = {}
  if "train_labels" in accepted:
    out["train_labels"] = train_labels(config)
  return out


def train_labels(config):
  """int64 [split_size]: the label of every sample index of the training split, -1 for the
  samples outside the ``--fraction`` subset (read once through the data pipeline)."""
  ds, info = _load_data(config, "train", 1024, fraction=config.fraction, seed=config.seed,
                        augment=False, shuffle=False, drop_remainder=False)
  labels = np.full([info.split_size], -1, np.int64)
  for batch in ds:
    labels[batch["index"].numpy()] = batch["label"].numpy()
  return labels


class _Policy:
  """Mixed precision for the duration of a run: mixed_float16 on GPU (with loss scaling),
  mixed_bfloat16 on CPU/TPU; float32 otherwise. Restores the previous global policy."""

  def __init__(self, enabled, strategy):
    self.enabled = enabled
    on_gpu = bool(tf.config.list_logical_devices("GPU")) and not isinstance(
        strategy, tf.distribute.TPUStrategy)
    self.name = ("mixed_float16" if on_gpu else "mixed_bfloat16") if enabled else "float32"
    self.loss_scale = self.name == "mixed_float16"

  def __enter__(self):
    self._previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(self.name)
    return self

  def __exit__(self, *exc):
    keras.mixed_precision.set_global_policy(self._previous)
    return False


def train(config, flags=None):
  """Train (or resume, or reuse) the run described by ``config`` (a ``TrainConfig``).

  ``flags``: the command line to record (default: the config's fields). Returns the results dict:
  last-epoch ``top1``/``top5``/``loss``/``n`` on the evaluation split, ``best_top1`` and
  ``best_epoch``, ``images_per_sec``, ``teacher_top1``, paths of the exports.
  """
  config = cfg.validate(config)
  verbose = config.verbose
  configure_cpu_replicas(config.cpu_replicas)
  strategy = make_strategy(config.strategy)
  replicas = strategy.num_replicas_in_sync
  if config.batch_size % replicas:
    raise UsageError(f"--batch_size={config.batch_size} is not divisible by the {replicas} "
                     f"replicas of --strategy={config.strategy} (--cpu_replicas="
                     f"{config.cpu_replicas}); use a multiple of {replicas}")
  if config.jit_compile and replicas > 1:
    raise UsageError(f"--jit_compile with {replicas} replicas is not supported: synchronized "
                     "BatchNorm all-reduces inside the compiled per-replica step, which TF 2.21 "
                     "refuses (merge_call in a nested tf.function); use one replica or drop "
                     "--jit_compile")
  reason = distillers.get(config.method).jit_unsupported
  if config.jit_compile and reason:
    raise UsageError(f"--jit_compile: method {config.method} cannot be compiled with XLA: {reason}")
  train_ds, info = _load_data(config, "train", config.batch_size, fraction=config.fraction,
                              seed=config.seed)
  test_ds, _ = _load_data(config, eval_split(info.splits), config.batch_size)
  input_shape = info.image_shape
  chief = is_chief(strategy)
  run = RunDir(config.train_dir)
  settings = cfg.settings(config)
  state = run.state(settings)
  if state == DONE:
    results = run.results()
    say(f"{run.path} is already trained (top1 {results['top1']:.2f}, best "
        f"{results['best_top1']:.2f}); nothing to do", verbose)
    return results

  source = cfg.teacher_source(config)
  teacher_cfg = cfg.teacher_config(config) if source == "train" else None
  method_cls = distillers.get(config.method)
  hparams = dict(ce_weight=config.ce_weight, kd_weight=config.kd_weight,
                 method_weight=config.method_weight, temperature=config.temperature,
                 init_epochs=config.init_epochs)
  hparams.update(engine_hparams(method_cls, config))

  with _Policy(config.mixed_precision, strategy) as policy:

    def build(teacher):
      """Student (and a fresh peer), then the distiller; seeded, in the strategy scope."""
      keras.utils.set_random_seed(config.seed)
      with strategy.scope():
        student = models.build_net(config.arch, info.num_classes, input_shape,
                                   synchronized_bn=replicas > 1)
        if source == "fresh":
          teacher = models.build_net(config.teacher_arch, info.num_classes, input_shape,
                                     synchronized_bn=replicas > 1)
        distiller = distillers.create(config.method, student, teacher, input_shape=input_shape,
                                      **hparams)
      return student, teacher, distiller

    teacher = None
    if source == "checkpoint":
      with strategy.scope():
        teacher = models.load_teacher(config.teacher_ckpt, config.teacher_arch,
                                      info.num_classes, input_shape)
    elif source == "train":  # a stand-in of the right shape validates the pair before any write
      RunDir(teacher_cfg.train_dir).state(cfg.settings(teacher_cfg))
      with strategy.scope():
        teacher = models.build_net(config.teacher_arch, info.num_classes, input_shape)
        teacher.trainable = False
    student, teacher, distiller = build(teacher)

    # Every input is valid: from here on the train dir is written.
    if chief:
      run.create(flags or dataclasses.asdict(config), settings)
    if source == "train":
      say(f"training the teacher {config.teacher_arch} into {teacher_cfg.train_dir}", verbose)
      train(teacher_cfg, flags=dict(dataclasses.asdict(teacher_cfg), trained_for=run.path))
      with strategy.scope():
        teacher = models.load_teacher(teacher_cfg.train_dir, config.teacher_arch,
                                      info.num_classes, input_shape)
      student, teacher, distiller = build(teacher)

    results = {}
    if source in ("checkpoint", "train"):
      results["teacher_top1"] = Evaluator(teacher, strategy)(test_ds)["top1"]
      say(f"teacher {config.teacher_arch}: test top1 {results['teacher_top1']:.2f}", verbose)
    pair = f"{config.teacher_arch} -> " if teacher is not None else ""
    if source == "fresh":
      pair = f"{config.teacher_arch} (peer, trained together) & "
    say(f"{distiller.method_name}: {pair}{config.arch} on {config.dataset} ({info.num_examples} "
        f"training images, {info.num_batches} steps/epoch, {replicas} replica(s)); weights "
        f"{distiller.hparams()}; train dir {run.path}", verbose)

    summaries = Summaries(run.path if chief else None)
    if chief:
      summaries.flags(flags or dataclasses.asdict(config), settings)
    checkpoint_dir = run.checkpoints if chief else tempfile.mkdtemp(prefix="kd_tf2_worker_")
    train_data, steps = train_ds, info.num_batches
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
      # Each worker reads its own shard, batched per replica; every worker runs the same number
      # of steps (the global count), whatever the size of its shard.
      train_data = kd_data.dataset_fn(config.dataset, "train", batch_size=config.batch_size,
                                      fraction=config.fraction, seed=config.seed,
                                      data_dir=config.data_dir or None)
      steps = info.num_examples // config.batch_size
    trainer = Trainer(
        strategy=strategy, student=student, distiller=distiller, train_data=train_data,
        test_data=test_ds, steps_per_epoch=steps, global_batch=config.batch_size,
        epochs=config.epochs, base_lr=cfg.base_lr(config), momentum=config.momentum,
        weight_decay=config.weight_decay, jit_compile=config.jit_compile,
        loss_scale=policy.loss_scale, checkpoint_dir=checkpoint_dir,
        restore_dir=run.checkpoints, summaries=summaries,
        metrics_sink=run.append_metrics if chief else None, verbose=verbose,
        extra_checkpointed=teacher.weights if source == "fresh" else ())
    try:
      results.update(trainer.fit())
    finally:
      summaries.close()
    results.update(method=distiller.method_name, arch=config.arch, dataset=config.dataset,
                   teacher_arch=config.teacher_arch if teacher is not None else None,
                   train_dir=run.path, keras_file=run.keras_file, saved_model=run.saved_model,
                   student_params=int(sum(int(tf.size(v)) for v in student.trainable_variables)))
    extra = distiller.extra_exports()
    for name, model in extra.items():
      results[f"{name}_top1"] = Evaluator(model, strategy)(test_ds)["top1"]
    if chief:
      models.export(student, run, input_shape)
      for name, model in extra.items():
        path = run.join(f"{name}.keras")
        model.save(path)
        results[f"{name}_keras_file"] = path
      run.write_results(results)
  say(f"done: last-epoch test top1 {results['top1']:.2f}, best {results['best_top1']:.2f} "
      f"(epoch {results['best_epoch']}); student exported to {run.keras_file}", verbose)
  return results


def evaluate(model, dataset, split="test", *, data_dir=None, batch_size=256):
  """Evaluate a model (object, train dir or ``.keras`` path) on ``split`` of ``dataset``.

  Returns ``{"top1", "top5", "loss", "n"}`` (percent accuracies, mean cross-entropy).
  """
  if isinstance(model, (str, os.PathLike)):
    model = models.load_model(os.fspath(model))
  try:
    ds, info = kd_data.load(dataset, split, batch_size=batch_size, data_dir=data_dir or None,
                            augment=False, shuffle=False, drop_remainder=False)
  except (ValueError, FileNotFoundError) as e:
    raise UsageError(f"--dataset={dataset}: {e}") from None
  _, classes = models.describe(model)
  if classes is not None and classes != info.num_classes:
    raise UsageError(f"the model has {classes} classes, --dataset={dataset} has "
                     f"{info.num_classes}")
  return Evaluator(model)(ds)
