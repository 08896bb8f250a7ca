"""Relation losses: PKT, RKD, SP, CC, IRG, CRD, FSP, KD-SVD (METHODS.md §2.5-2.9, 2.14, 2.18, 2.19).

Pure functions (DESIGN.md contract 2): tensors in, a float32 scalar out (``fsp_matrix``:
``[B, C1, C2]``), no variables, usable eagerly, in ``tf.function`` and under ``jit_compile=True``.
Inputs are cast to float32 first. Embeddings are ``[B, D]`` (extra dims flattened per sample),
maps NHWC with static H, W, C. Teacher-side arguments are constants (``tf.stop_gradient``,
METHODS.md §0). Gradients are finite at degenerate inputs (all-zero or identical embeddings, a batch
of one where the formula is defined).
"""
import math

import tensorflow as tf

from kd_tf2.checks import is_int
from op_util import adaptive_avg_pool, flatten_per_sample, l2_normalize, pool_to_match

__all__ = [
    "pkt",
    "rkd",
    "rkd_distance",
    "rkd_angle",
    "similarity_preserving",
    "correlation_congruence",
    "irg",
    "crd_contrast_loss",
    "fsp_matrix",
    "fsp",
    "kd_svd",
    "teacher_singular_vectors",
    "student_singular_vectors",
]

# Squared distances below this fraction of (|e_i|^2 + |e_j|^2) (embeddings centred on the batch
# mean) are treated as coincident points by rkd_angle: float32 Gram algebra cannot resolve them.
_COINCIDENT_REL = 1e-5


# --------------------------------------------------------------------------- helpers

def _f32(x):
  return tf.cast(x, tf.float32)


def _batch_size(x):
  return tf.cast(tf.shape(x)[0], tf.float32)


def _embedding_pair(fn, s_emb, t_emb):
  """Student [B, ...] and stop-gradient teacher [B, ...] as float32 [B, D_s], [B, D_t]."""
  s, t = _f32(s_emb), tf.stop_gradient(_f32(t_emb))
  _require_same_batch(fn, s, t)
  return flatten_per_sample(s), flatten_per_sample(t)


def _require_same_batch(fn, s, t, s_arg="student", t_arg="teacher"):
  if s.shape.rank is None or t.shape.rank is None or s.shape.rank < 1 or t.shape.rank < 1:
    raise ValueError(f"{fn}: inputs need a batch axis; got {s_arg} shape {s.shape} and {t_arg} "
                     f"shape {t.shape}")
  bs, bt = s.shape[0], t.shape[0]
  if bs is not None and bt is not None and bs != bt:
    raise ValueError(f"{fn}: batch sizes differ: {s_arg} shape {s.shape}, {t_arg} shape {t.shape}")


def _require_map(fn, arg, x):
  if x.shape.rank != 4 or None in x.shape[1:].as_list():
    raise ValueError(f"{fn}: {arg} must be an NHWC map [B, H, W, C] with static H, W, C; "
                     f"got shape {x.shape}")


def _safe_norm(x, axis):
  """||x||_2 along ``axis`` (keepdims); at x = 0 the value is 0 and the gradient 0 (not NaN)."""
  sq = tf.reduce_sum(tf.square(x), axis=axis, keepdims=True)
  nonzero = sq > 0
  return tf.where(nonzero, tf.sqrt(tf.where(nonzero, sq, tf.ones_like(sq))), tf.zeros_like(sq))


def _centred_gram(e):
  """Gram matrix of the batch-centred rows of e [B, D], and its diagonal (squared norms).

  Every loss that uses it depends on differences e_i - e_j only, so centring changes nothing but
  float32 cancellation in ||e_i||^2 + ||e_j||^2 - 2 e_i.e_j.
  """
  e = e - tf.reduce_mean(e, axis=0, keepdims=True)
  gram = tf.matmul(e, e, transpose_b=True)
  return gram, tf.linalg.diag_part(gram)


