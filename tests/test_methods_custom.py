"""Methods with their own train_step: Sobolev, LwM, DML, BSS, CRD (METHODS.md §4).

Each method: created through the registry on a tiny pair, one compiled step gives finite terms,
gradients reach the student and every connector and never the frozen teacher, and a numerical check
against an independent NumPy/eager recomputation where the method allows one.
"""
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import nets
from kd_tf2 import distillers
from kd_tf2.distillers import StepContext
from kd_tf2.errors import UsageError

S_ARCH, T_ARCH, K, B = "resnet8", "resnet14", 10, 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_net(arch, num_classes=K):
  net = nets.create(arch, num_classes)
  net.build((None, 32, 32, 3))
  return net


@pytest.fixture(scope="module")
def pair():
  """One student and one teacher shared by the tests of this module (their weights drift)."""
  return make_net(S_ARCH), make_net(T_ARCH)


def make_batch(seed=0, batch=B, n_data=64):
  rng = np.random.default_rng(seed)
  return {"image": tf.constant(rng.normal(size=(batch, 32, 32, 3)).astype(np.float32)),
          "label": tf.constant(rng.integers(0, K, size=batch).astype(np.int64)),
          "index": tf.constant(rng.choice(n_data, size=batch, replace=False).astype(np.int64))}


class RecordingContext(StepContext):
  """The engine's StepContext, also keeping which variables got a gradient and its norm."""

  def minimize(self, loss, tape, variables=None):
    grads = self.gradients(loss, tape, variables)
    self.has_grad = [g is not None for g in grads]  # static: fixed when the step is traced
    self.grad_norms = tf.stack([tf.norm(g) if g is not None else tf.constant(-1.0)
                                for g in grads])
    self.apply(grads, variables)


def context(distiller, lr=0.01):
  variables = distiller.variables_to_train()
  optimizer = keras.optimizers.SGD(lr)
  optimizer.build(variables)
  return RecordingContext(optimizer, variables)


def compiled_step(distiller, ctx):
  @tf.function
  def step(batch):
    out = distiller.train_step(batch, ctx)
    return out.terms, out.logits, ctx.grad_norms
  return step


def snapshot(variables):
  return [v.numpy().copy() for v in variables]


def run_checked(distiller, batch, *, lr=0.01, trained_nets=None):
  """One compiled step; checks finiteness, gradient coverage and that the teacher is untouched.

  trained_nets: the nets whose variables must be trained (default: the student). Returns
  (terms as floats, logits, {id(variable): gradient norm}).
  """
  trained_nets = trained_nets or [distiller.student]
  teacher = distiller.teacher
  frozen = teacher not in trained_nets
  if frozen:
    assert not teacher.trainable_variables
    assert not {id(v) for v in teacher.weights} & {id(v) for v in distiller.variables_to_train()}
  before = snapshot(teacher.weights)
  ctx = context(distiller, lr)
  terms, logits, norms = compiled_step(distiller, ctx)(batch)
  terms = {k: float(v) for k, v in terms.items()}
  assert all(np.isfinite(v) for v in terms.values()), terms
  assert logits.shape == (batch["image"].shape[0], K)
  by_id = {id(v): (has, float(n)) for v, has, n in zip(ctx.variables, ctx.has_grad, norms)}
  required = [v for net in trained_nets for v in net.trainable_variables]
  required += list(distiller.trainable_variables)
  missing = [v.path for v in required if not by_id.get(id(v), (False,))[0]]
  assert not missing, f"no gradient for {missing[:5]}"
  if frozen:
    for old, new in zip(before, snapshot(teacher.weights)):
      np.testing.assert_array_equal(old, new)
  return terms, logits, {k: n for k, (_, n) in by_id.items()}


def label_logit_grad(net, images, labels, training, wrt_layer=None):
  """Eager reference: d sum_b z[b, y_b] / d (images or features[wrt_layer]) as NumPy."""
  x = tf.constant(images)
  with tf.GradientTape() as tape:
    tape.watch(x)
    out = net(x, training=training, features=True)
    target = tf.reduce_sum(out.logits * tf.one_hot(labels, K))
  source = x if wrt_layer is None else out.features[wrt_layer]
  return tape.gradient(target, source).numpy().astype(np.float64)


