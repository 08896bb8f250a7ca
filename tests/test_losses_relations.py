"""kd_tf2.losses.relations against straightforward NumPy versions of METHODS.md §2.5-2.9, 2.14, 2.18, 2.19."""
import math

import numpy as np
import pytest
import tensorflow as tf

from kd_tf2 import losses
from kd_tf2.losses import relations as R

RTOL = 1e-4
B = 64


def _rng(seed):
  return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def emb():
  """Student [B, 64] and teacher [B, 256] embeddings: post-ReLU-like, with a common offset."""
  rng = _rng(0)
  s = np.maximum(rng.normal(size=(B, 64)) + 0.5, 0.0).astype(np.float32)
  t = np.maximum(rng.normal(size=(B, 256)) * 2.0 + 1.0, 0.0).astype(np.float32)
  return s, t


@pytest.fixture(scope="module")
def maps():
  """Student and teacher stage outputs (NHWC), different channels and spatial sizes."""
  rng = _rng(1)
  s = [rng.normal(size=(B, 16, 16, 16)), rng.normal(size=(B, 8, 8, 32)), rng.normal(size=(B, 4, 4, 64))]
  t = [rng.normal(size=(B, 32, 32, 16)), rng.normal(size=(B, 16, 16, 32)), rng.normal(size=(B, 8, 8, 64))]
  return [m.astype(np.float32) for m in s], [m.astype(np.float32) for m in t]


# --------------------------------------------------------------------------- NumPy references

def np_normalize(x, eps=1e-12):
  return x / max(np.linalg.norm(x), eps)


def np_huber(x):
  a = np.abs(x)
  return np.where(a < 1.0, 0.5 * x * x, a - 0.5)


def np_pool(x, h):
  """Average over non-overlapping r x r blocks of an NHWC map (integer ratio)."""
  b, hh, ww, c = x.shape
  r = hh // h
  return x.reshape(b, h, r, ww // r, r, c).mean(axis=(2, 4))


def np_pkt(s, t, eps=1e-7):
  def prob(x):
    x = np.asarray(x, np.float64)
    x = np.stack([row / (np.linalg.norm(row) + eps) for row in x])
    sim = (x @ x.T + 1.0) / 2.0
    return sim / sim.sum(axis=1, keepdims=True)
  ps, pt = prob(s), prob(t)
  return np.mean(pt * np.log((pt + eps) / (ps + eps)))


def np_rkd_distance(s, t):
  def psi(e):
    e = np.asarray(e, np.float64)
    n = len(e)
    d = np.zeros((n, n))
    for i in range(n):
      for j in range(n):
        if i != j:
          d[i, j] = np.linalg.norm(e[i] - e[j])
    return d / d[d > 0].mean()
  return np.mean(np_huber(psi(s) - psi(t)))


def np_rkd_angle(s, t):
  def angles(e):
    e = np.asarray(e, np.float64)
    diff = e[None, :, :] - e[:, None, :]                       # diff[i, j] = e_j - e_i
    norm = np.maximum(np.linalg.norm(diff, axis=2, keepdims=True), 1e-12)
    u = diff / norm
    return np.einsum("ijd,ikd->ijk", u, u)
  return np.mean(np_huber(angles(s) - angles(t)))


def np_sp(s, t):
  def gram(f):
    f = np.asarray(f, np.float64).reshape(len(f), -1)
    g = f @ f.T
    return np.stack([np_normalize(row) for row in g])
  n = len(s)
  return np.sum((gram(t) - gram(s)) ** 2) / n ** 2


def np_cc(s, t, gamma, order):
  def kernel(f):
    f = np.stack([np_normalize(row) for row in np.asarray(f, np.float64)])
    sim = f @ f.T
    return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * sim ** p
               for p in range(order + 1))
  return np.mean((kernel(s) - kernel(t)) ** 2)


