"""kd_tf2.adapt: any functional / Sequential Keras classifier -> the Outputs contract, and every
registered method on adapted nets (issue 11 items 1-2)."""
import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers as L

import kd_tf2
import nets
from kd_tf2 import distillers
from kd_tf2.distillers import StepContext
from kd_tf2.engine.step import compile_step
from support import convnet  # noqa: E402


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).random((4, 32, 32, 3)).astype(np.float32)


def test_automatic_taps_one_per_resolution_embedding_and_pre_softmax_logits(images):
  source = convnet([8, 16, 32, 64], name="t4", softmax=True)
  model = kd_tf2.adapt(source)
  out = model(images, training=False, features=True)
  assert isinstance(out, nets.Outputs)
  assert [tuple(f.shape) for f in out.features] == [(4, 32, 32, 8), (4, 16, 16, 16),
                                                    (4, 8, 8, 32), (4, 4, 4, 64)]
  assert model.tap_names == {"features": ["relu0", "relu1", "relu2", "relu3"],
                             "preacts": ["bn0", "bn1", "bn2", "bn3"], "embedding": "pool"}
  assert tuple(out.embedding.shape) == (4, 64)
  # logits are the Dense before its softmax: softmax(logits) is the source's output
  np.testing.assert_allclose(tf.nn.softmax(out.logits), source(images), atol=1e-6)
  np.testing.assert_allclose(model(images), out.logits, atol=1e-6)
  assert model.classifier is source.get_layer("fc")
  assert model.num_classes == 10 and model.arch == "t4"
  assert len(model.weights) == len(source.weights)
  assert len(model.trainable_variables) == len(source.trainable_variables)


def test_named_taps_sequential_and_a_softmax_layer(images):
  x = inp = keras.Input((32, 32, 3))
  x = L.Conv2D(4, 3, padding="same", name="c1")(x)
  x = L.Activation("relu", name="a1")(x)
  x = L.MaxPooling2D(name="p1")(x)
  x = L.Conv2D(8, 3, padding="same", name="c2")(x)
  x = L.Flatten(name="flat")(x)
  x = L.Dense(10, name="fc")(x)
  source = keras.Model(inp, L.Softmax(name="probs")(x), name="own")
  model = kd_tf2.adapt(source, features="a1,c2", preacts=["c1", "c2"], embedding="flat")
  out = model(images, features=True)
  assert [tuple(f.shape) for f in out.features] == [(4, 32, 32, 4), (4, 16, 16, 8)]
  np.testing.assert_allclose(out.preacts[0], source.get_layer("c1").output.shape[-1] and
                             keras.Model(inp, source.get_layer("c1").output)(images), atol=1e-6)
  np.testing.assert_allclose(tf.nn.softmax(out.logits), source(images), atol=1e-6)
  seq = keras.Sequential([keras.Input((32, 32, 3)), L.Conv2D(4, 3, strides=2), L.ReLU(),
                          L.GlobalAveragePooling2D(), L.Dense(10)])
  assert [tuple(f.shape) for f in kd_tf2.adapt(seq)(images, features=True).features] == [
      (4, 15, 15, 4)]


def test_zoo_nets_pass_through_unchanged():
  net = nets.create("resnet8", 10)
  assert kd_tf2.adapt(net) is net
  adapted = kd_tf2.adapt(convnet([4, 8]))
  assert kd_tf2.adapt(adapted) is adapted


