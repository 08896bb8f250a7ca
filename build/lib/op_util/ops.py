"""Stateless tensor ops (NHWC) used by the nets and the losses (METHODS.md §0)."""
import tensorflow as tf


def l2_normalize(x, axis=-1, eps=1e-12):
  """x / max(||x||_2, eps) along ``axis`` (the F.normalize convention, METHODS.md §0).

  Safe at x = 0: the gradient is finite (the norm is computed from a clamped square sum).
  """
  sq = tf.reduce_sum(tf.square(x), axis=axis, keepdims=True)
  return x * tf.math.rsqrt(tf.maximum(sq, eps * eps))


def flatten_per_sample(x):
  """[B, ...] -> [B, prod(...)] in row-major order."""
  return tf.reshape(x, [tf.shape(x)[0], -1])


def adaptive_avg_pool(x, out_hw):
  """PyTorch ``adaptive_avg_pool2d`` on an NHWC map with static spatial shape.

  Output cell i covers input rows floor(i*H/h) .. ceil((i+1)*H/h)-1 (same for columns). With an
  integer ratio this is the mean over non-overlapping r x r blocks (done with one avg_pool).
  x: [B, H, W, C] -> [B, h, w, C].
  """
  h_in, w_in = int(x.shape[1]), int(x.shape[2])
  h_out, w_out = int(out_hw[0]), int(out_hw[1])
  if (h_in, w_in) == (h_out, w_out):
    return x
  if h_in % h_out == 0 and w_in % w_out == 0:
    k = (h_in // h_out, w_in // w_out)
    return tf.nn.avg_pool2d(x, ksize=k, strides=k, padding="VALID")
  rows = []
  for i in range(h_out):
    r0, r1 = (i * h_in) // h_out, -((-(i + 1) * h_in) // h_out)
    cols = []
    for j in range(w_out):
      c0, c1 = (j * w_in) // w_out, -((-(j + 1) * w_in) // w_out)
      cols.append(tf.reduce_mean(x[:, r0:r1, c0:c1, :], axis=[1, 2]))
    rows.append(tf.stack(cols, axis=1))
  return tf.stack(rows, axis=1)


def pool_to_match(a, b):
  """Average-pool the larger (by height) of two NHWC maps to the smaller's (H, H) (RepDistiller).

  Returns (a', b') with equal spatial size; channels untouched. Equal heights: unchanged.
  """
  ha, hb = int(a.shape[1]), int(b.shape[1])
  if ha > hb:
    a = adaptive_avg_pool(a, (hb, hb))
  elif hb > ha:
    b = adaptive_avg_pool(b, (ha, ha))
  return a, b