def np_irg(s_maps, t_maps, s_emb, t_emb, s_logits, t_logits, wv, we, wt):
  def edge(x):
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    n = len(x)
    d = np.zeros((n, n))
    for i in range(n):
      for j in range(n):
        if i != j:
          d[i, j] = max(np.sum((x[i] - x[j]) ** 2), 1e-12)
    return d / d.max()

  def transform(fm1, fm2):
    fm1, fm2 = np.asarray(fm1, np.float64), np.asarray(fm2, np.float64)
    if fm1.shape[1] > fm2.shape[1]:
      fm1 = np_pool(fm1, fm2.shape[1])
    if fm1.shape[3] < fm2.shape[3]:
      fm2 = np.stack([(fm2[..., 2 * j] + fm2[..., 2 * j + 1]) / 2 for j in range(fm1.shape[3])], -1)
    tau = np.array([max(np.sum((fm1[b] - fm2[b]) ** 2), 1e-12) for b in range(len(fm1))])
    return tau / tau.max()

  vertex = np.mean((np.asarray(s_logits, np.float64) - t_logits) ** 2)
  e = (np.mean((edge(s_emb) - edge(t_emb)) ** 2) + np.mean((edge(s_maps[0]) - edge(t_maps[0])) ** 2)
       + np.mean((edge(s_maps[1]) - edge(t_maps[1])) ** 2)) / 3
  tr = np.mean((transform(*s_maps) - transform(*t_maps)) ** 2)
  return wv * vertex + we * e + wt * tr


def np_crd(scores, n_data, eps=1e-7):
  x = np.asarray(scores, np.float64)
  c = (x.shape[1] - 1) / n_data
  total = 0.0
  for b in range(x.shape[0]):
    total += np.log(x[b, 0] / (x[b, 0] + c + eps))
    for j in range(1, x.shape[1]):
      total += np.log(c / (x[b, j] + c + eps))
  return -total / x.shape[0]


def np_fsp_matrix(f1, f2):
  f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
  if f1.shape[1] > f2.shape[1]:
    f1 = np_pool(f1, f2.shape[1])
  elif f2.shape[1] > f1.shape[1]:
    f2 = np_pool(f2, f1.shape[1])
  n, h, w, c1 = f1.shape
  g = np.zeros((n, c1, f2.shape[3]))
  for b in range(n):
    x1, x2 = f1[b].reshape(h * w, c1), f2[b].reshape(h * w, -1)
    for i in range(c1):
      g[b, i] = x1[:, i] @ x2 / (h * w)
  return g


def np_fsp(s_feats, t_feats):
  return sum(np.mean((np_fsp_matrix(s_feats[l], s_feats[l + 1])
                      - np_fsp_matrix(t_feats[l], t_feats[l + 1])) ** 2)
             for l in range(len(s_feats) - 1))


def np_kd_svd(s_feats, t_feats, k=1):
  """METHODS.md §2.19 with numpy.linalg.svd (LAPACK) and the canonical teacher sign."""
  total = 0.0
  prev = None
  n = s_feats[0].shape[0]
  for fs, ft in zip(s_feats, t_feats):
    a_layer = np.zeros((n, fs.shape[3], k))
    v_layer = np.zeros((n, ft.shape[3], k))
    for b in range(n):
      _, sig_t, vh_t = np.linalg.svd(np.asarray(ft[b], np.float64).reshape(-1, ft.shape[3]),
                                     full_matrices=False)
      _, _, vh_s = np.linalg.svd(np.asarray(fs[b], np.float64).reshape(-1, fs.shape[3]),
                                 full_matrices=False)
      vt = vh_t[:k].T                                           # C x k
      for j in range(k):
        if vt[np.argmax(np.abs(vt[:, j])), j] < 0:
          vt[:, j] = -vt[:, j]
      vs = vh_s[:k + 3].T                                       # C x (k+3)
      sig = sig_t[:k] / max(np.linalg.norm(sig_t[:k]), 1e-12)
      cos = vs.T @ vt
      for j in range(k):
        i = np.argmax(np.abs(cos[:, j]))
        a_layer[b, :, j] = np.sign(cos[i, j]) * vs[:, i] * sig[j]
        v_layer[b, :, j] = vt[:, j] * sig[j]
    if prev is not None:
      pa, pv = prev
      rs = np.exp(-(a_layer[:, :, None, :] - pa[:, None, :, :]) ** 2 / 8)
      rt = np.exp(-(v_layer[:, :, None, :] - pv[:, None, :, :]) ** 2 / 8)
      total += np.sum((rs - rt) ** 2) / n
    prev = (a_layer, v_layer)
  return total


