"""Tests for kd_tf2.losses.features against plain NumPy versions of the METHODS.md formulas."""
import math

import numpy as np
import pytest
import tensorflow as tf

from kd_tf2 import losses
from kd_tf2.losses import features as F

B = 32
RTOL = 1e-4


def _rng(seed=0):
  return np.random.default_rng(seed)


def _maps(rng, shape, relu=False):
  x = rng.standard_normal(shape).astype(np.float32)
  return np.maximum(x, 0) if relu else x


# --------------------------------------------------------------------------- NumPy references
# Written from METHODS.md (float64), independent of the TF code.

def np_adaptive_pool(x, out_h, out_w):
  """METHODS.md §0: cell i covers rows floor(i*H/h) .. ceil((i+1)*H/h)-1."""
  _, h_in, w_in, _ = x.shape
  out = np.zeros((x.shape[0], out_h, out_w, x.shape[3]))
  for i in range(out_h):
    r0, r1 = math.floor(i * h_in / out_h), math.ceil((i + 1) * h_in / out_h)
    for j in range(out_w):
      c0, c1 = math.floor(j * w_in / out_w), math.ceil((j + 1) * w_in / out_w)
      out[:, i, j, :] = x[:, r0:r1, c0:c1, :].mean(axis=(1, 2))
  return out


def np_pool_to_match(a, b):
  a, b = a.astype(np.float64), b.astype(np.float64)
  if a.shape[1] > b.shape[1]:
    a = np_adaptive_pool(a, b.shape[1], b.shape[1])
  elif b.shape[1] > a.shape[1]:
    b = np_adaptive_pool(b, a.shape[1], a.shape[1])
  return a, b


def np_normalize(x, axis):
  return x / np.maximum(np.sqrt((x ** 2).sum(axis=axis, keepdims=True)), 1e-12)


def np_at(s, t, p):
  s, t = np_pool_to_match(s, t)
  q = [np_normalize((np.abs(f) ** p).mean(axis=3).reshape(len(f), -1), 1) for f in (s, t)]
  return ((q[0] - q[1]) ** 2).mean()


def np_nst(s, t):
  s, t = np_pool_to_match(s, t)
  n = [np_normalize(f.reshape(len(f), -1, f.shape[3]).transpose(0, 2, 1), 2) for f in (s, t)]
  kernel = lambda x, y: np.einsum("bip,bjp->bij", x, y) ** 2  # noqa: E731
  return kernel(n[1], n[1]).mean() + kernel(n[0], n[0]).mean() - 2 * kernel(n[0], n[1]).mean()


def np_ab(s, t, m):
  s, t = s.astype(np.float64), t.astype(np.float64)
  loss = ((s + m) ** 2 * ((s > -m) & (t <= 0)) + (s - m) ** 2 * ((s <= m) & (t > 0)))
  return loss.sum() / len(s)


def np_ofd_margin(gamma, beta):
  out = []
  for g, b in zip(gamma.astype(np.float64), beta.astype(np.float64)):
    sigma, mu = abs(g), b
    cdf = 0.5 * (1 + math.erf((-mu / sigma) / math.sqrt(2)))
    if cdf > 0.001:
      pdf = math.exp(-(mu / sigma) ** 2 / 2) / math.sqrt(2 * math.pi)
      out.append(mu - sigma * pdf / cdf)
    else:
      out.append(-3 * sigma)
  return np.array(out)


def np_ofd_distance(s, t, margin):
  s, t = np_pool_to_match(s, t)
  target = np.maximum(t, margin.astype(np.float64))
  mask = (s > target) | (target > 0)
  return (mask * (s - target) ** 2).sum() / len(s)


def np_vid(target, mean, alpha, eps):
  var = np.log1p(np.exp(alpha.astype(np.float64))) + eps
  return (0.5 * ((mean.astype(np.float64) - target) ** 2 / var + np.log(var))).mean()