def np_unit_rows(x):
  x = x.reshape(x.shape[0], -1)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------------- Sobolev

def test_sobolev_matches_input_gradient_reference_and_trains_second_order(pair):
  student, teacher = pair
  d = distillers.create("sobolev", student, teacher, ce_weight=0.0)
  assert d.method_weight == 20.0
  batch = make_batch(1)
  x, y = batch["image"].numpy(), batch["label"].numpy()
  g_t = np_unit_rows(label_logit_grad(teacher, x, y, training=False))
  g_s = np_unit_rows(label_logit_grad(student, x, y, training=True))
  expected = 20.0 * np.mean((g_s - g_t) ** 2)
  terms, _, norms = run_checked(d, batch)
  np.testing.assert_allclose(terms["sobolev"], expected, rtol=1e-4)
  # With CE off the classifier kernel is reached only through the input gradient (second order).
  assert norms[id(student.classifier.kernel)] > 0


# ----------------------------------------------------------------------------------- LwM

def np_cam(grad):
  weights = grad.mean(axis=(1, 2), keepdims=True)
  return np_unit_rows(np.maximum((weights * grad).sum(axis=-1), 0.0))


def test_lwm_matches_grad_cam_reference_and_trains_second_order(pair):
  student, teacher = pair
  d = distillers.create("LwM", student, teacher, ce_weight=0.0)
  assert (d.method_weight, d.layer) == (0.4, 2)
  batch = make_batch(2)
  x, y = batch["image"].numpy(), batch["label"].numpy()
  cam_t = np_cam(label_logit_grad(teacher, x, y, training=False, wrt_layer=2))
  cam_s = np_cam(label_logit_grad(student, x, y, training=True, wrt_layer=2))
  assert cam_s.shape == (B, 16 * 16)
  expected = 0.4 * np.mean(np.abs(cam_s - cam_t))
  terms, _, norms = run_checked(d, batch)
  np.testing.assert_allclose(terms["lwm"], expected, rtol=1e-4)
  assert norms[id(student.classifier.kernel)] > 0


def test_lwm_refuses_a_layer_outside_both_nets(pair):
  with pytest.raises(UsageError, match=r"LwM layer=7.*resnet8.*resnet14"):
    distillers.create("LwM", *pair, layer=7)


@pytest.mark.parametrize("method", ["Sobolev", "LwM", "DML", "BSS"])
def test_logit_methods_refuse_different_class_counts(method, pair):
  other = make_net(S_ARCH, num_classes=K + 1)
  with pytest.raises(UsageError, match=rf"{method} needs the same classes.*{S_ARCH}"):
    distillers.create(method, pair[0], other)


# ----------------------------------------------------------------------------------- DML

def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(axis=1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_kl_batchmean(logits_p, logits_q):
  """(1/B) sum_b KL(softmax(p_b) || softmax(q_b))."""
  lp, lq = np_log_softmax(logits_p), np_log_softmax(logits_q)
  return float(np.sum(np.exp(lp) * (lp - lq)) / lp.shape[0])


def test_dml_trains_both_nets_from_one_forward_pass(pair):
  student = pair[0]
  peer = make_net("resnet8")
  d = distillers.create("DML", student, peer)
  assert peer.trainable and d.peer is peer
  assert d.extra_exports() == {"peer": peer}
  assert {id(v) for v in peer.trainable_variables} <= {id(v) for v in d.variables_to_train()}
  batch = make_batch(3)
  x = batch["image"]
  z_s = student(x, training=True).numpy()
  z_p = peer(x, training=True).numpy()
  peer_before = snapshot(peer.trainable_variables)
  terms, _, _ = run_checked(d, batch, trained_nets=[student, peer])
  np.testing.assert_allclose(terms["dml"], np_kl_batchmean(z_p, z_s), rtol=1e-4)
  np.testing.assert_allclose(terms["peer_dml"], np_kl_batchmean(z_s, z_p), rtol=1e-4)
  changed = [not np.array_equal(a, b) for a, b in zip(peer_before,
                                                      snapshot(peer.trainable_variables))]
  assert all(changed)
