"""Online methods under 2 mirrored replicas: the same losses, gate and weights as on one device;
CS-KD's class pairs stay whole in each replica's share of a batch."""
import numpy as np
import pytest
import tensorflow as tf

import keras
import nets
from kd_tf2 import data as kd_data
from kd_tf2 import distillers
from kd_tf2.engine import make_optimizer
from kd_tf2.engine.step import compile_step

ONE_DEVICE = "/cpu:0"


def _paired_data():
  ds, _ = kd_data.load("synthetic", "train", batch_size=8, fraction=0.25, seed=0,
                       augment=False, pair_by_class=True)
  return ds


def _plain_data():
  rng = np.random.default_rng(0)
  return tf.data.Dataset.from_tensor_slices({
      "image": rng.normal(size=(24, 32, 32, 3)).astype(np.float32),
      "label": (np.arange(24) % 10).astype(np.int64),
      "index": np.arange(24, dtype=np.int64)}).batch(8)


def _run(strategy, method, make_data, **hparams):
  """Three steps of ``method``; returns (terms per step, trained weights, gate rows per replica)."""
  sync = strategy.num_replicas_in_sync > 1
  keras.utils.set_random_seed(0)
  with strategy.scope():
    student = nets.create("resnet8", 10, synchronized_bn=sync)
    student.build((None, 32, 32, 3))
    if "peers" in hparams:
      peer = nets.create("resnet8", 10, synchronized_bn=sync)
      peer.build((None, 32, 32, 3))
      hparams["peers"] = [peer]
    d = distillers.create(method, student, None, **hparams)
    variables = d.variables_to_train()
    step = compile_step(strategy, d.train_step, make_optimizer(0.05, variables), variables)
  out = []
  batches = list(make_data().take(3))  # a new dataset: its first epoch, the same in every run
  for batch in strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(
      tf.nest.map_structure(lambda *x: tf.stack(x), *batches)).unbatch().batch(8)):
    terms, metrics = step(batch)
    out.append({k: float(v) for k, v in list(terms.items()) + list(metrics.items())})
  return out, [v.numpy() for v in student.weights + d.weights], d


@pytest.mark.parametrize("method,hparams,paired", [
    ("ONE", {}, False), pytest.param("KDCL", {"peers": None}, False, marks=pytest.mark.slow),
    pytest.param("CL", {}, False, marks=pytest.mark.slow),  # its 4-head tree, rescaled gradients
    ("CSKD", {}, True)])
def test_online_training_on_two_replicas_matches_one_device(mirrored, method, hparams, paired):
  data = _paired_data if paired else _plain_data
  one, w_one, _ = _run(tf.distribute.OneDeviceStrategy(ONE_DEVICE), method, data, **dict(hparams))
  two, w_two, _ = _run(mirrored, method, data, **dict(hparams))
  for a, b in zip(one, two):
    assert set(a) == set(b)
    for key in a:
      assert b[key] == pytest.approx(a[key], rel=2e-4, abs=1e-5), (key, a, b)
  assert len(w_one) == len(w_two)
  for a, b in zip(w_one, w_two):
    np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-5)


def test_one_gate_per_replica_equals_one_device_rows(mirrored):
  """The gate is per sample: each replica's gate weights are the one-device rows of its half."""
  batch = next(iter(_plain_data()))
  keras.utils.set_random_seed(0)
  with mirrored.scope():
    student = nets.create("resnet8", 10, synchronized_bn=True)
    student.build((None, 32, 32, 3))
    d = distillers.create("ONE", student, None)
  whole = d.gate_weights(d.shared(batch["image"], False)).numpy()

  @tf.function
  def gates(b):
    return mirrored.run(lambda x: d.gate_weights(d.shared(x["image"], False)), args=(b,))

  dist = next(iter(mirrored.experimental_distribute_dataset(
      tf.data.Dataset.from_tensors(batch))))
  parts = [g.numpy() for g in mirrored.experimental_local_results(gates(dist))]
  np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-5, atol=1e-6)


def test_cskd_pairs_stay_whole_in_each_replica(mirrored):
  ds = _paired_data()
  local = mirrored.experimental_distribute_dataset(ds)
  for batch in local:
    for labels in mirrored.experimental_local_results(batch["label"]):
      labels = labels.numpy()
      assert len(labels) == 4
      np.testing.assert_array_equal(labels[0::2], labels[1::2])


def test_views_split_by_rows_across_replicas(mirrored):
  """``views`` [B, K, H, W, C] is split on axis 0 like ``image``: each replica gets its rows with
  all their views, view 0 still its ``image``."""
  def load():
    return kd_data.load("synthetic", "train", batch_size=8, fraction=0.25, seed=0, views=2)[0]
  whole = next(iter(load()))
  parts = next(iter(mirrored.experimental_distribute_dataset(load())))
  views = [v.numpy() for v in mirrored.experimental_local_results(parts["views"])]
  images = [v.numpy() for v in mirrored.experimental_local_results(parts["image"])]
  assert [v.shape for v in views] == [(4, 2, 32, 32, 3)] * 2
  for v, x in zip(views, images):
    np.testing.assert_array_equal(v[:, 0], x)
  np.testing.assert_array_equal(np.concatenate(views), whole["views"].numpy())