# --------------------------------------------------------------------------- reference checks

def test_pkt_matches_numpy(emb):
  s, t = emb
  np.testing.assert_allclose(float(losses.pkt(s, t)), np_pkt(s, t), rtol=RTOL)
  np.testing.assert_allclose(float(losses.pkt(s, t, eps=1e-6)), np_pkt(s, t, 1e-6), rtol=RTOL)


def test_rkd_matches_numpy(emb):
  s, t = emb
  d, a = np_rkd_distance(s, t), np_rkd_angle(s, t)
  np.testing.assert_allclose(float(losses.rkd_distance(s, t)), d, rtol=RTOL)
  np.testing.assert_allclose(float(losses.rkd_angle(s, t)), a, rtol=RTOL)
  np.testing.assert_allclose(float(losses.rkd(s, t)), 25 * d + 50 * a, rtol=RTOL)
  np.testing.assert_allclose(float(losses.rkd(s, t, distance_weight=1.0, angle_weight=0)), d,
                             rtol=RTOL)


def test_rkd_is_accurate_for_embeddings_far_from_the_origin(emb):
  # Gram-matrix distances cancel badly around a large common offset unless the batch is centred
  s, t = emb[0][:32] + 1000.0, emb[1][:32]
  np.testing.assert_allclose(float(losses.rkd_distance(s, t)), np_rkd_distance(s, t), rtol=RTOL)
  np.testing.assert_allclose(float(losses.rkd_angle(s, t)), np_rkd_angle(s, t), rtol=RTOL)


def test_rkd_angle_with_a_duplicated_sample_matches_numpy(emb):
  s, t = emb
  s, t = s[:32].copy(), t[:32].copy()
  s[3], t[7] = s[11], t[20]      # coincident points: zero difference direction
  np.testing.assert_allclose(float(losses.rkd_angle(s, t)), np_rkd_angle(s, t), rtol=RTOL)


def test_similarity_preserving_matches_numpy(maps):
  s, t = maps[0][2], maps[1][1]             # different C and H, W
  np.testing.assert_allclose(float(losses.similarity_preserving(s, t)), np_sp(s, t), rtol=RTOL)


@pytest.mark.parametrize("gamma,order", [(0.4, 2), (1.0, 4), (0.4, 0)])
def test_correlation_congruence_matches_numpy(emb, gamma, order):
  s, t = emb
  got = float(losses.correlation_congruence(s, t, gamma=gamma, order=order))
  np.testing.assert_allclose(got, np_cc(s, t, gamma, order), rtol=RTOL, atol=1e-12)


def test_irg_matches_numpy(maps, emb):
  rng = _rng(2)
  s_maps, t_maps = (maps[0][0], maps[0][1]), (maps[1][1], maps[1][2])   # C doubles, H halves
  t_maps = (t_maps[0], t_maps[1][..., :32])                              # equal channels too
  zs, zt = rng.normal(size=(B, 100)).astype(np.float32), rng.normal(size=(B, 100)).astype(np.float32)
  got = float(losses.irg(s_maps, t_maps, emb[0], emb[1], zs, zt, w_vertex=0.1, w_edge=5.0,
                         w_transform=5.0))
  want = np_irg(s_maps, t_maps, emb[0], emb[1], zs, zt, 0.1, 5.0, 5.0)
  np.testing.assert_allclose(got, want, rtol=RTOL)


