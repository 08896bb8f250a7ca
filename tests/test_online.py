"""Online methods (DML cohorts, KDCL, ONE, CL): losses against NumPy versions of the papers'
formulas, the methods' terms against the same formulas on their own nets, branch export,
checkpoint + resume of every net, bad input."""
import os

import numpy as np
import pytest
import tensorflow as tf

import keras
import nets
from nets import branched as nb
from kd_tf2 import distillers
from kd_tf2 import losses as L
from kd_tf2.engine import Trainer
from kd_tf2.engine import config as cfg
from kd_tf2.errors import UsageError

SHAPE, CLASSES = (32, 32, 3), 10


# ------------------------------------------------------------------------------ NumPy references
def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(p, log_q):
  """batch mean of sum_k p (log p - log q)."""
  return float(np.sum(np.where(p > 0, p * (np.log(np.maximum(p, 1e-30)) - log_q), 0.0))
               / p.shape[0])


def np_soft(z, t=1.0):
  return np.exp(np_log_softmax(z / t))


def np_ce(z, y):
  return float(-np.mean(np_log_softmax(z)[np.arange(len(y)), y]))


def logits(rng, n=3, b=6):
  return [rng.normal(size=(b, CLASSES)).astype(np.float32) * 3 for _ in range(n)]


def _np_kl_eps(target_logits, logits, t):
  """ONE's / OKDDip's KL in their code: T^2 * batchmean sum (p + 1e-7)(log(p + 1e-7) - log q)."""
  p = np_soft(target_logits, t) + 1e-7
  return t * t * float(np.mean(np.sum(p * (np.log(p) - np_log_softmax(logits / t)), axis=-1)))


def test_cohort_kl_is_dml_eq10():
  rng = np.random.default_rng(0)
  zs, k = logits(rng), 1
  want = np.mean([np_kl(np_soft(zs[l]), np_log_softmax(zs[k])) for l in (0, 2)])
  assert float(L.cohort_kl(zs, k)) == pytest.approx(want, rel=1e-5)
  # two nets: the existing DML term
  assert float(L.cohort_kl(zs[:2], 0)) == pytest.approx(float(L.dml_kl(zs[0], zs[1])), rel=1e-6)


def test_one_ensemble_and_distillation_are_eq5():
  rng = np.random.default_rng(1)
  zs = logits(rng)
  gate = np_soft(rng.normal(size=(6, 3)))
  ens = sum(gate[:, i:i + 1] * zs[i] for i in range(3))
  np.testing.assert_allclose(L.gate_ensemble(zs, gate).numpy(), ens, rtol=1e-5, atol=1e-6)
  t = 3.0
  want = sum(_np_kl_eps(ens, z, t) for z in zs)
  assert float(L.one_loss(zs, ens, t)) == pytest.approx(want, rel=1e-5)


def test_one_loss_does_not_teach_the_ensemble():
  rng = np.random.default_rng(2)
  zs = [tf.constant(z) for z in logits(rng)]
  ens = tf.Variable(rng.normal(size=(6, CLASSES)).astype(np.float32))
  with tf.GradientTape() as tape:
    loss = L.one_loss(zs, ens.read_value(), 3.0)
  assert tape.gradient(loss, ens) is None


def test_collaborative_kl_is_cl_eq4():
  rng = np.random.default_rng(3)
  zs, t = logits(rng), 2.0
  for h in range(3):
    target = np.mean([np_soft(zs[j], t) for j in range(3) if j != h], axis=0)
    want = t * t * np_kl(target, np_log_softmax(zs[h] / t))
    assert float(L.collaborative_kl(zs, h, t)) == pytest.approx(want, rel=1e-5)


def test_scale_gradient_is_identity_forward_and_scales_backward():
  x = tf.Variable([1.0, -2.0, 3.0])
  with tf.GradientTape() as tape:
    y = L.scale_gradient(x.read_value(), 0.25)
    loss = tf.reduce_sum(y * y)
  np.testing.assert_allclose(y.numpy(), x.numpy())
  np.testing.assert_allclose(tape.gradient(loss, x).numpy(), 0.25 * 2 * x.numpy(), rtol=1e-6)


def test_kdcl_ensembles():
  rng = np.random.default_rng(4)
  zs = logits(rng)
  y = rng.integers(0, CLASSES, size=6)
  rows = np.arange(6)
  want = np.min([z - z[rows, y][:, None] for z in zs], axis=0)
  np.testing.assert_allclose(L.kdcl_min_logit(zs, y).numpy(), want, rtol=1e-6, atol=1e-6)
  assert np.all(np.abs(want[rows, y]) < 1e-6)  # the target logit of the teacher is 0
  ce = np.stack([-np_log_softmax(z)[rows, y] for z in zs])  # [M, B]
  best = ce.argmin(0)
  np.testing.assert_allclose(L.kdcl_naive(zs, y).numpy(), np.stack(zs)[best, rows], rtol=1e-6)


# ------------------------------------------------------------------------------ methods on nets
def net(arch="resnet8", seed=0):
  keras.utils.set_random_seed(seed)
  n = nets.create(arch, CLASSES)
  n.build((None,) + SHAPE)
  return n


def batch(b=8, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": tf.constant(rng.normal(size=(b,) + SHAPE).astype(np.float32)),
          "label": tf.constant(np.arange(b) % CLASSES, tf.int64),
          "index": tf.range(b, dtype=tf.int64)}


@pytest.mark.parametrize("method", ["ONE", "OKDDip"])
@pytest.mark.parametrize("value", [-1, "soon", True])
def test_bad_rampup_is_one_line(method, value):
  with pytest.raises(UsageError, match=rf"^rampup={value!r} for {method}: must be a number of "
                     r"epochs >= 0$"):
    distillers.create(method, net(), None, rampup=value)


