"""Feature-map losses: AT, NST, AB, OFD, VID, FT, AFD, ReviewKD's HCL, LwM's CAM distance
(METHODS.md §2.3, 2.4, 2.10-2.13, 2.17, §4).

Pure functions (DESIGN.md contract 2): tensors in, a float32 scalar out (``ofd_margin``: ``[C]``),
no variables, usable eagerly, in ``tf.function`` and under ``jit_compile=True``. Inputs are cast to
float32 first. Maps are NHWC with static spatial sizes. Teacher-side arguments are treated as
constants (``tf.stop_gradient``), as METHODS.md §0 requires; gradients are finite at degenerate
inputs (all-zero maps, zero channels, zero BN scale).
"""
import math

import tensorflow as tf

from op_util import adaptive_avg_pool, flatten_per_sample, l2_normalize, pool_to_match

__all__ = [
    "hcl",
    "cam_distance",
    "attention_transfer",
    "nst",
    "activation_boundary",
    "ofd_margin",
    "ofd_distance",
    "vid_nll",
    "factor_transfer",
    "afd",
]


# --------------------------------------------------------------------------- helpers

def _f32(x):
  return tf.cast(x, tf.float32)


def _batch_size(x):
  return tf.cast(tf.shape(x)[0], tf.float32)


def _require_map(fn, arg, x):
  if x.shape.rank != 4:
    raise ValueError(f"{fn}: {arg} must be an NHWC map [B, H, W, C]; got shape {x.shape}")


def _require_same_shape(fn, s, t, s_arg="student", t_arg="teacher"):
  if not s.shape.is_compatible_with(t.shape):
    raise ValueError(f"{fn}: {s_arg} shape {s.shape} and {t_arg} shape {t.shape} must be equal")


def _pool_pair(fn, s, t):
  """Pool-to-match two NHWC maps (METHODS.md §0); error if their sizes still differ."""
  _require_map(fn, "the student map", s)
  _require_map(fn, "the teacher map", t)
  ps, pt = pool_to_match(s, t)
  if ps.shape[1:3].as_list() != pt.shape[1:3].as_list():
    raise ValueError(f"{fn}: cannot pool-to-match student shape {s.shape} and teacher shape "
                     f"{t.shape} (pooling goes to the smaller height, square output)")
  return ps, pt


def _abs_pow(x, p):
  """|x|^p with a finite gradient at x = 0 for every p > 0."""
  if p == 2:
    return tf.square(x)
  if p == 1:
    return tf.abs(x)
  a = tf.abs(x)
  nonzero = a > 0
  safe = tf.where(nonzero, a, tf.ones_like(a))
  return tf.where(nonzero, tf.pow(safe, p), tf.zeros_like(a))


def _positive_exponent(fn, p):
  p = float(p)
  if not p > 0:
    raise ValueError(f"{fn}: p must be a positive number; got {p}")
  return p


def _safe_norm(x, axis):
  """||x||_2 along ``axis`` (keepdims) whose gradient at x = 0 is 0 instead of NaN."""
  sq = tf.reduce_sum(tf.square(x), axis=axis, keepdims=True)
  nonzero = sq > 0
  return tf.where(nonzero, tf.sqrt(tf.where(nonzero, sq, tf.ones_like(sq))), tf.zeros_like(sq))


# --------------------------------------------------------------------------- AT

def attention_transfer(s_feat, t_feat, p=2.0):
  """Attention transfer (AT): Zagoruyko & Komodakis, ICLR 2017, arXiv:1612.03928.

  s_feat [B, Hs, Ws, Cs], t_feat [B, Ht, Wt, Ct] (channels may differ; the taller map is
  average-pooled to the other's size). Returns a scalar.
  L = mean_{b,pos} (q_s - q_t)^2,  q = normalize_pos(mean_c |f|^p)  (max-form l2 normalisation).
  Convention: |f|^p (paper, Zoo; RepDistiller uses f^p, equal for p = 2 or post-ReLU maps) and
  RepDistiller's max(||a||, 1e-12) normaliser rather than Zoo's ||a|| + 1e-6 (METHODS.md §2.3).
  """
  p = _positive_exponent("attention_transfer", p)
  s, t = _pool_pair("attention_transfer", _f32(s_feat), tf.stop_gradient(_f32(t_feat)))

  def attention(f):
    a = tf.reduce_mean(_abs_pow(f, p), axis=-1)           # [B, H, W]
    return l2_normalize(flatten_per_sample(a), axis=1)   # [B, H*W]

  return tf.reduce_mean(tf.square(attention(s) - attention(t)))