def test_crd_contrast_loss_matches_numpy():
  rng = _rng(3)
  scores = np.exp(rng.normal(size=(B, 257)) / 0.5).astype(np.float32) / 50.0
  np.testing.assert_allclose(float(losses.crd_contrast_loss(scores, n_data=50000)),
                             np_crd(scores, 50000), rtol=RTOL)
  # RepDistiller's [B, K+1, 1] layout gives the same value
  np.testing.assert_allclose(float(losses.crd_contrast_loss(scores[..., None], 50000)),
                             np_crd(scores, 50000), rtol=RTOL)


def test_fsp_matrix_matches_numpy(maps):
  s = maps[0]
  got = losses.fsp_matrix(s[0], s[1]).numpy()                  # 16x16x16 pooled to 8x8
  assert got.shape == (B, 16, 32)
  np.testing.assert_allclose(got, np_fsp_matrix(s[0], s[1]), rtol=RTOL, atol=1e-6)
  # first-argument-first orientation: swapping the arguments transposes the matrix
  np.testing.assert_allclose(losses.fsp_matrix(s[1], s[0]).numpy(), np.transpose(got, (0, 2, 1)),
                             rtol=1e-6, atol=1e-7)


def test_fsp_matches_numpy(maps):
  s, t = maps
  np.testing.assert_allclose(float(losses.fsp(s, t)), np_fsp(s, t), rtol=RTOL)


def test_kd_svd_matches_numpy(maps):
  # teacher maps taller than wide (HW > C) and a last student map with HW < C: both Gram routes
  s, t = [m[:24] for m in maps[0]], [m[:24] for m in maps[1]]
  np.testing.assert_allclose(float(losses.kd_svd(s, t)), np_kd_svd(s, t), rtol=RTOL)
  small_s, small_t = [m[:8] for m in s], [m[:8] for m in t]
  np.testing.assert_allclose(float(losses.kd_svd(small_s, small_t, k=2)),
                             np_kd_svd(small_s, small_t, k=2), rtol=RTOL)


def test_kd_svd_gradient_matches_numpy_finite_differences():
  # directional derivative of the float64 NumPy/LAPACK reference vs TF's gradient
  rng = _rng(14)
  s = [rng.normal(size=(4, 6, 6, 8)), rng.normal(size=(4, 3, 3, 16))]
  t = [rng.normal(size=(4, 6, 6, 8)), rng.normal(size=(4, 2, 3, 16))]
  d = [rng.normal(size=m.shape) for m in s]
  h = 1e-4
  fd = (np_kd_svd([m + h * dm for m, dm in zip(s, d)], t)
        - np_kd_svd([m - h * dm for m, dm in zip(s, d)], t)) / (2 * h)
  xs = [tf.constant(m, tf.float32) for m in s]
  with tf.GradientTape() as tape:
    tape.watch(xs)
    loss = losses.kd_svd(xs, [m.astype(np.float32) for m in t])
  got = sum(float(tf.reduce_sum(g * dm)) for g, dm in zip(tape.gradient(loss, xs), d))
  np.testing.assert_allclose(got, fd, rtol=2e-3)


# --------------------------------------------------------------------------- properties

def test_zero_when_student_equals_teacher(emb, maps):
  s = emb[0]
  m = maps[0]
  z = _rng(4).normal(size=(B, 10)).astype(np.float32)
  assert abs(float(losses.pkt(s, s))) < 1e-9
  assert abs(float(losses.rkd(s, s))) < 1e-9
  assert abs(float(losses.similarity_preserving(m[1], m[1]))) < 1e-12
  assert abs(float(losses.correlation_congruence(s, s))) < 1e-12
  assert abs(float(losses.irg(m[:2], m[:2], s, s, z, z))) < 1e-12
  assert abs(float(losses.fsp(m, m))) < 1e-12
  assert abs(float(losses.kd_svd(m, m))) < 1e-9


