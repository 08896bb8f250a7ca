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
import shutil
import tempfile

import keras
import tensorflow as tf

from kd_tf2 import data as kd_data
from kd_tf2 import distillers
from kd_tf2.engine import config as cfg
from kd_tf2.engine import models
from kd_tf2.engine.loop import Evaluator, Trainer
from kd_tf2.engine.rundir import DONE, RunDir
from kd_tf2.engine.strategy import configure_cpu_replicas, is_chief, make_strategy
from kd_tf2.engine.summaries import Summaries, say
from kd_tf2.errors import UsageError, raised_by_our_checks

EVAL_SPLITS = ("test", "validation", "val")


def _load_data(config, split, batch_size, **kwargs):
  kwargs = {"image_size": config.image_size, "augment": config.augment, "cache": config.cache,
            **kwargs}
  try:
    return kd_data.load(config.dataset, split, batch_size=batch_size,
                        data_dir=config.data_dir or None, **kwargs)
  except (ValueError, FileNotFoundError) as e:
    if not raised_by_our_checks(e):  # e.g. TensorFlow tracing the pipeline: a bug
      raise
    raise UsageError(f"--dataset={config.dataset}: {e}") from None


def eval_split(splits):
  """The split evaluated after each epoch: ``test`` if the dataset has one, else ``validation``."""
  for name in EVAL_SPLITS:
    if name in splits:
      return name
  raise UsageError(f"the dataset has no evaluation split (one of {', '.join(EVAL_SPLITS)}); "
                   f"its splits: {', '.join(splits)}")


def engine_hparams(method_cls, config):
  """Constructor keywords the method asks the engine for (``Distiller.engine_hparams``);
  ``protocol`` is the run's (``--protocol``, or the dataset's for ``auto``), the one that also
  set the schedule."""
  return distillers.engine_kwargs(
      method_cls, train_labels=lambda: train_labels(config),
      jit_compiled=lambda: config.jit_compile,
      protocol=lambda: cfg.resolve_protocol(config.protocol, config.dataset))


def batch_views(method_cls, config):
  """How many augmented views of each training sample the method asks the pipeline for (its
  ``batch_views``: an int, or ``"per_net"``: one per net it trains, the student and --peers);
  1 when ``--method_args=views=false`` turns the method's views off."""
  views = getattr(method_cls, "batch_views", 1)
  if views != 1 and cfg.method_kwargs(config).get("views", True) is False:
    return 1
  if views == "per_net":
    return 1 + len([p for p in config.peers.split(",") if p])
  return views


def train_labels(config):
  """int64 [split_size]: the label of every sample index of the training split, -1 for the
  samples outside the ``--fraction`` subset (from the split's listing: no image decoded)."""
  try:
    return kd_data.subset_labels(config.dataset, "train", fraction=config.fraction,
                                 seed=config.seed, data_dir=config.data_dir or None)
  except (ValueError, FileNotFoundError) as e:
    raise UsageError(f"--dataset={config.dataset}: {e}") from None


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