@pytest.mark.parametrize("build, kwargs, message", [
    (lambda: convnet([4, 8]), dict(features=["conv9"]), "has no layer of that name; did you mean"),
    (lambda: convnet([4, 8]), dict(embedding="relu1"), "not [B, D]"),
    (lambda: convnet([4, 8]), dict(embedding="conv1"), "not [B, D]"),
    (lambda: convnet([4, 8]), dict(features=["pool"]), "not an NHWC map"),
    (lambda: convnet([4, 8]), dict(preacts=["bn0"]), "give one preact layer name per feature"),
    (lambda: convnet([4, 8]), dict(features=["relu0"], preacts=["bn1"]), "a preact has its"),
    (lambda: keras.Sequential([L.Conv2D(4, 3), L.Flatten(), L.Dense(10)]), {},
     "has no symbolic input"),
    (lambda: keras.Model(*(lambda i: (i, L.Conv2D(10, 1)(i)))(keras.Input((8, 8, 3)))), {},
     "has no logits"),
    (lambda: keras.Model(*(lambda i: (i, L.Dense(10, activation="relu")(
        L.Flatten()(i))))(keras.Input((8, 8, 3)))), {}, "activation 'relu'"),
    (lambda: nets.create("resnet8", 10), dict(features=["x"]), "zoo net, its taps are fixed"),
])
def test_refusals_are_one_line_naming_what_is_missing(build, kwargs, message):
  with pytest.raises(kd_tf2.UsageError) as err:
    kd_tf2.adapt(build(), **kwargs)
  assert message in str(err.value) and "\n" not in str(err.value)


def test_adapted_model_saves_and_loads(tmp_path, images):
  model = kd_tf2.adapt(convnet([4, 8], softmax=True), features=["relu0", "relu1"])
  path = str(tmp_path / "m.keras")
  model.save(path)
  loaded = keras.saving.load_model(path)
  assert isinstance(loaded, kd_tf2.Adapted) and loaded.tap_names == model.tap_names
  np.testing.assert_allclose(loaded(images), model(images), atol=1e-6)


# ---------------------------------------------------------- every method on adapted nets

def _batch():
  rng = np.random.default_rng(0)
  return {"image": tf.constant(rng.random((4, 32, 32, 3), np.float32)),
          "label": tf.constant(rng.integers(0, 10, 4)), "index": tf.constant(np.arange(4))}


def _one_step_each_phase(method, student, teacher, in_graph=False):
  """Create the method's distiller, run one step of each stage and of the main phase (eagerly, or
  the main step in a tf.function as the engine does); check the terms are finite, every trainable
  student variable moved and the teacher did not."""
  cls = distillers.get(method)
  hp = {}
  if "train_labels" in cls.accepted_hparams():
    hp["train_labels"] = np.tile(np.arange(10), 2)[:16]
  if cls.init_epochs is not None:
    hp["init_epochs"] = 1
  d = distillers.create(method, student, teacher, **hp)
  batch = _batch()
  for stage in d.stages():
    variables = d.stage_variables(stage)
    opt = keras.optimizers.SGD(0.01)
    opt.build(variables)
    ctx = StepContext(opt, variables)
    d.stage_step(stage, batch, ctx)
    opt.apply_gradients(ctx.take_pending())
  variables = d.variables_to_train()
  opt = keras.optimizers.SGD(0.01)
  opt.build(variables)
  before = [v.numpy().copy() for v in student.trainable_variables]
  teacher_before = [v.numpy().copy() for v in teacher.weights] if cls.pretrained_teacher else []
  if in_graph:  # the engine's compiled step
    terms, _ = compile_step(tf.distribute.get_strategy(), d.train_step, opt, variables)(batch)
  else:
    ctx = StepContext(opt, variables)
    terms = d.train_step(batch, ctx).terms
    opt.apply_gradients(ctx.take_pending())
  assert terms and all(np.isfinite(float(v)) for v in terms.values()), terms
  moved = [not np.array_equal(v.numpy(), b) for v, b in zip(student.trainable_variables, before)]
  assert all(moved), f"{method}: some student variables did not move"
  for v, b in zip(teacher.weights, teacher_before):
    np.testing.assert_array_equal(v.numpy(), b, err_msg=f"{method}: teacher {v.path} moved")
  return terms


# Methods whose main step is also run inside a tf.function here (one per kind of step).
IN_GRAPH = {"ST", "AT", "CRD", "DML", "Sobolev"}