def _squared_distances(e):
  """[B, B] matrix ||e_i||^2 + ||e_j||^2 - 2 e_i.e_j (not clamped; diagonal exactly 0)."""
  gram, sq = _centred_gram(e)
  return sq[:, None] + sq[None, :] - 2.0 * gram


def _off_diagonal(x):
  """x [B, B] with its diagonal set to 0."""
  return tf.linalg.set_diag(x, tf.zeros_like(tf.linalg.diag_part(x)))


def _smooth_l1(x):
  """Huber / smooth-L1 with beta = 1: 0.5 x^2 if |x| < 1 else |x| - 0.5."""
  a = tf.abs(x)
  return tf.where(a < 1.0, 0.5 * tf.square(x), a - 0.5)


# --------------------------------------------------------------------------- PKT

def pkt(s_emb, t_emb, eps=1e-7):
  """PKT: Passalis, Tefas, ECCV 2018, arXiv:1803.10837 (RepDistiller PKT).

  s_emb [B, D_s], t_emb [B, D_t] -> scalar.
  L = mean_{i,j} P_t log((P_t + eps) / (P_s + eps)), P = row-normalised (cos + 1) / 2 of
  x / (||x|| + eps) (eps added to the norm as RepDistiller; Zoo uses eps = 1e-6).
  """
  s, t = _embedding_pair("pkt", s_emb, t_emb)

  def probabilities(x):
    x = x / (_safe_norm(x, axis=1) + eps)
    x = tf.where(tf.math.is_nan(x), tf.zeros_like(x), x)
    sim = (tf.matmul(x, x, transpose_b=True) + 1.0) / 2.0
    return sim / tf.reduce_sum(sim, axis=1, keepdims=True)

  p_s, p_t = probabilities(s), probabilities(t)
  return tf.reduce_mean(p_t * (tf.math.log(p_t + eps) - tf.math.log(p_s + eps)))


# --------------------------------------------------------------------------- RKD

def _rkd_distance_potential(e):
  """psi_D = d / mean(d[d > 0]) with d = sqrt(max(squared distance, 1e-12)), zero diagonal."""
  d = _off_diagonal(tf.sqrt(tf.maximum(_squared_distances(e), 1e-12)))
  positive = tf.cast(d > 0, tf.float32)
  mu = tf.math.divide_no_nan(tf.reduce_sum(d), tf.reduce_sum(positive))
  return tf.math.divide_no_nan(d, mu)


def _rkd_angle_potential(e):
  """A[i, j, k] = u_ij . u_ik with u_ij = normalize(e_j - e_i), from the Gram matrix only.

  Law of cosines: (e_j - e_i).(e_k - e_i) = (d_ij^2 + d_ik^2 - d_jk^2) / 2, so A needs the B x B
  squared distances and one B x B x B tensor, never the B x B x D differences. Coincident pairs
  (i = j, or e_i = e_j up to float32 resolution) give u_ij = 0, as F.normalize does.
  """
  gram, sq = _centred_gram(e)
  d2 = tf.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
  apart = d2 > _COINCIDENT_REL * (sq[:, None] + sq[None, :])
  inv = tf.where(apart, tf.math.rsqrt(tf.where(apart, d2, tf.ones_like(d2))), tf.zeros_like(d2))
  dots = 0.5 * (d2[:, :, None] + d2[:, None, :] - d2[None, :, :])   # [i, j, k]
  cos = dots * inv[:, :, None] * inv[:, None, :]
  return tf.clip_by_value(cos, -1.0, 1.0)


def rkd_distance(s_emb, t_emb):
  """RKD distance term: Park, Kim, Lu, Cho, CVPR 2019, arXiv:1904.05068 (RepDistiller RKDLoss).

  s_emb [B, D_s], t_emb [B, D_t] -> scalar (B >= 2; B = 1 gives 0).
  L = mean over B*B of smooth_l1(d_s / mu_s - d_t / mu_t), d the pairwise distance matrix
  (sqrt of squared distances clamped at 1e-12, zero diagonal), mu the mean of its positive entries.
  Distances come from the Gram matrix of the batch-centred embeddings (RepDistiller's pdist without
  its float32 cancellation around a large common offset).
  """
  s, t = _embedding_pair("rkd_distance", s_emb, t_emb)
  return tf.reduce_mean(_smooth_l1(_rkd_distance_potential(s) - _rkd_distance_potential(t)))


