"""Methods with a step of their own (Sobolev, LwM, DML, BSS) and CRD (METHODS.md §4).

Each method: created through the registry on a tiny pair, one compiled step gives finite terms,
gradients reach the student and every connector and never the frozen teacher, and a numerical check
against an independent NumPy/eager recomputation where the method allows one.
"""
import keras
import numpy as np
import pytest
import tensorflow as tf

import nets
from kd_tf2 import distillers
from kd_tf2.distillers import StepContext
from kd_tf2.errors import UsageError

S_ARCH, T_ARCH, K, B = "resnet8", "resnet14", 10, 8


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
    ctx.optimizer.apply_gradients(ctx.take_pending())
    return out.terms, out.logits, ctx.grad_norms
  return step


def snapshot(variables):
  return [v.numpy().copy() for v in variables]


def run_checked(distiller, batch, *, lr=0.01, trained_nets=None):
  """One compiled step; checks finiteness, gradient coverage and that the teacher is untouched.

  trained_nets: the nets whose variables must be trained (default: the student). Returns
  (terms as floats, logits, {id(variable): gradient norm}, the compiled step).
  """
  trained_nets = trained_nets or [distiller.student]
  teacher = distiller.teacher
  frozen = teacher not in trained_nets
  if frozen:
    assert not teacher.trainable_variables
    assert not {id(v) for v in teacher.weights} & {id(v) for v in distiller.variables_to_train()}
  before = snapshot(teacher.weights)
  ctx = context(distiller, lr)
  step = compiled_step(distiller, ctx)
  terms, logits, norms = step(batch)
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
  return terms, logits, {k: n for k, (_, n) in by_id.items()}, step


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
  terms, _, norms, _ = run_checked(d, batch)
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
  terms, _, norms, _ = run_checked(d, batch)
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
  terms, _, _, _ = run_checked(d, batch, trained_nets=[student, peer])
  np.testing.assert_allclose(terms["dml"], np_kl_batchmean(z_p, z_s), rtol=1e-4)
  np.testing.assert_allclose(terms["peer_dml"], np_kl_batchmean(z_s, z_p), rtol=1e-4)
  changed = [not np.array_equal(a, b) for a, b in zip(peer_before,
                                                      snapshot(peer.trainable_variables))]
  assert all(changed)


# ----------------------------------------------------------------------------------- BSS

def zoo_bss_lambda(epoch_1based, epochs, lambda_kd=2.0):
  """The Zoo's schedule, written with its 1-based epoch."""
  if epoch_1based <= 10:
    return 0.0
  return max(lambda_kd * (1 - 5 / 4 * (epoch_1based - 1) / epochs), 0.0)


def test_bss_schedule_follows_the_zoo(pair):
  d = distillers.create("BSS", *pair)
  assert (d.method_weight, d.temperature, d.attack_size) == (2.0, 3.0, 32)
  d.epochs = 100
  for epoch in (0, 9, 10, 11, 50, 79, 80, 99):
    d.epoch.assign(float(epoch))
    np.testing.assert_allclose(float(d.weight()), zoo_bss_lambda(epoch + 1, 100), atol=1e-6)


@pytest.mark.parametrize("bad", [dict(attack_size=0), dict(attack_steps=-1),
                                 dict(step_size=0.0), dict(warmup_epochs=1.5)])
def test_bss_refuses_bad_attack_settings(bad, pair):
  with pytest.raises(UsageError, match=f"{next(iter(bad))}=.*BSS"):
    distillers.create("BSS", *pair, **bad)


def test_bss_selects_the_candidates_with_the_largest_disagreement():
  from kd_tf2.distillers.bss import select_candidates
  rng = np.random.default_rng(4)
  labels = np.array([0, 1, 2, 0, 1, 2], np.int64)
  t = rng.normal(size=(6, 3)).astype(np.float32)
  s = rng.normal(size=(6, 3)).astype(np.float32)
  t[np.arange(6), labels] += 6.0
  s[np.arange(6), labels] += rng.uniform(4.0, 6.0, size=6).astype(np.float32)
  s[4, 1] -= 20.0  # sample 4: student wrong
  t[5, 2] -= 20.0  # sample 5: teacher wrong
  correct = (s.argmax(1) == labels) & (t.argmax(1) == labels)
  assert correct.tolist() == [True] * 4 + [False] * 2
  p_t, p_s = np.exp(np_log_softmax(t)), np.exp(np_log_softmax(s))
  diff = (p_t - p_s) ** 2
  diff[np.arange(6), labels] = 0.0
  ranked = [i for i in np.argsort(-diff.sum(axis=1)) if correct[i]]
  rows, valid = select_candidates(tf.constant(s), tf.constant(t), tf.constant(labels), 3)
  assert rows.numpy().tolist() == ranked[:3] and valid.numpy().all()
  rows, valid = select_candidates(tf.constant(s), tf.constant(t), tf.constant(labels), 6)
  assert rows.numpy()[:4].tolist() == ranked
  assert valid.numpy().tolist() == [True] * 4 + [False] * 2