def np_ft(s, t, p):
  if s.ndim == 4:
    s, t = np_pool_to_match(s, t)
  s_hat = np_normalize(s.reshape(len(s), -1).astype(np.float64), 1)
  t_hat = np_normalize(t.reshape(len(t), -1).astype(np.float64), 1)
  return (np.abs(s_hat - t_hat) ** p).mean()


def np_afd(s, t, rho):
  def norm(f):
    f = f.astype(np.float64)
    return f / (np.sqrt((f ** 2).sum(axis=(1, 2), keepdims=True)) + 1e-6)
  per_channel = ((norm(s) - norm(t)) ** 2).mean(axis=(1, 2))
  return (rho * per_channel).sum() / len(s)


def _close(actual, expected, rtol=RTOL):
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=0)


# --------------------------------------------------------------------------- inputs per function

def _bn_params(rng, c):
  gamma = rng.uniform(0.2, 2.0, c) * rng.choice([-1, 1], c)        # sign must not matter
  beta = rng.uniform(-2.0, 2.0, c)
  beta[:4] = np.abs(gamma[:4]) * np.array([3.2, 4.0, 6.0, 2.9])     # fallback and its border
  return gamma.astype(np.float32), beta.astype(np.float32)


def _case(name, rng):
  """(positional args, keyword args, numpy reference value) for each function."""
  if name == "attention_transfer":
    s, t = _maps(rng, (B, 16, 16, 64), True), _maps(rng, (B, 8, 8, 128), True)
    return (s, t), {}, np_at(s, t, 2.0)
  if name == "nst":
    s, t = _maps(rng, (B, 16, 16, 64), True), _maps(rng, (B, 8, 8, 128), True)
    return (s, t), {}, np_nst(s, t)
  if name == "activation_boundary":
    s, t = 1.5 * _maps(rng, (B, 8, 8, 128)), _maps(rng, (B, 8, 8, 128))
    return (s, t), {"margin": 1.0}, np_ab(s, t, 1.0)
  if name == "ofd_margin":
    gamma, beta = _bn_params(rng, 128)
    return (gamma, beta), {}, np_ofd_margin(gamma, beta)
  if name == "ofd_distance":
    s, t = _maps(rng, (B, 8, 8, 128)), _maps(rng, (B, 16, 16, 128))
    margin = np_ofd_margin(*_bn_params(rng, 128)).astype(np.float32)
    return (s, t, margin), {}, np_ofd_distance(s, t, margin)
  if name == "vid_nll":
    target, mean = _maps(rng, (B, 8, 8, 128)), _maps(rng, (B, 8, 8, 128))
    alpha = rng.uniform(-3, 3, 128).astype(np.float32)
    return (target, mean, alpha), {}, np_vid(target, mean, alpha, 1e-5)
  if name == "factor_transfer":
    s, t = _maps(rng, (B, 16, 16, 32)), _maps(rng, (B, 8, 8, 32))
    return (s, t), {}, np_ft(s, t, 1.0)
  if name == "afd":
    s, t = _maps(rng, (B, 8, 8, 64), True), _maps(rng, (B, 8, 8, 64), True)
    rho = rng.uniform(0.1, 1.0, (B, 64)).astype(np.float32)
    rho /= rho.sum(axis=1, keepdims=True)
    return (s, t, rho), {}, np_afd(s, t, rho)
  raise KeyError(name)


# The one-pair map losses the tables below cover. ``hcl`` (lists of maps, ReviewKD) is checked
# against NumPy in test_methods_connectors.py::test_hcl_matches_numpy; ``cam_distance`` below.
ALL = [name for name in F.__all__ if name not in ("hcl", "cam_distance")]


def test_all_exports_are_the_ten_functions_and_reexported():
  assert sorted(F.__all__) == sorted(["attention_transfer", "nst", "activation_boundary",
                                      "ofd_margin", "ofd_distance", "vid_nll", "factor_transfer",
                                      "afd", "hcl", "cam_distance"])
  for name in F.__all__:
    assert getattr(losses, name) is getattr(F, name)