def rkd_angle(s_emb, t_emb):
  """RKD angle term: Park, Kim, Lu, Cho, CVPR 2019, arXiv:1904.05068 (RepDistiller RKDLoss).

  s_emb [B, D_s], t_emb [B, D_t] -> scalar.
  L = mean over B^3 of smooth_l1(A_s - A_t), A[i,j,k] = normalize(e_j - e_i) . normalize(e_k - e_i).
  Computed from Gram matrices (memory O(B^3), no B x B x D tensor); pairs closer than
  sqrt(1e-5) of their (batch-centred) norms count as coincident (zero direction, as for i = j).
  """
  s, t = _embedding_pair("rkd_angle", s_emb, t_emb)
  return tf.reduce_mean(_smooth_l1(_rkd_angle_potential(s) - _rkd_angle_potential(t)))


def rkd(s_emb, t_emb, distance_weight=25.0, angle_weight=50.0):
  """RKD: Park, Kim, Lu, Cho, CVPR 2019, arXiv:1904.05068 (RepDistiller RKDLoss = Zoo RKD).

  s_emb [B, D_s], t_emb [B, D_t] -> scalar.
  L = distance_weight * rkd_distance + angle_weight * rkd_angle (paper/RepDistiller weights 25, 50;
  sseung0703's variant normalises the embeddings first and uses 100 / 200 - not followed).
  A weight given as the Python number 0 skips its term.
  """
  loss = tf.constant(0.0)
  if not (isinstance(distance_weight, (int, float)) and distance_weight == 0):
    loss += _f32(distance_weight) * rkd_distance(s_emb, t_emb)
  if not (isinstance(angle_weight, (int, float)) and angle_weight == 0):
    loss += _f32(angle_weight) * rkd_angle(s_emb, t_emb)
  return loss


# --------------------------------------------------------------------------- SP, CC

def similarity_preserving(s_feat, t_feat):
  """SP: Tung, Mori, ICCV 2019, arXiv:1907.09682 (RepDistiller Similarity = Zoo SP).

  s_feat [B, ...], t_feat [B, ...] (any shapes, flattened per sample) -> scalar.
  L = (1/B^2) * sum (G_hat_t - G_hat_s)^2, G_hat = row-wise l2-normalised F F^T.
  """
  s, t = _embedding_pair("similarity_preserving", s_feat, t_feat)

  def similarity(f):
    return l2_normalize(tf.matmul(f, f, transpose_b=True), axis=1)

  return tf.reduce_mean(tf.square(similarity(t) - similarity(s)))


def correlation_congruence(s_emb, t_emb, gamma=0.4, order=2):
  """CC: Peng et al., ICCV 2019, arXiv:1904.01802 (Zoo CC, Taylor-expanded Gaussian RBF).

  s_emb [B, D_s], t_emb [B, D_t] -> scalar.
  L = mean over B*B of (K_s - K_t)^2, K = sum_{p=0..order} e^{-2 gamma} (2 gamma)^p / p! * S^p
  (element-wise powers of the cosine matrix S of the l2-normalised rows). Follows the paper/Zoo
  kernel form, not RepDistiller's simplified "CC" (METHODS.md §2.8).
  """
  if not is_int(order) or order < 0:
    raise ValueError(f"correlation_congruence: order must be an integer >= 0; got {order!r}")
  s, t = _embedding_pair("correlation_congruence", s_emb, t_emb)
  g = _f32(gamma)

  def kernel(f):
    f = l2_normalize(f, axis=1)
    sim = tf.matmul(f, f, transpose_b=True)
    power = tf.ones_like(sim)
    out = tf.zeros_like(sim)
    for p in range(order + 1):
      out += tf.exp(-2.0 * g) * tf.pow(2.0 * g, float(p)) / math.factorial(p) * power
      power = power * sim
    return out

  return tf.reduce_mean(tf.square(kernel(s) - kernel(t)))