# --------------------------------------------------------------------------- NST

def nst(s_feat, t_feat):
  """Neuron selectivity transfer (NST, polynomial kernel d=2, c=0).

  Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
  arXiv:1707.01219. s_feat [B, Hs, Ws, Cs], t_feat [B, Ht, Wt, Ct] (channels may differ;
  pool-to-match). Returns a scalar.
  L = mean(K_tt) + mean(K_ss) - 2 mean(K_st),  K_xy[b,i,j] = (n_x[b,:,i] . n_y[b,:,j])^2,
  n = each channel's H*W vector l2-normalised (RepDistiller NSTLoss, full squared MMD).
  Computed from [B, C, C'] Gram matrices, or from the equivalent [B, HW, HW] Gram matrices of the
  positions when those are smaller (sum_ij (n_i.m_j)^2 = <N N^T, M M^T>_F); never [B, C, C', HW].
  """
  s, t = _pool_pair("nst", _f32(s_feat), tf.stop_gradient(_f32(t_feat)))
  hw, cs, ct = s.shape[1] * s.shape[2], s.shape[3], t.shape[3]

  def channel_vectors(f):  # [B, HW, C], each column unit-norm
    return l2_normalize(tf.reshape(f, [tf.shape(f)[0], hw, f.shape[3]]), axis=1)

  ns, nt = channel_vectors(s), channel_vectors(t)
  if 2 * hw * hw < cs * cs + ct * ct + cs * ct:
    gs = tf.matmul(ns, ns, transpose_b=True)  # [B, HW, HW]
    gt = tf.matmul(nt, nt, transpose_b=True)
    k_ss = tf.reduce_sum(gs * gs, axis=[1, 2]) / (cs * cs)
    k_tt = tf.reduce_sum(gt * gt, axis=[1, 2]) / (ct * ct)
    k_st = tf.reduce_sum(gs * gt, axis=[1, 2]) / (cs * ct)
  else:
    def mean_sq_gram(x, y):
      return tf.reduce_mean(tf.square(tf.matmul(x, y, transpose_a=True)), axis=[1, 2])
    k_ss, k_tt, k_st = mean_sq_gram(ns, ns), mean_sq_gram(nt, nt), mean_sq_gram(ns, nt)
  return tf.reduce_mean(k_tt) + tf.reduce_mean(k_ss) - 2.0 * tf.reduce_mean(k_st)


# --------------------------------------------------------------------------- AB

def activation_boundary(s_pre, t_pre, margin=1.0):
  """Activation-boundary loss (AB): Heo, Lee, Yun & Choi, AAAI 2019, arXiv:1811.03233.

  s_pre: the connector output of the student's pre-ReLU map, t_pre: the teacher's pre-ReLU map,
  equal shapes (e.g. [B, H, W, C]); a mismatch raises ValueError. Returns a scalar.
  L = (1/B) sum[(s+m)^2 1(s > -m, t <= 0) + (s-m)^2 1(s <= m, t > 0)],  m = margin.
  Convention: RepDistiller criterion_alternative_l2 divided by B, margin 1 (Zoo: mean over
  elements, margin 2). Layer weights 2^(i-n+1) and the 3/1000 factor belong to the distiller.
  """
  s, t = _f32(s_pre), tf.stop_gradient(_f32(t_pre))
  _require_same_shape("activation_boundary", s, t)
  m = tf.cast(margin, tf.float32)
  teacher_on = t > 0
  below = tf.square(s + m) * tf.cast((s > -m) & tf.logical_not(teacher_on), tf.float32)
  above = tf.square(s - m) * tf.cast((s <= m) & teacher_on, tf.float32)
  return tf.reduce_sum(below + above) / _batch_size(s)


# --------------------------------------------------------------------------- OFD