def test_bss_attack_class_avoids_the_top_class_and_follows_the_teacher():
  from kd_tf2.distillers.bss import sample_attack_class
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
  draws = sample_attack_class(tf.constant(np.repeat(logits, 4000, axis=0))).numpy()
  freq = np.bincount(draws, minlength=4) / draws.size
  np.testing.assert_allclose(freq, [0.0, 0.6, 0.3, 0.1], atol=0.03)
  assert freq[0] == 0.0


def np_attack_step(x, w, target, attack, active, step_size=0.3, eps=1e-4):
  """One Zoo BSS step for the linear model z = flatten(x) @ w."""
  flat = x.reshape(x.shape[0], -1).astype(np.float64)
  z = flat @ w
  p = np.exp(np_log_softmax(z))
  out = x.astype(np.float64).copy()
  for a in range(x.shape[0]):
    if not (active[a] and np.argmax(z[a]) == target[a]):
      continue
    dz = p[a, attack[a]] * (np.eye(w.shape[1])[attack[a]] - p[a])
    dz -= p[a, target[a]] * (np.eye(w.shape[1])[target[a]] - p[a])
    g = w @ dz
    move = step_size * (p[a, target[a]] - p[a, attack[a]] + eps) * g / np.linalg.norm(g)
    out[a] = np.clip(flat[a] + move, -2.5, 2.5).reshape(x.shape[1:])
  return out