def test_cam_distance_matches_numpy_and_pools_the_larger_map():
  """LwM: mean |normalize(cam_s) - normalize(cam_t)| after pooling the larger map to the smaller."""
  rng = _rng(21)
  s, t = _maps(rng, (B, 8, 8, 1), True), _maps(rng, (B, 4, 4, 1), True)
  ps, pt = np_pool_to_match(s, t)
  hs = np_normalize(ps.reshape(B, -1), 1)
  ht = np_normalize(pt.reshape(B, -1), 1)
  _close(F.cam_distance(tf.constant(s), tf.constant(t)), np.abs(hs - ht).mean(), rtol=1e-4)
  cam = tf.Variable(s)
  with tf.GradientTape() as tape:
    loss = F.cam_distance(cam, tf.constant(t))
  assert tape.gradient(loss, cam) is not None


@pytest.mark.parametrize("name", ALL)
def test_matches_numpy_reference(name):
  args, kwargs, expected = _case(name, _rng(1))
  out = getattr(F, name)(*[tf.constant(a) for a in args], **kwargs)
  assert out.dtype == tf.float32
  assert out.shape == ((128,) if name == "ofd_margin" else ())
  _close(out, expected)


# --------------------------------------------------------------------------- more reference cases

@pytest.mark.parametrize("p", [1.0, 1.5, 3.0])
def test_at_other_exponents_use_abs(p):
  rng = _rng(2)
  s, t = _maps(rng, (B, 8, 8, 32)), _maps(rng, (B, 8, 8, 48))  # signed: |f|^p differs from f^p
  _close(F.attention_transfer(s, t, p=p), np_at(s, t, p))


def test_non_integer_pool_ratio():
  rng = _rng(3)
  s, t = _maps(rng, (8, 7, 7, 16), True), _maps(rng, (8, 4, 4, 24), True)
  _close(F.attention_transfer(s, t), np_at(s, t, 2.0))
  _close(F.nst(s, t), np_nst(s, t))


def test_nst_channel_gram_branch():
  # 16x16 maps with few channels: the [B, C, C'] Gram path (the 8x8x128 case uses positions).
  rng = _rng(4)
  s, t = _maps(rng, (B, 16, 16, 16), True), _maps(rng, (B, 16, 16, 32), True)
  _close(F.nst(s, t), np_nst(s, t))


def test_ofd_margin_is_truncated_normal_mean():
  # Monte-Carlo check of E[x | x < 0], x ~ N(beta, gamma^2), independent of the closed form.
  rng = _rng(5)
  gamma = np.array([1.0, -0.5, 2.0], np.float32)
  beta = np.array([0.3, -0.2, 1.0], np.float32)
  x = beta + np.abs(gamma) * rng.standard_normal((400000, 3))
  mc = np.array([x[:, c][x[:, c] < 0].mean() for c in range(3)])
  np.testing.assert_allclose(F.ofd_margin(gamma, beta), mc, rtol=1e-2)


def test_ofd_margin_fallback_and_zero_scale():
  gamma = np.array([1.0, 1.0, 0.0, 0.0, 0.0], np.float32)
  beta = np.array([3.5, 3.0, -0.7, 0.0, 0.4], np.float32)   # Phi(-3.5) < 1e-3 < Phi(-3)
  m = F.ofd_margin(gamma, beta).numpy()
  assert m[0] == pytest.approx(-3.0)
  assert m[1] == pytest.approx(np_ofd_margin(gamma[1:2], beta[1:2])[0], rel=1e-6)
  # sigma -> 0 limit: min(beta, 0)
  np.testing.assert_array_equal(m[2:], np.float32([-0.7, 0.0, 0.0]))


def test_factor_transfer_p2_and_flat_factors():
  rng = _rng(6)
  s, t = _maps(rng, (B, 8, 8, 16)), _maps(rng, (B, 8, 8, 16))
  _close(F.factor_transfer(s, t, p=2), np_ft(s, t, 2.0))
  e_s, e_t = _maps(rng, (B, 256)), _maps(rng, (B, 256))
  _close(F.factor_transfer(e_s, e_t), np_ft(e_s, e_t, 1.0))


