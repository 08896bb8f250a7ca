"""kd_tf2.losses.logits against straightforward NumPy versions of METHODS.md §2.1, 2.2, 2.15, 2.16, 2.20."""
import numpy as np
import pytest
import tensorflow as tf

from kd_tf2 import losses
from kd_tf2.losses import logits as L

B, K = 64, 100
RTOL = 1e-4


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  s = (rng.normal(size=(B, K)) * 2.0).astype(np.float32)
  t = (rng.normal(size=(B, K)) * 3.0 + rng.normal(size=(1, K))).astype(np.float32)
  y = rng.integers(0, K, size=B).astype(np.int64)
  return s, t, y


# --------------------------------------------------------------------------- NumPy references

def np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max())
  return e / e.sum()


def np_kl(p, q):
  """sum_k p_k (log p_k - log q_k), 0 log 0 = 0."""
  total = 0.0
  for pk, qk in zip(p, q):
    if pk > 0:
      total += pk * (np.log(pk) - np.log(qk))
  return total


def np_soft_target(s, t, temp):
  return temp ** 2 * sum(np_kl(np_softmax(t[b] / temp), np_softmax(s[b] / temp))
                         for b in range(len(s))) / len(s)


def np_dkd(s, t, y, alpha, beta, temp):
  tckd = nckd = 0.0
  for b in range(len(s)):
    ps, pt = np_softmax(s[b] / temp), np_softmax(t[b] / temp)
    bs = np.array([ps[y[b]], 1.0 - ps[y[b]]])
    bt = np.array([pt[y[b]], 1.0 - pt[y[b]]])
    tckd += np_kl(bt, bs)
    # non-target distribution: softmax over the remaining K - 1 classes
    nckd += np_kl(np_softmax(np.delete(t[b], y[b]) / temp), np_softmax(np.delete(s[b], y[b]) / temp))
  n = len(s)
  return alpha * temp ** 2 * tckd / n + beta * temp ** 2 * nckd / n


def np_pearson(u, v):
  u = u - u.mean()
  v = v - v.mean()
  return float(u @ v) / (np.sqrt(u @ u) * np.sqrt(v @ v) + 1e-8)


def np_dist(s, t, beta, gamma, temp):
  ys = np.stack([np_softmax(r / temp) for r in s])
  yt = np.stack([np_softmax(r / temp) for r in t])
  inter = 1.0 - np.mean([np_pearson(ys[b], yt[b]) for b in range(ys.shape[0])])
  intra = 1.0 - np.mean([np_pearson(ys[:, k], yt[:, k]) for k in range(ys.shape[1])])
  return temp ** 2 * (beta * inter + gamma * intra)


# --------------------------------------------------------------------------- reference checks

@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_soft_target_matches_numpy(data, temp):
  s, t, _ = data
  got = float(losses.soft_target(s, t, temperature=temp))
  np.testing.assert_allclose(got, np_soft_target(s, t, temp), rtol=RTOL)


def test_logit_mse_matches_numpy(data):
  s, t, _ = data
  want = np.mean((s.astype(np.float64) - t) ** 2)
  np.testing.assert_allclose(float(losses.logit_mse(s, t)), want, rtol=RTOL)