@pytest.mark.parametrize("epoch,ramp", [(0, np.exp(-5.0)), (60, np.exp(-5.0 / 16)), (80, 1.0)])
def test_sigmoid_rampup_is_the_authors_consistency_weight(epoch, ramp):
  assert float(L.sigmoid_rampup(epoch, 80.0)) == pytest.approx(ramp, rel=1e-6)
  assert float(L.sigmoid_rampup(epoch, 0.0)) == 1.0


@pytest.mark.parametrize("epoch", [0, 80])
def test_one_terms_follow_eq6_on_its_branches(epoch):
  d = distillers.create("ONE", net(seed=1), None)
  assert d.num_branches == 3 and d.temperature == 3.0 and d.rampup == 80.0
  d.epoch.assign(float(epoch))
  b = batch()
  terms, _ = d.all_terms(b["image"], b["label"], False)
  shared = d.shared(b["image"], False)
  zs = [o.logits.numpy() for o in d.branch_outputs(shared, False)]
  pooled = shared[0].numpy().mean(axis=(1, 2))
  w, bias = (v.numpy() for v in d.gate.weights)
  gate = np_soft(pooled @ w + bias)
  ens = sum(gate[:, i:i + 1] * zs[i] for i in range(3))
  y = b["label"].numpy()
  assert float(terms["ce"]) == pytest.approx(np_ce(zs[0], y), rel=1e-5)
  assert float(terms["branch_ce"]) == pytest.approx(np_ce(zs[1], y) + np_ce(zs[2], y), rel=1e-5)
  assert float(terms["ensemble_ce"]) == pytest.approx(np_ce(ens, y), rel=1e-5)
  want = sum(_np_kl_eps(ens, z, 3.0) for z in zs) * (np.exp(-5.0) if epoch == 0 else 1.0)
  assert float(terms["one"]) == pytest.approx(want, rel=1e-4)


def test_branches_share_the_trunk_and_export_as_plain_nets(tmp_path):
  student = net(seed=1)
  d = distillers.create("ONE", student, None)
  x = batch()["image"]
  # the branches differ (own last stage) but read the student's trunk
  views = d.eval_models()
  z1 = views["branch1"](x).numpy()
  assert not np.allclose(z1, student(x, training=False).numpy())
  exported = d.extra_exports()["branch1"]
  path = str(tmp_path / "branch1.keras")
  exported.save(path)
  loaded = keras.saving.load_model(path, compile=False)
  np.testing.assert_allclose(loaded(x, training=False).numpy(), z1, rtol=1e-5, atol=1e-5)
  # the clones' own trunk is frozen: never optimised
  trunk_ids = {id(v) for layer in nb.unused_layers(d.tree, 1, d.clones[0]) for v in layer.weights}
  assert trunk_ids and not trunk_ids & {id(v) for v in d.variables_to_train()}


@pytest.mark.parametrize("method", ["ONE", "OKDDip"])
def test_the_ensemble_exports_as_one_model_equal_to_its_view(tmp_path, method):
  d = distillers.create(method, net(seed=1), None)
  x = batch()["image"]
  view = d.eval_models()["ensemble"](x).numpy()
  exported = d.extra_exports()["ensemble"]
  np.testing.assert_allclose(exported(x, training=False).numpy(), view, rtol=1e-5, atol=1e-5)
  if method == "ONE":  # gated: not the plain mean of the branches
    branches = np.mean([v(x).numpy() for k, v in d.eval_models().items() if k != "ensemble"]
                       + [d.student(x, training=False).numpy()], axis=0)
    assert not np.allclose(view, branches, atol=1e-4)
  path = str(tmp_path / "ensemble.keras")
  exported.save(path)
  loaded = keras.saving.load_model(path, compile=False)
  np.testing.assert_allclose(loaded(x, training=False).numpy(), view, rtol=1e-5, atol=1e-5)


def test_cl_one_level_terms_and_gradient_rescaling():
  d = distillers.create("CL", net(seed=1), None, splits=2, branches=3)
  assert d.tree.splits == (2,) and d.num_branches == 3
  assert (d.ce_weight, d.method_weight, d.temperature) == (0.5, 0.5, 2.0)
  b = batch()
  terms, _ = d.all_terms(b["image"], b["label"], False)
  zs = [o.logits.numpy() for o in d.branch_outputs(d.shared(b["image"], False), False)]
  y = b["label"].numpy()
  kl = 0.0
  for h in range(3):
    target = np.mean([np_soft(zs[j], 2.0) for j in range(3) if j != h], axis=0)
    kl += 4.0 * np_kl(target, np_log_softmax(zs[h] / 2.0))
  assert float(terms["cl"]) == pytest.approx(0.5 * kl, rel=1e-4)
  assert float(terms["head_ce"]) == pytest.approx(0.5 * (np_ce(zs[1], y) + np_ce(zs[2], y)),
                                                  rel=1e-5)
  # the trunk's gradient is 1/H of the plain sum of the heads' gradients
  stem = d.student.conv1.kernel
  with tf.GradientTape(persistent=True) as tape:
    scaled, _ = d.all_terms(b["image"], b["label"], False)
    plain_shared = nb.trunk(d.student, b["image"], False, d.split)
    outs = [nb.branch(n, plain_shared, False, d.split) for n in d.branch_nets()]
    plain_kl = tf.add_n([L.collaborative_kl([o.logits for o in outs], h, 2.0) for h in range(3)])
    plain = 0.5 * tf.add_n([d.cross_entropy(o.logits, b["label"]) for o in outs]) + 0.5 * plain_kl
    scaled_loss = tf.add_n(list(scaled.values()))
  np.testing.assert_allclose(tape.gradient(scaled_loss, stem).numpy(),
                             tape.gradient(plain, stem).numpy() / 3.0, rtol=1e-3, atol=1e-7)


# ------------------------------------------------------------------------------ branched zoo nets
def _assert_same_outputs(got, want):
  """Two ``Outputs`` equal exactly, field by field and tensor by tensor."""
  assert len(got.features) == len(want.features) and len(got.preacts) == len(want.preacts)
  for name, a, b in [("logits", got.logits, want.logits), ("embedding", got.embedding,
                                                           want.embedding)] + [
      (f"features[{i}]", a, b) for i, (a, b) in enumerate(zip(got.features, want.features))] + [
      (f"preacts[{i}]", a, b) for i, (a, b) in enumerate(zip(got.preacts, want.preacts))]:
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


