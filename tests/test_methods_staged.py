"""The staged methods FSP, AB, FT and MHGD: stages, gradients, frozen modules, checkpoints,
refusals and NumPy cross-checks (METHODS.md §2.9, §2.10, §2.13, §4)."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import nets  # noqa: E402
from kd_tf2 import distillers  # noqa: E402
from kd_tf2.distillers.base import StepContext  # noqa: E402
from kd_tf2.engine.step import compile_step  # noqa: E402
from kd_tf2.distillers import mhgd as mhgd_module  # noqa: E402
from kd_tf2.errors import UsageError  # noqa: E402

B, K = 8, 10


# ---------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def zoo():
  """Tiny nets shared by the module: resnet8 students, resnet14 (same channels) and wrn_16_2
  (twice the channels) teachers."""
  tf.random.set_seed(0)
  out = {}
  for name in ("resnet8", "resnet14", "wrn_16_2"):
    net = nets.create(name, K)
    net.build()
    out[name] = net
  return out


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  return {"image": tf.constant(rng.normal(size=(B, 32, 32, 3)), tf.float32),
          "label": tf.constant(rng.integers(0, K, size=B), tf.int32)}


def _values(variables):
  return [v.numpy().copy() for v in variables]


def _changed(before, variables):
  return [not np.array_equal(a, v.numpy()) for a, v in zip(before, variables)]


def _ctx(variables):
  variables = list(variables)
  opt = keras.optimizers.SGD(0.05)
  opt.build(variables)
  return StepContext(opt, variables)


def _ids(variables):
  return {id(v) for v in variables}


def _moves(variables):
  """The variables a step must change: all but the biases of convs followed by a training-mode BN
  (the BN removes the batch mean, so their gradient is ~0 and an SGD step may round to nothing)."""
  return [v for v in variables
          if not (v.path.endswith("/bias") and ("connector_" in v.path or "translator" in v.path))]


def _stage_gradients(d, stage, batch):
  """Gradients of the stage's loss w.r.t. its variables and the teacher's weights."""
  images, labels = batch["image"], batch["label"]
  variables = d.stage_variables(stage)
  with tf.GradientTape() as tape:
    s = d.student_outputs(images, training=True) if stage.uses_student else None
    t = d.teacher_outputs(images)
    terms = stage.terms(s, t, {"label": labels, "image": images}, training=True)
    loss = tf.add_n(list(terms.values()))
  grads = tape.gradient(loss, variables + list(d.teacher.weights))
  return terms, grads[:len(variables)], grads[len(variables):]


def _run_stage_step(d, stage, batch):
  """One compiled stage step; returns the terms."""
  variables = d.stage_variables(stage)
  return _compiled(lambda b, ctx: d.stage_step(stage, b, ctx), variables)(batch)[0]


def _run_train_step(d, batch):
  return _compiled(d.train_step, d.variables_to_train())(batch)[0]


def _compiled(step_fn, variables):
  """The engine's compiled step of ``step_fn`` (SGD 0.05, one device): ``batch -> (the step's
  own terms, without the engine's sum "loss", metrics)``."""
  ctx = _ctx(variables)
  step = compile_step(tf.distribute.get_strategy(), step_fn, ctx.optimizer, ctx.variables)

  def run(batch):
    terms, metrics = step(batch)
    return {k: v for k, v in terms.items() if k != "loss"}, metrics
  return run


def _checkpoint_roundtrip(d, method, student, teacher, tmp_path, **hparams):
  """Save ``d``, restore into a fresh distiller of the same pair; return both."""
  path = tf.train.Checkpoint(distiller=d).save(str(tmp_path / "ckpt"))
  fresh = distillers.create(method, student, teacher, **hparams)
  tf.train.Checkpoint(distiller=fresh).restore(path).assert_existing_objects_matched()
  return fresh


def _feature_variable_ids(student):
  return _ids(student.trainable_variables) - _ids(student.classifier.trainable_variables)


# ------------------------------------------------------------------------- NumPy references