# The automatic taps of a 4-stage teacher (8/16/32/64 wide) and a 3-stage student (4/8/16) differ
# in count and width: these methods' shape rules refuse the pair with their one-line UsageError.
REFUSED_3_VS_4 = {"AB": "same number of positions", "AFD": "equal stage shapes",
                  "FSP": "same positions", "KD_SVD": "same number", "MHGD": "same number"}
# Online methods (issue 14) on adapted nets: the branched ones need a staged zoo net to split, the
# peer ones need --peers (nets built like the student); both are refused in one line here.
REFUSED_ONLINE = {"ONE": "cannot be branched", "CL": "cannot be branched",
                  "OKDDip": "cannot be branched", "KDCL": "needs at least 1 peer"}


@pytest.mark.parametrize("method", distillers.available())
def test_every_method_on_a_3_stage_and_a_4_stage_functional_net(method):
  keras.utils.set_random_seed(0)
  teacher = kd_tf2.adapt(convnet([8, 16, 32, 64], name="t4", softmax=True))
  student = kd_tf2.adapt(convnet([4, 8, 16], name="s3"))
  refused = {**REFUSED_3_VS_4, **REFUSED_ONLINE}
  if method in refused:
    with pytest.raises(kd_tf2.UsageError, match=refused[method]):
      _one_step_each_phase(method, student, teacher)
  else:
    _one_step_each_phase(method, student, teacher, in_graph=method in IN_GRAPH)


@pytest.mark.parametrize("method", sorted(REFUSED_3_VS_4) + ["OFD"])
def test_shape_strict_methods_run_on_matching_named_taps(method):
  """Tap the 4-stage teacher's first three stages and give the student its widths: the pair
  now meets every method's shape rule (OFD finds each preact's BatchNorm in the graph)."""
  keras.utils.set_random_seed(0)
  teacher = kd_tf2.adapt(convnet([8, 16, 32, 64], name="t4", softmax=True),
                         features="relu0,relu1,relu2")
  student = kd_tf2.adapt(convnet([8, 16, 32], name="s3"))
  _one_step_each_phase(method, student, teacher)


def test_ofd_without_batchnorm_before_a_preact_is_refused_naming_the_argument():
  x = inp = keras.Input((32, 32, 3))
  for i, w in enumerate((8, 16, 32)):
    x = L.Conv2D(w, 3, strides=1 if i == 0 else 2, padding="same", activation="relu",
                 name=f"conv{i}")(x)
  out = L.Dense(10)(L.GlobalAveragePooling2D()(x))
  teacher = kd_tf2.adapt(keras.Model(inp, out, name="nobn"))
  student = kd_tf2.adapt(convnet([4, 8, 16]))
  with pytest.raises(kd_tf2.UsageError, match=r"preacts=\[BatchNormalization layer names\]"):
    distillers.create("OFD", student, teacher)


@pytest.mark.slow
@pytest.mark.parametrize("method", distillers.available())
def test_every_method_with_a_keras_applications_teacher(method):
  """MobileNetV2 (weights=None, alpha 0.35, 32x32) -> a 3-stage net of one's own."""
  keras.utils.set_random_seed(0)
  teacher = kd_tf2.adapt(keras.applications.MobileNetV2(
      weights=None, input_shape=(32, 32, 3), classes=10, alpha=0.35))
  student = kd_tf2.adapt(convnet([4, 8, 16], name="s3"))
  try:
    _one_step_each_phase(method, student, teacher)
  except kd_tf2.UsageError as e:
    assert method in REFUSED_MOBILENET, f"{method}: {e}"
    assert REFUSED_MOBILENET[method] in str(e)
  else:
    assert method not in REFUSED_MOBILENET


# MobileNetV2's automatic taps: 5 maps (16x16 .. 1x1) of 48..1280 channels vs the student's 3.
REFUSED_MOBILENET = {"AB": "same number of positions", "AFD": "equal stage shapes",
                     "FSP": "same positions", "IRG": "1280 channels", "KD_SVD": "same number",
                     "MHGD": "same number", **REFUSED_ONLINE}