# --------------------------------------------------------------------------- IRG

def _irg_edge(x):
  """Squared-distance matrix max(d^2, 1e-12) with zero diagonal, divided by its maximum."""
  d2 = _off_diagonal(tf.maximum(_squared_distances(flatten_per_sample(x)), 1e-12))
  return tf.math.divide_no_nan(d2, tf.reduce_max(d2))


def _irg_transform(fn, fm1, fm2):
  """tau[b] = max(||fm1 - fm2'||^2, 1e-12) / max_b(.), fm2' = fm2 pooled/channel-paired to fm1."""
  shape1, shape2 = fm1.shape, fm2.shape
  h1, c1 = shape1[1], shape1[3]
  h2, w2, c2 = shape2[1:]
  if h1 > h2:
    fm1 = adaptive_avg_pool(fm1, (h2, w2))
  if c2 == 2 * c1:
    fm2 = (fm2[..., 0::2] + fm2[..., 1::2]) / 2.0
  if fm1.shape[1:] != fm2.shape[1:]:
    raise ValueError(f"{fn}: cannot relate maps of shapes {shape1} and {shape2}: the later map must be no larger in H, W and have the "
                     "same or twice the channels")
  tau = tf.maximum(tf.reduce_sum(tf.square(fm1 - fm2), axis=[1, 2, 3]), 1e-12)
  return tf.math.divide_no_nan(tau, tf.reduce_max(tau))


def irg(s_maps, t_maps, s_emb, t_emb, s_logits, t_logits, w_vertex=0.1, w_edge=5.0,
        w_transform=5.0):
  """IRG: Liu et al., "Knowledge Distillation via Instance Relationship Graph", CVPR 2019 (Zoo IRG).

  s_maps = (fm1, fm2) NHWC student maps (fm1 earlier), t_maps likewise for the teacher (channels may
  differ from the student's); s_emb [B, D_s], t_emb [B, D_t]; logits [B, K] (equal K) -> scalar.
  L = w_vertex * MSE(z_s, z_t) + w_edge * mean over {emb, fm1, fm2} of MSE(E_s, E_t)
      + w_transform * mean_b (tau_s - tau_t)^2, E = squared-distance matrix / its max,
  tau = per-sample squared distance fm1 -> fm2 (fm1 pooled to fm2's size, fm2 channel pairs
  averaged when it has twice fm1's channels), / its max. Zoo's "one-to-one" mode.
  """
  fn = "irg"
  if len(s_maps) != 2 or len(t_maps) != 2:
    raise ValueError(f"{fn}: s_maps and t_maps must each be two maps (fm1, fm2); got "
                     f"{len(s_maps)} and {len(t_maps)}")
  s1, s2 = (_f32(m) for m in s_maps)
  t1, t2 = (tf.stop_gradient(_f32(m)) for m in t_maps)
  for arg, m in (("s_maps[0]", s1), ("s_maps[1]", s2), ("t_maps[0]", t1), ("t_maps[1]", t2)):
    _require_map(fn, arg, m)
  zs, zt = _f32(s_logits), tf.stop_gradient(_f32(t_logits))
  if zs.shape.rank != 2 or not zs.shape.is_compatible_with(zt.shape):
    raise ValueError(f"{fn}: student logits shape {zs.shape} and teacher logits shape {zt.shape} "
                     "must be equal [B, K]")
  es, et = _embedding_pair(fn, s_emb, t_emb)
  for s, t in ((s1, t1), (s2, t2), (es, zs)):
    _require_same_batch(fn, s, t)

  vertex = tf.reduce_mean(tf.square(zs - zt))
  edge = (tf.reduce_mean(tf.square(_irg_edge(es) - _irg_edge(et)))
          + tf.reduce_mean(tf.square(_irg_edge(s1) - _irg_edge(t1)))
          + tf.reduce_mean(tf.square(_irg_edge(s2) - _irg_edge(t2)))) / 3.0
  transform = tf.reduce_mean(tf.square(_irg_transform(fn, s1, s2) - _irg_transform(fn, t1, t2)))
  return _f32(w_vertex) * vertex + _f32(w_edge) * edge + _f32(w_transform) * transform