@pytest.mark.parametrize("alpha,beta,temp", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_matches_numpy(data, alpha, beta, temp):
  s, t, y = data
  got = float(losses.dkd(s, t, y, alpha=alpha, beta=beta, temperature=temp))
  np.testing.assert_allclose(got, np_dkd(s, t, y, alpha, beta, temp), rtol=RTOL)


@pytest.mark.parametrize("beta,gamma,temp", [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_matches_numpy(data, beta, gamma, temp):
  s, t, _ = data
  got = float(losses.dist(s, t, beta=beta, gamma=gamma, temperature=temp))
  np.testing.assert_allclose(got, np_dist(s, t, beta, gamma, temp), rtol=RTOL)


def test_dml_kl_matches_numpy(data):
  s, t, _ = data
  want = sum(np_kl(np_softmax(t[b]), np_softmax(s[b])) for b in range(B)) / B
  np.testing.assert_allclose(float(losses.dml_kl(s, t)), want, rtol=RTOL)


# --------------------------------------------------------------------------- properties

def test_zero_when_student_equals_teacher(data):
  s, _, y = data
  assert abs(float(losses.soft_target(s, s))) < 1e-6
  assert float(losses.logit_mse(s, s)) == 0.0
  assert abs(float(losses.dkd(s, s, y))) < 1e-5
  assert abs(float(losses.dml_kl(s, s))) < 1e-6
  # Pearson with 1e-8 added to the norms: 1 - rho is tiny but not exactly 0
  assert abs(float(losses.dist(s, s))) < 1e-4


def test_kl_direction_is_teacher_to_student():
  # a sharp teacher and a flat student: KL(t || s) and KL(s || t) differ a lot
  s = np.zeros((2, 5), np.float32)
  t = np.array([[8.0, 0, 0, 0, 0], [0, 0, 0, 0, 8.0]], np.float32)
  forward = np.mean([np_kl(np_softmax(t[b]), np_softmax(s[b])) for b in range(2)])
  reverse = np.mean([np_kl(np_softmax(s[b]), np_softmax(t[b])) for b in range(2)])
  assert abs(forward - reverse) > 0.5
  np.testing.assert_allclose(float(losses.dml_kl(s, t)), forward, rtol=1e-5)
  np.testing.assert_allclose(float(losses.soft_target(s, t, temperature=1.0)), forward, rtol=1e-5)


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_soft_target_gradient_is_T_times_prob_gap(data, temp):
  # d/dz_s of T^2 KL(p_t || p_s) / B = T (p_s - p_t) / B: checks T^2, batchmean and direction
  s, t, _ = data
  zs = tf.constant(s)
  with tf.GradientTape() as tape:
    tape.watch(zs)
    loss = losses.soft_target(zs, t, temperature=temp)
  grad = tape.gradient(loss, zs).numpy()
  p_s = np.stack([np_softmax(r / temp) for r in s])
  p_t = np.stack([np_softmax(r / temp) for r in t])
  np.testing.assert_allclose(grad, temp * (p_s - p_t) / B, rtol=1e-3, atol=1e-8)


def test_logit_losses_ignore_a_constant_shift_per_row(data):
  s, t, y = data
  shift = np.linspace(-5, 5, B).astype(np.float32)[:, None]
  for fn in (losses.soft_target, losses.dml_kl, losses.dist):
    np.testing.assert_allclose(float(fn(s + shift, t)), float(fn(s, t)), rtol=1e-4)
  np.testing.assert_allclose(float(losses.dkd(s + shift, t, y)), float(losses.dkd(s, t, y)),
                             rtol=1e-4)


def test_dkd_splits_into_target_and_non_target_parts(data):
  s, t, y = data
  tckd = float(losses.dkd(s, t, y, alpha=1.0, beta=0.0))
  nckd = float(losses.dkd(s, t, y, alpha=0.0, beta=1.0))
  np.testing.assert_allclose(float(losses.dkd(s, t, y, alpha=2.0, beta=3.0)),
                             2.0 * tckd + 3.0 * nckd, rtol=1e-5)
  # moving only the student's target logit changes TCKD but leaves NCKD untouched
  s2 = s.copy()
  s2[np.arange(B), y] += 3.0
  np.testing.assert_allclose(float(losses.dkd(s2, t, y, alpha=0.0, beta=1.0)), nckd, rtol=1e-5)
  assert abs(float(losses.dkd(s2, t, y, alpha=1.0, beta=0.0)) - tckd) > 1e-2


def test_dkd_depends_on_labels(data):
  s, t, y = data
  assert abs(float(losses.dkd(s, t, y)) - float(losses.dkd(s, t, (y + 1) % K))) > 1e-3


def test_dist_is_invariant_to_class_and_batch_permutations(data):
  s, t, _ = data
  rng = np.random.default_rng(1)
  cls, rows = rng.permutation(K), rng.permutation(B)
  base = float(losses.dist(s, t))
  np.testing.assert_allclose(float(losses.dist(s[:, cls], t[:, cls])), base, rtol=1e-5)
  np.testing.assert_allclose(float(losses.dist(s[rows], t[rows])), base, rtol=1e-5)
  # the inter-class term alone is per-sample: permuting the teacher's rows changes it
  assert float(losses.dist(s, t[rows], beta=1.0, gamma=0.0)) != pytest.approx(
      float(losses.dist(s, t, beta=1.0, gamma=0.0)), rel=1e-3)


def test_teacher_and_peer_get_no_gradient(data):
  s, t, y = data
  zt = tf.constant(t)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(zt)
    values = [losses.soft_target(s, zt), losses.logit_mse(s, zt), losses.dkd(s, zt, y),
              losses.dist(s, zt), losses.dml_kl(s, zt)]
  for v in values:
    assert tape.gradient(v, zt) is None


def _all_losses(s, t, y):
  return [losses.soft_target(s, t), losses.logit_mse(s, t), losses.dkd(s, t, y),
          losses.dist(s, t), losses.dml_kl(s, t)]


@pytest.mark.parametrize("case", ["zeros", "batch_of_one", "saturated", "equal"])
def test_gradients_are_finite_at_degenerate_inputs(case):
  rng = np.random.default_rng(2)
  if case == "zeros":
    s, t = np.zeros((4, 10), np.float32), np.zeros((4, 10), np.float32)
  elif case == "batch_of_one":
    s, t = rng.normal(size=(1, 10)).astype(np.float32), rng.normal(size=(1, 10)).astype(np.float32)
  elif case == "saturated":  # probabilities underflow to exactly 0 in float32
    s = (rng.normal(size=(4, 10)) * 1e4).astype(np.float32)
    t = (rng.normal(size=(4, 10)) * 1e4).astype(np.float32)
  else:
    s = rng.normal(size=(4, 10)).astype(np.float32)
    t = s.copy()
  y = np.arange(s.shape[0]) % 10
  zs = tf.constant(s)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(zs)
    values = _all_losses(zs, t, y)
  for v in values:
    assert np.isfinite(float(v))
    g = tape.gradient(v, zs)
    assert g is not None and np.all(np.isfinite(g.numpy()))


def test_xla_and_tf_function_match_eager(data):
  s, t, y = data

  def run(zs, zt, labels):
    with tf.GradientTape() as tape:
      tape.watch(zs)
      values = _all_losses(zs, zt, labels)
      total = tf.add_n(values)
    return values, tape.gradient(total, zs)

  eager_vals, eager_grad = run(tf.constant(s), tf.constant(t), tf.constant(y))
  # jit-compiled, and a plain graph function with an unknown batch size
  spec = [tf.TensorSpec([None, K], tf.float32), tf.TensorSpec([None, K], tf.float32),
          tf.TensorSpec([None], tf.int64)]
  for compiled in (tf.function(run, jit_compile=True), tf.function(run, input_signature=spec)):
    vals, grad = compiled(tf.constant(s), tf.constant(t), tf.constant(y))
    for a, b in zip(vals, eager_vals):
      assert a.dtype == tf.float32 and a.shape == ()
      np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
    scale = np.abs(eager_grad.numpy()).max()
    np.testing.assert_allclose(grad.numpy(), eager_grad.numpy(), rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_low_precision_inputs_are_computed_in_float32(data, dtype):
  s, t, y = data
  s_lo, t_lo = tf.cast(s, dtype), tf.cast(t, dtype)
  s32, t32 = tf.cast(s_lo, tf.float32), tf.cast(t_lo, tf.float32)
  for a, b in zip(_all_losses(s_lo, t_lo, y), _all_losses(s32, t32, y)):
    assert a.dtype == tf.float32
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def test_shape_mismatch_errors_name_both_shapes():
  s, t = np.zeros((4, 10), np.float32), np.zeros((4, 11), np.float32)
  for fn in (losses.soft_target, losses.logit_mse, losses.dist, losses.dml_kl):
    with pytest.raises(ValueError, match=r"\(4, 10\).*\(4, 11\)"):
      fn(s, t)
  with pytest.raises(ValueError, match=r"\(4, 10\).*\(4, 11\)"):
    losses.dkd(s, t, np.zeros(4, np.int64))
  with pytest.raises(ValueError, match=r"labels shape \(3,\)"):
    losses.dkd(s, s, np.zeros(3, np.int64))
  with pytest.raises(ValueError, match=r"\[B, K\]"):
    losses.soft_target(np.zeros((4, 2, 5), np.float32), np.zeros((4, 2, 5), np.float32))


def test_module_exports():
  assert set(L.__all__) == {"soft_target", "logit_mse", "dkd", "dist", "dml_kl", "kl_without_t2",
                            "kl_rows_sum"}
  for name in L.__all__:
    assert getattr(losses, name) is getattr(L, name)


def test_kl_rows_sum_matches_numpy():
  """MHGD's attention KL: the sum over every row and entry of p_x (log p_x - log p_y)."""
  rng = np.random.default_rng(22)
  x, y = rng.normal(0, 2, (3, 4, 6)), rng.normal(0, 2, (3, 4, 6))

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  expected = (np.exp(log_softmax(x)) * (log_softmax(x) - log_softmax(y))).sum()
  got = L.kl_rows_sum(tf.constant(x, tf.float32), tf.constant(y, tf.float32))
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)