def test_embedding_losses_are_invariant_to_batch_order(emb):
  s, t = emb
  perm = _rng(5).permutation(B)
  for fn in (losses.pkt, losses.rkd, losses.similarity_preserving, losses.correlation_congruence):
    np.testing.assert_allclose(float(fn(s[perm], t[perm])), float(fn(s, t)), rtol=1e-5)
  # pairing matters: shuffling only the teacher changes every one of them
  for fn in (losses.pkt, losses.rkd, losses.similarity_preserving, losses.correlation_congruence):
    assert abs(float(fn(s, t[perm])) - float(fn(s, t))) > 1e-3 * abs(float(fn(s, t)))


def test_scale_invariances(emb):
  s, t = emb
  # PKT, SP: one global positive scale; CC: any positive scale per sample
  for fn in (losses.pkt, losses.similarity_preserving):
    np.testing.assert_allclose(float(fn(7.3 * s, t)), float(fn(s, t)), rtol=1e-4)
  row_scale = np.linspace(0.1, 10.0, B).astype(np.float32)[:, None]
  np.testing.assert_allclose(float(losses.correlation_congruence(row_scale * s, t)),
                             float(losses.correlation_congruence(s, t)), rtol=1e-4)
  # SP is not invariant to per-sample scales (the Gram rows mix samples)
  assert abs(float(losses.similarity_preserving(row_scale * s, t))
             - float(losses.similarity_preserving(s, t))) > 1e-4


def test_rkd_is_invariant_to_similarity_transforms(emb):
  # psi_D and the angles depend only on the shape of the point cloud: scale, shift, rotate
  s, t = emb
  q, _ = np.linalg.qr(_rng(6).normal(size=(64, 64)))
  moved = (3.0 * s @ q + 5.0).astype(np.float32)
  np.testing.assert_allclose(float(losses.rkd_distance(moved, t)), float(losses.rkd_distance(s, t)),
                             rtol=1e-4)
  np.testing.assert_allclose(float(losses.rkd_angle(moved, t)), float(losses.rkd_angle(s, t)),
                             rtol=1e-4)


def test_similarity_preserving_ignores_channel_order(maps):
  s, t = maps[0][1], maps[1][1]
  perm = _rng(7).permutation(s.shape[-1])
  np.testing.assert_allclose(float(losses.similarity_preserving(s[..., perm], t)),
                             float(losses.similarity_preserving(s, t)), rtol=1e-5)


def test_kd_svd_is_independent_of_the_solver_signs(maps, monkeypatch):
  # an eigen/SVD backend may return any sign per vector: flip some, the loss must not move
  s, t = [m[:16] for m in maps[0]], [m[:16] for m in maps[1]]
  base = float(losses.kd_svd(s, t, k=2))
  eigh = tf.linalg.eigh

  def sign_flipping_eigh(m):
    lam, vecs = eigh(m)
    n, c = vecs.shape[0], vecs.shape[-1]
    signs = np.where((np.arange(n)[:, None] + np.arange(c)[None, :]) % 3 == 0, -1.0, 1.0)
    return lam, vecs * signs[:, None, :].astype(np.float32)

  monkeypatch.setattr(tf.linalg, "eigh", sign_flipping_eigh)
  np.testing.assert_allclose(float(losses.kd_svd(s, t, k=2)), base, rtol=1e-6)


def test_kd_svd_is_invariant_to_negated_or_shuffled_maps(maps):
  # X, -X and X with its positions permuted have the same right-singular subspaces
  s, t = [m[:16] for m in maps[0]], [m[:16] for m in maps[1]]
  base = float(losses.kd_svd(s, t))
  np.testing.assert_allclose(float(losses.kd_svd(s, [t[0], -t[1], t[2]])), base, rtol=1e-5)
  np.testing.assert_allclose(float(losses.kd_svd([-s[0], s[1], -s[2]], t)), base, rtol=1e-5)
  pos = _rng(8).permutation(256)
  shuffled = [t[0], t[1].reshape(16, 256, 32)[:, pos].reshape(16, 16, 16, 32), t[2]]
  np.testing.assert_allclose(float(losses.kd_svd(s, shuffled)), base, rtol=1e-5)