@pytest.mark.parametrize("arch", nets.available())
def test_every_zoo_net_split_after_any_stage_is_the_net_itself(arch):
  """Branch 0 of a split net, after every possible split, and every head of a two-level tree
  whose nets are all this one net, return exactly the net's own ``Outputs``."""
  size = 64 if arch.endswith("_imagenet") else 32
  keras.utils.set_random_seed(0)
  n = nets.create(arch, CLASSES)
  x = tf.constant(np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32))
  want = n(x, training=False, features=True)
  assert len(want.features) == n.num_stages + 1
  for split in range(n.num_stages):
    _assert_same_outputs(nb.branch(n, nb.trunk(n, x, False, split), False, split), want)
  tree = nb.Tree((n.num_stages - 2, n.num_stages - 1), (2, 2))
  root = nb.trunk(n, x, False, tree.splits[0])
  outs = nb.tree_outputs([n] * 4, tree, root, False)
  assert len(outs) == 4
  for out in outs:
    _assert_same_outputs(out, want)


@pytest.mark.parametrize("arch,split", [("wrn_16_1", 1), ("vgg8", 2)])
def test_exported_branch_is_the_branch(arch, split):
  """A WRN branch (its first block's bn1 is the trunk's last preact, its head's bn1 its own) and a
  VGG branch (pools inside the stages) exported as plain zoo nets return the branch's Outputs."""
  d = distillers.create("ONE", net(arch, seed=1), None, split=split)
  x = batch(b=4)["image"]
  outs = d.branch_outputs(d.shared(x, False), False)
  exported = d.extra_exports()
  for i in (1, 2):
    _assert_same_outputs(exported[f"branch{i}"](x, training=False, features=True),
                         nb.Outputs(*outs[i]))
  # each branch is its own net after the split: not the student
  assert not np.allclose(outs[1].logits.numpy(), outs[0].logits.numpy())


def test_one_trains_a_wrn_with_gradients_to_every_branch_and_the_gate():
  from kd_tf2.distillers.base import StepContext
  from kd_tf2.engine import make_optimizer
  d = distillers.create("ONE", net("wrn_16_1", seed=1), None)
  d.setup(SHAPE)
  b = batch(b=4)
  variables = d.variables_to_train()
  with tf.GradientTape() as tape:
    terms, _ = d.all_terms(b["image"], b["label"], True)
    loss = tf.add_n(list(terms.values()))
  grads = dict(zip([id(v) for v in variables], tape.gradient(loss, variables)))
  moved = {id(v) for v in variables if grads[id(v)] is not None
           and float(tf.reduce_max(tf.abs(grads[id(v)]))) > 0}
  own = [d.student.classifier, d.student.groups[2][0], d.gate] + [
      layer for c in d.clones for layer in (c.classifier, c.groups[2][0], c.bn1)]
  for layer in own:
    assert {id(v) for v in layer.trainable_weights} <= moved, layer.name
  before = [v.numpy() for v in variables]
  opt = make_optimizer(0.05, variables)
  ctx = StepContext(opt, variables)
  d.train_step(b, ctx)  # records the update; the engine's step applies it
  pairs = ctx.take_pending()
  opt.apply([g for g, _ in pairs], [v for _, v in pairs])
  changed = {id(v) for a, v in zip(before, variables) if not np.array_equal(a, v.numpy())}
  assert moved <= changed


def _cl_tree(seed=1):
  d = distillers.create("CL", net(seed=seed), None)
  d.setup(SHAPE)
  return d


def test_cl_default_is_the_papers_four_heads_by_hierarchical_sharing():
  d = _cl_tree()
  assert (d.tree.splits, d.tree.branches, d.num_branches) == ((1, 2), (2, 2), 4)
  assert d.tree.groups(0) == [[0, 1], [2, 3]] and d.tree.groups(1) == [[0], [1], [2], [3]]
  assert set(d.eval_models()) == {"branch1", "branch2", "branch3", "ensemble"}
  assert d.hparams()["splits"] == "1-2" and d.hparams()["branches"] == "2-2"
  # which nets' stages each head reads: stage 2 is shared inside a group, stage 3 is per head
  student, c1, c2, c3 = d.branch_nets()
  b = batch(b=4)
  variables = d.variables_to_train()
  with tf.GradientTape(persistent=True) as tape:
    outs = d.branch_outputs(d.shared(b["image"], True), True)
    ces = [d.cross_entropy(o.logits, b["label"]) for o in outs]

  def reads(h, layers):
    ids = {id(v) for layer in layers for v in layer.trainable_weights}
    grads = tape.gradient(ces[h], [v for v in variables if id(v) in ids])
    return len(grads) == len(ids) and all(g is not None for g in grads)

  for h in range(4):
    assert reads(h, student.part_layers()[0] + student.part_layers()[1])  # the root trunk
    assert reads(h, student.part_layers()[2]) == (h in (0, 1))
    assert reads(h, c2.part_layers()[2]) == (h in (2, 3))
    assert reads(h, d.branch_nets()[h].part_layers()[3])
  # the parts a head's net does not run are frozen (head 1: stem to stage 2; head 2: the trunk)
  train_ids = {id(v) for v in variables}
  for h, net_, frozen_parts in [(1, c1, 3), (2, c2, 2), (3, c3, 3)]:
    frozen = [layer for p in net_.part_layers()[:frozen_parts] for layer in p]
    assert nb.unused_layers(d.tree, h, net_) == frozen
    assert not {id(v) for layer in frozen for v in layer.weights} & train_ids
  # exported heads compute their paths: head 3 reads head 2's stage 2, head 1 the student's
  x = b["image"]
  ref = d.branch_outputs(d.shared(x, False), False)
  for h, name in [(1, "branch1"), (2, "branch2"), (3, "branch3")]:
    _assert_same_outputs(d.extra_exports()[name](x, training=False, features=True),
                         nb.Outputs(*ref[h]))
  for a, b_ in zip(c3.part_layers()[2][0].weights, c2.part_layers()[2][0].weights):
    np.testing.assert_array_equal(a.numpy(), b_.numpy())


