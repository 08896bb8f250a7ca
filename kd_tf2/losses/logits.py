"""Response (logit) losses: ST, Logits, DKD, DIST, DML, BSS's and MHGD's KLs (METHODS.md §2.1, 2.2,
2.15, 2.16, 2.20, §4).

Pure functions (DESIGN.md contract 2): logits ``[B, K]`` in, a float32 scalar out, no variables,
usable eagerly, in ``tf.function`` and under ``jit_compile=True``. Inputs are cast to float32 first.
Teacher/peer logits are constants (``tf.stop_gradient``, METHODS.md §0). Every log-probability
comes from ``log_softmax`` (never ``log(softmax)``), so gradients stay finite for saturated logits.
"""
import tensorflow as tf

__all__ = ["soft_target", "logit_mse", "dkd", "dist", "dml_kl", "kl_without_t2", "kl_rows_sum"]

# Added to masked-out logits: exp() underflows to exactly 0 but stays finite (no inf - inf).
_MASKED_LOGIT = -1e9


# --------------------------------------------------------------------------- helpers

def _f32(x):
  return tf.cast(x, tf.float32)


def _batch_size(x):
  return tf.cast(tf.shape(x)[0], tf.float32)


def _logit_pair(fn, s_logits, t_logits, t_arg="teacher"):
  """float32 student logits and stop-gradient teacher logits, both [B, K] of equal shape."""
  s, t = _f32(s_logits), tf.stop_gradient(_f32(t_logits))
  if s.shape.rank != 2 or t.shape.rank != 2:
    raise ValueError(f"{fn}: logits must be [B, K]; got student shape {s.shape} and {t_arg} "
                     f"shape {t.shape}")
  if not s.shape.is_compatible_with(t.shape):
    raise ValueError(f"{fn}: student shape {s.shape} and {t_arg} shape {t.shape} must be equal")
  return s, t


def _kl_batchmean(log_p, log_q):
  """(1/B) * sum_{b,k} p (log p - log q) with p = exp(log_p): KL(p || q) per row, batch mean."""
  return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q)) / _batch_size(log_p)


def _safe_norm(x, axis):
  """||x||_2 along ``axis``; at x = 0 the value is 0 and the gradient 0 (not NaN)."""
  sq = tf.reduce_sum(tf.square(x), axis=axis)
  nonzero = sq > 0
  return tf.where(nonzero, tf.sqrt(tf.where(nonzero, sq, tf.ones_like(sq))), tf.zeros_like(sq))


def _pearson(a, b, axis, eps=1e-8):
  """Pearson correlation along ``axis`` with eps added to the product of norms (DIST_KD)."""
  a = a - tf.reduce_mean(a, axis=axis, keepdims=True)
  b = b - tf.reduce_mean(b, axis=axis, keepdims=True)
  return tf.reduce_sum(a * b, axis=axis) / (_safe_norm(a, axis) * _safe_norm(b, axis) + eps)


# --------------------------------------------------------------------------- losses

def soft_target(s_logits, t_logits, temperature=4.0):
  """ST / KD soft targets: Hinton, Vinyals, Dean, NIPS 2014 DL workshop, arXiv:1503.02531.

  s_logits, t_logits: [B, K] -> scalar.
  L = T^2 * (1/B) * sum_{b,k} p_t (log p_t - log p_s), p = softmax(z / T): KL(teacher || student),
  "batchmean" times T^2, as RepDistiller DistillKL / Zoo SoftTarget (not sseung0703's T=5, no T^2).
  """
  s, t = _logit_pair("soft_target", s_logits, t_logits)
  temp = _f32(temperature)
  kl = _kl_batchmean(tf.nn.log_softmax(t / temp, axis=-1), tf.nn.log_softmax(s / temp, axis=-1))
  return kl * temp * temp


def logit_mse(s_logits, t_logits):
  """Logit regression: Ba, Caruana, NIPS 2014, arXiv:1312.6184 (Zoo Logits).

  s_logits, t_logits: [B, K] -> scalar.  L = mean_{b,k} (z_s - z_t)^2.
  """
  s, t = _logit_pair("logit_mse", s_logits, t_logits)
  return tf.reduce_mean(tf.square(s - t))


