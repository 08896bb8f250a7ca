"""The engine: resume, NaN stop, evaluation, XLA path, replicas, train dir, config, teacher loading."""
import os
import signal

import keras
import numpy as np
import pytest
import tensorflow as tf

import nets
from kd_tf2 import distillers
from kd_tf2.distillers import Distiller
from kd_tf2.engine import Evaluator, Trainer, config as cfg, load_teacher, make_strategy
from kd_tf2.engine import configure_cpu_replicas
from kd_tf2.engine.rundir import DONE, NEW, RESUME, RunDir
from kd_tf2.errors import TrainingDiverged, TrainingInterrupted, UsageError

SHAPE = (32, 32, 3)


def fixed_data(n, batch, seed=0, classes=10):
  """A deterministic dataset (no shuffling, no augmentation) of n images in batches."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n,) + SHAPE).astype(np.float32)
  labels = (np.arange(n) % classes).astype(np.int64)
  return tf.data.Dataset.from_tensor_slices(
      {"image": images, "label": labels, "index": np.arange(n, dtype=np.int64)}).batch(batch)


def make_trainer(checkpoint_dir, method="FitNet", epochs=2, sink=None, jit=False, distiller=None,
                 steps=2, train_data=None, **extra):
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  keras.utils.set_random_seed(0)
  with strategy.scope():
    student = nets.create("resnet8", 10)
    student.build((None,) + SHAPE)
    if distiller is None:
      teacher = nets.create("resnet8", 10)
      teacher.build((None,) + SHAPE)
      d = distillers.create(method, student, teacher)
    else:
      d = distiller(student, None).setup(SHAPE)
  return Trainer(strategy=strategy, student=student, distiller=d,
                 train_data=train_data or fixed_data(16 * steps, 16),
                 test_data=fixed_data(16, 16, seed=1),
                 steps_per_epoch=steps, global_batch=16, epochs=epochs, base_lr=0.05,
                 jit_compile=jit, checkpoint_dir=checkpoint_dir, metrics_sink=sink, verbose=False,
                 **extra)


def state_of(trainer):
  opt = trainer.phases[-1].optimizer
  return ([v.numpy() for v in trainer.student.weights + trainer.distiller.weights],
          [v.numpy() for v in opt.variables], int(opt.iterations))


def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, capsys):
  """2 epochs x 2 steps, the lr drops at step 2 (milestones scaled to 2 epochs). Run B is stopped
  by SIGTERM during epoch 2 (after its first step), then resumed by a fresh Trainer: the weights,
  the regressor and every optimiser slot must equal those of the uninterrupted run A."""
  a = make_trainer(str(tmp_path / "a"))
  result_a = a.fit()
  weights_a, slots_a, iters_a = state_of(a)
  assert iters_a == 4 and result_a["epochs"] == 2

  def interrupt(record):
    if record["epoch"] == 1:
      os.kill(os.getpid(), signal.SIGTERM)

  b = make_trainer(str(tmp_path / "b"), sink=interrupt)
  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(TrainingInterrupted, match=r"epoch 2 step 1"):
    b.fit()
  assert signal.getsignal(signal.SIGTERM) is handler  # the loop's handler is removed again
  resumed = make_trainer(str(tmp_path / "b"))
  assert resumed.restore() == (1, 1)
  capsys.readouterr()
  resumed.verbose = True
  result_b = resumed.fit()
  assert "resuming from epoch 1 (step 1)" in capsys.readouterr().out
  weights_b, slots_b, iters_b = state_of(resumed)
  assert iters_b == iters_a
  for x, y in zip(weights_a + slots_a, weights_b + slots_b):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  assert result_b["top1"] == pytest.approx(result_a["top1"])


def test_a_resumed_run_sees_the_batches_of_an_uninterrupted_one(tmp_path):
  """With a shuffled, augmented pipeline (every epoch draws its own order and flips), a run
  stopped mid-epoch 2 and resumed trains on exactly the batches of the uninterrupted run: the
  final weights agree."""
  from kd_tf2 import data as kd_data

  def shuffled():  # as the engine builds it: seeded first (TF's global seed enters tf.data's)
    keras.utils.set_random_seed(3)
    return kd_data.load("synthetic:train=48,test=16", "train", batch_size=16, seed=3)[0]

  a = make_trainer(str(tmp_path / "a"), steps=3, train_data=shuffled())
  a.fit()
  b = make_trainer(str(tmp_path / "b"), steps=3, train_data=shuffled(), checkpoint_every_steps=2)
  original = b._save

  def save_then_die(done, steps=0):  # killed right after the mid-epoch checkpoint of epoch 2
    original(done, steps)
    if (done, steps) == (1, 2):
      raise KeyboardInterrupt

  b._save = save_then_die
  with pytest.raises(KeyboardInterrupt):
    b.fit()
  resumed = make_trainer(str(tmp_path / "b"), steps=3, train_data=shuffled())
  resumed.fit()
  for x, y in zip(state_of(a)[0], state_of(resumed)[0]):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


class _RecordingSummaries:
  def __init__(self):
    self.calls = []

  def scalars(self, step, values):
    self.calls.append((step, dict(values)))


def test_step_logging_and_mid_epoch_checkpoints(tmp_path, capsys):
  """--log_every_n_steps writes the window's mean terms against the global step (and a console
  line with the run's ETA); --checkpoint_every_n_steps saves within the epoch, and a run killed
  after such a save resumes at that step."""
  log = _RecordingSummaries()
  trainer = make_trainer(str(tmp_path / "a"), epochs=2, steps=4, log_every=2,
                         checkpoint_every_steps=3)
  trainer.summaries, trainer.verbose = log, True
  trainer.fit()
  out = capsys.readouterr().out
  step_calls = [(step, v) for step, v in log.calls if any("/step/" in k for k in v)]
  assert [step for step, _ in step_calls] == [2, 6]  # mid-epoch only: epoch end is the epoch line
  assert {"main/step/ce", "main/step/hint", "main/step/loss",
          "main/step/images_per_sec"} <= set(step_calls[0][1])
  assert "epoch 1/2 step 2/4 [main]" in out and "run ETA" in out
  saved = [int(p.split("-")[-1]) for p in trainer.manager.checkpoints]
  assert len(saved) == 2  # the last two of: step 3, epoch 1, step 3 of epoch 2, epoch 2

  b = make_trainer(str(tmp_path / "b"), epochs=2, steps=4, checkpoint_every_steps=3)
  original = b._save

  def save_then_die(done, steps=0):  # the process dies right after the mid-epoch checkpoint
    original(done, steps)
    if steps == 3:
      raise KeyboardInterrupt

  b._save = save_then_die
  with pytest.raises(KeyboardInterrupt):
    b.fit()
  resumed = make_trainer(str(tmp_path / "b"), epochs=2, steps=4, checkpoint_every_steps=3)
  assert resumed.restore() == (0, 3)


class _Exploding(Distiller):
  """A loss term that is finite in epoch 1 and infinite from epoch 2 on."""
  method_name = "exploding"
  uses_teacher = False

  def terms(self, s, t, batch, *, training=True):
    return {"boom": 0.0 * tf.reduce_mean(s.logits) + 1.0 / (1.0 - self.epoch)}


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  trainer = make_trainer(str(tmp_path), epochs=3, distiller=_Exploding)
  with pytest.raises(TrainingDiverged, match=r"'boom' = inf at epoch 2 step 1"):
    trainer.fit()
  again = make_trainer(str(tmp_path), epochs=3, distiller=_Exploding)
  assert again.restore() == (1, 0)
  assert all(np.isfinite(v.numpy()).all() for v in again.student.weights)


def test_evaluator_matches_numpy_top_k_and_cross_entropy():
  rng = np.random.default_rng(2)
  logits = rng.normal(0, 2, (50, 7)).astype(np.float32)
  labels = rng.integers(0, 7, 50)
  ds = tf.data.Dataset.from_tensor_slices({"image": logits, "label": labels}).batch(16)
  got = Evaluator(keras.layers.Identity())(ds)
  order = np.argsort(-logits, axis=1)
  shifted = logits - logits.max(1, keepdims=True)
  ce = -(shifted[np.arange(50), labels] - np.log(np.exp(shifted).sum(1)))
  assert got["n"] == 50
  assert got["top1"] == pytest.approx(100.0 * np.mean(order[:, 0] == labels))
  assert got["top5"] == pytest.approx(100.0 * np.mean((order[:, :5] == labels[:, None]).any(1)))
  assert got["loss"] == pytest.approx(ce.mean(), rel=1e-5)


def test_xla_step_matches_the_default_step():
  """jit_compile compiles the per-replica forward/backward and applies the update outside XLA:
  first-step losses and the updated weights agree with the oneDNN path."""
  results = []
  for jit in (False, True):
    trainer = make_trainer(None, method="AT", epochs=1, jit=jit)
    step = trainer.distributed_step()
    batch = next(iter(trainer.strategy.experimental_distribute_dataset(fixed_data(16, 16))))
    terms, _ = step(batch)
    out = {k: float(v) for k, v in terms.items()}
    results.append((out, [v.numpy() for v in trainer.student.trainable_weights]))
  (plain, w_plain), (xla, w_xla) = results
  assert set(plain) == set(xla) >= {"ce", "at", "loss"}
  for key in plain:
    assert xla[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-5), key
  for x, y in zip(w_plain, w_xla):
    np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5)


def test_strategy_errors():
  tf.constant(1.0)  # TensorFlow is initialised from here on
  with pytest.raises(UsageError, match=r"unknown strategy 'gpu'; accepted: auto, one_device"):
    make_strategy("gpu")
  with pytest.raises(UsageError, match=r"cpu_replicas=3: TensorFlow already initialised"):
    configure_cpu_replicas(3)
  with pytest.raises(UsageError, match=r"cpu_replicas=0"):
    configure_cpu_replicas(0)
  old = os.environ.pop("TF_CONFIG", None)
  try:
    with pytest.raises(UsageError, match=r"needs the TF_CONFIG environment variable"):
      make_strategy("multi_worker")
  finally:
    if old is not None:
      os.environ["TF_CONFIG"] = old


def test_run_dir_states_and_refusals(tmp_path):
  settings = {"method": "AT", "epochs": 2}
  run = RunDir(str(tmp_path / "run"))
  assert run.state(settings) == NEW
  assert not os.path.exists(run.path)  # checking writes nothing
  run.create({"method": "at"}, settings)
  assert run.state(settings) == RESUME
  with pytest.raises(UsageError, match=r"different flags \(--epochs=2 there vs 3 now\)"):
    run.state(dict(settings, epochs=3))
  run.write_results({"top1": 1.0})
  assert run.state(settings) == DONE
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  with pytest.raises(UsageError, match=r"not empty and is not a kd_tf2 train dir"):
    RunDir(str(foreign)).state(settings)
  with pytest.raises(UsageError, match=r"is not a directory"):
    RunDir(str(foreign / "notes.txt")).state(settings)


def test_config_validation_and_canonical_names():
  good = cfg.validate(cfg.TrainConfig(method="kd", arch="RESNET8", teacher_arch="wrn_16_2",
                                      dataset="synthetic", epochs=3))
  assert (good.method, good.arch, good.teacher_epochs) == ("ST", "resnet8", 3)
  assert good.train_dir == os.path.join("runs", "synthetic", "ST_wrn_16_2_resnet8_seed0")
  bad = [(dict(fraction=0.0), r"--fraction=0.0: must be in \(0, 1\]"),
         (dict(fraction=1.5), r"--fraction=1.5"),
         (dict(epochs=0), r"--epochs=0: must be an integer >= 1"),
         (dict(method="nope"), r"unknown method 'nope'"),
         (dict(arch="resnet9"), r"--arch: unknown net 'resnet9'"),
         (dict(teacher_arch="x"), r"--teacher_arch: unknown net 'x'"),
         (dict(strategy="gpu"), r"--strategy='gpu'"),
         (dict(method="AT", init_epochs=2), r"method AT has no init stage.*FitNet"),
         (dict(kd_weight=-1.0), r"--kd_weight=-1.0"),
         (dict(lr=0.0), r"--lr=0.0: must be a number > 0")]
  for change, message in bad:
    with pytest.raises(UsageError, match=message):
      cfg.validate(cfg.TrainConfig(dataset="synthetic").replace(**change))
  st = cfg.settings(cfg.validate(cfg.TrainConfig(method="ST", dataset="synthetic")))
  assert (st["ce_weight"], st["kd_weight"], st["temperature"], st["lr"]) == (0.1, 0.9, 4.0, 0.05)
  plain = cfg.settings(cfg.validate(cfg.TrainConfig(method="none", dataset="synthetic")))
  assert plain["teacher_arch"] is None  # a plain run does not depend on teacher flags


def test_teacher_loading_checks_arch_and_classes(tmp_path):
  keras.utils.set_random_seed(0)
  model = nets.create("resnet8", 10)
  model.build((None,) + SHAPE)
  path = str(tmp_path / "t.keras")
  model.save(path)
  loaded = load_teacher(path, "RESNET8", 10, SHAPE)
  assert not loaded.trainable
  x = tf.random.normal((2,) + SHAPE)
  np.testing.assert_allclose(loaded(x, training=False), model(x, training=False), atol=1e-6)
  with pytest.raises(UsageError, match=r"is a resnet8, but --teacher_arch=resnet20"):
    load_teacher(path, "resnet20", 10, SHAPE)
  with pytest.raises(UsageError, match=r"has 10 classes, the dataset has 100"):
    load_teacher(path, "resnet8", 100, SHAPE)
  npz = str(tmp_path / "t.npz")
  np.savez(npz, **nets.reference_state(model))
  from_npz = load_teacher(npz, "resnet8", 10, SHAPE)
  np.testing.assert_allclose(from_npz(x, training=False), model(x, training=False), atol=1e-5)
  with pytest.raises(UsageError, match=r"does not hold resnet14 weights for 10 classes"):
    load_teacher(npz, "resnet14", 10, SHAPE)
  (tmp_path / "bad.keras").write_bytes(b"not a zip")
  with pytest.raises(UsageError, match=r"cannot load model .*bad.keras"):
    load_teacher(str(tmp_path / "bad.keras"), "resnet8", 10, SHAPE)
  with pytest.raises(UsageError, match=r"no such model file"):
    load_teacher(str(tmp_path / "missing.keras"), "resnet8", 10, SHAPE)


def test_trainer_and_speed_benchmark_run_the_same_step_function(monkeypatch):
  """The benchmark times the engine's own step: ``Trainer.distributed_step`` and ``kd_tf2.bench
  speed`` both compile their step with ``kd_tf2.engine.step.compile_step`` (a recording wrapper
  sees both), and the benchmark's step is a working train step (the student moves)."""
  from kd_tf2.bench import speed
  from kd_tf2.engine import step as step_lib
  calls = []
  real = step_lib.compile_step

  def recording(strategy, step_fn, optimizer, variables, **kwargs):
    calls.append(getattr(step_fn, "__name__", type(step_fn).__name__))
    return real(strategy, step_fn, optimizer, variables, **kwargs)

  monkeypatch.setattr(step_lib, "compile_step", recording)
  trainer = make_trainer(None, method="AT", epochs=1)
  trainer.distributed_step()
  assert calls == ["train_step"]
  config = speed.SpeedConfig(arch="resnet8", teacher_arch="resnet14", batch_size=4, num_classes=10,
                             train_size=16)
  nets_ = speed._Nets(config)
  bench_step = speed._method_step("CRD", nets_, config, loss_scale=False)
  assert calls == ["train_step", "train_step"]
  before = [v.numpy().copy() for v in nets_.student.trainable_variables]
  terms, metrics = bench_step(speed._random_batch(config))
  assert {"ce", "crd", "loss"} <= set(terms) and float(metrics["count"]) == 4
  assert any(not np.array_equal(b, v.numpy())
             for b, v in zip(before, nets_.student.trainable_variables))