def test_cl_loss_for_four_heads_is_eq3_4():
  d = _cl_tree()
  b = batch()
  terms, _ = d.all_terms(b["image"], b["label"], False)
  zs = [o.logits.numpy() for o in d.branch_outputs(d.shared(b["image"], False), False)]
  assert len(zs) == 4
  y, t, beta = b["label"].numpy(), 2.0, 0.5
  soft = []
  for h in range(4):
    target = np.mean([np_soft(zs[j], t) for j in range(4) if j != h], axis=0)
    soft.append(t * t * np_kl(target, np_log_softmax(zs[h] / t)))
  assert float(terms["ce"]) == pytest.approx(beta * np_ce(zs[0], y), rel=1e-5)
  assert float(terms["head_ce"]) == pytest.approx(beta * sum(np_ce(z, y) for z in zs[1:]),
                                                  rel=1e-5)
  assert float(terms["cl"]) == pytest.approx((1 - beta) * sum(soft), rel=1e-4)


def test_cl_rescales_the_gradient_at_every_split():
  """Root trunk: 1/(2*2) of the heads' summed gradient; a group's middle stage: 1/2 of its two
  heads'; a head's own last stage: unscaled. A rule scaling only at the root, or by 1/H at every
  split, fails one of them."""
  d = _cl_tree()
  b = batch(b=4)
  student, c1, c2, c3 = d.branch_nets()
  probes = {"stem": (student.conv1.kernel, 0.25),
            "middle_0": (student.stages[1][0].conv1.kernel, 0.5),
            "middle_2": (c2.stages[1][0].conv1.kernel, 0.5),
            "leaf_1": (c1.stages[2][0].conv1.kernel, 1.0),
            "leaf_3": (c3.stages[2][0].conv1.kernel, 1.0)}
  variables = [v for v, _ in probes.values()]
  with tf.GradientTape(persistent=True) as tape:
    scaled = tf.add_n(list(d.all_terms(b["image"], b["label"], False)[0].values()))
    plain_outs = nb.tree_outputs(d.branch_nets(), d.tree, d.shared(b["image"], False), False)
    zs = [o.logits for o in plain_outs]
    plain = 0.5 * tf.add_n([d.cross_entropy(z, b["label"]) for z in zs]) + 0.5 * tf.add_n(
        [L.collaborative_kl(zs, h, 2.0) for h in range(4)])
  np.testing.assert_allclose(float(scaled), float(plain), rtol=1e-6)  # identity forward
  for (name, (v, factor)), g, g_plain in zip(probes.items(), tape.gradient(scaled, variables),
                                             tape.gradient(plain, variables)):
    assert float(tf.reduce_max(tf.abs(g_plain))) > 0, name
    np.testing.assert_allclose(g.numpy(), factor * g_plain.numpy(), rtol=1e-5, atol=1e-9,
                               err_msg=name)


def test_split_keywords_accept_method_args_forms():
  from kd_tf2.distillers._online import int_tuple
  for value in ("1-2", "1/2", " 1 - 2 ", (1, 2), [1, 2]):
    assert int_tuple("splits", value, "CL") == (1, 2)
  assert int_tuple("branches", 3, "CL") == (3,)
  given = cfg.parse_method_args("splits=0/2,branches=3-2", "CL")  # --method_args
  d = distillers.create("CL", net(), None, **given)
  assert (d.tree.splits, d.tree.branches, d.num_branches) == ((0, 2), (3, 2), 6)
  assert d.tree.groups(0) == [[0, 1], [2, 3], [4, 5]]
  d = distillers.create("CL", net(), None, splits=2, branches=3)
  assert (d.tree.splits, d.tree.branches) == ((2,), (3,))


@pytest.mark.parametrize("ensemble", ["minlogit", "naive"])
def test_kdcl_terms_on_mixed_architectures(ensemble):
  d = distillers.create("KDCL", net(seed=1), None, peers=[net("wrn_16_1", seed=2)],
                        ensemble=ensemble)
  b = batch()
  terms, _ = d.all_terms(b["image"], b["label"], False)
  zs = [o.logits.numpy() for o in d.cohort_outputs(b["image"], False)]
  y = b["label"].numpy()
  rows = np.arange(len(y))
  if ensemble == "minlogit":
    target = np.min([z - z[rows, y][:, None] for z in zs], axis=0)
  else:
    target = np.stack(zs)[np.stack([-np_log_softmax(z)[rows, y] for z in zs]).argmin(0), rows]
  for name, z in zip(["", "peer1_"], zs):
    assert float(terms[f"{name}ce"]) == pytest.approx(np_ce(z, y), rel=1e-5)
    want = 4.0 * np_kl(np_soft(target, 2.0), np_log_softmax(z / 2.0))
    assert float(terms[f"{name}kdcl"]) == pytest.approx(want, rel=1e-4)
  # the step reports the student's logits [B, K] (the training accuracy reads them)
  from kd_tf2.distillers.base import StepContext
  from kd_tf2.engine import make_optimizer
  v = d.variables_to_train()
  out = d.train_step(b, StepContext(make_optimizer(0.01, v), v))
  assert out.logits.shape == zs[0].shape


def kdcl_reference(zs, y, ensemble="minlogit", t=2.0):
  """{"ce", "kdcl", "peer<i>_ce", "peer<i>_kdcl"} of KDCL from the nets' logits zs (NumPy)."""
  rows = np.arange(len(y))
  if ensemble == "minlogit":
    target = np.min([z - z[rows, y][:, None] for z in zs], axis=0)
  else:
    target = np.stack(zs)[np.stack([-np_log_softmax(z)[rows, y] for z in zs]).argmin(0), rows]
  out = {}
  for name, z in zip([""] + [f"peer{i}_" for i in range(1, len(zs))], zs):
    out[f"{name}ce"] = np_ce(z, y)
    out[f"{name}kdcl"] = t * t * np_kl(np_soft(target, t), np_log_softmax(z / t))
  return out