def _np_pool(x, size):
  """Mean over non-overlapping blocks: [B, H, W, C] -> [B, size, size, C]."""
  b, h, w, c = x.shape
  r = h // size
  return x.reshape(b, size, r, size, r, c).mean(axis=(2, 4))


def _np_fsp(feats_s, feats_t):
  def gram(a, b):
    size = min(a.shape[1], b.shape[1])
    a, b = _np_pool(a, size), _np_pool(b, size)
    return np.einsum("bhwi,bhwj->bij", a, b) / (size * size)
  total = 0.0
  for l in range(len(feats_s) - 1):
    total += np.mean((gram(feats_s[l], feats_s[l + 1]) - gram(feats_t[l], feats_t[l + 1])) ** 2)
  return total


def _np_ab(s_pre, t_pre, margin=1.0):
  n = len(s_pre)
  total = 0.0
  for i, (s, t) in enumerate(zip(s_pre, t_pre)):
    crit = ((s + margin) ** 2 * ((s > -margin) & (t <= 0)) +
            (s - margin) ** 2 * ((s <= margin) & (t > 0)))
    total += 2.0 ** (i - n + 1) * crit.sum() / s.shape[0] * 3 / 1000
  return total


def _np_transposed_conv3x3(x, kernel, bias):
  """PyTorch ConvTranspose2d(k=3, stride=1, padding=1): out[y] = sum_k in[y + 1 - k] W[k]."""
  b, h, w, _ = x.shape
  out = np.zeros((b, h, w, kernel.shape[2])) + bias
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  for ky in range(3):
    for kx in range(3):
      window = padded[:, 2 - ky:2 - ky + h, 2 - kx:2 - kx + w, :]   # in[y + 1 - ky]
      out += np.einsum("bhwc,oc->bhwo", window, kernel[ky, kx])
  return out


# ------------------------------------------------------------------------------------- FSP

def test_fsp_stage_matches_numpy_and_main_phase_is_ce_only(zoo, batch):
  s, t = zoo["resnet8"], zoo["resnet14"]
  d = distillers.create("fsp", s, t)
  (stage,) = d.stages()
  assert (stage.name, stage.epochs, stage.learning_rate) == ("init", 30, None)
  assert not d.needs_teacher
  so = d.student_outputs(batch["image"], training=False)
  to = d.teacher_outputs(batch["image"])
  got = float(stage.terms(so, to, batch)["fsp"])
  want = _np_fsp([f.numpy() for f in so.features], [f.numpy() for f in to.features])
  assert np.isfinite(got) and got > 0
  np.testing.assert_allclose(got, want, rtol=1e-4)
  assert set(d.total_terms(so, None, batch)) == {"ce"}
  assert set(distillers.create("fsp", s, t, kd_weight=0.9).total_terms(
      so, to, batch)) == {"ce", "kd"}


def test_fsp_stage_gradients_and_step(zoo, batch):
  s, t = zoo["resnet8"], zoo["resnet14"]
  d = distillers.create("FSP", s, t)
  (stage,) = d.stages()
  variables = d.stage_variables(stage)
  assert _ids(variables) == _feature_variable_ids(s)
  assert t.trainable_variables == []
  terms, grads, teacher_grads = _stage_gradients(d, stage, batch)
  assert all(g is not None for g in grads)
  assert all(g is None for g in teacher_grads)
  head, teacher_before = _values(s.classifier.weights), _values(t.weights)
  before = _values(variables)
  terms = _run_stage_step(d, stage, batch)
  assert np.isfinite(float(terms["fsp"]))
  assert all(_changed(before, variables))
  assert not any(_changed(head, s.classifier.weights))
  assert not any(_changed(teacher_before, t.weights))


def test_fsp_refuses_different_channels(zoo, caplog):
  with pytest.raises(UsageError, match=r"FSP .*resnet8 -> wrn_16_2.*features\[1\].*16.*32"):
    distillers.create("FSP", zoo["resnet8"], zoo["wrn_16_2"])
  with caplog.at_level("WARNING"):
    d = distillers.create("FSP", zoo["resnet8"], zoo["resnet14"], method_weight=50.0)
  assert "no effect" in caplog.text
  assert set(d.terms(None, None, {"label": None, "image": None})) == set()