def test_long_epoch_flags_are_checked_and_default_to_a_twentieth_of_large_epochs():
  base = cfg.TrainConfig(method="none", arch="resnet8", dataset="synthetic", train_dir="x")
  for bad, needle in ((dict(log_every_n_steps=-1), "--log_every_n_steps=-1"),
                      (dict(checkpoint_every_n_steps=1.5), "--checkpoint_every_n_steps=1.5"),
                      (dict(checkpoint_every_minutes=-2.0), "--checkpoint_every_minutes=-2.0"),
                      (dict(checkpoint_every_minutes=5.0, strategy="multi_worker"),
                       "use --checkpoint_every_n_steps")):
    with pytest.raises(UsageError, match=needle.replace(".", r"\.")):
      cfg.validate(base.replace(**bad))
  assert cfg.log_every_n_steps(base, 5004) == 250  # ImageNet at batch 256
  assert cfg.log_every_n_steps(base, 390) == 0      # CIFAR: the epoch line is enough
  assert cfg.log_every_n_steps(base.replace(log_every_n_steps=7), 390) == 7
  assert "log_every_n_steps" not in cfg.settings(cfg.validate(base))  # operational: resumable


def test_protocol_sets_the_schedule_defaults_and_flags_win():
  cifar = cfg.validate(cfg.TrainConfig(method="none", arch="resnet8", dataset="synthetic",
                                       train_dir="x"))
  assert (cifar.protocol, cifar.epochs, cifar.batch_size, cifar.weight_decay) == ("cifar", 240, 64,
                                                                                  5e-4)
  assert cfg.base_lr(cifar) == 0.05 and cfg.schedule(cifar) == ((150, 180, 210), 240)
  assert "protocol" not in cfg.settings(cifar)  # train dirs made before --protocol still resume
  auto = cfg.validate(cfg.TrainConfig(method="none", arch="resnet18_imagenet",
                                      dataset="imagenette", train_dir="x"))
  assert (auto.protocol, auto.epochs, auto.batch_size, auto.weight_decay) == ("imagenet", 100, 256,
                                                                              1e-4)
  assert cfg.base_lr(auto) == 0.1 and cfg.schedule(auto) == ((30, 60, 90), 100)
  assert cfg.settings(auto)["protocol"] == "imagenet"
  mine = cfg.validate(cfg.TrainConfig(method="none", arch="resnet8", dataset="folder:/x",
                                      protocol="imagenet", epochs=3, lr=0.2, train_dir="x"))
  assert (mine.epochs, mine.batch_size, cfg.base_lr(mine)) == (3, 256, 0.2)
  with pytest.raises(UsageError, match=r"--protocol='tpu': accepted: auto, cifar, imagenet"):
    cfg.validate(cifar.replace(protocol="tpu"))


def test_the_method_gets_the_protocol_that_set_the_schedule():
  """--protocol=imagenet on a folder (a CIFAR-like name) gives DIST its ImageNet defaults too."""
  from kd_tf2.engine import run
  base = cfg.TrainConfig(method="DIST", arch="resnet8", dataset="folder:/data/x", train_dir="x")
  dist = distillers.get("DIST")
  assert run.engine_hparams(dist, cfg.validate(base)) == {"protocol": "cifar"}
  assert run.engine_hparams(dist, cfg.validate(base.replace(protocol="imagenet"))) == {
      "protocol": "imagenet"}
  assert run.engine_hparams(dist, base.replace(dataset="imagenette")) == {"protocol": "imagenet"}