def dkd(s_logits, t_logits, labels, alpha=1.0, beta=8.0, temperature=4.0):
  """Decoupled KD: Zhao, Cui, Song, Qiu, Liang, CVPR 2022, arXiv:2203.08679 (mdistiller dkd_loss).

  s_logits, t_logits: [B, K]; labels: int [B] -> scalar.
  L = alpha * T^2 KL_B(b_t || b_s) + beta * T^2 KL_B(p_hat_t || p_hat_s), with b = [p_y, 1 - p_y]
  (binary target/rest split of softmax(z/T)), p_hat = softmax over the classes k != y, KL_B the
  batch-mean KL. mdistiller subtracts 1000 from z_y/T; here the target class is masked explicitly
  and log b is computed in log space (logsumexp over k != y), which gives the same numbers without
  log(0) when p_y underflows.
  """
  s, t = _logit_pair("dkd", s_logits, t_logits)
  labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
  if s.shape[0] is not None and labels.shape[0] is not None and labels.shape[0] != s.shape[0]:
    raise ValueError(f"dkd: labels shape {labels.shape} does not match logits shape {s.shape}")
  temp = _f32(temperature)
  is_target = tf.one_hot(labels, tf.shape(s)[1], on_value=True, off_value=False, dtype=tf.bool)

  def split(z):
    z = z / temp
    log_p = tf.nn.log_softmax(z, axis=-1)
    masked = tf.where(is_target, _MASKED_LOGIT, z)           # target class removed
    log_target = tf.reduce_sum(tf.where(is_target, log_p, 0.0), axis=-1)
    log_rest = tf.reduce_logsumexp(masked, axis=-1) - tf.reduce_logsumexp(z, axis=-1)
    log_binary = tf.stack([log_target, log_rest], axis=-1)   # log [p_y, sum_{k!=y} p_k]
    return log_binary, tf.nn.log_softmax(masked, axis=-1)    # and log p_hat (k != y)

  bin_s, hat_s = split(s)
  bin_t, hat_t = split(t)
  tckd = _kl_batchmean(bin_t, bin_s)
  nckd_terms = tf.where(is_target, 0.0, tf.exp(hat_t) * (hat_t - hat_s))
  nckd = tf.reduce_sum(nckd_terms) / _batch_size(s)
  return temp * temp * (_f32(alpha) * tckd + _f32(beta) * nckd)


def dist(s_logits, t_logits, beta=1.0, gamma=1.0, temperature=1.0):
  """DIST: Huang, You, Wang, Qian, Xu, NeurIPS 2022, arXiv:2205.10536 (authors' DIST_KD loss).

  s_logits, t_logits: [B, K] -> scalar (meaningful for B >= 2; at B = 1 the intra term is 1).
  L = T^2 * (beta * (1 - mean_b rho(Y_s[b,:], Y_t[b,:])) + gamma * (1 - mean_k rho(Y_s[:,k], Y_t[:,k]))),
  Y = softmax(z / T), rho = Pearson correlation with 1e-8 added to the product of the norms.
  """
  s, t = _logit_pair("dist", s_logits, t_logits)
  temp = _f32(temperature)
  y_s, y_t = tf.nn.softmax(s / temp, axis=-1), tf.nn.softmax(t / temp, axis=-1)
  inter = 1.0 - tf.reduce_mean(_pearson(y_s, y_t, axis=1))
  intra = 1.0 - tf.reduce_mean(_pearson(y_s, y_t, axis=0))
  return temp * temp * (_f32(beta) * inter + _f32(gamma) * intra)


def dml_kl(s_logits, peer_logits):
  """DML mutual term: Zhang, Xiang, Hospedales, Lu, CVPR 2018, arXiv:1706.00384 (Zoo DML).

  s_logits, peer_logits: [B, K] -> scalar.
  L = (1/B) * sum_{b,k} p_peer (log p_peer - log p_s), plain softmax (no temperature, as the paper
  and Zoo; sseung0703 uses T = 5); the peer is a constant.
  """
  s, peer = _logit_pair("dml_kl", s_logits, peer_logits, t_arg="peer")
  return _kl_batchmean(tf.nn.log_softmax(peer, axis=-1), tf.nn.log_softmax(s, axis=-1))


# --------------------------------------------------------------------------- BSS, MHGD

def kl_without_t2(s_logits, t_logits, temperature, mask=None):
  """BSS's KL: masked batch-mean of KL(softmax(t/T) || softmax(s/T)) without T^2 (Zoo BSS; also
  BYOT's, as its authors' code).

  s_logits, t_logits: [B, K]; mask: [B] bool or 0/1 (rows that count), None: every row.
  Float32 scalar. The teacher keeps its gradient (stop it where the method detaches it).
  """
  s_logits, t_logits = _f32(s_logits), _f32(t_logits)
  log_p_t = tf.nn.log_softmax(t_logits / temperature)
  log_p_s = tf.nn.log_softmax(s_logits / temperature)
  per_row = tf.reduce_sum(tf.exp(log_p_t) * (log_p_t - log_p_s), axis=1)
  if mask is None:
    return tf.reduce_mean(per_row)
  mask = tf.cast(mask, tf.float32)
  return tf.reduce_sum(per_row * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)


def kl_rows_sum(x, y):
  """MHGD's attention KL: sum over every row and entry of softmax(x) * (log_softmax(x) -
  log_softmax(y)); x, y [..., N] (sum, not a batch mean). Float32 scalar."""
  x, y = _f32(x), _f32(y)
  return tf.reduce_sum(tf.nn.softmax(x) * (tf.nn.log_softmax(x) - tf.nn.log_softmax(y)))
