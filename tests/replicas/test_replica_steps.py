"""Steps under 2 mirrored replicas agree with one device (optimiser, engine step, custom steps)."""
import numpy as np
import pytest
import tensorflow as tf

import keras
import nets
from kd_tf2 import distillers
from kd_tf2.distillers import StepContext
from kd_tf2.engine import Trainer, make_optimizer
from kd_tf2.engine.step import compile_step
from kd_tf2.optim import StepDecay, TorchSGD

ONE = "/cpu:0"


# ------------------------------------------------------------------------------------- optimiser
# Not covered: jit_compile under this setup; XLA fails there for any optimizer (even a jitted
# forward/backward alone: "Trying to access resource .../replica_1 ... from device CPU:0").

def _train_sgd(strategy, loss_scale=False):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(8, 5)).astype("float32")
  y = rng.integers(0, 3, size=8)
  global_batch, steps = 8, 6
  with strategy.scope():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(7, activation="tanh"),
                              keras.layers.Dense(3)])
    opt = TorchSGD(learning_rate=StepDecay(0.5, [3], 0.1), momentum=0.9, weight_decay=0.05)
    opt.exclude_from_weight_decay(var_names=["bias"])
    if loss_scale:
      opt = keras.optimizers.LossScaleOptimizer(opt)
    opt.build(model.trainable_variables)
  data = tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch).repeat(steps)

  def replica_step(xb, yb):
    with tf.GradientTape() as tape:
      per_example = keras.losses.sparse_categorical_crossentropy(yb, model(xb), from_logits=True)
      loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
      if loss_scale:
        loss = opt.scale_loss(loss)
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))

  @tf.function
  def step(xb, yb):
    strategy.run(replica_step, args=(xb, yb))

  for xb, yb in strategy.experimental_distribute_dataset(data):
    step(xb, yb)
  return [v.numpy() for v in model.trainable_variables], int(opt.iterations.numpy())


def _max_abs_diff(a, b):
  return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))


def test_torch_sgd_on_two_replicas_matches_one_device(mirrored):
  w1, it1 = _train_sgd(tf.distribute.OneDeviceStrategy(ONE))
  w2, it2 = _train_sgd(mirrored)
  w2s, it2s = _train_sgd(mirrored, loss_scale=True)
  assert [it1, it2, it2s] == [6, 6, 6]
  assert min(float(np.max(np.abs(a))) for a in w1) > 0
  assert _max_abs_diff(w1, w2) < 1e-5
  assert _max_abs_diff(w1, w2s) < 1e-5


# ------------------------------------------------------------------------------------- engine step

def _fitnet_run(strategy):
  """Three FitNet+KD steps of the engine on fixed global batches of 16."""
  rng = np.random.default_rng(0)
  data = {"image": rng.normal(size=(48, 32, 32, 3)).astype(np.float32),
          "label": (np.arange(48) % 10).astype(np.int64), "index": np.arange(48)}
  ds = tf.data.Dataset.from_tensor_slices(data).batch(16)
  keras.utils.set_random_seed(0)
  sync = strategy.num_replicas_in_sync > 1
  with strategy.scope():
    student = nets.create("resnet8", 10, synchronized_bn=sync)
    teacher = nets.create("resnet8", 10)
    student.build((None, 32, 32, 3))
    teacher.build((None, 32, 32, 3))
    d = distillers.create("FitNet", student, teacher, kd_weight=0.5)
  init = float(sum(np.abs(v.numpy()).sum() for v in student.weights + d.weights))
  trainer = Trainer(strategy=strategy, student=student, distiller=d, train_data=ds, test_data=ds,
                    steps_per_epoch=3, global_batch=16, epochs=1, base_lr=0.05, verbose=False)
  step = trainer.distributed_step()
  losses = []
  for batch in strategy.experimental_distribute_dataset(ds):
    terms, metrics = step(batch)
    losses.append({k: float(v) for k, v in list(terms.items()) + list(metrics.items())})
  final = float(sum(np.abs(v.numpy()).sum() for v in student.weights + d.weights))
  return init, losses, final