@pytest.mark.parametrize("ensemble", ["minlogit", "naive"])
def test_kdcl_feeds_each_net_its_own_view(ensemble):
  """Net m sees view m; the teacher is ensembled from the logits on those views (sec. 3)."""
  from kd_tf2.distillers.base import StepContext
  from kd_tf2.engine import make_optimizer
  cohort = [net(seed=1), net("wrn_16_1", seed=2), net(seed=3)]
  d = distillers.create("KDCL", cohort[0], None, peers=cohort[1:], ensemble=ensemble)
  assert distillers.get("KDCL").batch_views == "per_net" and d.views is True
  b = batch()
  views = np.stack([batch(seed=s)["image"].numpy() for s in (10, 11, 12)], axis=1)  # [B, 3, ...]
  b.update(views=tf.constant(views), image=tf.constant(views[:, 0]))
  y = b["label"].numpy()
  for training in (False, True):
    zs = [n(views[:, m], training=training).numpy() for m, n in enumerate(cohort)]
    if training:  # the step: one update on the sum, its terms from the nets' own views
      v = d.variables_to_train()
      terms = d.train_step(b, StepContext(make_optimizer(0.0, v), v)).terms
    else:
      terms, _ = d.all_terms(d.step_images(b), b["label"], training)
    want = kdcl_reference(zs, y, ensemble)
    assert set(terms) == set(want)
    for key, value in want.items():
      assert float(terms[key]) == pytest.approx(value, rel=1e-4), (training, key)
  # views=False: every net gets the batch's image (the same for all)
  same = distillers.create("KDCL", cohort[0], None, peers=cohort[1:], ensemble=ensemble,
                           views=False)
  terms, _ = same.all_terms(same.step_images(b), b["label"], False)
  zs = [n(views[:, 0], training=False).numpy() for n in cohort]
  for key, value in kdcl_reference(zs, y, ensemble).items():
    assert float(terms[key]) == pytest.approx(value, rel=1e-4), key
  assert float(terms["peer2_ce"]) != pytest.approx(
      kdcl_reference([n(views[:, m], training=False).numpy() for m, n in enumerate(cohort)],
                     y, ensemble)["peer2_ce"], rel=1e-3)
  with pytest.raises(UsageError, match=r"KDCL trains 3 nets but the batch holds 2 views"):
    d.step_images({**b, "views": b["views"][:, :2]})
  with pytest.raises(UsageError, match=r"views='yes' for KDCL; accepted: True"):
    distillers.create("KDCL", cohort[0], None, peers=cohort[1:], views="yes")


def test_dml_cohort_terms_are_eq10():
  d = distillers.create("DML", net(seed=1), None, peers=[net(seed=2), net(seed=3)])
  assert set(d.extra_exports()) == {"peer1", "peer2"}
  from kd_tf2.distillers.base import StepContext
  from kd_tf2.engine import make_optimizer
  b = batch()
  zs = [n(b["image"], training=True).numpy() for n in d.cohort()]
  v = d.variables_to_train()
  out = d.train_step(b, StepContext(make_optimizer(0.01, v), v))
  for k, name in enumerate(["dml", "peer1_dml", "peer2_dml"]):
    want = np.mean([np_kl(np_soft(zs[l]), np_log_softmax(zs[k])) for l in range(3) if l != k])
    assert float(out.terms[name]) == pytest.approx(want, rel=1e-4)
  assert float(out.terms["peer2_ce"]) == pytest.approx(np_ce(zs[2], b["label"].numpy()),
                                                       rel=1e-5)


# ------------------------------------------------------------------------------ resume
def _data(n, bs, seed):
  rng = np.random.default_rng(seed)
  return tf.data.Dataset.from_tensor_slices(
      {"image": rng.normal(size=(n,) + SHAPE).astype(np.float32),
       "label": (np.arange(n) % CLASSES).astype(np.int64),
       "index": np.arange(n, dtype=np.int64)}).batch(bs)


def _trainer(ckpt, method, seed, **hparams):
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  with strategy.scope():
    student = net(seed=seed)
    if "peers" in hparams:
      hparams["peers"] = [net(a, seed=seed + 1) for a in hparams["peers"]]
    d = distillers.create(method, student, None, **hparams)
  return Trainer(strategy=strategy, student=student, distiller=d, train_data=_data(16, 8, 0),
                 test_data=_data(8, 8, 1), steps_per_epoch=2, global_batch=8, epochs=1,
                 base_lr=0.05, checkpoint_dir=ckpt, verbose=False)


@pytest.mark.parametrize("method,hparams", [("ONE", {}), ("KDCL", {"peers": ["resnet8"]}),
                                            ("CL", {})])
def test_checkpoint_restores_every_net(tmp_path, method, hparams):
  a = _trainer(str(tmp_path), method, 1, **dict(hparams))
  results = a.fit()
  assert {f"{n}_top1" for n in a.distiller.eval_models()} <= set(results)
  b = _trainer(str(tmp_path), method, 7, **dict(hparams))  # other initial weights
  assert b.restore() == (1, 0)
  nets_a = [a.student] + list(a.distiller.extra_exports().values())
  nets_b = [b.student] + list(b.distiller.extra_exports().values())
  assert len(nets_a) == {"ONE": 4, "KDCL": 2, "CL": 4}[method]  # ONE: + its ensemble
  for na, nb_ in zip(nets_a, nets_b):
    for va, vb in zip(na.weights, nb_.weights):
      np.testing.assert_array_equal(va.numpy(), vb.numpy(), err_msg=va.path)
  for va, vb in zip(a.distiller.weights, b.distiller.weights):  # gate, clones, peers
    np.testing.assert_array_equal(va.numpy(), vb.numpy(), err_msg=va.path)