def test_fsp_compares_students_and_teachers_of_different_spatial_size(maps):
  s, t = maps
  # doubling every teacher map's resolution by repetition leaves its FSP matrices unchanged
  up = [np.repeat(np.repeat(m, 2, axis=1), 2, axis=2) for m in s]
  assert abs(float(losses.fsp(s, up))) < 1e-10


def test_crd_gradient_signs():
  rng = _rng(9)
  x = tf.constant(np.exp(rng.normal(size=(8, 17))).astype(np.float32))
  with tf.GradientTape() as tape:
    tape.watch(x)
    loss = losses.crd_contrast_loss(x, n_data=100)
  g = tape.gradient(loss, x).numpy()
  assert np.all(g[:, 0] < 0)      # a larger positive score lowers the loss
  assert np.all(g[:, 1:] > 0)     # larger negative scores raise it


def test_teacher_gets_no_gradient(emb, maps):
  s, t = emb
  tt = tf.constant(t)
  tm = [tf.constant(m) for m in maps[1]]
  z = tf.zeros((B, 10))
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(tt)
    tape.watch(tm)
    values = [losses.pkt(s, tt), losses.rkd(s, tt), losses.similarity_preserving(s, tt),
              losses.correlation_congruence(s, tt),
              losses.irg(maps[0][:2], tm[1:], s, tt, z, z), losses.fsp(maps[0], tm),
              losses.kd_svd(maps[0], tm)]
  for v in values:
    assert tape.gradient(v, tt) is None
    assert all(g is None for g in tape.gradient(v, tm))


def test_rkd_angle_gradient_matches_explicit_differences(emb):
  # the Gram/law-of-cosines form must have the same gradient as normalising e_j - e_i directly
  s, t = emb[0][:16], emb[1][:16]

  def explicit(e):
    diff = e[None, :, :] - e[:, None, :]
    norm = tf.sqrt(tf.maximum(tf.reduce_sum(diff * diff, axis=2, keepdims=True), 1e-24))
    u = diff / tf.maximum(norm, 1e-12)
    return tf.einsum("ijd,ikd->ijk", u, u)

  x = tf.constant(s)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    a = losses.rkd_angle(x, t)
    d = explicit(x) - tf.stop_gradient(explicit(tf.constant(t)))
    ad = tf.reduce_mean(tf.where(tf.abs(d) < 1, 0.5 * d * d, tf.abs(d) - 0.5))
  np.testing.assert_allclose(float(a), float(ad), rtol=1e-5)
  g, gd = tape.gradient(a, x).numpy(), tape.gradient(ad, x).numpy()
  np.testing.assert_allclose(g, gd, rtol=1e-3, atol=1e-4 * np.abs(gd).max())


def _embedding_losses(s, t):
  return [losses.pkt(s, t), losses.rkd_distance(s, t), losses.rkd_angle(s, t),
          losses.similarity_preserving(s, t), losses.correlation_congruence(s, t)]


@pytest.mark.parametrize("case", ["zeros", "identical_rows", "batch_of_one", "student_is_teacher"])
def test_embedding_gradients_are_finite_at_degenerate_inputs(case):
  rng = _rng(10)
  t = rng.normal(size=(8, 32)).astype(np.float32)
  if case == "zeros":
    s = np.zeros((8, 16), np.float32)
  elif case == "identical_rows":
    s = np.tile(rng.normal(size=(1, 16)), (8, 1)).astype(np.float32)
  elif case == "batch_of_one":
    s, t = rng.normal(size=(1, 16)).astype(np.float32), t[:1]
  else:
    s = t.copy()
  x = tf.constant(s)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    values = _embedding_losses(x, t)
  for v in values:
    assert np.isfinite(float(v))
    g = tape.gradient(v, x)
    assert g is not None and np.all(np.isfinite(g.numpy()))