def check_execution(config, replicas):
  """Refuse execution settings that cannot work with this many replicas / this method."""
  if config.batch_size % replicas:
    raise UsageError(f"--batch_size={config.batch_size} is not divisible by the {replicas} "
                     f"replicas of --strategy={config.strategy} (--cpu_replicas="
                     f"{config.cpu_replicas}); use a multiple of {replicas}")
  if config.jit_compile and replicas > 1:
    raise UsageError(f"--jit_compile with {replicas} replicas is not supported: synchronized "
                     "BatchNorm all-reduces inside the compiled per-replica step, which TF 2.21 "
                     "refuses (merge_call in a nested tf.function); use one replica or drop "
                     "--jit_compile")
  if getattr(distillers.get(config.method), "paired_batches", False) and (
      config.batch_size // replicas) % 2:
    raise UsageError(f"--batch_size={config.batch_size}: method {config.method} trains on "
                     f"anchor/partner pairs, so each of the {replicas} replica(s) needs an even "
                     f"share of the batch; use a multiple of {2 * replicas}")
  if getattr(distillers.get(config.method), "paired_batches", False) and (
      config.strategy == "multi_worker"):
    raise UsageError(f"--strategy=multi_worker: method {config.method}'s class-paired batches "
                     "are not built by the sharded input pipeline; use one worker")
  reason = distillers.get(config.method).jit_unsupported
  if config.jit_compile and reason:
    raise UsageError(f"--jit_compile: method {config.method} cannot be compiled with XLA: {reason}")


class _Job:
  """One ``train`` call: the validated config, its strategy, data and train dir (reads only)."""

  def __init__(self, config):
    self.config = c = cfg.validate(config)
    configure_cpu_replicas(c.cpu_replicas)
    self.strategy = make_strategy(c.strategy, cluster_timeout=c.cluster_timeout)
    self.replicas = self.strategy.num_replicas_in_sync
    check_execution(c, self.replicas)
    # Seeded before the pipeline is built, so its shuffle follows --seed (as the multi-worker
    # pipeline, built later, does): one worker and several see the same batches.
    keras.utils.set_random_seed(c.seed)
    # Under multi-worker this pipeline only describes the data (each worker streams its shard).
    sharded = isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy)
    paired = getattr(distillers.get(c.method), "paired_batches", False)  # CS-KD
    self.views = batch_views(distillers.get(c.method), c)  # KDCL: a view per net
    self.train_ds, self.info = _load_data(
        c, "train", c.batch_size, fraction=c.fraction, seed=c.seed,
        cache="none" if sharded and c.cache == "auto" else c.cache,
        **({"pair_by_class": True} if paired else {}), views=self.views)
    self.test_ds, _ = _load_data(c, eval_split(self.info.splits), c.batch_size)
    self.input_shape = self.info.image_shape
    self.chief = is_chief(self.strategy)
    self.scratch = None
    self.run = RunDir(c.train_dir)
    self.settings = cfg.settings(c)
    self.subset = {"images": self.info.num_examples,
                   "fingerprint": self.info.subset_fingerprint}
    self.state = self.run.state(self.settings, self.subset)
    self.source = cfg.teacher_source(c)
    self.teacher_cfg = cfg.teacher_config(c) if self.source == "train" else None
    self.teacher_name = cfg.net_label(c.teacher_arch)
    self.hparams = dict(ce_weight=c.ce_weight, kd_weight=c.kd_weight,
                        method_weight=c.method_weight, temperature=c.temperature,
                        init_epochs=c.init_epochs)

  def say(self, message):
    say(message, self.config.verbose)

  def given_teacher(self):
    """The teacher known before anything is written: loaded from --teacher_ckpt, or an untrained
    stand-in of the right shape (validates the pair) when it is to be trained first."""
    c = self.config
    if self.source == "checkpoint":
      with self.strategy.scope():
        teacher = models.load_teacher(c.teacher_ckpt, c.teacher_arch, self.info.num_classes,
                                      self.input_shape, features=c.teacher_features)
      self.teacher_name = models.describe(teacher)[0]
      check_input_shape(teacher, self.input_shape, f"--teacher_ckpt={c.teacher_ckpt}",
                        c.dataset)
      return teacher
    if self.source == "train":
      RunDir(self.teacher_cfg.train_dir).state(cfg.settings(self.teacher_cfg), self.subset)
      with self.strategy.scope():
        stand_in = models.build_net(c.teacher_arch, self.info.num_classes, self.input_shape,
                                    features=c.teacher_features, flag="--teacher_arch")
      stand_in.trainable = False
      return stand_in
    return None

  def build(self, teacher):
    """(student, teacher, distiller): seeded, in the strategy scope; a fresh peer for methods
    that train their teacher with the student."""
    c, sync = self.config, self.replicas > 1
    if not hasattr(self, "_engine_hparams"):
      self._engine_hparams = engine_hparams(distillers.get(c.method), c)
    keras.utils.set_random_seed(c.seed)
    with self.strategy.scope():
      student = models.build_net(c.arch, self.info.num_classes, self.input_shape,
                                 synchronized_bn=sync, features=c.student_features)
      if self.source == "fresh":
        teacher = models.build_net(c.teacher_arch, self.info.num_classes, self.input_shape,
                                   synchronized_bn=sync, features=c.teacher_features,
                                   flag="--teacher_arch")
      peers = {}
      if c.peers:  # further nets trained with the student (online methods), built like it
        peers["peers"] = [models.build_net(a, self.info.num_classes, self.input_shape,
                                           synchronized_bn=sync) for a in c.peers.split(",")]
      distiller = distillers.create(c.method, student, teacher, input_shape=self.input_shape,
                                    **self.hparams, **self._engine_hparams, **peers,
                                    **cfg.method_kwargs(c))
    return student, teacher, distiller

  def train_teacher(self):
    """Train (or resume, or reuse) the teacher in TRAIN_DIR/teacher and load it."""
    c = self.config
    self.say(f"training the teacher {self.teacher_name} into {self.teacher_cfg.train_dir}")
    train(self.teacher_cfg, flags=dict(dataclasses.asdict(self.teacher_cfg),
                                       trained_for=self.run.path))
    with self.strategy.scope():
      teacher = models.load_teacher(self.teacher_cfg.train_dir, None, self.info.num_classes,
                                    self.input_shape, features=c.teacher_features)
    self.teacher_name = models.describe(teacher)[0]
    return teacher

  def announce(self, teacher, distiller):
    """Teacher accuracy (when it is a trained one) and a one-line description of the run."""
    c, results, name = self.config, {}, self.teacher_name
    if self.source in ("checkpoint", "train"):
      results["teacher_top1"] = Evaluator(teacher, self.strategy)(self.test_ds)["top1"]
      self.say(f"teacher {name}: test top1 {results['teacher_top1']:.2f}")
    pair = {None: "", "fresh": f"{name} (peer, trained together) & "}.get(
        self.source, f"{name} -> ")
    self.say(f"{distiller.method_name}: {pair}{cfg.net_label(c.arch)} on {c.dataset} "
             f"({self.info.num_examples} "
             f"training images, {self.info.num_batches} steps/epoch, {self.replicas} "
             f"replica(s)); weights {distiller.hparams()}; train dir {self.run.path}")
    return results

  def trainer(self, student, teacher, distiller, summaries, loss_scale):
    c = self.config
    train_data, steps = self.train_ds, self.info.num_batches
    if isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
      # Each worker reads its own shard, batched per replica; every worker runs the same number
      # of steps (the global count), whatever the size of its shard.
      train_data = kd_data.dataset_fn(c.dataset, "train", batch_size=c.batch_size,
                                      fraction=c.fraction, seed=c.seed,
                                      data_dir=c.data_dir or None, image_size=c.image_size,
                                      augment=c.augment, cache=c.cache, views=self.views)
      steps = self.info.num_examples // c.batch_size
    # A non-chief worker checkpoints into a scratch dir of its own (deleted after training).
    scratch = self.scratch = None if self.chief else tempfile.mkdtemp(prefix="kd_tf2_worker_")
    if scratch:
      self.say(f"not the chief: this worker's checkpoints go to {scratch}")
    return Trainer(
        strategy=self.strategy, student=student, distiller=distiller, train_data=train_data,
        test_data=self.test_ds, steps_per_epoch=steps, global_batch=c.batch_size,
        epochs=c.epochs, base_lr=cfg.base_lr(c), schedule=cfg.schedule(c), momentum=c.momentum,
        weight_decay=c.weight_decay, jit_compile=c.jit_compile, loss_scale=loss_scale,
        checkpoint_dir=scratch or self.run.checkpoints, restore_dir=self.run.checkpoints,
        summaries=summaries, metrics_sink=self.run.append_metrics if self.chief else None,
        on_start=self.run.trim_metrics if self.chief else None, verbose=c.verbose,
        resume_from=self.run.newest, log_every=cfg.log_every_n_steps(c, steps),
        checkpoint_every_steps=c.checkpoint_every_n_steps,
        checkpoint_every_minutes=c.checkpoint_every_minutes,
        extra_checkpointed=teacher.weights if self.source == "fresh" else ())

  def export(self, student, teacher, distiller, as_teacher=False):
    """Evaluate and export the trained nets (chief only writes); returns their results.
    ``as_teacher``: this run trains a teacher for another (its model is ``teacher.keras``)."""
    c, run = self.config, self.run
    keras_file = run.join(models.TEACHER_FILE) if as_teacher else run.keras_file
    results = dict(method=distiller.method_name, arch=c.arch, dataset=c.dataset,
                   teacher_arch=self.teacher_name if teacher is not None else None,
                   train_dir=run.path, keras_file=keras_file, saved_model=run.saved_model,
                   student_params=int(sum(int(tf.size(v)) for v in student.trainable_variables)),
                   image_shape=list(self.info.image_shape), mean=list(self.info.mean),
                   std=list(self.info.std), normalization=self.info.stats,
                   augment_style=self.info.style,
                   class_names=[str(name) for name in self.info.class_names])
    extra = distiller.extra_exports()
    for name, model in distiller.eval_models().items():
      results[f"{name}_top1"] = Evaluator(model, self.strategy)(self.test_ds)["top1"]
    if self.chief:
      models.export(student, run, self.input_shape, keras_file=keras_file, info=self.info)
      for name, model in extra.items():
        results[f"{name}_keras_file"] = run.join(f"{name}.keras")
        model.save(results[f"{name}_keras_file"])
    return results