# --------------------------------------------------------------------------- properties

def test_zero_loss_when_student_equals_teacher():
  rng = _rng(7)
  f = _maps(rng, (B, 8, 8, 32), True)
  rho = np.full((B, 32), 1 / 32, np.float32)
  assert float(F.attention_transfer(f, f)) == pytest.approx(0, abs=1e-12)
  assert float(F.nst(f, f)) == pytest.approx(0, abs=1e-6)
  assert float(F.factor_transfer(f, f)) == pytest.approx(0, abs=1e-12)
  assert float(F.afd(f, f, rho)) == pytest.approx(0, abs=1e-12)
  margin = np.full(32, -0.5, np.float32)
  assert float(F.ofd_distance(np.maximum(f, -0.5), f, margin)) == pytest.approx(0, abs=1e-12)
  # The AT value for equal maps is not merely small: a 5% perturbation gives a clearly larger loss.
  g = f * (1 + 0.05 * rng.standard_normal(f.shape).astype(np.float32))
  assert float(F.attention_transfer(g, f)) > 1e-6


def test_at_invariances():
  rng = _rng(8)
  s, t = _maps(rng, (B, 16, 16, 32), True), _maps(rng, (B, 8, 8, 64), True)
  ref = float(F.attention_transfer(s, t))
  perm = rng.permutation(32)
  _close(F.attention_transfer(s[..., perm], t), ref)                  # channel order
  _close(F.attention_transfer(7.5 * s, 0.01 * t), ref)                # positive scale per map
  _close(F.attention_transfer(t, s), ref)                             # either map may be larger
  # Channel count cancels: duplicating every channel keeps the attention map.
  _close(F.attention_transfer(np.concatenate([s, s], -1), t), ref)


def test_nst_invariances():
  rng = _rng(9)
  s, t = _maps(rng, (B, 16, 16, 32), True), _maps(rng, (B, 8, 8, 48), True)
  ref = float(F.nst(s, t))
  _close(F.nst(s[..., rng.permutation(32)], t[..., rng.permutation(48)]), ref)
  # Each channel is normalised on its own: any positive per-sample, per-channel scale cancels.
  scale = rng.uniform(0.1, 10, (B, 1, 1, 32)).astype(np.float32)
  _close(F.nst(s * scale, t), ref)
  _close(F.nst(t, s), ref)                                            # symmetric MMD


def test_ab_depends_on_teacher_sign_only_and_vanishes_beyond_margin():
  rng = _rng(10)
  s, t = _maps(rng, (B, 8, 8, 16)), _maps(rng, (B, 8, 8, 16))
  ref = float(F.activation_boundary(s, t))
  _close(F.activation_boundary(s, 3.0 * t + np.sign(t)), ref)
  # Student beyond the margin on the teacher's side of zero: no loss.
  m = 2.0
  s_ok = np.where(t > 0, m + np.abs(s), -m - np.abs(s) - 1e-3).astype(np.float32)
  assert float(F.activation_boundary(s_ok, t, margin=m)) == 0.0
  assert float(F.activation_boundary(s_ok, t, margin=m + 5)) > 0.0


def test_ofd_no_loss_below_a_non_positive_target():
  rng = _rng(11)
  t = _maps(rng, (B, 8, 8, 16))
  margin = np.full(16, -0.3, np.float32)
  target = np.maximum(t, margin)
  gap = np.abs(_maps(rng, t.shape)) + 0.01
  s = target - gap                                   # s <= t' everywhere
  expected = ((gap ** 2) * (target > 0)).astype(np.float64).sum() / B   # only where t' > 0 counts
  _close(F.ofd_distance(s, t, margin), expected)


