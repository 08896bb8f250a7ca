"""Losses of online distillation (nets trained together, no frozen teacher) and self-distillation.

Pure functions, logits [B, K] in, float32 scalar out. "KL(p || q)" is the batch mean of
sum_k p (log p - log q); the distribution on the left is the target, detached unless a function
says otherwise (OKDDip's keep their gradient, as in the authors' code).
"""
import tensorflow as tf

from kd_tf2.losses.logits import _f32, _kl_batchmean, soft_target

__all__ = ["sigmoid_rampup", "kl_eps", "cohort_kl", "gate_ensemble", "one_loss",
           "collaborative_kl", "scale_gradient", "kdcl_min_logit", "kdcl_naive", "cs_kd",
           "attention_targets", "okddip_peer_kl", "okddip_leader_kl"]


def cohort_kl(logits, k):
  """DML cohort term of net ``k``: Zhang et al., "Deep Mutual Learning", CVPR 2018,
  arXiv:1706.00384, eq. 10: (1 / (K-1)) * sum_{l != k} KL(p_l || p_k), plain softmax.

  logits: list of K >= 2 tensors [B, C]; the other nets' logits are constants.
  """
  others = [tf.stop_gradient(_f32(z)) for i, z in enumerate(logits) if i != k]
  log_q = tf.nn.log_softmax(_f32(logits[k]), axis=-1)
  kls = [_kl_batchmean(tf.nn.log_softmax(z, axis=-1), log_q) for z in others]
  return tf.add_n(kls) / float(len(others))


def gate_ensemble(branch_logits, gate):
  """ONE's ensemble: z_e = sum_i g_i z_i. branch_logits: list of m [B, C]; gate: [B, m]
  (softmax weights per sample). Returns [B, C]."""
  stacked = tf.stack([_f32(z) for z in branch_logits], axis=1)  # [B, m, C]
  return tf.reduce_sum(stacked * _f32(gate)[:, :, None], axis=1)


def sigmoid_rampup(epoch, length):
  """The consistency ramp-up of ONE's and OKDDip's code (Laine & Aila, ICLR 2017,
  arXiv:1610.02242): exp(-5 (1 - min(epoch, length) / length)^2), epoch 0-based; 1 when
  ``length`` is 0. epoch: a scalar (tensor or number) -> float32 scalar."""
  if not length:
    return tf.constant(1.0)
  done = tf.clip_by_value(_f32(epoch), 0.0, float(length)) / float(length)
  return tf.exp(-5.0 * tf.square(1.0 - done))


# ONE's and OKDDip's code add 1e-7 to the target probabilities of their KL (Lan1991Xu/
# ONE_NeurIPS2018 loss/kl_loss.py; DefangChen/OKDDip utils.py).
TARGET_EPS = 1e-7


def kl_eps(targets, logits, temperature):
  """T^2 * batch mean of sum (p + eps)(log(p + eps) - log q) over every axis but the batch's,
  p = softmax(targets / T), q = softmax(logits / T), eps = 1e-7; targets, logits [B, ..., K].
  Both keep their gradient (stop it on the targets where the method detaches them)."""
  temp = _f32(temperature)
  p = tf.nn.softmax(_f32(targets) / temp, axis=-1) + TARGET_EPS
  log_q = tf.nn.log_softmax(_f32(logits) / temp, axis=-1)
  per_row = tf.reduce_sum(p * (tf.math.log(p) - log_q), axis=list(range(1, p.shape.rank)))
  return temp * temp * tf.reduce_mean(per_row)


def one_loss(branch_logits, ensemble_logits, temperature=3.0):
  """ONE distillation term: Lan, Zhu, Gong, NeurIPS 2018, arXiv:1806.04606, eq. 5:
  sum_i T^2 * KL(softmax(z_e / T) || softmax(z_i / T)), the ensemble detached (T = 3), with the
  authors' code's + 1e-7 on the ensemble's probabilities (``kl_eps``).

  branch_logits: list of m [B, C]; ensemble_logits: [B, C]. The CE terms of ONE's eq. 6 are
  plain cross-entropies, added by the distiller.
  """
  target = tf.stop_gradient(_f32(ensemble_logits))
  return tf.add_n([kl_eps(target, z, temperature) for z in branch_logits])