@pytest.mark.parametrize("case", ["zeros", "constant", "batch_of_one", "student_is_teacher"])
def test_map_gradients_are_finite_at_degenerate_inputs(case):
  rng = _rng(11)
  shapes = [(4, 8, 8, 8), (4, 4, 4, 16)]
  t = [rng.normal(size=sh).astype(np.float32) for sh in shapes]
  if case == "zeros":
    s = [np.zeros(sh, np.float32) for sh in shapes]
  elif case == "constant":   # rank-1 maps: repeated singular values 0
    s = [np.ones(sh, np.float32) for sh in shapes]
  elif case == "batch_of_one":
    t = [m[:1] for m in t]
    s = [rng.normal(size=(1,) + sh[1:]).astype(np.float32) for sh in shapes]
  else:
    s = [m.copy() for m in t]
  xs = [tf.constant(m) for m in s]
  z = tf.zeros((xs[0].shape[0], 10))
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(xs)
    values = [losses.fsp(xs, t), losses.kd_svd(xs, t), losses.irg(xs, t, xs[1], t[1], z, z),
              losses.similarity_preserving(xs[0], t[0]) + losses.similarity_preserving(xs[1], t[1]),
              tf.reduce_sum(losses.fsp_matrix(*xs))]
  for v in values:
    assert np.isfinite(float(v))
    for g in tape.gradient(v, xs):
      assert g is not None and np.all(np.isfinite(g.numpy()))


def test_xla_matches_eager(emb):
  # small maps: XLA's eigensolver is slow to compile on CPU, and every distinct size compiles anew
  rng = _rng(12)
  s, t = emb[0][:16], emb[1][:16]
  ms = [rng.normal(size=(16, 8, 8, 8)).astype(np.float32), rng.normal(size=(16, 4, 4, 8)).astype(np.float32)]
  mt = [rng.normal(size=(16, 8, 8, 8)).astype(np.float32), rng.normal(size=(16, 4, 4, 8)).astype(np.float32)]
  z = rng.normal(size=(16, 10)).astype(np.float32)
  scores = np.exp(rng.normal(size=(16, 17))).astype(np.float32)

  def run(s, t, ms, mt):
    with tf.GradientTape() as tape:
      tape.watch(s)
      tape.watch(ms)
      values = _embedding_losses(s, t) + [
          losses.rkd(s, t), losses.irg(ms[:2], mt[:2], s, t, z, z * 2.0),
          losses.crd_contrast_loss(scores, 1000), losses.fsp(ms, mt), losses.kd_svd(ms, mt),
          tf.reduce_mean(losses.fsp_matrix(ms[0], ms[1]))]
      total = tf.add_n(values)
    return values, tape.gradient(total, [s] + ms)

  args = (tf.constant(s), tf.constant(t), [tf.constant(m) for m in ms], [tf.constant(m) for m in mt])
  eager_vals, eager_grads = run(*args)
  vals, grads = tf.function(run, jit_compile=True)(*args)
  for a, b in zip(vals, eager_vals):
    assert a.dtype == tf.float32 and a.shape == ()
    np.testing.assert_allclose(float(a), float(b), rtol=1e-4, atol=1e-9)
  for g, ge in zip(grads, eager_grads):
    scale = np.abs(ge.numpy()).max()
    np.testing.assert_allclose(g.numpy(), ge.numpy(), rtol=1e-3, atol=1e-4 * scale)