# ------------------------------------------------------------------------------ bad input
def test_bad_online_inputs():
  base = cfg.TrainConfig(arch="resnet8", dataset="synthetic", epochs=1)
  with pytest.raises(UsageError, match=r"--peers=resnet8: method AT trains no peers .*KDCL"):
    cfg.validate(base.replace(method="AT", peers="resnet8"))
  with pytest.raises(UsageError, match=r"method KDCL needs at least 1 peer"):
    cfg.validate(base.replace(method="KDCL"))
  with pytest.raises(UsageError, match=r"--peers: unknown net 'resnet9'"):
    cfg.validate(base.replace(method="KDCL", peers="resnet9"))
  ok = cfg.validate(base.replace(method="dml", peers="Resnet20, wrn_16_2"))
  assert ok.peers == "resnet20,wrn_16_2" and cfg.teacher_source(ok) is None
  assert cfg.settings(ok)["teacher_arch"] is None
  assert cfg.teacher_source(cfg.validate(base.replace(method="DML"))) == "fresh"
  assert cfg.teacher_source(cfg.validate(base.replace(method="ONE"))) is None
  with pytest.raises(UsageError, match=r"^splits=3 for method ONE: resnet8 has 3 stages; give "
                                      r"increasing counts of shared stages in 0\.\.2$"):
    distillers.create("ONE", net(), None, split=3)
  with pytest.raises(UsageError, match=r"^branches=1 for method CL: must be an integer >= 2 "):
    distillers.create("CL", net(), None, branches=1)
  for bad, msg in [({"splits": "2-1"}, r"splits=2-1 for method CL: resnet8 has 3 stages"),
                   ({"splits": "1-1"}, r"splits=1-1 for method CL: resnet8 has 3 stages"),
                   ({"splits": "1-x"}, r"splits='1-x' for method CL: give an int, or ints joined"),
                   ({"splits": 1.5}, r"splits=1.5 for method CL: give an int"),
                   ({"splits": "1-2", "branches": "2-2-2"},
                    r"branches=2-2-2 for method CL: must be an integer >= 2 per split level "
                    r"\(splits=1-2\)$"),
                   ({"branches": "2-1"}, r"branches=2-1 for method CL: must be an integer >= 2"),
                   ({"split": 1, "splits": 1}, r"split=1 and splits=1 for method CL: give one")]:
    with pytest.raises(UsageError, match=msg):
      distillers.create("CL", net(), None, **bad)
  with pytest.raises(UsageError, match=r"splits=1-2 for method ONE: it forks at one split point"):
    distillers.create("ONE", net(), None, splits="1/2")
  with pytest.raises(UsageError, match=r"ensemble='mean' for KDCL; accepted: minlogit, naive"):
    distillers.create("KDCL", net(), None, peers=[net()], ensemble="mean")


# ------------------------------------------------------------------------------ CS-KD
def test_class_paired_batches_pair_each_sample_with_its_class():
  from kd_tf2 import data as kd_data
  ds, info = kd_data.load("synthetic", "train", batch_size=8, fraction=0.5, seed=3,
                          pair_by_class=True)
  plain, _ = kd_data.load("synthetic", "train", batch_size=8, fraction=0.5, seed=3,
                          shuffle=False, drop_remainder=False)
  subset = {int(i) for b in plain for i in b["index"].numpy()}
  seen, partners = 0, set()
  for b in ds.take(info.num_batches):
    labels, index = b["label"].numpy(), b["index"].numpy()
    assert len(labels) == 8
    np.testing.assert_array_equal(labels[0::2], labels[1::2])
    assert set(index.tolist()) <= subset
    partners.update(index[1::2].tolist())
    seen += 1
  assert seen == info.num_batches and len(partners) > 8  # random partners, not a fixed one


def test_cskd_terms_are_eq3_on_anchors_and_partners():
  d = distillers.create("CS-KD", net(seed=1), None)
  assert (d.method_name, d.temperature, d.method_weight) == ("CSKD", 4.0, 1.0)
  kernel = d.student.classifier.kernel
  kernel.assign(kernel * 30.0)  # logits far apart: the KL is not a float32 round-off
  b = batch()
  s = d.student_outputs(b["image"], training=False)
  terms = d.total_terms(s, None, b, training=False)
  z, y = s.logits.numpy(), b["label"].numpy()
  assert float(terms["ce"]) == pytest.approx(np_ce(z[0::2], y[0::2]), rel=1e-5)
  want = 16.0 * np_kl(np_soft(z[1::2], 4.0), np_log_softmax(z[0::2] / 4.0))
  assert float(terms["cs_kd"]) == pytest.approx(want, rel=1e-4)


def test_cskd_refuses_odd_replica_shares():
  from kd_tf2.engine.run import check_execution
  c = cfg.validate(cfg.TrainConfig(method="CS-KD", arch="resnet8", dataset="synthetic",
                                   batch_size=6))
  check_execution(c, 1)
  with pytest.raises(UsageError, match=r"--batch_size=6: method CSKD .* multiple of 4"):
    check_execution(c, 2)


# ------------------------------------------------------------------------------ BYOT
def test_byot_terms_are_eq1_to_3_over_its_heads():
  d = distillers.create("BYOT", net(seed=1), None)
  assert (d.alpha, d.method_weight, d.temperature) == (0.3, 0.03, 3.0)
  assert len(d.heads) == 2  # after stages 1 and 2 of a 3-stage resnet
  b = batch()
  s = d.student_outputs(b["image"], training=False)
  terms = d.terms(s, None, b, training=False)
  y, zc, fc = b["label"].numpy(), s.logits.numpy(), s.embedding.numpy()
  outs = [(z.numpy(), f.numpy()) for z, f in d.head_outputs(s, False)]
  assert all(f.shape == fc.shape for _, f in outs)
  assert float(terms["byot_ce"]) == pytest.approx(0.7 * sum(np_ce(z, y) for z, _ in outs),
                                                  rel=1e-5)
  # the authors' code: alpha * KL at T=3, no T^2 factor (their soft cross-entropy's gradient)
  kl = sum(np_kl(np_soft(zc, 3.0), np_log_softmax(z / 3.0)) for z, _ in outs)
  assert float(terms["byot_kl"]) == pytest.approx(0.3 * kl, rel=1e-4)
  feat = sum(np.mean(np.sum((f - fc) ** 2, axis=-1)) for _, f in outs)
  assert float(terms["byot_feat"]) == pytest.approx(0.03 * feat, rel=1e-4)
  views = d.eval_models()
  np.testing.assert_allclose(views["head1"](b["image"]).numpy(), outs[0][0], rtol=1e-5,
                             atol=1e-6)