def train(config, flags=None):
  """Train (or resume, or reuse) the run described by ``config`` (a ``TrainConfig``).

  ``flags``: the command line to record (default: the config's fields). Returns the results dict:
  last-epoch ``top1``/``top5``/``loss``/``n`` on the evaluation split, ``best_top1`` and
  ``best_epoch``, ``images_per_sec``, ``teacher_top1``, paths of the exports.
  """
  if config.assistants:  # teacher -> assistants -> student, one run per link
    from kd_tf2.engine import chain  # pylint: disable=import-outside-toplevel
    return chain.train_chain(config, train, flags)
  job = _Job(config)
  if job.state == DONE:
    results = job.run.results()
    job.say(f"{job.run.path} is already trained (top1 {results['top1']:.2f}, best "
            f"{results['best_top1']:.2f}); nothing to do")
    return results
  flags = flags or dataclasses.asdict(job.config)
  with _Policy(job.config.mixed_precision, job.strategy) as policy:
    student, teacher, distiller = job.build(job.given_teacher())
    # Every input is valid: from here on the train dir is written.
    if job.chief:
      job.run.create(flags, job.settings, job.subset)
    if job.source == "train":
      student, teacher, distiller = job.build(job.train_teacher())
    results = job.announce(teacher, distiller)
    summaries = Summaries(job.run.path if job.chief else None)
    if job.chief:
      summaries.flags(flags, job.settings)
    trainer = job.trainer(student, teacher, distiller, summaries, policy.loss_scale)
    try:
      results.update(trainer.fit())
    finally:
      summaries.close()
      if job.scratch:
        shutil.rmtree(job.scratch, ignore_errors=True)
    results.update(job.export(student, teacher, distiller,
                              as_teacher=bool(flags.get("trained_for"))))
    if job.chief:
      job.run.write_results(results)
  job.say(f"done: last-epoch test top1 {results['top1']:.2f}, best {results['best_top1']:.2f} "
          f"(epoch {results['best_epoch']}); exported to {results['keras_file']}")
  return results