def test_bss_attack_matches_one_zoo_step_and_stops_when_nothing_moves():
  from kd_tf2.distillers.bss import boundary_attack
  rng = np.random.default_rng(5)
  w = rng.normal(size=(2 * 2 * 3, 4)).astype(np.float32)
  x = rng.normal(size=(4, 2, 2, 3)).astype(np.float32)
  target = np.argmax(x.reshape(4, -1) @ w, axis=1).astype(np.int32)
  attack = (target + 1) % 4
  target[3] = (target[3] + 2) % 4  # row 3 is no longer predicted as its target: it stays
  active = np.array([True, True, False, True])  # row 2 is not a candidate: it stays

  def linear(images):
    return tf.reshape(images, [tf.shape(images)[0], -1]) @ w

  got = boundary_attack(linear, tf.constant(x), tf.constant(target), tf.constant(attack),
                        tf.constant(active), steps=1).numpy()
  np.testing.assert_allclose(got, np_attack_step(x, w, target, attack, active), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_array_equal(got[2:], x[2:])
  assert not np.allclose(got[:2], x[:2])
  # Out-of-range pixels are left alone when no row moves (the Zoo breaks before clamping).
  big = x * 10.0
  idle = boundary_attack(linear, tf.constant(big), tf.constant(target), tf.constant(attack),
                         tf.constant([False] * 4), steps=10).numpy()
  np.testing.assert_array_equal(idle, big)
  many = boundary_attack(linear, tf.constant(big), tf.constant(target), tf.constant(attack),
                         tf.constant(active), steps=10).numpy()
  assert np.abs(many[:2]).max() <= 2.5


def test_bss_kl_is_masked_batch_mean_without_t2():
  from kd_tf2.losses import kl_without_t2
  rng = np.random.default_rng(6)
  s, t = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
  mask = np.array([True, False, True, True, False])
  expected = np_kl_batchmean(t[mask] / 3.0, s[mask] / 3.0)
  got = kl_without_t2(tf.constant(s), tf.constant(t), 3.0, tf.constant(mask))
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_bss_step_attacks_after_warmup_and_trains_the_student(pair):
  student, teacher = pair
  d = distillers.create("BSS", student, teacher, attack_size=5)
  d.epochs = 100
  d.epoch.assign(10.0)
  # Make every sample a candidate: both nets favour class 3, which is every label.
  biases = [net.classifier.bias for net in (student, teacher)]
  saved = snapshot(biases)
  try:
    batch = dict(make_batch(7), label=tf.fill([B], tf.constant(3, tf.int64)))
    for net, b in zip((student, teacher), biases):
      # The shared nets drift across tests: lift class 3 by whatever margin this batch needs.
      logits = net(batch["image"]).numpy()
      margin = float((logits.max(axis=1) - logits[:, 3]).max()) + 2.0
      b.assign(b + margin * tf.one_hot(3, K))
    assert (np.argmax(teacher(batch["image"]).numpy(), axis=1) == 3).all()
    terms, _, _, step = run_checked(d, batch)
    assert terms["bss"] > 0
    d.epoch.assign(5.0)  # warm-up: no attack, no term
    assert float(step(batch)[0]["bss"]) == 0.0
  finally:
    for b, value in zip(biases, saved):
      b.assign(value)


# ----------------------------------------------------------------------------------- CRD

def np_contrast(scores, n_data, eps=1e-7):
  """RepDistiller ContrastLoss (Eq. 18) on [B, K+1] scores."""
  scores = np.asarray(scores, np.float64)
  c = (scores.shape[1] - 1) / n_data
  pos, neg = scores[:, 0], scores[:, 1:]
  return -(np.log(pos / (pos + c + eps)).sum() + np.log(c / (neg + c + eps)).sum()) / len(scores)


def np_embed(layer, e):
  v = e.astype(np.float64) @ layer.kernel.numpy() + layer.bias.numpy()
  return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_crd_sampler_draws_uniformly_from_other_training_classes():
  from kd_tf2.distillers.crd import NegativeSampler
  train_labels = np.array([2, 0, -1, 1, 0, 2, 2, -1, 1, 0, 0, 1])
  sampler = NegativeSampler(train_labels)
  assert (sampler.n_data, sampler.n_active, sampler.num_classes) == (12, 10, 3)
  labels = np.array([0, 1, 2] * 200)
  draws = sampler(tf.constant(labels), 300).numpy()
  assert draws.shape == (600, 300)
  for c in range(3):
    got = draws[labels == c].ravel()
    allowed = np.flatnonzero((train_labels >= 0) & (train_labels != c))
    assert set(np.unique(got)) == set(allowed)
    freq = np.bincount(got, minlength=12)[allowed] / got.size
    np.testing.assert_allclose(freq, 1.0 / allowed.size, atol=0.01)


def test_crd_negatives_are_drawn_without_replacement_like_repdistiller():
  """RepDistiller's loader: np.random.choice(other-class indices, K, replace=K > count)."""
  from kd_tf2.distillers.crd import NegativeSampler
  tf.random.set_seed(0)
  train_labels = np.repeat(np.arange(4), 25)          # 75 other-class samples per class
  sampler = NegativeSampler(train_labels)
  labels = np.array([0, 1, 2, 3] * 150)
  draws = sampler(tf.constant(labels), 60).numpy()    # K = 60 <= 75: no duplicates in a row
  assert draws.shape == (600, 60)
  assert all(len(set(row)) == 60 for row in draws)
  assert not np.any(train_labels[draws] == labels[:, None])
  freq = np.bincount(draws[labels == 0].ravel(), minlength=100)[25:] / (150 * 60)
  np.testing.assert_allclose(freq, 1.0 / 75, atol=0.005)  # uniform (4 sigma) over 75 candidates
  many = sampler(tf.constant(labels[:8]), 90).numpy()     # K = 90 > 75: with replacement
  assert many.shape == (8, 90) and not np.any(train_labels[many] == labels[:8, None])
  old = sampler.with_replacement(tf.constant(labels), 60).numpy()
  assert any(len(set(row)) < 60 for row in old)           # the replacement=True draw repeats


def test_crd_matches_reference_on_a_deterministic_two_sample_split(pair):
  student, teacher = pair
  d = distillers.create("CRD", student, teacher, train_labels=np.array([0, 1]), n_data=2)
  assert (d.method_weight, d.feat_dim, d.nce_t, d.nce_m) == (0.8, 128, 0.07, 0.5)
  assert d.num_negatives == 1  # 16384 capped at n_data - 1
  batch = dict(make_batch(8, batch=2), label=tf.constant([0, 1], tf.int64),
               index=tf.constant([0, 1], tf.int64))
  x = batch["image"]
  v_s = np_embed(d.embed_s, student(x, training=True, features=True).embedding.numpy())
  v_t = np_embed(d.embed_t, teacher(x, training=False, features=True).embedding.numpy())
  bank_s, bank_t = d.bank_s.numpy().astype(np.float64), d.bank_t.numpy().astype(np.float64)
  idx = np.array([[0, 1], [1, 0]])  # own index, then the only sample of the other class
  out_s = np.exp(np.einsum("bkd,bd->bk", bank_t[idx], v_s) / 0.07)
  out_t = np.exp(np.einsum("bkd,bd->bk", bank_s[idx], v_t) / 0.07)
  z = np.array([out_s.mean() * 2, out_t.mean() * 2])
  expected = 0.8 * (np_contrast(out_s / z[0], 2) + np_contrast(out_t / z[1], 2))
  assert not d.z_fixed.numpy()
  terms, _, _, step = run_checked(d, batch, lr=0.0)
  np.testing.assert_allclose(terms["crd"], expected, rtol=1e-4)
  np.testing.assert_allclose(d.z.numpy(), z, rtol=1e-4)
  assert d.z_fixed.numpy()
  for bank, old, v in ((d.bank_s, bank_s, v_s), (d.bank_t, bank_t, v_t)):
    new = 0.5 * old + 0.5 * v
    np.testing.assert_allclose(bank.numpy(), new / np.linalg.norm(new, axis=1, keepdims=True),
                               rtol=1e-4, atol=1e-6)
  # Z stays fixed on the next batch although the scores changed.
  step(dict(batch, image=x * 2.0))
  np.testing.assert_allclose(d.z.numpy(), z, rtol=1e-4)


def test_crd_state_survives_a_checkpoint_mid_run(pair, tmp_path):
  student, teacher = pair
  labels = np.random.default_rng(9).integers(0, K, size=64)
  d = distillers.create("CRD", student, teacher, train_labels=labels, kd_weight=1.0)
  ctx = context(d)
  step = compiled_step(d, ctx)
  batch = dict(make_batch(10), label=tf.constant(labels[make_batch(10)["index"].numpy()]))
  terms, _, _ = step(batch)
  assert "kd" in terms and "crd" in terms  # the CRD+KD variant is just kd_weight = 1
  path = tf.train.Checkpoint(distiller=d).write(str(tmp_path / "crd"))
  saved = {v.path: v.numpy().copy() for v in d.weights}
  step(dict(make_batch(11), label=batch["label"]))
  assert not np.array_equal(d.bank_s.numpy(), saved["distiller_crd/bank_s"])

  fresh = distillers.create("CRD", student, teacher, train_labels=labels, kd_weight=1.0)
  assert not fresh.z_fixed.numpy()
  tf.train.Checkpoint(distiller=fresh).read(path).assert_consumed()
  for v in fresh.weights:
    np.testing.assert_array_equal(v.numpy(), saved[v.path], err_msg=v.path)
  assert fresh.z_fixed.numpy()
  compiled_step(fresh, context(fresh))(batch)
  np.testing.assert_array_equal(fresh.z.numpy(), saved["distiller_crd/z"])


def test_crd_refuses_missing_or_inconsistent_split_information(pair):
  with pytest.raises(UsageError, match="CRD needs train_labels"):
    distillers.create("CRD", *pair)
  with pytest.raises(UsageError, match=r"n_data=10.*len\(train_labels\) = 4"):
    distillers.create("CRD", *pair, train_labels=[0, 1, 0, 1], n_data=10)
  with pytest.raises(UsageError, match="at least 2 classes"):
    distillers.create("CRD", *pair, train_labels=[3, 3, -1, 3])
  with pytest.raises(UsageError, match="must be integers"):
    distillers.create("CRD", *pair, train_labels=[0.0, 1.0])
  with pytest.raises(UsageError, match=r"nce_m=1\.0"):
    distillers.create("CRD", *pair, train_labels=[0, 1], nce_m=1.0)