# --------------------------------------------------------------------------- CRD

def crd_contrast_loss(scores, n_data, eps=1e-7):
  """CRD NCE loss (Eq. 18): Tian, Krishnan, Isola, ICLR 2020, arXiv:1910.10699 (RepDistiller ContrastLoss).

  scores: [B, K+1] (or RepDistiller's [B, K+1, 1]), column 0 the positive, all > 0; n_data: size
  of the memory bank -> scalar.
  L = -(1/B) [sum_b log(P_b / (P_b + c + eps)) + sum_{b,j} log(c / (Q_bj + c + eps))], c = K / n_data.
  Scores are floored at 1e-30 inside the logs (the reference gives -inf for a zero score).
  """
  x = _f32(scores)
  if x.shape.rank == 3 and x.shape[2] == 1:
    x = x[:, :, 0]
  if x.shape.rank != 2 or (x.shape[1] is not None and x.shape[1] < 2):
    raise ValueError(f"crd_contrast_loss: scores must be [B, K+1] with K >= 1 negatives; got shape "
                     f"{tf.convert_to_tensor(scores).shape}")
  c = tf.cast(tf.shape(x)[1] - 1, tf.float32) / _f32(n_data)
  x = tf.maximum(x, 1e-30)
  pos, neg = x[:, 0], x[:, 1:]
  log_d1 = tf.math.log(pos) - tf.math.log(pos + c + eps)
  log_d0 = tf.math.log(c) - tf.math.log(neg + c + eps)
  return -(tf.reduce_sum(log_d1) + tf.reduce_sum(log_d0)) / _batch_size(x)


# --------------------------------------------------------------------------- FSP

def fsp_matrix(f1, f2):
  """FSP matrix: Yim, Joo, Bae, Kim, CVPR 2017 (no arXiv) (Zoo FSP.fsp_matrix orientation).

  f1 [B, H1, W1, C1], f2 [B, H2, W2, C2] -> [B, C1, C2] (first argument's channels first).
  G[b, i, j] = (1 / (H*W)) * sum_pos f1[b, pos, i] * f2[b, pos, j] after pool-to-match (the taller
  map is average-pooled to the smaller one's size). RepDistiller builds the transpose.
  """
  a, b = _f32(f1), _f32(f2)
  _require_map("fsp_matrix", "f1", a)
  _require_map("fsp_matrix", "f2", b)
  _require_same_batch("fsp_matrix", a, b, "f1", "f2")
  pa, pb = pool_to_match(a, b)
  if pa.shape[1:3] != pb.shape[1:3]:
    raise ValueError(f"fsp_matrix: cannot pool-to-match f1 shape {a.shape} and f2 shape {b.shape} "
                     "(pooling goes to the smaller height, square output)")
  hw = float(pa.shape[1] * pa.shape[2])
  return tf.einsum("bhwi,bhwj->bij", pa, pb) / hw


