"""The methods with learnable modules: VID, OFD (alias CO), AFD, ReviewKD (METHODS.md §2.11, 2.12,
2.17, §4 ReviewKD).

Per method: registered under its key (any case, aliases), METHODS.md §3 defaults, the weighted term
against a NumPy version of the formula written from the catalog (module outputs read from the
distiller's own layers), gradients of the method term that reach the student and every module
variable and never the teacher, one optimiser step inside ``tf.function`` that changes the student
and the modules and leaves every teacher variable untouched; the pairs and values each method
refuses; OFD's BatchNorm locator and margins; ReviewKD's HCL, nearest resize, warm-up and per-pair
weight. Tiny nets: student resnet8; teachers resnet14 (same widths), wrn_16_2 (wider), vgg8 (other
stage sizes); batch 8, 10 classes.
"""
import math
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

import nets
from kd_tf2 import distillers
from kd_tf2 import losses as L
from kd_tf2.distillers import ofd as ofd_module
from kd_tf2.distillers import reviewkd as reviewkd_module
from kd_tf2.distillers import vid as vid_module
from kd_tf2.errors import UsageError

NUM_CLASSES, BATCH = 10, 8

# METHODS.md §3 / §2.11 / §2.17 / §4: (ce_weight, kd_weight, method_weight).
DEFAULTS = {"VID": (1.0, 0.0, 1.0), "OFD": (1.0, 0.0, 1e-3), "AFD": (1.0, 0.0, 500.0),
            "ReviewKD": (1.0, 0.0, 1.0)}
TERM = {"VID": "vid", "OFD": "ofd", "AFD": "afd", "ReviewKD": "reviewkd"}
# The teacher each method is exercised with: AFD needs equal shapes, the others get wider maps.
TEACHER = {"VID": "wrn_16_2", "OFD": "wrn_16_2", "AFD": "resnet14", "ReviewKD": "wrn_16_2"}


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  images = tf.constant(rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32))
  labels = tf.constant(np.arange(BATCH) % NUM_CLASSES, tf.int32)
  return images, labels


def _randomize_batchnorms(model, seed):
  """Give every BN non-trivial parameters and statistics (fresh nets have gamma 1, beta 0)."""
  rng = np.random.default_rng(seed)
  for layer in model._flatten_layers():  # pylint: disable=protected-access
    if isinstance(layer, keras.layers.BatchNormalization):
      c = layer.gamma.shape[0]
      layer.gamma.assign(rng.uniform(0.3, 1.5, c) * rng.choice([-1.0, 1.0], c))
      layer.beta.assign(rng.normal(0.0, 0.7, c))
      layer.moving_mean.assign(rng.normal(0.0, 0.2, c))
      layer.moving_variance.assign(rng.uniform(0.5, 2.0, c))


@pytest.fixture(scope="module")
def nets_():
  student = nets.create("resnet8", NUM_CLASSES)
  teachers = {name: nets.create(name, NUM_CLASSES) for name in ("resnet14", "wrn_16_2", "vgg8")}
  for seed, model in enumerate(teachers.values()):
    model.build()
    _randomize_batchnorms(model, seed)
  return student, teachers


@pytest.fixture(scope="module")
def made(nets_):
  """One distiller per method (``create`` also resolves aliases / case)."""
  student, teachers = nets_
  names = {"VID": "vid", "OFD": "co", "AFD": "AFD", "ReviewKD": "reviewkd"}
  return {m: distillers.create(names[m], student, teachers[TEACHER[m]]) for m in DEFAULTS}


def _np(x):
  return np.asarray(x, np.float64)


def _outputs(d, images, training=False):
  return d.student_outputs(images, training=training), d.teacher_outputs(images)