def _shuffle_batchnorm_statistics(layers, seed):
  """Random moving means/variances, so inference differs from a freshly built net."""
  rng = np.random.default_rng(seed)
  for layer in layers:
    for v in layer.weights:
      if "moving_mean" in v.path:
        v.assign(rng.normal(scale=0.1, size=v.shape).astype(np.float32))
      elif "moving_variance" in v.path:
        v.assign(rng.uniform(0.5, 2.0, size=v.shape).astype(np.float32))


def test_byot_early_exits_are_truncated_and_round_trip_as_keras(tmp_path):
  student = net(seed=1)
  d = distillers.create("BYOT", student, None, early_exit="all")
  assert d.exits == (1, 2) and d.hparams()["early_exit"] == "1,2"
  _shuffle_batchnorm_statistics([student] + d.heads, seed=3)
  x = batch(b=4, seed=5)["image"]
  views, exports = d.eval_models(), d.extra_exports()
  assert set(exports) == {"exit1", "exit2"}
  for i in (1, 2):
    model = exports[f"exit{i}"]
    # truly truncated: the stem, stages 1..i and head i only; no deeper stage, no net classifier
    deeper = [b for blocks in model.net.stages[i:] for b in blocks] + [model.net.classifier]
    assert all(not layer.weights for layer in deeper)
    kept = nb.trunk_layers(model.net, i) + [model.head]
    assert {id(v) for v in model.weights} == {id(v) for layer in kept for v in layer.weights}
    trunk = sum(len(layer.weights) for layer in nb.trunk_layers(student, i))
    assert len(model.weights) == trunk + len(d.heads[i - 1].weights)
    assert not [v.path for v in model.weights if "layer3" in v.path]  # resnet8's last stage
    want = views[f"head{i}"](x).numpy()
    np.testing.assert_allclose(model(x, training=False).numpy(), want, rtol=1e-5, atol=1e-5)
    path = str(tmp_path / f"exit{i}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    assert (loaded.arch, loaded.num_classes, len(loaded.weights)) == (
        f"resnet8_exit{i}", CLASSES, len(model.weights))
    np.testing.assert_allclose(loaded(x, training=False).numpy(), want, rtol=1e-5, atol=1e-5)
  assert distillers.create("BYOT", net(), None, early_exit="2").extra_exports().keys() == {"exit2"}
  assert distillers.create("BYOT", net(), None, early_exit="none").extra_exports() == {}


def test_byot_heads_at_chosen_stages():
  d = distillers.create("BYOT", net(seed=1), None, heads="2", early_exit="2")
  assert d.head_stages == (2,) and [h.name for h in d.heads] == ["head2"]
  assert set(d.eval_models()) == {"head2"} and set(d.extra_exports()) == {"exit2"}
  assert distillers.create("BYOT", net(seed=1), None).head_stages == (1, 2)
  b = batch()
  s = d.student(b["image"], training=False, features=True)
  # the chosen head reads stage 2's map, and only its terms are summed
  assert d.heads[0].convs[0].kernel.shape[2] == s.features[2].shape[-1]
  terms = d.terms(s, None, b, training=False)
  z, _ = d.heads[0](s.features[2], training=False)
  want = 0.7 * np_ce(z.numpy(), b["label"].numpy())
  assert float(terms["byot_ce"]) == pytest.approx(want, rel=1e-5)
  with pytest.raises(UsageError, match=r"^early_exit='1' for BYOT: exits need heads; the heads "
                     r"are at stages 2 \(heads='2'\)$"):
    distillers.create("BYOT", net(), None, heads="2", early_exit="1")
  with pytest.raises(UsageError, match=r"^heads='3' for BYOT on resnet8: accepted: none, all, or "
                     r"head indices 1..2"):
    distillers.create("BYOT", net(), None, heads="3")
  with pytest.raises(UsageError, match=r"^heads='none' for BYOT: needs at least one head"):
    distillers.create("BYOT", net(), None, heads="none")


@pytest.mark.parametrize("value", [3, 0, "first", True, 1.0, "1+3"])
def test_byot_bad_early_exit_is_one_line(value):
  with pytest.raises(UsageError) as e:
    distillers.create("BYOT", net(), None, early_exit=value)
  assert str(e.value) == (f"early_exit={value!r} for BYOT on resnet8: accepted: none, all, or "
                          "head indices 1..2 (e.g. 1 or 1+2)")


@pytest.mark.parametrize("arch", ["wrn_16_1", "vgg8", "MobileNetV2"])
def test_byot_early_exits_of_every_zoo_family_equal_their_heads(arch):
  student = net(arch, seed=1)
  d = distillers.create("BYOT", student, None, early_exit="all")
  assert d.exits == tuple(range(1, student.num_stages))
  _shuffle_batchnorm_statistics([student] + d.heads, seed=3)
  x = batch(b=2, seed=5)["image"]
  views, exports = d.eval_models(), d.extra_exports()
  for i in d.exits:
    got = exports[f"exit{i}"](x, training=False).numpy()
    np.testing.assert_allclose(got, views[f"head{i}"](x).numpy(), rtol=1e-5, atol=1e-5)
  first = exports["exit1"]
  assert len(first.weights) < len(student.weights)  # truncated


