"""The training step: one distributed optimiser update, built in one place for every caller.

    step = compile_step(strategy, distiller.train_step, optimizer, variables)
    terms, metrics = step(distributed_batch)

``Trainer`` (train.py), ``kd_tf2.bench speed`` and the tests run this function, so the figures the
benchmark prints are those of the step users train with.

Per replica (``strategy.run``): ``step_fn(batch, ctx)`` (``Distiller.train_step`` or a stage's
``stage_step``) runs the forward and backward pass and records its gradients in the
``StepContext``; they are returned from that pass and applied by the optimiser after it, always (the
one way gradients are applied). With ``jit_compile`` the pass is an XLA cluster and the distributed
update stays outside it (XLA cannot run it). Each replica's loss is divided by the number of
replicas and the optimiser SUM-all-reduces the gradients: the update is the gradient of the
global-batch mean.

Returns, reduced over replicas: ``terms`` {name: float32 mean over replicas} with every loss term
and their sum ``"loss"``; ``metrics`` {"correct": top-1 hits, "count": samples} summed (the
training accuracy; zero hits when the step reports no logits).
"""
import tensorflow as tf

from kd_tf2.distillers.base import StepContext


def _replica_fn(step_fn, optimizer, variables, num_replicas, jit_compile):
  """The per-replica function: ``batch -> (terms, correct, count)``, update applied. Each call
  (one per replica) gets a ``StepContext`` of its own: replicas never share recorded gradients."""
  traced_vars = []  # the variables of the pass's gradients, in order (fixed when it is traced)

  def forward_backward(batch):
    ctx = StepContext(optimizer, variables, num_replicas, jit_compiled=jit_compile)
    out = step_fn(batch, ctx)
    pending = ctx.take_pending()
    traced_vars[:] = [v for _, v in pending]  # the same variables in every replica
    return out.terms, out.logits, [g for g, _ in pending]

  if jit_compile:
    forward_backward = tf.function(forward_backward, jit_compile=True)

  def replica(batch):
    terms, logits, grads = forward_backward(batch)
    optimizer.apply_gradients(zip(grads, traced_vars))
    terms = {k: tf.cast(v, tf.float32) for k, v in terms.items()}
    terms["loss"] = tf.add_n(list(terms.values()))
    labels = tf.cast(tf.reshape(batch["label"], [-1]), tf.int64)
    if logits is None:
      correct = tf.constant(0.0)
    else:
      pred = tf.argmax(logits, axis=-1, output_type=tf.int64)
      correct = tf.reduce_sum(tf.cast(tf.equal(pred, labels), tf.float32))
    return terms, correct, tf.cast(tf.shape(labels)[0], tf.float32)

  return replica


def compile_step(strategy, step_fn, optimizer, variables, *, jit_compile=False):
  """The compiled distributed step: ``step(distributed_batch) -> (terms, metrics)``.

  strategy:    the ``tf.distribute`` strategy the nets, distiller and optimiser were built in.
  step_fn:     ``fn(batch, ctx) -> StepOutput`` (``Distiller.train_step``, a bound stage step).
  optimizer:   built on ``variables`` (``kd_tf2.engine.make_optimizer``).
  variables:   the variables the step trains (its ``StepContext.variables``).
  jit_compile: compile the per-replica forward/backward pass with XLA.
  One optimiser update per call; see the module docstring for what it returns.
  """
  replica = _replica_fn(step_fn, optimizer, list(variables), strategy.num_replicas_in_sync,
                        bool(jit_compile))
  mean, total = tf.distribute.ReduceOp.MEAN, tf.distribute.ReduceOp.SUM

  @tf.function
  def step(batch):
    terms, correct, count = strategy.run(replica, args=(batch,))
    terms = {k: strategy.reduce(mean, v, axis=None) for k, v in terms.items()}
    metrics = {"correct": strategy.reduce(total, correct, axis=None),
               "count": strategy.reduce(total, count, axis=None)}
    return terms, metrics

  return step