def ofd_margin(bn_gamma, bn_beta):
  """Per-channel OFD margin from the teacher's pre-ReLU BatchNorm (Heo et al., ICCV 2019,
  "A Comprehensive Overhaul of Feature Distillation", arXiv:1904.01866).

  bn_gamma, bn_beta: [C]. Returns [C] (a constant: no gradient flows).
  m_c = E[x | x < 0] for x ~ N(beta_c, |gamma_c|^2) = mu - sigma phi(z)/Phi(z), z = -mu/sigma,
  when Phi(z) > 0.001, else -3 sigma (clovaai / mdistiller get_margin_from_BN). Margins from the BN
  parameters, not from batch statistics (Zoo). Library extension for gamma_c = 0 (where the
  references divide by zero): the limit min(beta_c, 0). Computed in float64 (mu - sigma phi/Phi
  cancels up to ~12x near the fallback border; the references use float64 scipy) and returned as
  float32: margins are constants, compute them once outside a TPU step (no float64 on TPU).
  """
  gamma, beta = tf.cast(bn_gamma, tf.float64), tf.cast(bn_beta, tf.float64)
  if gamma.shape.rank != 1 or not gamma.shape.is_compatible_with(beta.shape):
    raise ValueError(f"ofd_margin: bn_gamma shape {gamma.shape} and bn_beta shape {beta.shape} "
                     "must both be [C]")
  sigma, mu = tf.abs(gamma), beta
  has_scale = sigma > 0
  z = -mu / tf.where(has_scale, sigma, tf.ones_like(sigma))
  cdf = 0.5 * tf.math.erfc(-z / math.sqrt(2.0))
  pdf = tf.exp(-0.5 * tf.square(z)) / math.sqrt(2.0 * math.pi)
  truncated_mean = mu - sigma * pdf / tf.maximum(cdf, 1e-3)
  margin = tf.where(cdf > 1e-3, truncated_mean, -3.0 * sigma)
  margin = tf.where(has_scale, margin, tf.minimum(mu, tf.zeros_like(mu)))
  return tf.stop_gradient(_f32(margin))


def ofd_distance(s_feat, t_pre, margin):
  """OFD partial L2 distance (Heo et al., ICCV 2019, arXiv:1904.01866).

  s_feat [B, Hs, Ws, C]: the connector output of the student's pre-ReLU map (already C_t
  channels); t_pre [B, Ht, Wt, C]: the teacher's pre-ReLU map; margin [C] from ``ofd_margin``.
  Different spatial sizes are pooled to match; different channel counts raise ValueError.
  L = (1/B) sum 1(s > t' or t' > 0) (s - t')^2,  t' = max(t, margin_c).
  Convention: clovaai/mdistiller distillation_loss summed and divided by B (Zoo takes the mean);
  the 1/2^(n-i-1) layer weights and the 1e-3 factor belong to the distiller.
  """
  s, t = _pool_pair("ofd_distance", _f32(s_feat), tf.stop_gradient(_f32(t_pre)))
  m = tf.stop_gradient(_f32(margin))
  if s.shape[-1] != t.shape[-1] or m.shape.as_list() != [t.shape[-1]]:
    raise ValueError(f"ofd_distance: student shape {s_feat.shape}, teacher shape {t_pre.shape} "
                     f"and margin shape {m.shape} must share the channel count (margin: [C])")
  target = tf.maximum(t, m)
  mask = tf.cast((s > target) | (target > 0), tf.float32)
  return tf.reduce_sum(mask * tf.square(s - target)) / _batch_size(s)


# --------------------------------------------------------------------------- VID

def vid_nll(target, pred_mean, log_scale, eps=1e-5):
  """VID Gaussian negative log-likelihood: Ahn, Hu, Damianou, Lawrence & Dai, CVPR 2019,
  "Variational Information Distillation for Knowledge Transfer", arXiv:1904.05835.

  target: teacher map [B, H, W, C] (constant); pred_mean: regressor output, same shape;
  log_scale: [C] (alpha, one per channel). Returns a scalar.
  L = mean 0.5 ((pred_mean - target)^2 / var_c + log var_c),  var_c = softplus(alpha_c) + eps
  (RepDistiller VIDLoss after its regressor, no log 2pi; eps 1e-5 as RepDistiller/mdistiller,
  Zoo uses 1e-6). Pool-to-match happens before the regressor, in the distiller.
  """
  y, mean, alpha = tf.stop_gradient(_f32(target)), _f32(pred_mean), _f32(log_scale)
  _require_same_shape("vid_nll", mean, y, "pred_mean", "target")
  if alpha.shape.as_list() != [y.shape[-1]]:
    raise ValueError(f"vid_nll: log_scale shape {alpha.shape} must be [C] for target shape "
                     f"{y.shape}")
  var = tf.nn.softplus(alpha) + eps
  return tf.reduce_mean(0.5 * (tf.square(mean - y) / var + tf.math.log(var)))


# --------------------------------------------------------------------------- FT