def _block_mean(x, size):
  """Average-pool an NHWC numpy map to (size, size) with an integer ratio."""
  b, h, w, c = x.shape
  r = h // size
  return x.reshape(b, size, r, size, w // size, c).mean(axis=(2, 4))


# ----------------------------------------------------------------------------- every method

@pytest.mark.parametrize("method", sorted(DEFAULTS))
def test_registered_with_catalog_defaults(method, made):
  d = made[method]
  assert distillers.canonical_name(method.lower()) == method
  assert (d.ce_weight, d.kd_weight, d.method_weight) == DEFAULTS[method]
  assert distillers.get("CO") is distillers.get("OFD")


@pytest.mark.parametrize("method", sorted(DEFAULTS))
def test_method_gradients_reach_student_and_every_module_never_teacher(method, made, batch):
  d = made[method]
  images, labels = batch
  t = d.teacher_outputs(images)
  with tf.GradientTape() as tape:
    s = d.student_outputs(images, training=True)
    terms = d.total_terms(s, t, {"label": labels, "image": images}, training=True)
    term = terms[TERM[method]]
  assert set(terms) == {"ce", TERM[method]}
  assert np.isfinite(float(term)) and float(term) > 0
  teacher_ids = {id(v) for v in d.teacher.variables}
  assert not teacher_ids & {id(v) for v in tape.watched_variables()}
  modules = d.trainable_variables
  assert modules, f"{method} has no learnable module"
  grads = tape.gradient(term, list(d.student.trainable_variables) + modules)
  student_grads, module_grads = grads[:len(d.student.trainable_variables)], grads[-len(modules):]
  assert sum(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in student_grads) > 0
  for v, g in zip(modules, module_grads):
    assert g is not None, f"{method}: no gradient for {v.path}"
    assert np.all(np.isfinite(g.numpy())) and float(tf.reduce_max(tf.abs(g))) > 0, v.path


# ----------------------------------------------------------------------------- VID

def _np_vid(d, s, t, pool_student_to=None):
  total = 0.0
  for regressor, fs, ft in zip(d.regressors, s.features[1:], t.features[1:]):
    fs, ft = _np(fs), _np(ft)
    if fs.shape[1] > ft.shape[1]:
      fs = _block_mean(fs, ft.shape[1])
    elif ft.shape[1] > fs.shape[1]:
      ft = _block_mean(ft, fs.shape[1])
    mean = _np(regressor(tf.constant(fs, tf.float32)))
    var = np.log1p(np.exp(_np(regressor.log_scale))) + 1e-5
    total += np.mean(0.5 * ((mean - ft) ** 2 / var + np.log(var)))
  return total


def test_vid_variance_starts_at_init_var():
  regressor = vid_module.VIDRegressor(6, 6, init_var=5.0, eps=1e-5)
  np.testing.assert_allclose(np.log1p(np.exp(_np(regressor.log_scale))) + 1e-5, 5.0, rtol=1e-6)


def test_vid_regressors_and_loss_match_numpy(made, batch):
  d = made["VID"]
  for regressor, ft in zip(d.regressors, d.teacher_outputs(batch[0]).features[1:]):
    assert regressor.log_scale.shape == (ft.shape[-1],)
    assert [conv.kernel.shape[-1] for conv in regressor.convs] == [ft.shape[-1]] * 3
  s, t = _outputs(d, batch[0])
  got = float(d.terms(s, t, {"label": batch[1], "image": batch[0]}, training=False)["vid"])
  np.testing.assert_allclose(got, _np_vid(d, s, t), rtol=1e-4)


def test_vid_pools_before_the_regressor(nets_, batch):
  student, teachers = nets_
  d = distillers.create("VID", student, teachers["vgg8"], init_var=2.0)  # 32x32 vs 16x16 stage 1
  s, t = _outputs(d, batch[0])
  assert s.features[1].shape[1] == 2 * t.features[1].shape[1]
  got = float(d.terms(s, t, {"label": batch[1], "image": batch[0]}, training=False)["vid"])
  np.testing.assert_allclose(got, _np_vid(d, s, t), rtol=1e-4)


@pytest.mark.parametrize("kwargs", [{"init_var": 0.0}, {"eps": -1.0}, {"init_var": 1e-6}])
def test_vid_refuses_bad_variances(kwargs, nets_):
  student, teachers = nets_
  with pytest.raises(UsageError, match="VID"):
    distillers.create("VID", student, teachers["resnet14"], **kwargs)


# ----------------------------------------------------------------------------- OFD

def _np_truncated_mean(gamma, beta):
  """E[x | x < 0] for x ~ N(beta, gamma^2) by numerical integration (or -3 sigma if P(x<0) <=
  0.001), per channel."""
  out = []
  for g, b in zip(_np(gamma), _np(beta)):
    sigma = abs(g)
    x = np.linspace(b - 12 * sigma, 0.0, 200001)
    pdf = np.exp(-0.5 * ((x - b) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    mass = np.trapezoid(pdf, x)
    out.append(np.trapezoid(x * pdf, x) / mass if mass > 1e-3 else -3 * sigma)
  return np.array(out)


def test_ofd_margins_are_truncated_means_of_the_located_teacher_bn(made):
  d = made["OFD"]
  bns = ofd_module.teacher_preact_batchnorms(d.teacher)
  assert [bn.name for bn in bns] == ["bn1", "bn1", "bn1"]
  for bn, margin in zip(bns, d._margins):  # pylint: disable=protected-access
    np.testing.assert_allclose(margin, _np_truncated_mean(bn.gamma, bn.beta), rtol=1e-4, atol=1e-5)
    assert np.all(margin <= 0)


def test_ofd_loss_matches_numpy(made, batch):
  d = made["OFD"]
  s, t = _outputs(d, batch[0])
  n, total = len(d.connectors), 0.0
  for i, (connector, sp, tp) in enumerate(zip(d.connectors, s.preacts[1:], t.preacts[1:])):
    guess = _np(connector(sp, training=False))
    target = np.maximum(_np(tp), d._margins[i])  # pylint: disable=protected-access
    mask = (guess > target) | (target > 0)
    total += (mask * (guess - target) ** 2).sum() / BATCH / 2 ** (n - i - 1)
  got = float(d.terms(s, t, {"label": batch[1], "image": batch[0]}, training=False)["ofd"])
  np.testing.assert_allclose(got, 1e-3 * total, rtol=1e-4)


@pytest.mark.parametrize("arch", ["resnet14", "wrn_16_2", "vgg8", "ShuffleV2", "MobileNetV2"])
def test_ofd_locator_finds_the_bn_that_shifts_each_preact(arch, nets_, batch):
  """Adding delta to the located BN's beta shifts that preact by exactly delta (the BN output, or
  BN + a shortcut that does not depend on it) on the BN's channels, and nothing shallower."""
  model = nets_[1][arch] if arch in nets_[1] else nets.create(arch, NUM_CLASSES)
  images = batch[0][:2]
  before = model(images, training=False, features=True).preacts[1:]
  bns = ofd_module.teacher_preact_batchnorms(model)
  assert len(bns) == len(before)
  rng = np.random.default_rng(1)
  for i, bn in enumerate(bns):
    c = bn.beta.shape[0]
    beta = bn.beta.numpy().copy()
    delta = rng.uniform(0.5, 1.0, c).astype(np.float32)
    bn.beta.assign(beta + delta)
    after = model(images, training=False, features=True).preacts[1:]
    bn.beta.assign(beta)
    kept = before[i].shape[-1] - c  # ShuffleV2: the passed-through half comes first
    assert kept == (before[i].shape[-1] // 2 if arch == "ShuffleV2" else 0)
    shift = _np(after[i]) - _np(before[i])
    np.testing.assert_allclose(shift[..., kept:], np.broadcast_to(delta, shift[..., kept:].shape),
                               atol=2e-4)
    np.testing.assert_array_equal(shift[..., :kept], 0.0)
    for j in range(i):
      np.testing.assert_array_equal(_np(after[j]), _np(before[j]))


def test_ofd_pairs_the_last_stages_with_their_margins(nets_):
  """resnet8 (3 stages) against vgg8 (4): mdistiller ``_align_list`` pairs the last 3 of each."""
  student, teachers = nets_
  d = distillers.create("OFD", student, teachers["vgg8"])
  t_pre = teachers["vgg8"](tf.zeros([2, 32, 32, 3]), training=False, features=True).preacts[1:]
  assert [c.out_channels for c in d.connectors] == [int(p.shape[-1]) for p in t_pre[1:]]
  every = ofd_module.teacher_margins(teachers["vgg8"], [int(p.shape[-1]) for p in t_pre])
  assert len(d._margins) == 3  # pylint: disable=protected-access
  for got, want in zip(d._margins, every[1:]):  # pylint: disable=protected-access
    np.testing.assert_array_equal(got, want)


def test_ofd_teacher_bn_uses_batch_statistics_and_keeps_the_teacher(nets_, batch):
  """Default ``teacher_bn="batch"`` (mdistiller's train-mode teacher): the stem map is
  ReLU(BN over this batch's statistics); the teacher's moving statistics stay as loaded.
  ``teacher_bn="moving"`` is the inference-mode teacher."""
  student, teachers = nets_
  teacher = teachers["resnet14"]
  d = distillers.create("OFD", student, teacher)
  assert d.hparams()["teacher_bn"] == "batch"
  moving = {v.path: v.numpy().copy() for v in teacher.non_trainable_variables}
  images = batch[0]
  t = d.teacher_outputs(images)
  for v in teacher.non_trainable_variables:
    np.testing.assert_array_equal(v.numpy(), moving[v.path])
  bn = ofd_module.teacher_preact_batchnorms(teacher)[0]
  assert bn.trainable is False and bn.momentum == 0.9  # restored after the call
  # the stem: conv1 -> bn1 -> ReLU with batch statistics
  layers = dict(teacher.torch_layers())
  conv = _np(layers["conv1"](images))
  mean, var = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))
  g, b = _np(layers["bn1"].gamma), _np(layers["bn1"].beta)
  stem = np.maximum((conv - mean) / np.sqrt(var + 1e-5) * g + b, 0.0)
  np.testing.assert_allclose(_np(t.features[0]), stem, rtol=1e-4, atol=1e-4)
  moving_bn = distillers.create("OFD", student, teacher, teacher_bn="moving")
  inference = moving_bn.teacher_outputs(images)
  assert np.abs(_np(inference.features[0]) - stem).max() > 1e-2
  with pytest.raises(UsageError, match=r"OFD teacher_bn='train': accepted batch, moving"):
    distillers.create("OFD", student, teacher, teacher_bn="train")


def test_ofd_refuses_a_teacher_without_known_batchnorms(nets_):
  stranger = keras.Sequential([keras.layers.Dense(3)], name="stranger")
  with pytest.raises(UsageError, match="OFD cannot locate .*stranger"):
    ofd_module.teacher_preact_batchnorms(stranger)


# ----------------------------------------------------------------------------- AFD

def _np_afd(d, s, t):
  total = []
  for attention, fs, ft in zip(d.attentions, s.features[1:], t.features[1:]):
    fs, ft = _np(fs), _np(ft)
    w1, b1 = _np(attention.squeeze.kernel)[0, 0], _np(attention.squeeze.bias)
    w2, b2 = _np(attention.excite.kernel)[0, 0], _np(attention.excite.bias)
    hidden = np.maximum(ft.mean(axis=(1, 2)) @ w1 + b1, 0.0)
    rho = 1.0 / (1.0 + np.exp(-(hidden @ w2 + b2)))
    rho /= rho.sum(axis=1, keepdims=True)

    def unit(f):
      return f / (np.sqrt((f ** 2).sum(axis=(1, 2), keepdims=True)) + 1e-6)

    per_channel = ((unit(fs) - unit(ft)) ** 2).mean(axis=(1, 2))
    total.append((rho * per_channel).sum() / len(fs))
  return 500.0 * np.mean(total)


def test_afd_attention_and_loss_match_numpy(made, batch):
  d = made["AFD"]
  s, t = _outputs(d, batch[0])
  for attention, ft in zip(d.attentions, t.features[1:]):
    rho = attention(ft).numpy()
    assert rho.shape == (BATCH, ft.shape[-1]) and np.all(rho > 0)
    np.testing.assert_allclose(rho.sum(axis=1), 1.0, rtol=1e-5)
  got = float(d.terms(s, t, {"label": batch[1], "image": batch[0]}, training=False)["afd"])
  np.testing.assert_allclose(got, _np_afd(d, s, t), rtol=1e-4)


@pytest.mark.parametrize("teacher", ["wrn_16_2", "vgg8"])
def test_afd_refuses_pairs_with_different_stage_shapes(teacher, nets_):
  student, teachers = nets_
  with pytest.raises(UsageError, match=f"AFD needs equal stage shapes: resnet8 .* {teacher}"):
    distillers.create("AFD", student, teachers[teacher])


def test_afd_refuses_non_positive_att_f(nets_):
  student, teachers = nets_
  with pytest.raises(UsageError, match="att_f"):
    distillers.create("AFD", student, teachers["resnet14"], att_f=0)


# ----------------------------------------------------------------------------- ReviewKD

def test_nearest_resize_reads_floor_index():
  x = tf.reshape(tf.range(9, dtype=tf.float32), [1, 3, 3, 1])
  up = reviewkd_module.nearest_resize(x, 8)[0, :, :, 0].numpy()
  rows = [0, 0, 0, 1, 1, 1, 2, 2]  # floor(i * 3 / 8)
  np.testing.assert_array_equal(up, np.arange(9).reshape(3, 3)[np.ix_(rows, rows)])
  y = tf.reshape(tf.range(64, dtype=tf.float32), [1, 8, 8, 1])
  down = reviewkd_module.nearest_resize(y, 4)[0, :, :, 0].numpy()
  np.testing.assert_array_equal(down, np.arange(64).reshape(8, 8)[::2, ::2])


def test_hcl_matches_numpy():
  rng = np.random.default_rng(3)
  shapes = [(2, 8, 8, 3), (2, 4, 4, 5), (2, 1, 1, 7)]
  ys = [rng.normal(size=sh) for sh in shapes]
  yt = [rng.normal(size=sh) for sh in shapes]

  def mse(a, b):
    return ((a - b) ** 2).mean()

  expect = ((mse(ys[0], yt[0]) + mse(_block_mean(ys[0], 4), _block_mean(yt[0], 4)) / 2
             + mse(_block_mean(ys[0], 2), _block_mean(yt[0], 2)) / 4
             + mse(_block_mean(ys[0], 1), _block_mean(yt[0], 1)) / 8) / 1.875
            + (mse(ys[1], yt[1]) + mse(_block_mean(ys[1], 2), _block_mean(yt[1], 2)) / 2
               + mse(_block_mean(ys[1], 1), _block_mean(yt[1], 1)) / 4) / 1.75
            + mse(ys[2], yt[2]))
  got = L.hcl([tf.constant(a, tf.float32) for a in ys],
                            [tf.constant(a, tf.float32) for a in yt])
  np.testing.assert_allclose(float(got), expect, rtol=1e-5)


def test_reviewkd_levels_match_teacher_shapes_and_loss_is_hcl(made, batch):
  d = made["ReviewKD"]
  s, t = _outputs(d, batch[0])
  s_maps, t_maps = d._levels(s, t)  # pylint: disable=protected-access
  assert [m.shape for m in t_maps] == [p.shape for p in t.preacts[1:]] + [(BATCH, 1, 1, 128)]
  assert len(d.abfs) == 4 and [a.fuse for a in d.abfs] == [True, True, True, False]
  assert {a.mid_channels for a in d.abfs} == {64}  # min(512, student embedding width)
  outputs = d.review(s_maps, t_maps, training=False)
  assert [o.shape for o in outputs] == [m.shape for m in t_maps]
  d.epoch.assign(40.0)
  try:
    got = float(d.terms(s, t, {"label": batch[1], "image": batch[0]}, training=False)["reviewkd"])
  finally:
    d.epoch.assign(0.0)
  np.testing.assert_allclose(got, float(L.hcl(outputs, t_maps)), rtol=1e-5)


def test_reviewkd_warmup_is_one_based_min_epoch_over_20(made, batch):
  d = made["ReviewKD"]
  s, t = _outputs(d, batch[0])
  values = {}
  for epoch in (0.0, 9.0, 19.0, 100.0):
    d.epoch.assign(epoch)
    values[epoch] = float(d.terms(s, t, {"label": batch[1], "image": batch[0]}, training=False)["reviewkd"])
  d.epoch.assign(0.0)
  full = values[100.0]
  np.testing.assert_allclose([values[0.0], values[9.0], values[19.0]],
                             [full / 20, full * 10 / 20, full], rtol=1e-5)


def test_reviewkd_weight_is_5_for_resnet32x4_to_resnet8x4_unless_given():
  def net(arch):
    return types.SimpleNamespace(arch=arch)

  cls = distillers.get("ReviewKD")
  assert cls(net("resnet8x4"), net("resnet32x4")).method_weight == 5.0
  assert cls(net("resnet8x4"), net("resnet32x4"), method_weight=2.0).method_weight == 2.0
  assert cls(net("resnet8"), net("resnet32x4")).method_weight == 1.0
  with pytest.raises(UsageError, match="warmup_epochs"):
    cls(net("resnet8"), net("resnet14"), warmup_epochs=0)


def test_reviewkd_pairs_the_deepest_stages(nets_, batch):
  student, teachers = nets_
  d = distillers.create("ReviewKD", student, teachers["vgg8"])  # 3 student vs 4 teacher stages
  s, t = _outputs(d, batch[0])
  s_maps, t_maps = d._levels(s, t)  # pylint: disable=protected-access
  assert [m.shape[1] for m in s_maps] == [32, 16, 8, 1]
  assert [m.shape for m in t_maps] == [p.shape for p in t.preacts[2:]] + [(BATCH, 1, 1, 512)]
  assert np.isfinite(float(d.terms(s, t, {"label": batch[1], "image": batch[0]}, training=False)["reviewkd"]))