def evaluate(model, dataset, split="test", *, data_dir=None, batch_size=256, image_size=None,
             augment="auto"):
  """Evaluate a model (object, train dir or ``.keras`` path) on ``split`` of ``dataset``.

  image_size, augment: as trained (``augment`` picks the evaluation transform's style; no
  augmentation is applied). Returns ``{"top1", "top5", "loss", "n"}`` (percent accuracies, mean
  cross-entropy).
  """
  if isinstance(model, (str, os.PathLike)):
    model = models.load_model(os.fspath(model))
  style = "auto" if augment in (None, "none") else augment
  try:
    ds, info = kd_data.load(dataset, split, batch_size=batch_size, data_dir=data_dir or None,
                            augment=False, style=style, shuffle=False, drop_remainder=False,
                            image_size=image_size)
  except (ValueError, FileNotFoundError) as e:
    if not raised_by_our_checks(e):
      raise
    raise UsageError(f"--dataset={dataset}: {e}") from None
  _, classes = models.describe(model)
  if classes is not None and classes != info.num_classes:
    raise UsageError(f"the model has {classes} classes, --dataset={dataset} has "
                     f"{info.num_classes}")
  check_input_shape(model, info.image_shape, "the model", dataset)
  return Evaluator(model)(ds)


def check_input_shape(model, image_shape, what, dataset):
  """``UsageError`` unless ``model`` (built for [H, W, C] images) takes the dataset's images:
  the same channel count (the zoo nets pool globally, so H and W may differ)."""
  built = (model.get_build_config() or {}).get("input_shape") if model.built else None
  if built is None or len(built) != 4 or built[-1] is None:
    return
  if int(built[-1]) != int(image_shape[-1]):
    size = "x".join(str(d) for d in built[1:])
    raise UsageError(f"{what} takes {size} images ({built[-1]} channels), the images of "
                     f"--dataset={dataset} have {image_shape[-1]} channels")