def factor_transfer(s_factor, t_factor, p=1):
  """Factor transfer (FT): Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression
  via Factor Transfer", NeurIPS 2018, arXiv:1802.04977.

  s_factor (translator output), t_factor (paraphraser encoding): [B, H, W, C] with equal
  channels, or [B, D] with equal D. NHWC factors of different spatial size are pooled to match
  (library extension); any other mismatch raises ValueError. Returns a scalar.
  L = mean_{b,n} |F_hat_s - F_hat_t|^p,  F_hat = normalize(flatten(F)) per sample.
  Convention: the paper's factor loss (= Zoo FT for p = 1), not RepDistiller's attention-map FT.
  """
  p = _positive_exponent("factor_transfer", p)
  s, t = _f32(s_factor), tf.stop_gradient(_f32(t_factor))
  if s.shape.rank == 4 and t.shape.rank == 4:
    s, t = _pool_pair("factor_transfer", s, t)
  if not s.shape[1:].is_compatible_with(t.shape[1:]):
    raise ValueError(f"factor_transfer: student factor shape {s_factor.shape} and teacher factor "
                     f"shape {t_factor.shape} must have equal channels (spatial sizes may differ)")
  s_hat = l2_normalize(flatten_per_sample(s), axis=1)
  t_hat = l2_normalize(flatten_per_sample(t), axis=1)
  return tf.reduce_mean(_abs_pow(s_hat - t_hat, p))


# --------------------------------------------------------------------------- AFD

def afd(s_feat, t_feat, rho):
  """Attention feature distillation (AFD, Zoo form): Wang et al., "Pay Attention to Features,
  Transfer Learn Faster CNNs", ICLR 2020 (OpenReview ryxyCeHtPB; no arXiv id).

  s_feat, t_feat: [B, H, W, C], equal shapes (a mismatch raises ValueError); rho: [B, C]
  channel weights from the distiller's attention module (gradients flow into rho). Returns a scalar.
  L = (1/B) sum_{b,c} rho[b,c] mean_{h,w} (s_hat - t_hat)^2,  f_hat = f / (||f[b,:,:,c]||_2 + 1e-6).
  Convention: Zoo AFD (eps added to the spatial norm; SE attention instead of the paper's AFDS).
  """
  s, t, r = _f32(s_feat), tf.stop_gradient(_f32(t_feat)), _f32(rho)
  _require_map("afd", "s_feat", s)
  _require_same_shape("afd", s, t)
  if not r.shape.is_compatible_with([s.shape[0], s.shape[-1]]):
    raise ValueError(f"afd: rho shape {r.shape} must be [B, C] for feature shape {s.shape}")

  def normalize(f):
    return f / (_safe_norm(f, axis=[1, 2]) + 1e-6)

  per_channel = tf.reduce_mean(tf.square(normalize(s) - normalize(t)), axis=[1, 2])  # [B, C]
  return tf.reduce_sum(r * per_channel) / _batch_size(s)


# --------------------------------------------------------------------------- ReviewKD, LwM

def hcl(student_maps, teacher_maps):
  """Hierarchical context loss (mdistiller ``hcl_loss``): a sum over levels of the weighted mean
  of the full-resolution MSE and the MSEs of the 4x4, 2x2, 1x1 average pools smaller than the
  level. Maps are NHWC pairs of equal shape; returns a float32 scalar."""
  total = 0.0
  for ys, yt in zip(student_maps, teacher_maps):
    ys, yt = tf.cast(ys, tf.float32), tf.stop_gradient(tf.cast(yt, tf.float32))
    if ys.shape[1:] != yt.shape[1:]:
      raise ValueError(f"hcl: student map {ys.shape} and teacher map {yt.shape} must match")
    loss, weight, weights = tf.reduce_mean(tf.square(ys - yt)), 1.0, 1.0
    for size in (4, 2, 1):
      if size >= ys.shape[1]:
        continue
      weight /= 2.0
      pooled_s = adaptive_avg_pool(ys, (size, size))
      pooled_t = adaptive_avg_pool(yt, (size, size))
      loss += weight * tf.reduce_mean(tf.square(pooled_s - pooled_t))
      weights += weight
    total += loss / weights
  return total


def cam_distance(cam_s, cam_t):
  """mean |normalize(cam_s) - normalize(cam_t)| after pool-to-match; [B, H, W, 1] maps -> scalar."""
  cam_s, cam_t = pool_to_match(cam_s, cam_t)
  hat_s = l2_normalize(flatten_per_sample(cam_s), axis=1)
  hat_t = l2_normalize(flatten_per_sample(cam_t), axis=1)
  return tf.reduce_mean(tf.abs(hat_s - tf.stop_gradient(hat_t)))