def test_two_cpu_replicas_give_the_losses_of_one(mirrored):
  """MirroredStrategy over 2 logical CPUs (synchronized BN in student and regressor, gradients
  summed over replicas of per-replica losses divided by 2) reproduces the single-device losses
  of three FitNet+KD steps on the same global batches."""
  one = _fitnet_run(tf.distribute.OneDeviceStrategy(ONE))
  two = _fitnet_run(mirrored)
  assert two[0] == pytest.approx(one[0], rel=1e-7)
  for step_one, step_two in zip(one[1], two[1]):
    assert set(step_one) == set(step_two) >= {"ce", "kd", "hint", "loss", "correct", "count"}
    for key in ("ce", "kd", "hint", "loss", "count", "correct"):
      assert step_two[key] == pytest.approx(step_one[key], rel=2e-4, abs=1e-5), key
  assert two[2] == pytest.approx(one[2], rel=1e-5)
  assert two[2] != pytest.approx(one[0], rel=1e-6)  # training moved the weights


# ------------------------------------------------------------------------------------- custom steps

@pytest.fixture(scope="module")
def synced_pair(mirrored):
  with mirrored.scope():
    student = nets.create("resnet8", 10, synchronized_bn=True)
    teacher = nets.create("resnet8", 10, synchronized_bn=True)
    for net in (student, teacher):
      net.build((None, 32, 32, 3))
  return student, teacher


def _local_terms_step(strategy, d):
  """``batch -> [terms of replica 0, terms of replica 1]``: one update of ``d``'s main phase with
  each replica's own (unreduced) terms, for checks the replica mean would hide."""
  with strategy.scope():
    variables = d.variables_to_train()
    optimizer = make_optimizer(0.01, variables)

  def replica(batch):
    ctx = StepContext(optimizer, variables, num_replicas=strategy.num_replicas_in_sync)
    terms = d.train_step(batch, ctx).terms
    optimizer.apply_gradients(ctx.take_pending())
    return terms

  @tf.function
  def step(batch):
    return strategy.run(replica, args=(batch,))

  return lambda batch: [{k: float(v) for k, v in t.items()} for t in _local(strategy, step(batch))]


def _local(strategy, per_replica_terms):
  keys = list(per_replica_terms)
  columns = [strategy.experimental_local_results(per_replica_terms[k]) for k in keys]
  return [dict(zip(keys, row)) for row in zip(*columns)]


def _global_batch(strategy, rng, index, labels):
  ds = tf.data.Dataset.from_tensors({
      "image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
      "label": labels.astype(np.int64), "index": index.astype(np.int64)})
  return next(iter(strategy.experimental_distribute_dataset(ds)))


def test_crd_banks_stay_identical_across_replicas(mirrored, synced_pair):
  """Both replicas' copies of the banks, Z and the flag stay identical, and every row of the
  global batch (4 indices per replica) is updated in both copies."""
  rng = np.random.default_rng(0)
  labels = np.arange(32) % 10
  with mirrored.scope():
    d = distillers.create("CRD", *synced_pair, train_labels=labels)
  optimizer, variables = _optimizer(mirrored, d)
  step = compile_step(mirrored, d.train_step, optimizer, variables)
  before = d.bank_s.value.values[0].numpy()
  index = rng.choice(32, 8, replace=False)
  batch = _global_batch(mirrored, rng, index, labels[index])
  for _ in range(2):
    terms, _ = step(batch)
  assert np.isfinite(float(terms["crd"]))
  for var in (d.bank_s, d.bank_t, d.z, d.z_fixed):
    a, b = (c.numpy() for c in var.value.values)
    assert np.array_equal(a, b), var.path
  changed = np.flatnonzero(np.any(d.bank_s.value.values[0].numpy() != before, axis=1))
  assert sorted(changed) == sorted(index), (changed, index)
  assert d.z_fixed.value.values[0].numpy()


def _optimizer(strategy, d):
  with strategy.scope():
    variables = d.variables_to_train()
    return make_optimizer(0.01, variables), variables


def test_bss_runs_with_candidates_on_one_replica_only(mirrored, synced_pair):
  """Only replica 0 has attack candidates; the student's synchronised BatchNorm must not block."""
  rng = np.random.default_rng(1)
  for net in synced_pair:
    net.classifier.bias.assign(net.classifier.bias + 4.0 * tf.one_hot(3, 10))
  with mirrored.scope():
    d = distillers.create("BSS", *synced_pair, attack_size=2)
  d.epochs = 100
  d.epoch.assign(10.0)
  step = _local_terms_step(mirrored, d)
  batch = _global_batch(mirrored, rng, np.arange(8), np.array([3] * 4 + [1] * 4))
  replica0, replica1 = step(batch)
  assert replica0["bss"] > 0 and replica1["bss"] == 0, (replica0, replica1)
