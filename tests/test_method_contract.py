"""What every registered method must satisfy (DESIGN.md contract 3), one test per method.

Each method runs one step of each of its phases (its stages, then the main phase) through the
engine's own ``kd_tf2.engine.step.compile_step`` on a resnet8 pair, and:
- every loss term is finite;
- every trainable variable of the student and of the distiller (connectors, embeddings, ...)
  receives a finite gradient in some phase, and so does the peer of a method that trains its
  "teacher" with the student (DML), and so do the distiller's own nets (peers, branches, gates,
  heads: its trainable variables);
- a frozen teacher is in no phase's variables, gets no gradient and stays bit-identical (weights
  and BatchNorm statistics);
- the main phase moves the student.
"""
import functools

import numpy as np
import pytest
import tensorflow as tf

import nets
from kd_tf2 import distillers
from kd_tf2.engine import make_optimizer
from kd_tf2.engine.step import compile_step

CLASSES, BATCH, SPLIT = 10, 8, 64


def _batch():
  rng = np.random.default_rng(0)
  return {"image": tf.constant(rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32)),
          "label": tf.constant(np.arange(BATCH) % CLASSES, tf.int64),
          "index": tf.constant(rng.choice(SPLIT, BATCH, replace=False), tf.int64)}


def _net(seed):
  tf.keras.utils.set_random_seed(seed)
  net = nets.create("resnet8", CLASSES)
  net.build((None, 32, 32, 3))
  return net


def _distiller(method, student, teacher):
  cls = distillers.get(method)
  hparams = distillers.engine_kwargs(cls, train_labels=lambda: np.arange(SPLIT) % CLASSES,
                                     jit_compiled=lambda: False, protocol=lambda: "cifar")
  if cls.init_epochs is not None:
    hparams["init_epochs"] = 1  # every stage runs
  if getattr(cls, "min_peers", 0):
    hparams["peers"] = [_net(3)]  # online methods: a peer trained with the student
  return distillers.create(method, student, teacher if cls.reads_teacher() else None,
                           **hparams)


def _phases(d):
  out = [(f"stage_{s.name}", functools.partial(d.stage_step, s), d.stage_variables(s))
         for s in d.stages()]
  return out + [("main", d.train_step, d.variables_to_train())]


def _recording(step_fn, variables, norms):
  """``step_fn`` that also writes each variable's gradient norm into ``norms`` (-1: none)."""

  def step(batch, ctx):
    out = step_fn(batch, ctx)
    pairs = ctx.take_pending()
    by_id = {id(v): g for g, v in pairs}
    norms.assign(tf.stack([tf.norm(tf.cast(by_id[id(v)], tf.float32)) if id(v) in by_id
                           else tf.constant(-1.0) for v in variables]))
    ctx.apply([g for g, _ in pairs], [v for _, v in pairs])
    return out

  return step


@pytest.mark.parametrize("method", distillers.available())
def test_method_contract(method):
  student, teacher = _net(1), _net(2)
  d = _distiller(method, student, teacher)
  frozen = d.teacher if d.teacher is not None and distillers.get(method).pretrained_teacher \
      else None
  frozen_ids = {id(v) for v in frozen.weights} if frozen is not None else set()
  frozen_before = [v.numpy().copy() for v in frozen.weights] if frozen is not None else []
  batch = _batch()
  reached, moved = set(), False
  for name, step_fn, variables in _phases(d):
    assert not frozen_ids & {id(v) for v in variables}, f"{name} trains the frozen teacher"
    norms = tf.Variable(tf.zeros([len(variables)]), trainable=False)
    step = compile_step(tf.distribute.get_strategy(), _recording(step_fn, variables, norms),
                        make_optimizer(0.01, variables), variables)
    student_before = [v.numpy().copy() for v in student.trainable_variables]
    terms, metrics = step(batch)
    bad = {k: float(v) for k, v in terms.items() if not np.isfinite(float(v))}
    assert not bad, f"{name}: non-finite terms {bad}"
    assert float(metrics["count"]) == BATCH
    for v, n in zip(variables, norms.numpy()):
      assert np.isfinite(n), f"{name}: non-finite gradient for {v.path}"
      if n >= 0:
        reached.add(id(v))
    if name == "main":
      moved = any(not np.array_equal(b, v.numpy())
                  for b, v in zip(student_before, student.trainable_variables))
  required = list(student.trainable_variables) + list(d.trainable_variables)
  if d.teacher is not None and frozen is None:
    required += list(d.teacher.trainable_variables)  # a peer trained with the student
  missing = [v.path for v in required if id(v) not in reached]
  assert not missing, f"no gradient in any phase for {missing[:6]}"
  assert moved, "the main phase did not move the student"
  for v, before in zip(frozen.weights if frozen is not None else [], frozen_before):
    np.testing.assert_array_equal(v.numpy(), before, err_msg=f"teacher {v.path} changed")