def test_vid_optimal_variance_has_zero_gradient():
  # d/d var of mean(0.5 (r^2/var + log var)) vanishes at var_c = mean_c(r^2).
  rng = _rng(12)
  target, mean = _maps(rng, (B, 4, 4, 8)), _maps(rng, (B, 4, 4, 8))
  var = ((mean.astype(np.float64) - target) ** 2).mean(axis=(0, 1, 2))
  alpha_opt = tf.Variable(np.log(np.expm1(var - 1e-5)).astype(np.float32))
  alpha_off = tf.Variable(alpha_opt + 1.0)
  for alpha, zero in ((alpha_opt, True), (alpha_off, False)):
    with tf.GradientTape() as tape:
      loss = F.vid_nll(target, mean, alpha)
    g = np.abs(tape.gradient(loss, alpha).numpy()).max()
    assert (g < 1e-6) if zero else (g > 1e-3)


def test_ft_and_afd_scale_invariances():
  rng = _rng(13)
  s, t = _maps(rng, (B, 8, 8, 16)), _maps(rng, (B, 8, 8, 16))
  per_sample = rng.uniform(0.1, 10, (B, 1, 1, 1)).astype(np.float32)
  _close(F.factor_transfer(s * per_sample, t), float(F.factor_transfer(s, t)))
  rho = rng.uniform(0, 1, (B, 16)).astype(np.float32)
  per_channel = rng.uniform(0.5, 5, (B, 1, 1, 16)).astype(np.float32)
  ref = float(F.afd(s, t, rho))
  _close(F.afd(s * per_channel, t, rho), ref, rtol=1e-5)
  _close(F.afd(s, t, 2 * rho), 2 * ref)               # linear in rho


# --------------------------------------------------------------------------- gradients

def _degenerate_inputs(name):
  """All-zero maps (and zero channels) where each function normalises, divides or takes roots."""
  z = np.zeros((4, 8, 8, 16), np.float32)
  half = z.copy()
  half[..., :8] = 1.0                                  # half the channels exactly zero
  if name == "ofd_margin":
    return [np.zeros(16, np.float32), np.zeros(16, np.float32)], {}
  if name in ("ofd_distance",):
    return [z, z, np.zeros(16, np.float32)], {}
  if name == "vid_nll":
    return [z, z, np.zeros(16, np.float32)], {}
  if name == "afd":
    return [half, z, np.zeros((4, 16), np.float32)], {}
  if name == "activation_boundary":
    return [z, z], {}
  return [half, z], {}


@pytest.mark.parametrize("name", ALL)
def test_finite_gradients_at_degenerate_inputs(name):
  args, kwargs = _degenerate_inputs(name)
  variables = [tf.Variable(a) for a in args]
  with tf.GradientTape() as tape:
    out = tf.reduce_sum(getattr(F, name)(*variables, **kwargs))
  assert np.isfinite(out.numpy())
  grads = tape.gradient(out, variables)
  for i, g in enumerate(grads):
    if g is not None:
      assert np.all(np.isfinite(g.numpy())), (name, i)
  # Teacher-side tensors are constants.
  teacher_arg = {"ofd_margin": [0, 1], "vid_nll": [0]}.get(name, [1])
  for i in teacher_arg:
    assert grads[i] is None, (name, i)
  if name not in ("ofd_margin",):
    student = 1 if name == "vid_nll" else 0
    assert grads[student] is not None


@pytest.mark.parametrize("p", [0.5, 1.0, 1.5, 2.0])
def test_at_finite_gradient_all_zero_for_any_p(p):
  s = tf.Variable(np.zeros((2, 4, 4, 8), np.float32))
  t = tf.constant(_maps(_rng(14), (2, 4, 4, 8), True))
  with tf.GradientTape() as tape:
    loss = F.attention_transfer(s, t, p=p)
  assert np.all(np.isfinite(tape.gradient(loss, s).numpy()))


def test_ft_finite_gradient_when_equal():
  f = _maps(_rng(15), (4, 4, 4, 8))
  s = tf.Variable(f)
  for p in (0.5, 1, 2):
    with tf.GradientTape() as tape:
      loss = F.factor_transfer(s, f, p=p)
    assert np.all(np.isfinite(tape.gradient(loss, s).numpy()))