def collaborative_kl(head_logits, h, temperature=2.0):
  """CL soft-target term of head ``h``: Song & Chai, NeurIPS 2018, arXiv:1805.11761, eq. 3-4:
  T^2 * KL(q_h || softmax(z_h / T)) with q_h = mean_{j != h} softmax(z_j / T), the other heads'
  targets detached. head_logits: list of H >= 2 [B, C]."""
  temp = _f32(temperature)
  others = [tf.nn.softmax(tf.stop_gradient(_f32(z)) / temp, axis=-1)
            for j, z in enumerate(head_logits) if j != h]
  target = tf.add_n(others) / float(len(others))
  log_target = tf.math.log(tf.maximum(target, 1e-30))
  log_q = tf.nn.log_softmax(_f32(head_logits[h]) / temp, axis=-1)
  return temp * temp * _kl_batchmean(log_target, log_q)


def scale_gradient(x, scale):
  """Identity forward (exactly), gradient times ``scale`` backward (CL's backpropagation
  rescaling at a split point, Song & Chai sec. 3.3)."""
  @tf.custom_gradient
  def identity(t):
    return tf.identity(t), lambda dy: dy * scale
  return identity(x)


def kdcl_min_logit(logits, labels):
  """KDCL-MinLogit teacher: Guo et al., "Online Knowledge Distillation via Collaborative
  Learning", CVPR 2020, sec. 3.2: each net's logits minus its own target-class logit, element-wise
  minimum over the nets: z_t[c] = min_m (z_m[c] - z_m[y]). logits: list of M [B, C]; labels [B].
  Returns [B, C], detached."""
  labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
  centred = []
  for z in logits:
    z = _f32(z)
    target = tf.gather(z, labels, axis=1, batch_dims=1)  # [B]
    centred.append(z - target[:, None])
  return tf.stop_gradient(tf.reduce_min(tf.stack(centred, axis=0), axis=0))


def kdcl_naive(logits, labels):
  """KDCL-Naive teacher (Guo et al. CVPR 2020, sec. 3.2): per sample, the logits of the net with
  the lowest cross-entropy. logits: list of M [B, C]; labels [B]. Returns [B, C], detached."""
  labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
  stacked = tf.stack([_f32(z) for z in logits], axis=0)  # [M, B, C]
  ce = tf.stack([tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=z)
                 for z in tf.unstack(stacked)], axis=0)  # [M, B]
  best = tf.argmin(ce, axis=0, output_type=tf.int32)  # [B]
  picked = tf.gather(tf.transpose(stacked, [1, 0, 2]), best, axis=1, batch_dims=1)  # [B, C]
  return tf.stop_gradient(picked)


def cs_kd(anchor_logits, partner_logits, temperature=4.0):
  """CS-KD class-wise term: Yun, Park, Lee, Shin, CVPR 2020, arXiv:2003.13964, eq. 2:
  T^2 * KL(softmax(z_partner / T) || softmax(z_anchor / T)), the partner (another sample of the
  same class) detached, T = 4. anchor_logits, partner_logits: [B/2, C]."""
  return soft_target(anchor_logits, partner_logits, temperature)


def attention_targets(logits, queries, keys):
  """OKDDip's peer targets: Chen et al., AAAI 2020, arXiv:1912.00350, sec. 3.2:
  a_ij = softmax_j(q_i . k_j), t_i = sum_j a_ij z_j. logits [B, m, K], queries, keys [B, m, d].
  Returns [B, m, K]; the targets keep the gradient of the attention and of the logits (the
  authors' code detaches neither)."""
  energy = tf.matmul(_f32(queries), _f32(keys), transpose_b=True)  # [B, m, m]
  return tf.matmul(tf.nn.softmax(energy, axis=-1), _f32(logits))


def okddip_peer_kl(targets, logits, temperature=3.0):
  """OKDDip first-level term: T^2 sum_i KL(t_i || z_i) at temperature T, batch mean;
  targets, logits [B, m, K]. The targets keep their gradient, as in the authors' code."""
  return kl_eps(targets, logits, temperature)


def okddip_leader_kl(leader_logits, peer_logits, temperature=3.0):
  """OKDDip second-level term: T^2 KL(mean_i z_i || z_leader) at temperature T, batch mean;
  leader_logits [B, K], peer_logits [B, m, K]. The peers' mean keeps its gradient, as in the
  authors' code (``criterion_T(x_stu, torch.mean(output_batch, dim=2))``)."""
  return kl_eps(tf.reduce_mean(_f32(peer_logits), axis=1), leader_logits, temperature)