@pytest.mark.slow
def test_byot_cli_leaves_exit_files_that_test_py_evaluates(tmp_path):
  from support import DATA, ok, run, write_image
  train_dir = str(tmp_path / "byot")
  results = ok(run("train.py", [
      "--method=BYOT", "--arch=resnet8", f"--dataset={DATA}", "--batch_size=32", "--epochs=1",
      "--method_args=early_exit=2", f"--train_dir={train_dir}"]))
  assert os.path.isfile(os.path.join(train_dir, "exit2.keras"))
  assert not os.path.exists(os.path.join(train_dir, "exit1.keras"))
  assert results["exit2_keras_file"] == os.path.join(train_dir, "exit2.keras")
  # a fresh process loads it (test.py imports only the project) and scores it as head 2 scored
  scored = ok(run("test.py", [f"--model={train_dir}/exit2.keras", f"--dataset={DATA}"]))
  assert scored["top1"] == pytest.approx(results["head2_top1"], abs=1e-6)
  import kd_tf2
  image = str(tmp_path / "img.png")
  write_image(image, np.full((32, 32, 3), 128, np.uint8))
  top = kd_tf2.predict(os.path.join(train_dir, "exit2.keras"), [image], top=3)[0]
  assert len(top) == 3 and all(0.0 <= p <= 1.0 for _, p in top)


# ------------------------------------------------------------------------------ TAKD chains
def test_takd_chain_links_and_refusals(tmp_path):
  from kd_tf2.engine import chain
  c = cfg.validate(cfg.TrainConfig(method="ST", arch="resnet8", teacher_arch="resnet56",
                                   assistants="Resnet20, resnet14", dataset="synthetic",
                                   train_dir=str(tmp_path)))
  assert c.assistants == "resnet20,resnet14"
  got = [(n, l.teacher_arch, l.arch, l.teacher_ckpt, l.train_dir, l.assistants)
         for n, l in chain.links(c)]
  t = str(tmp_path)
  assert got == [
      ("assistant1", "resnet56", "resnet20", f"{t}/teacher", f"{t}/assistant1_resnet20", ""),
      ("assistant2", "resnet20", "resnet14", f"{t}/assistant1_resnet20",
       f"{t}/assistant2_resnet14", ""),
      ("student", "resnet14", "resnet8", f"{t}/assistant2_resnet14", f"{t}/student_resnet8", "")]
  assert cfg.teacher_config(c).assistants == ""
  with pytest.raises(UsageError, match=r"--assistants=resnet20: method DML does not distil"):
    cfg.validate(c.replace(method="DML", assistants="resnet20"))
  with pytest.raises(UsageError, match=r"--assistants: unknown net 'resnet9'"):
    cfg.validate(c.replace(assistants="resnet9"))


@pytest.mark.slow
def test_takd_chain_trains_every_link_once_and_reuses_them(tmp_path):
  from kd_tf2 import engine
  c = cfg.TrainConfig(method="ST", arch="resnet8", teacher_arch="resnet14", assistants="resnet8",
                      dataset="synthetic", fraction=0.125, epochs=1, batch_size=16,
                      train_dir=str(tmp_path), verbose=False)
  first = engine.train(c)
  assert {"teacher_top1", "assistant1_top1", "top1"} <= set(first)
  for d in ("teacher", "assistant1_resnet8", "student_resnet8"):
    assert (tmp_path / d / "student.keras").is_file(), d
  stamp = (tmp_path / "student_resnet8" / "student.keras").stat().st_mtime_ns
  again = engine.train(c)
  assert again["top1"] == first["top1"]
  assert (tmp_path / "student_resnet8" / "student.keras").stat().st_mtime_ns == stamp


# ------------------------------------------------------------------------------ OKDDip
@pytest.mark.parametrize("epoch,ramp", [(0, np.exp(-5.0)), (40, np.exp(-1.25)), (95, 1.0)])
def test_okddip_terms_follow_the_authors_code_on_its_branches(epoch, ramp):
  d = distillers.create("OKDDip", net(seed=1), None)
  assert d.num_branches == 4 and d.temperature == 3.0 and d.rampup == 80.0
  d.epoch.assign(float(epoch))
  b = batch()
  terms, _ = d.all_terms(b["image"], b["label"], False)
  outs = d.branch_outputs(d.shared(b["image"], False), False)
  z = [o.logits.numpy() for o in outs]
  e = np.stack([o.embedding.numpy() for o in outs[1:]], axis=1)  # [B, 3, d]
  assert [len(v.weights) for v in (d.query, d.key)] == [1, 1]  # no bias
  wq, wk = d.query.weights[0].numpy(), d.key.weights[0].numpy()
  assert wq.shape == (e.shape[-1], e.shape[-1] // 8)
  q, k = e @ wq, e @ wk
  energy = np.einsum("bid,bjd->bij", q, k)
  a = np.exp(energy - energy.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  peers = np.stack(z[1:], axis=1)
  targets = np.einsum("bij,bjk->bik", a, peers)
  first = sum(_np_kl_eps(targets[:, i], z[i + 1], 3.0) for i in range(3))
  assert float(terms["okd_peer"]) == pytest.approx(ramp * first, rel=1e-4)
  second = _np_kl_eps(np.mean(z[1:], axis=0), z[0], 3.0)
  assert float(terms["okd_leader"]) == pytest.approx(ramp * second, rel=1e-4)
  y = b["label"].numpy()
  assert float(terms["peer_ce"]) == pytest.approx(sum(np_ce(x, y) for x in z[1:]), rel=1e-5)


def test_okddip_targets_pass_gradient_to_the_peers_as_in_the_authors_code():
  d = distillers.create("OKDDip", net(seed=1), None)
  d.epoch.assign(100.0)
  b = batch()
  with tf.GradientTape() as tape:
    outs = d.branch_outputs(d.shared(b["image"], False), False)
    z = tf.stack([p.logits for p in outs[1:]], axis=1)
    tape.watch(z)
    loss = L.okddip_leader_kl(outs[0].logits, z, 3.0)
  grad = tape.gradient(loss, z)
  assert float(tf.reduce_max(tf.abs(grad))) > 0  # a detached mean would give None / zeros