def test_gradient_matches_finite_difference_for_nst():
  # Checks the Gram-matrix path end to end (positions branch and channel branch).
  rng = _rng(16)
  for s_shape, t_shape in (((2, 4, 4, 8), (2, 2, 2, 12)), ((2, 4, 4, 2), (2, 4, 4, 3))):
    s = _maps(rng, s_shape, True).astype(np.float64) + 0.1
    t = _maps(rng, t_shape, True).astype(np.float64) + 0.1
    theory, numeric = tf.test.compute_gradient(lambda x: F.nst(tf.cast(x, tf.float32), t), [s])
    np.testing.assert_allclose(theory[0], numeric[0], atol=2e-3)


# --------------------------------------------------------------------------- graph modes and dtypes

@pytest.mark.parametrize("name", ALL)
def test_jit_compile_matches_eager(name):
  args, kwargs, _ = _case(name, _rng(17))
  args = [tf.constant(a[:4]) if a.ndim == 4 or (a.ndim == 2 and a.shape[0] == B) else
          tf.constant(a) for a in args]
  fn = getattr(F, name)
  eager = fn(*args, **kwargs)
  jitted = tf.function(lambda *a: fn(*a, **kwargs), jit_compile=True)(*args)
  _close(jitted, eager.numpy(), rtol=1e-5)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_low_precision_inputs_computed_in_float32(dtype):
  rng = _rng(18)
  s, t = _maps(rng, (8, 8, 8, 16), True), _maps(rng, (8, 4, 4, 32), True)
  s_lp, t_lp = tf.cast(s, dtype), tf.cast(t, dtype)
  s32, t32 = tf.cast(s_lp, tf.float32), tf.cast(t_lp, tf.float32)  # same values, float32
  for fn in (F.attention_transfer, F.nst):
    out = fn(s_lp, t_lp)
    assert out.dtype == tf.float32
    _close(out, fn(s32, t32).numpy(), rtol=1e-6)
  out = F.vid_nll(t_lp, t_lp * 0.5, tf.zeros(32, dtype))
  assert out.dtype == tf.float32


# --------------------------------------------------------------------------- mismatch errors

def _shape_text(shape):
  return str(tf.TensorShape(shape)).replace("(", r"\(").replace(")", r"\)")


def test_mismatch_errors_name_both_shapes():
  z = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
  a, b = (2, 8, 8, 16), (2, 8, 8, 32)
  pattern = f"{_shape_text(a)}.*{_shape_text(b)}"
  with pytest.raises(ValueError, match=pattern):
    F.afd(z(*a), z(*b), z(2, 16))
  with pytest.raises(ValueError, match=pattern):
    F.activation_boundary(z(*a), z(*b))
  with pytest.raises(ValueError, match=pattern):
    F.ofd_distance(z(*a), z(*b), z(32))
  with pytest.raises(ValueError, match=pattern):
    F.factor_transfer(z(*a), z(*b))
  with pytest.raises(ValueError, match=pattern):
    F.vid_nll(z(*b), z(*a), z(32))
  # Equal heights, different widths: pool-to-match cannot reconcile them.
  with pytest.raises(ValueError, match=f"{_shape_text((2, 8, 4, 16))}.*{_shape_text(b)}"):
    F.attention_transfer(z(2, 8, 4, 16), z(*b))
  with pytest.raises(ValueError, match="rho shape"):
    F.afd(z(*a), z(*a), z(2, 8))                       # rho must be [B, C]
  with pytest.raises(ValueError, match="margin"):
    F.ofd_distance(z(*a), z(*a), z(8))
  with pytest.raises(ValueError, match="log_scale"):
    F.vid_nll(z(*a), z(*a), z(8))
  with pytest.raises(ValueError, match="NHWC"):
    F.nst(z(2, 64), z(2, 64))
  with pytest.raises(ValueError, match="bn_gamma"):
    F.ofd_margin(z(4), z(5))
  with pytest.raises(ValueError, match="p must be a positive"):
    F.attention_transfer(z(*a), z(*a), p=0)