def fsp(s_feats, t_feats):
  """FSP loss: Yim, Joo, Bae, Kim, CVPR 2017 (no arXiv) (RepDistiller FSP: sum over pairs).

  s_feats, t_feats: lists of L >= 2 NHWC maps with C_s^l = C_t^l (spatial sizes may differ) -> scalar.
  L = sum_{l=0..L-2} mean((fsp_matrix(s_l, s_{l+1}) - fsp_matrix(t_l, t_{l+1}))^2)
  (Zoo averages over the pairs instead; the catalog sums).
  """
  s_feats, t_feats = list(s_feats), list(t_feats)
  if len(s_feats) != len(t_feats) or len(s_feats) < 2:
    raise ValueError(f"fsp: needs two equally long lists of at least 2 maps; got {len(s_feats)} "
                     f"student and {len(t_feats)} teacher maps")
  s_feats = [_f32(f) for f in s_feats]
  t_feats = [tf.stop_gradient(_f32(f)) for f in t_feats]
  for l, (s, t) in enumerate(zip(s_feats, t_feats)):
    if s.shape.rank != 4 or t.shape.rank != 4 or s.shape[-1] != t.shape[-1]:
      raise ValueError(f"fsp: map {l} must be NHWC with equal channels; got student shape "
                       f"{s.shape} and teacher shape {t.shape}")
  loss = tf.constant(0.0)
  for l in range(len(s_feats) - 1):
    g_s = fsp_matrix(s_feats[l], s_feats[l + 1])
    g_t = fsp_matrix(t_feats[l], t_feats[l + 1])
    loss += tf.reduce_mean(tf.square(g_s - g_t))
  return loss


# --------------------------------------------------------------------------- KD-SVD

def _finite(x):
  return tf.where(tf.math.is_finite(x), x, tf.zeros_like(x))


def _top_right_singular(f, n):
  """First n singular values [B, n] and right-singular vectors [B, C, n] of X = reshape(f, [B, HW, C]).

  Computed from the eigendecomposition of the smaller Gram matrix (X^T X if C <= HW, else X X^T with
  v_j = normalize(X^T u_j)): the same vectors as an SVD, up to sign, to float32 accuracy for the
  leading ones that the loss keeps, and much cheaper than tf.linalg.svd, whose XLA CPU kernel takes
  seconds on a [64, 1024, 64] batch. TF's eigh gradient regularises 1 / (lambda_i - lambda_j) like
  its SVD gradient, so gradients stay finite at repeated (e.g. all-zero) singular values.
  """
  _, h, w, c = f.shape
  x = tf.reshape(f, [-1, h * w, c])
  use_columns = c <= h * w
  gram = tf.matmul(x, x, transpose_a=use_columns, transpose_b=not use_columns)
  lam, vecs = tf.linalg.eigh(0.5 * (gram + tf.transpose(gram, [0, 2, 1])))   # ascending
  lam = tf.reverse(lam[:, -n:], axis=[1])
  vecs = tf.reverse(vecs[:, :, -n:], axis=[2])
  v = vecs if use_columns else tf.matmul(x, vecs, transpose_a=True)          # X^T u_j = s_j v_j
  positive = lam > 0
  sigma = tf.where(positive, tf.sqrt(tf.where(positive, lam, tf.ones_like(lam))), tf.zeros_like(lam))
  return _finite(sigma), l2_normalize(_finite(v), axis=1)


def teacher_singular_vectors(f, k):
  """The teacher side of KD-SVD / MHGD: the first k right-singular vectors of
  reshape(f, [B, H*W, C]) with the catalog's canonical sign (largest-magnitude component
  positive), unit columns [B, C, k], and normalize(sigma[:k]) [B, k]. f: NHWC, H*W >= k, C >= k."""
  sigma, v = _top_right_singular(_f32(f), k)
  pivot = tf.argmax(tf.abs(v), axis=1)                               # [B, k]
  lead = tf.gather(tf.transpose(v, [0, 2, 1]), pivot, axis=2, batch_dims=2)
  v = v * tf.where(lead < 0, -1.0, 1.0)[:, None, :]
  return v, l2_normalize(sigma, axis=1)


def student_singular_vectors(f, k, v_t):
  """The student side: of its first k+3 right-singular vectors [B, C, k+3], the one best aligned
  with each teacher vector of ``v_t`` [B, C, k] (largest |cosine|), signed to make the cosine
  positive: [B, C, k] unit columns. f: NHWC with H*W >= k+3 and C >= k+3."""
  _, v_s = _top_right_singular(_f32(f), k + 3)
  cos = tf.matmul(v_s, v_t, transpose_a=True)                        # [B, k+3, k]
  best = tf.argmax(tf.abs(cos), axis=1)                              # [B, k]
  pick = tf.one_hot(best, k + 3, axis=1) * tf.sign(cos)              # [B, k+3, k]
  return tf.matmul(v_s, pick)