# -------------------------------------------------------------------------------------- AB

def test_ab_identity_connectors_match_numpy(zoo, batch):
  s, t = zoo["resnet8"], zoo["resnet14"]
  d = distillers.create("AB", s, t)
  (stage,) = d.stages()
  assert (stage.name, stage.epochs) == ("init", 30)
  assert d.connector_variables() == []       # equal shapes: identity connectors
  so = d.student_outputs(batch["image"], training=False)
  to = d.teacher_outputs(batch["image"])
  got = float(stage.terms(so, to, batch, training=False)["ab"])
  want = _np_ab([p.numpy() for p in so.preacts[1:]], [p.numpy() for p in to.preacts[1:]])
  assert np.isfinite(got) and got > 0
  np.testing.assert_allclose(got, want, rtol=1e-4)
  assert set(d.total_terms(so, None, batch)) == {"ce"}


def test_ab_stage_trains_connectors_and_features_then_freezes(zoo, batch, tmp_path):
  s, t = zoo["resnet8"], zoo["wrn_16_2"]
  d = distillers.create("AB", s, t)
  (stage,) = d.stages()
  connectors = d.connector_variables()
  assert len(connectors) == 3 * 4             # conv kernel+bias, BN gamma+beta per position
  variables = d.stage_variables(stage)
  assert _ids(variables) == _ids(connectors) | _feature_variable_ids(s)
  _, grads, teacher_grads = _stage_gradients(d, stage, batch)
  assert all(g is not None for g in grads)
  assert all(g is None for g in teacher_grads)
  teacher_before, head = _values(t.weights), _values(s.classifier.weights)
  moving = _moves(variables)
  assert len(moving) == len(variables) - 3
  before = _values(moving)
  terms = _run_stage_step(d, stage, batch)
  assert np.isfinite(float(terms["ab"]))
  assert all(_changed(before, moving))
  assert not any(_changed(head, s.classifier.weights))
  assert not any(_changed(teacher_before, t.weights))
  # main phase: the student only, connectors frozen
  assert _ids(d.variables_to_train()) == _ids(s.trainable_variables)
  connector_weights = [w for c in d.connectors for w in c.weights]
  frozen = _values(connector_weights)
  _run_train_step(d, batch)
  assert not any(_changed(frozen, connector_weights))
  # the stage's connectors (incl. BN statistics) survive a checkpoint round trip
  fresh = _checkpoint_roundtrip(d, "AB", s, t, tmp_path)
  assert len(fresh.weights) == len(d.weights)
  for a, b in zip(d.weights, fresh.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_ab_refusals(zoo):
  with pytest.raises(UsageError, match="margin"):
    distillers.create("AB", zoo["resnet8"], zoo["resnet14"], margin=-1.0)


# -------------------------------------------------------------------------------------- FT

def test_ft_paraphraser_shapes_and_pytorch_transposed_conv(zoo, batch):
  d = distillers.create("FT", zoo["resnet8"], zoo["wrn_16_2"])
  to = d.teacher_outputs(batch["image"])
  f_t = to.features[-1]                                 # [B, 8, 8, 128]
  factor = d.paraphraser.encode(f_t)
  assert factor.shape == (B, 8, 8, 64)                  # int(0.5 * 128)
  rec = d.paraphraser(f_t).numpy()
  assert rec.shape == f_t.shape
  want = np.mean((rec - f_t.numpy()) ** 2)           # RepDistiller nn.MSELoss, plain
  got = d.stages()[0].terms(None, to, batch)["paraphraser"]
  np.testing.assert_allclose(float(got), want, rtol=1e-4)
  so = d.student_outputs(batch["image"], training=False)
  assert d.translator(so.features[-1], training=False).shape == (B, 8, 8, 64)
  dec = d.paraphraser.dec0
  x = np.random.default_rng(1).normal(size=(2, 5, 5, 64)).astype(np.float32)
  want = _np_transposed_conv3x3(x, dec.kernel.numpy(), dec.bias.numpy())
  np.testing.assert_allclose(dec(x).numpy(), want, rtol=1e-4, atol=1e-4)
  # main term (RepDistiller FactorTransfer p1=2, p2=1):
  # 200 * mean |normalize(mean_c F_s^2) - normalize(mean_c F_t^2)| over [B, H*W]
  a_s = np.mean(d.translator(so.features[-1], training=False).numpy() ** 2, axis=-1)
  a_p = np.mean(factor.numpy() ** 2, axis=-1)
  a_s, a_p = a_s.reshape(B, -1), a_p.reshape(B, -1)
  want = 200.0 * np.mean(np.abs(a_s / np.linalg.norm(a_s, axis=1, keepdims=True) -
                                a_p / np.linalg.norm(a_p, axis=1, keepdims=True)))
  got = d.terms(so, to, batch, training=False)["ft"]
  np.testing.assert_allclose(float(got), want, rtol=1e-4)


def test_ft_stage_then_main_phase(zoo, batch, tmp_path):
  s, t = zoo["resnet8"], zoo["wrn_16_2"]
  d = distillers.create("FT", s, t)
  (stage,) = d.stages()
  assert (stage.name, stage.epochs, stage.learning_rate) == ("paraphraser", 30, 0.01)
  assert not stage.uses_student
  para = list(d.paraphraser.trainable_variables)
  assert _ids(d.stage_variables(stage)) == _ids(para) and len(para) == 12
  _, grads, teacher_grads = _stage_gradients(d, stage, batch)
  assert all(g is not None for g in grads)
  assert all(g is None for g in teacher_grads)
  student_before, translator_before = _values(s.weights), _values(d.translator.weights)
  teacher_before, para_before = _values(t.weights), _values(para)
  terms = _run_stage_step(d, stage, batch)
  assert np.isfinite(float(terms["paraphraser"]))
  assert all(_changed(para_before, para))
  assert not any(_changed(student_before, s.weights))
  assert not any(_changed(translator_before, d.translator.weights))
  # the trained paraphraser is checkpointed with the distiller
  fresh = _checkpoint_roundtrip(d, "FT", s, t, tmp_path)
  for a, b in zip(para, fresh.paraphraser.trainable_variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  # main phase: student + translator learn, paraphraser frozen, teacher untouched
  main = d.variables_to_train()
  assert _ids(main) == _ids(s.trainable_variables) | _ids(d.translator.trainable_variables)
  with tf.GradientTape() as tape:
    so = d.student_outputs(batch["image"], training=True)
    to = d.teacher_outputs(batch["image"])
    loss = d.terms(so, to, batch)["ft"]
  translator = list(d.translator.trainable_variables)
  grads = tape.gradient(loss, translator + para)
  assert all(g is not None for g in grads[:len(translator)])
  assert all(g is None for g in grads[len(translator):])
  moving = _moves(main)
  assert len(moving) == len(main) - 3
  para_before, main_before = _values(para), _values(moving)
  terms = _run_train_step(d, batch)
  assert set(terms) == {"ce", "ft"} and np.isfinite(float(terms["ft"]))
  assert not any(_changed(para_before, para))
  unchanged = [v.path for v, c in zip(moving, _changed(main_before, moving)) if not c]
  assert not unchanged, unchanged
  assert not any(_changed(teacher_before, t.weights))


def test_ft_learning_rate_rule_and_refusals(zoo):
  assert distillers.create("FT", zoo["resnet8"], zoo["resnet14"],
                           paraphraser_lr=0.05).stages()[0].learning_rate == 0.05
  with pytest.raises(UsageError, match="rate"):
    distillers.create("FT", zoo["resnet8"], zoo["resnet14"], rate=0.0)
  with pytest.raises(UsageError, match="0 factor channels"):
    distillers.create("FT", zoo["resnet8"], zoo["resnet14"], rate=0.001)


# ------------------------------------------------------------------------------------ MHGD

def test_mhgd_svd_compression(batch):
  rng = np.random.default_rng(2)
  f_t = tf.constant(rng.normal(size=(4, 4, 4, 8)), tf.float32)
  f_s = tf.constant(rng.normal(size=(4, 4, 4, 8)), tf.float32)
  v_t = mhgd_module.teacher_vector(f_t).numpy()
  _, _, vh = np.linalg.svd(f_t.numpy().reshape(4, 16, 8))
  ref = vh[:, 0, :]
  np.testing.assert_allclose(np.abs(v_t), np.abs(ref), atol=1e-4)
  lead = v_t[np.arange(4), np.abs(v_t).argmax(axis=1)]
  assert np.all(lead > 0)
  v_s = mhgd_module.student_vector(f_s, tf.constant(v_t)).numpy()
  _, _, vh_s = np.linalg.svd(f_s.numpy().reshape(4, 16, 8))
  cands = vh_s[:, :4, :]                                    # [B, 4, C]
  cos = np.einsum("bnc,bc->bn", cands, v_t)
  best = np.abs(cos).argmax(axis=1)
  want = cands[np.arange(4), best] * np.sign(cos[np.arange(4), best])[:, None]
  np.testing.assert_allclose(v_s, want, atol=1e-4)


def test_mhgd_clip_distillation():
  gm = [tf.constant([3.0, 4.0]), None, tf.constant([1.0, 0.0]), tf.constant([0.0, 1.0])]
  gd = [tf.constant([0.0, 10.0]), tf.constant([1.0, 1.0]), None, tf.constant([0.0, 0.1])]
  out = mhgd_module.clip_distillation(gm, gd, 0.5)
  np.testing.assert_allclose(out[0].numpy(), [3.0, 4.0 + 2.5])     # clipped to 0.5 * 5
  np.testing.assert_allclose(out[1].numpy(), [0.0, 0.0])            # no main gradient: no budget
  np.testing.assert_allclose(out[2].numpy(), [1.0, 0.0])
  np.testing.assert_allclose(out[3].numpy(), [0.0, 1.1])            # under the limit: unchanged


def test_mhgd_stage_trains_attention_on_teacher_only(zoo, batch, tmp_path):
  s, t = zoo["resnet8"], zoo["resnet14"]
  d = distillers.create("MHGD", s, t)
  (stage,) = d.stages()
  assert (stage.name, stage.epochs, stage.uses_student) == ("attention", 40, False)
  modules = d.module_variables()
  assert _ids(d.stage_variables(stage)) == _ids(modules)
  _, grads, teacher_grads = _stage_gradients(d, stage, batch)
  assert all(g is not None for g in grads)
  assert all(g is None for g in teacher_grads)
  student_before, teacher_before = _values(s.weights), _values(t.weights)
  module_before = _values(modules)
  stats = [w for m in d.attentions for w in m.non_trainable_weights]
  stats_before = _values(stats)
  terms = _run_stage_step(d, stage, batch)
  assert np.isfinite(float(terms["attention"]))
  assert all(_changed(module_before, modules))
  assert all(_changed(stats_before, stats))                 # BN statistics learn in stage 1
  assert not any(_changed(student_before, s.weights))
  assert not any(_changed(teacher_before, t.weights))
  fresh = _checkpoint_roundtrip(d, "MHGD", s, t, tmp_path)
  for a, b in zip(d.weights, fresh.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_mhgd_main_step_clips_per_variable_and_freezes_modules(zoo, batch):
  s, t = zoo["resnet8"], zoo["resnet14"]
  d = distillers.create("MHGD", s, t, method_weight=1e4)   # large: the clipping must act
  d.epoch.assign(0.0)                                       # sigmoid(0) = 0.5
  variables = d.variables_to_train()
  assert _ids(variables) == _ids(s.trainable_variables)
  images, labels = batch["image"], batch["label"]
  # independent reference gradients (BN in training mode normalises with this batch's statistics
  # in both passes, so both see the same forward values)
  with tf.GradientTape(persistent=True) as tape:
    so = d.student_outputs(images, training=True)
    to = d.teacher_outputs(images)
    ce = d.cross_entropy(so.logits, labels)
    kl = d.terms(so, to, {"label": labels, "image": images})["mhgd"]
  g_ce = [g.numpy() for g in tape.gradient(ce, variables)]
  g_kl = tape.gradient(kl, variables)
  assert sum(g is not None for g in g_kl) > len(variables) // 2
  # the step's gradients, as recorded for the update
  ctx = _ctx(variables)
  terms = d.train_step(batch, ctx)
  got = {id(v): g.numpy() for g, v in ctx.take_pending()}
  clipped = 0
  for v, gc, gk in zip(variables, g_ce, g_kl):
    gk = np.zeros_like(gc) if gk is None else gk.numpy()
    limit = 0.5 * np.linalg.norm(gc)
    norm = np.linalg.norm(gk)
    clipped += norm > limit
    want = gc + gk * min(1.0, limit / max(norm, 1e-12))
    np.testing.assert_allclose(got[id(v)], want, rtol=2e-3, atol=1e-6 * (1 + np.abs(want).max()))
  assert clipped > 0
  assert set(terms.terms) == {"ce", "mhgd"} and np.isfinite(float(terms.terms["mhgd"]))


def test_mhgd_compiled_main_step(zoo, batch):
  s, t = zoo["resnet8"], zoo["resnet14"]
  d = distillers.create("MHGD", s, t)
  module_weights = [w for m in d.attentions + d.estimators for w in m.weights]
  before, student_before, teacher_before = (_values(module_weights), _values(s.trainable_variables),
                                            _values(t.weights))
  terms = _run_train_step(d, batch)
  assert np.isfinite(float(terms["mhgd"])) and np.isfinite(float(terms["ce"]))
  assert not any(_changed(before, module_weights))          # frozen, BN statistics included
  assert any(_changed(student_before, s.trainable_variables))
  assert not any(_changed(teacher_before, t.weights))


def test_mhgd_refusals(zoo):
  with pytest.raises(UsageError, match=r"MHGD .*resnet8 -> wrn_16_2.*features\[1\]"):
    distillers.create("MHGD", zoo["resnet8"], zoo["wrn_16_2"])
  with pytest.raises(UsageError, match="heads"):
    distillers.create("MHGD", zoo["resnet8"], zoo["resnet14"], heads=0)


# --------------------------------------------------------------- refusals from shapes alone

def _fake_outputs(maps):
  """``nets.Outputs`` with zero maps of the given [H, W, C] shapes (features = preacts)."""
  feats = tuple(tf.zeros([2, h, w, c]) for h, w, c in maps)
  return nets.Outputs(tf.zeros([2, K]), feats, feats, tf.zeros([2, maps[-1][2]]))


@pytest.mark.parametrize("method, s_maps, t_maps, pattern", [
    ("AB", [(32, 32, 16), (8, 8, 16)], [(32, 32, 16), (32, 32, 16)],
     r"AB cannot distil resnet8 -> resnet14 at preacts\[1\]: .*8x8.*32x32"),
    ("AB", [(32, 32, 16), (8, 8, 16)], [(32, 32, 16), (8, 8, 16), (4, 4, 16)],
     r"AB cannot distil resnet8 -> resnet14: .*1 stage outputs.*2"),
    ("FSP", [(32, 32, 16), (8, 8, 16)], [(32, 32, 16), (8, 8, 16), (4, 4, 16)],
     r"FSP cannot distil resnet8 -> resnet14: .*2 feature maps.*3"),
    ("MHGD", [(32, 32, 16), (8, 8, 16), (1, 1, 16)], [(32, 32, 16), (8, 8, 16), (1, 1, 16)],
     r"MHGD cannot distil resnet8 -> resnet14: features\[2\] of the student is 1x1x16"),
    ("MHGD", [(32, 32, 16), (8, 8, 16)], [(32, 32, 16), (8, 8, 16)],
     r"MHGD cannot distil resnet8 -> resnet14: .*1 stage outputs.*at least 2"),
])
def test_refusals_name_method_nets_and_mismatch(zoo, method, s_maps, t_maps, pattern):
  d = distillers.get(method)(zoo["resnet8"], zoo["resnet14"])
  with pytest.raises(UsageError, match=pattern):
    d.build_connectors(_fake_outputs(s_maps), _fake_outputs(t_maps))
