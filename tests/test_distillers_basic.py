"""The Distiller base class, the registry and the first methods (none, ST, AT, FitNet)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import nets
from kd_tf2 import distillers
from kd_tf2.connectors import ConvReg
from kd_tf2.distillers import Distiller, StepContext
from kd_tf2.engine.step import compile_step
from kd_tf2.errors import UsageError
from nets.outputs import Outputs

SHAPE = (32, 32, 3)


@pytest.fixture(scope="module")
def pair():
  """(student resnet8, teacher resnet14), 10 classes; the teacher is frozen by create()."""
  keras.utils.set_random_seed(1)
  return nets.create("resnet8", 10), nets.create("resnet14", 10)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  return {"image": tf.constant(rng.normal(size=(4,) + SHAPE), tf.float32),
          "label": tf.constant([0, 3, 7, 9], tf.int64)}


def _logits_outputs(logits):
  return Outputs(tf.constant(logits, tf.float32), (), (), tf.zeros([len(logits), 1]))


# ------------------------------------------------------------------ registry

def test_registry_names_aliases_and_case():
  names = distillers.available()
  for name in ("none", "ST", "AT", "FitNet"):
    assert name in names
  assert distillers.get("kd") is distillers.get("ST") is distillers.get("SOFT_LOGITS")
  assert distillers.canonical_name("fitnet") == "FitNet"
  assert distillers.canonical_name("at") == "AT"


def test_unknown_method_lists_the_known_ones():
  with pytest.raises(UsageError, match=r"unknown method 'nope'.*FitNet.*ST \(KD/Soft_logits\)"):
    distillers.get("nope")
  assert issubclass(UsageError, ValueError)


def test_register_refuses_a_taken_name_and_non_distillers():
  assert distillers.get("kd").method_name == "ST"  # the registry is filled (whatever ran before)
  with pytest.raises(ValueError, match="already registered"):
    distillers.register("kd")(type("Other", (Distiller,), {}))
  with pytest.raises(TypeError):
    distillers.register("x_not_a_distiller")(object)


def test_create_refuses_unknown_and_bad_hparams(pair):
  s, t = pair
  with pytest.raises(UsageError, match=r"does not take hint_layer; accepted: .*method_weight"):
    distillers.create("AT", s, t, hint_layer=1)
  with pytest.raises(UsageError, match=r"kd_weight=-1"):
    distillers.create("ST", s, t, kd_weight=-1)
  with pytest.raises(UsageError, match=r"temperature=0"):
    distillers.create("ST", s, t, temperature=0)
  with pytest.raises(UsageError, match=r"method AT has no init stage"):
    distillers.create("AT", s, t, init_epochs=3)
  with pytest.raises(UsageError, match=r"needs a teacher"):
    distillers.create("AT", s, None)
  assert "hint_layer" in distillers.get("FitNet").accepted_hparams()


def test_method_defaults_are_the_reference_ones_and_flags_override(pair):
  s, t = pair
  st = distillers.create("ST", s, t)
  assert (st.ce_weight, st.kd_weight, st.method_weight, st.temperature) == (0.1, 0.9, 0.0, 4.0)
  at = distillers.create("AT", s, t, method_weight=10, ce_weight=0.5)
  assert (at.ce_weight, at.kd_weight, at.method_weight) == (0.5, 0.0, 10.0)
  assert distillers.create("FitNet", s, t).method_weight == 100.0
  none = distillers.create("none", s, None)
  assert not none.needs_teacher and none.ce_weight == 1.0
  assert distillers.create("none", s, t, kd_weight=0.5).needs_teacher


# ----------------------------------------------------------------------- ST

def _keras_st(temperature):
  return keras.distillation.LogitsDistillation(temperature=temperature,
                                               loss=keras.losses.KLDivergence())


def test_st_matches_keras_logits_distillation():
  """ST's kd term equals Keras 3's own LogitsDistillation (KL * T^2, batch mean) on the same
  logits, and ST's total equals keras.distillation.Distiller's combination with
  student_loss_weight = 0.1 (0.1 CE + 0.9 KD).

  Keras 3.15.1 pitfall: LogitsDistillation's default ``loss="kl_divergence"`` resolves to the
  plain function, which skips the softmax branch (that branch tests for a ``KLDivergence``
  instance) and compares clipped raw logits; only ``loss=keras.losses.KLDivergence()`` gives the
  Hinton loss.
  """
  rng = np.random.default_rng(3)
  s_logits = rng.normal(0, 3, (8, 10)).astype(np.float32)
  t_logits = rng.normal(0, 3, (8, 10)).astype(np.float32)
  labels = tf.constant(rng.integers(0, 10, 8))
  d = distillers.get("ST")(None, None)
  terms = d.total_terms(_logits_outputs(s_logits), _logits_outputs(t_logits), {"label": labels})
  keras_kd = _keras_st(4.0).compute_loss(tf.constant(t_logits), tf.constant(s_logits))
  np.testing.assert_allclose(float(terms["kd"]) / 0.9, float(keras_kd), rtol=1e-4)
  keras_ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, s_logits)
  keras_total = 0.1 * float(keras_ce) + 0.9 * float(keras_kd)
  np.testing.assert_allclose(float(terms["ce"] + terms["kd"]), keras_total, rtol=1e-4)


def test_kd_term_follows_temperature_and_is_absent_at_weight_zero():
  rng = np.random.default_rng(4)
  s = _logits_outputs(rng.normal(0, 2, (4, 5)))
  t = _logits_outputs(rng.normal(0, 2, (4, 5)))
  labels = tf.constant([0, 1, 2, 3])
  hot = distillers.get("ST")(None, None, temperature=8.0).total_terms(s, t, {"label": labels})
  ref = _keras_st(8.0).compute_loss(t.logits, s.logits)
  np.testing.assert_allclose(float(hot["kd"]) / 0.9, float(ref), rtol=1e-4)
  plain = distillers.get("none")(None, None).total_terms(s, None, {"label": labels})
  assert set(plain) == {"ce"}


# ----------------------------------------------------------------------- AT

def _numpy_at(fs, ft, p=2.0):
  """Attention transfer from METHODS.md §2.3, in NumPy (pool the taller map, then compare)."""
  fs, ft = np.asarray(fs, np.float64), np.asarray(ft, np.float64)

  def pool(f, h):
    r = f.shape[1] // h
    b, _, _, c = f.shape
    return f.reshape(b, h, r, h, r, c).mean(axis=(2, 4))

  h = min(fs.shape[1], ft.shape[1])
  fs, ft = pool(fs, h), pool(ft, h)

  def att(f):
    a = (np.abs(f) ** p).mean(axis=-1).reshape(len(f), -1)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

  return np.mean((att(fs) - att(ft)) ** 2)


def test_at_sums_the_stage_pairs_with_its_weight(pair, batch):
  s_net, t_net = pair
  d = distillers.create("AT", s_net, t_net, method_weight=7.0)
  s = d.student_outputs(batch["image"], training=False)
  t = d.teacher_outputs(batch["image"])
  got = float(d.terms(s, t, batch)["at"])
  want = 7.0 * sum(_numpy_at(a, b) for a, b in zip(s.features[1:], t.features[1:]))
  np.testing.assert_allclose(got, want, rtol=1e-4)


# ------------------------------------------------------------------- FitNet

def test_fitnet_hint_is_the_regressed_mse_at_layer_2(pair, batch):
  s_net, t_net = pair
  d = distillers.create("FitNet", s_net, t_net)
  s = d.student_outputs(batch["image"], training=False)
  t = d.teacher_outputs(batch["image"])
  guess = d.regressor(s.features[2], training=False).numpy()
  assert guess.shape == t.features[2].shape
  want = 100.0 * np.mean((guess - t.features[2].numpy()) ** 2)
  got = float(d.terms(s, t, batch, training=False)["hint"])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  with pytest.raises(UsageError, match=r"hint_layer=9 is out of range.*accepted: 0..3"):
    distillers.create("FitNet", s_net, t_net, hint_layer=9)


def test_gradients_reach_student_and_connectors_never_the_teacher(pair, batch):
  s_net, t_net = pair
  for method in ("ST", "AT", "FitNet"):
    d = distillers.create(method, s_net, t_net)
    teacher_vars = [w.value for w in t_net.weights]
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(teacher_vars)
      t = d.teacher_outputs(batch["image"])
      s = d.student_outputs(batch["image"], training=True)
      loss = tf.add_n(list(d.total_terms(s, t, batch).values()))
    assert all(g is None for g in tape.gradient(loss, teacher_vars)), method
    grads = tape.gradient(loss, d.variables_to_train())
    assert all(g is not None for g in grads), method
    connector_ids = {id(v) for v in d.trainable_variables}
    if method == "FitNet":
      assert len(connector_ids) == 4  # regressor conv kernel, bias, BN gamma, beta
    assert connector_ids <= {id(v) for v in d.variables_to_train()}
    assert not {id(v) for v in t_net.weights} & {id(v) for v in d.variables_to_train()}


def test_fitnet_hint_stage_updates_only_the_layers_before_the_hint(pair, batch):
  s_net, t_net = pair
  assert distillers.create("FitNet", s_net, t_net).stages() == []
  d = distillers.create("FitNet", s_net, t_net, init_epochs=2)
  (stage,) = d.stages()
  assert (stage.name, stage.epochs) == ("hint", 2)
  variables = d.stage_variables(stage)
  opt = keras.optimizers.SGD(0.1)
  opt.build(variables)
  before = {v.path: v.numpy().copy() for v in s_net.trainable_variables}
  step = compile_step(tf.distribute.get_strategy(), lambda b, ctx: d.stage_step(stage, b, ctx),
                      opt, variables)
  terms, _ = step(batch)
  assert set(terms) == {"hint", "loss"}
  after = {v.path: v.numpy() for v in s_net.trainable_variables}
  changed = {p for p in before if not np.array_equal(before[p], after[p])}
  classifier = {v.path for v in s_net.classifier.trainable_variables}
  assert changed and not changed & classifier
  first_conv = s_net.trainable_variables[0].path
  assert first_conv in changed


# --------------------------------------------------------------- connectors

def _numpy_conv_transpose(x, w, b, stride, pad):
  """PyTorch ConvTranspose2d (NHWC input, Keras kernel [k, k, out, in])."""
  n, h, wd, _ = x.shape
  k = w.shape[0]
  full = np.zeros((n, (h - 1) * stride + k, (wd - 1) * stride + k, w.shape[2]))
  for i in range(h):
    for j in range(wd):
      full[:, i * stride:i * stride + k, j * stride:j * stride + k, :] += np.einsum(
          "nc,abdc->nabd", x[:, i, j, :], w)
  return full[:, pad:full.shape[1] - pad, pad:full.shape[2] - pad, :] + b


def test_convreg_upsampling_is_pytorch_conv_transpose_padding_1():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
  reg = ConvReg((2, 4, 4, 3), (2, 8, 8, 5), use_relu=False)
  y = reg(x, training=False).numpy()
  conv = reg.conv
  z = _numpy_conv_transpose(x, conv.kernel.numpy(), conv.bias.numpy(), 2, 1)
  bn = reg.bn  # inference BN with fresh statistics: (z - 0) / sqrt(1 + eps)
  np.testing.assert_allclose(y, z / np.sqrt(1.0 + bn.epsilon), rtol=1e-4, atol=1e-5)


def test_convreg_shapes_and_refusal():
  for s, t in [((1, 16, 16, 4), (1, 8, 8, 6)), ((1, 9, 9, 4), (1, 8, 8, 6)),
               ((1, 8, 8, 4), (1, 8, 8, 6))]:
    assert ConvReg(s, t)(tf.zeros(s)).shape == t
  with pytest.raises(UsageError, match=r"cannot map a 4x4 student map onto a 16x16"):
    ConvReg((1, 4, 4, 3), (1, 16, 16, 3))


# -------------------------------------------------------------- StepContext

def test_step_context_divides_by_replicas_and_records_the_update():
  v = tf.Variable([1.0, 2.0])
  opt = keras.optimizers.SGD(1.0)
  opt.build([v])
  ctx = StepContext(opt, [v], num_replicas=4)
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(3.0 * v)
  np.testing.assert_allclose(ctx.gradients(loss, tape)[0].numpy(), [0.75, 0.75])
  one = StepContext(opt, [v], num_replicas=1, jit_compiled=True)
  assert one.jit_compiled and not ctx.jit_compiled
  with pytest.raises(AttributeError):
    one.jit_compiled = False  # read-only
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(v * v)
  one.minimize(loss, tape)
  np.testing.assert_array_equal(v.numpy(), [1.0, 2.0])  # recorded, not applied
  (pair_,) = one.take_pending()
  np.testing.assert_allclose(pair_[0].numpy(), [2.0, 4.0])
  assert pair_[1] is v and one.take_pending() == []