def _svd_relation(cur, prev):
  """R[b, c, c', j] = exp(-(cur[b, c, j] - prev[b, c', j])^2 / 8)."""
  return tf.exp(-tf.square(cur[:, :, None, :] - prev[:, None, :, :]) / 8.0)


def kd_svd(s_feats, t_feats, k=1):
  """KD-SVD: Lee, Kim, Song, ECCV 2018, arXiv:1807.06819 (RepDistiller KDSVD + canonical sign).

  s_feats, t_feats: lists of L >= 2 NHWC maps with C_s^l = C_t^l, H*W >= k+3 and C >= k+3 -> scalar.
  L = sum_{l>=1} (1/B) sum (R_s^l - R_t^l)^2, R^l[b,c,c',j] = exp(-(v^l[b,c,j] - v^{l-1}[b,c',j])^2/8),
  v = teacher right-singular vectors of reshape(f, [B, HW, C]) (first k, canonical sign: largest-
  magnitude component positive) and for the student the best-matching of its first k+3, sign-aligned
  (METHODS.md §2.19); both scaled by normalize(sigma_t[:k]). The catalog's sign rule makes the value
  independent of the SVD backend; RepDistiller's square-map reshape is not reproduced (any H, W).
  The SVD is taken through the eigendecomposition of the smaller Gram matrix (see
  _top_right_singular): same numbers to ~1e-5 relative as LAPACK's SVD, far cheaper under XLA.
  Gradients flow through the student's decomposition only; they are finite at repeated singular
  values (TF regularises 1 / (lambda_i - lambda_j)) but large when leading ones are close.
  XLA: compiles and runs under jit_compile=True (tested), but XLA's CPU eigensolver is ~10x slower
  than TF's default kernel (0.4 s vs 0.04 s for a [64, 64, 64] batch): the one loss better kept out
  of jit-compiled steps on CPU.
  """
  fn = "kd_svd"
  if not is_int(k) or k < 1:
    raise ValueError(f"{fn}: k must be an integer >= 1; got {k!r}")
  s_feats, t_feats = list(s_feats), list(t_feats)
  if len(s_feats) != len(t_feats) or len(s_feats) < 2:
    raise ValueError(f"{fn}: needs two equally long lists of at least 2 maps; got {len(s_feats)} "
                     f"student and {len(t_feats)} teacher maps")
  s_feats = [_f32(f) for f in s_feats]
  t_feats = [tf.stop_gradient(_f32(f)) for f in t_feats]
  for l, (s, t) in enumerate(zip(s_feats, t_feats)):
    _require_map(fn, f"s_feats[{l}]", s)
    _require_map(fn, f"t_feats[{l}]", t)
    _require_same_batch(fn, s, t)
    if s.shape[-1] != t.shape[-1]:
      raise ValueError(f"{fn}: map {l} needs equal channels; got student shape {s.shape} and "
                       f"teacher shape {t.shape}")
    for arg, m in (("student", s), ("teacher", t)):
      if m.shape[1] * m.shape[2] < k + 3 or m.shape[3] < k + 3:
        raise ValueError(f"{fn}: map {l} ({arg} shape {m.shape}) needs H*W >= k+3 and C >= k+3 "
                         f"(k = {k})")

  loss = tf.constant(0.0)
  prev_s = prev_t = None
  for s, t in zip(s_feats, t_feats):
    v_t_unit, scale = teacher_singular_vectors(t, k)
    v_t = v_t_unit * scale[:, None, :]
    a_s = student_singular_vectors(s, k, v_t_unit) * scale[:, None, :]
    if prev_s is not None:
      sq = tf.square(_svd_relation(a_s, prev_s) - _svd_relation(v_t, prev_t))
      loss += tf.reduce_sum(_finite(sq)) / _batch_size(s)
    prev_s, prev_t = a_s, v_t
  return loss
