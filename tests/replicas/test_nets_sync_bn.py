"""The zoo's synchronized BatchNorm under 2 replicas (issue 13): each replica holds half of every
batch; outputs and moving statistics equal those of the plain BatchNorm on the whole batch on one
device, which tests/test_nets.py checks against a NumPy replay of PyTorch's BatchNorm2d update
(moving variance from the unbiased batch variance, n = the *global* count per channel)."""
import numpy as np
import tensorflow as tf

from nets.layers import batch_norm


def _case():
  rng = np.random.default_rng(7)
  xs = [(rng.standard_normal((4, 5, 5, 6)) * rng.uniform(0.5, 3, 6) + rng.normal(0, 2, 6))
        .astype(np.float32) for _ in range(3)]
  weights = [rng.uniform(0.5, 1.5, 6), rng.normal(0, 0.5, 6), rng.normal(0, 1, 6),
             rng.uniform(0.5, 2, 6)]  # gamma, beta, moving mean, moving variance
  return xs, [w.astype(np.float32) for w in weights]


def _scaled_err(a, e):
  return float(np.max(np.abs(np.asarray(a, np.float64) - e)) / max(1.0, np.max(np.abs(e))))


def test_synchronized_bn_equals_plain_bn_on_the_global_batch(mirrored):
  xs, weights = _case()
  plain = batch_norm("plain")
  plain.build((None, 5, 5, 6))
  plain.set_weights(weights)
  with mirrored.scope():
    sync = batch_norm("sync", synchronized=True)
    sync.build((None, 5, 5, 6))
    sync.set_weights(weights)

  @tf.function
  def step(x):
    return mirrored.run(lambda t: sync(t, training=True), args=(x,))

  for i, x in enumerate(xs, start=1):
    halves = mirrored.experimental_distribute_values_from_function(
        lambda ctx, x=x: x[2 * ctx.replica_id_in_sync_group:2 * ctx.replica_id_in_sync_group + 2])
    got = np.concatenate([np.asarray(t)
                          for t in mirrored.experimental_local_results(step(halves))])
    want = np.asarray(plain(x, training=True), np.float64)
    for what, a, e in (("output", got, want),
                       ("moving_mean", sync.moving_mean.numpy(), plain.moving_mean.numpy()),
                       ("moving_variance", sync.moving_variance.numpy(),
                        plain.moving_variance.numpy())):
      err = _scaled_err(a, np.float64(e))
      assert err <= 1e-6, f"step {i} {what}: scaled error {err:.2g}"
    if i == 1:  # PyTorch's rule with the global n = 4·5·5 (a per-replica n = 50 is 1e-3 off)
      x64 = np.float64(x)
      want_var = 0.9 * weights[3] + 0.1 * x64.var(axis=(0, 1, 2)) * 100 / 99
      assert _scaled_err(sync.moving_variance.numpy(), want_var) <= 1e-6