def test_unknown_batch_size_in_tf_function(emb):
  s, t = emb
  spec = [tf.TensorSpec([None, 64], tf.float32), tf.TensorSpec([None, 256], tf.float32)]
  fn = tf.function(lambda a, b: tf.stack(_embedding_losses(a, b)), input_signature=spec)
  np.testing.assert_allclose(fn(s, t).numpy(), tf.stack(_embedding_losses(s, t)).numpy(), rtol=1e-5)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_low_precision_inputs_are_computed_in_float32(emb, maps, dtype):
  s, t = tf.cast(emb[0][:16], dtype), tf.cast(emb[1][:16], dtype)
  ms = [tf.cast(m[:8], dtype) for m in maps[0]]
  mt = [tf.cast(m[:8], dtype) for m in maps[1]]
  up = lambda x: tf.cast(x, tf.float32)
  pairs = [(losses.rkd(s, t), losses.rkd(up(s), up(t))),
           (losses.pkt(s, t), losses.pkt(up(s), up(t))),
           (losses.fsp(ms, mt), losses.fsp([up(m) for m in ms], [up(m) for m in mt])),
           (losses.kd_svd(ms, mt), losses.kd_svd([up(m) for m in ms], [up(m) for m in mt])),
           (losses.crd_contrast_loss(tf.exp(s), 100), losses.crd_contrast_loss(up(tf.exp(s)), 100))]
  for a, b in pairs:
    assert a.dtype == tf.float32
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


# --------------------------------------------------------------------------- errors

def test_fsp_channel_mismatch_names_both_shapes():
  s = [np.zeros((2, 8, 8, 16), np.float32), np.zeros((2, 4, 4, 32), np.float32)]
  t = [np.zeros((2, 8, 8, 16), np.float32), np.zeros((2, 4, 4, 64), np.float32)]
  with pytest.raises(ValueError, match=r"\(2, 4, 4, 32\).*\(2, 4, 4, 64\)"):
    losses.fsp(s, t)
  with pytest.raises(ValueError, match=r"\(2, 4, 4, 32\).*\(2, 4, 4, 64\)"):
    losses.kd_svd(s, t)
  with pytest.raises(ValueError, match="at least 2 maps"):
    losses.fsp(s[:1], t[:1])


def test_other_mismatches_raise_value_errors():
  e = np.zeros((4, 8), np.float32)
  with pytest.raises(ValueError, match=r"\(4, 8\).*\(5, 8\)"):
    losses.rkd(e, np.zeros((5, 8), np.float32))
  with pytest.raises(ValueError, match="order"):
    losses.correlation_congruence(e, e, order=1.5)
  with pytest.raises(ValueError, match=r"\(2, 8, 8, 16\).*\(2, 4, 4, 24\)"):
    losses.irg([np.zeros((2, 8, 8, 16)), np.zeros((2, 4, 4, 24))],
               [np.zeros((2, 8, 8, 16)), np.zeros((2, 4, 4, 32))],
               e[:2], e[:2], e[:2], e[:2])
  with pytest.raises(ValueError, match=r"\(2, 4, 6, 16\).*\(2, 8, 8, 16\)"):
    losses.fsp_matrix(np.zeros((2, 4, 6, 16)), np.zeros((2, 8, 8, 16)))
  with pytest.raises(ValueError, match=r"H\*W >= k\+3"):
    losses.kd_svd([np.zeros((2, 1, 2, 8))] * 2, [np.zeros((2, 1, 2, 8))] * 2)
  with pytest.raises(ValueError, match=r"K >= 1"):
    losses.crd_contrast_loss(np.ones((4, 1), np.float32), 10)


def test_module_exports():
  assert set(R.__all__) == {"pkt", "rkd", "rkd_distance", "rkd_angle", "similarity_preserving",
                            "correlation_congruence", "irg", "crd_contrast_loss", "fsp_matrix",
                            "fsp", "kd_svd", "teacher_singular_vectors",
                            "student_singular_vectors"}
  for name in R.__all__:
    assert getattr(losses, name) is getattr(R, name)
