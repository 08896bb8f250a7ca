"""The single-stage methods that wrap one pure loss: Logits, NST, PKT, RKD, SP, CC, IRG, DKD, DIST,
KD_SVD (METHODS.md §2-3).

Per method: registered under its key, METHODS.md §3 defaults, the weighted term read at the right
positions (NumPy references where the formula is short, the pure loss otherwise), zero when the
student is an exact copy of the teacher, finite gradients that reach the student and never the
teacher, one optimiser step inside ``tf.function``; plus the pairs and values each method refuses
and DKD's warm-up. Tiny pair: resnet8 student, resnet14 teacher (same stage widths), batch 8.
"""
import math
import types

import numpy as np
import pytest
import tensorflow as tf

import nets
from kd_tf2 import distillers
from kd_tf2 import losses as L
from kd_tf2.errors import UsageError

METHODS = ["Logits", "NST", "PKT", "RKD", "SP", "CC", "IRG", "DKD", "DIST", "KD_SVD"]
# CC is exercised here in its parameter-free Zoo form; its default RepDistiller form (trainable
# embeds) is tested in test_cc_repdistiller_form and in tests/parity.
FORM = {"CC": {"form": "zoo"}}
NUM_CLASSES, BATCH = 10, 8

# METHODS.md §3 (§2.15 / §2.16 for DKD, DIST): ce_weight, kd_weight, method_weight, temperature.
DEFAULTS = {
    "Logits": (1.0, 0.0, 0.1, 4.0),
    "NST": (1.0, 0.0, 50.0, 4.0),
    "PKT": (1.0, 0.0, 30000.0, 4.0),
    "RKD": (1.0, 0.0, 1.0, 4.0),
    "SP": (1.0, 0.0, 3000.0, 4.0),
    "CC": (1.0, 0.0, 100.0, 4.0),
    "IRG": (1.0, 0.0, 1.0, 4.0),
    "DKD": (1.0, 0.0, 1.0, 4.0),
    "DIST": (1.0, 0.0, 2.0, 4.0),   # the "cifar" protocol (DIST_KD dist_cifar.yaml)
    "KD_SVD": (1.0, 0.0, 1.0, 4.0),
}


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  images = tf.constant(rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32))
  labels = tf.constant(np.arange(BATCH) % NUM_CLASSES, tf.int32)
  return images, labels


@pytest.fixture(scope="module")
def pair():
  """(student, teacher) used read-only by the loss tests."""
  return nets.create("resnet8", NUM_CLASSES), nets.create("resnet14", NUM_CLASSES)


@pytest.fixture(scope="module")
def twins(batch):
  """(student, teacher): two resnet8 with the same (perturbed, so non-trivial) weights."""
  teacher = nets.create("resnet8", NUM_CLASSES)
  student = nets.create("resnet8", NUM_CLASSES)
  images, _ = batch
  teacher(images[:1]), student(images[:1])  # build the weights
  rng = np.random.default_rng(1)
  teacher.set_weights([w + 0.05 * rng.normal(size=w.shape).astype(w.dtype)
                       for w in teacher.get_weights()])
  student.set_weights(teacher.get_weights())
  return student, teacher


@pytest.fixture(scope="module")
def trained_pair():
  """(student, teacher) that the step tests update; resnet8 twice, the smallest graph to trace."""
  return nets.create("resnet8", NUM_CLASSES), nets.create("resnet8", NUM_CLASSES)


@pytest.fixture(scope="module")
def outputs(pair, batch):
  """Student and teacher ``Outputs`` (inference mode, float32) of the shared batch."""
  student, teacher = pair
  images, _ = batch
  d = distillers.create("Logits", student, teacher)
  return d.student_outputs(images, training=False), d.teacher_outputs(images)


# ----------------------------------------------------------------------------- NumPy references

def _np(x):
  return np.asarray(x, np.float64)


def _flat(x):
  x = _np(x)
  return x.reshape(x.shape[0], -1)


def _unit_rows(x, eps=1e-12):
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def np_sp(s, t):
  def sim(f):
    return _unit_rows(f @ f.T)
  return np.mean((sim(_flat(t)) - sim(_flat(s))) ** 2)


def np_cc(s, t, gamma=0.4, order=2):
  def kernel(f):
    c = _unit_rows(f) @ _unit_rows(f).T
    return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * c ** p
               for p in range(order + 1))
  return np.mean((kernel(_flat(s)) - kernel(_flat(t))) ** 2)


def expected_terms(method, s, t, labels):
  """The weighted terms METHODS.md §3 prescribes, computed without the distiller."""
  if method == "Logits":
    return {"logits": 0.1 * np.mean((_np(s.logits) - _np(t.logits)) ** 2)}
  if method == "NST":
    return {"nst": 50.0 * sum(float(L.nst(a, b)) for a, b in zip(s.features[1:], t.features[1:]))}
  if method == "PKT":  # post-ReLU embeddings: cosines > 0.98, float32 cancels ~1e-2 of the value
    return {"pkt": 30000.0 * float(L.pkt(s.embedding, t.embedding, eps=1e-7))}
  if method == "RKD":
    return {"rkd_distance": 25.0 * float(L.rkd_distance(s.embedding, t.embedding)),
            "rkd_angle": 50.0 * float(L.rkd_angle(s.embedding, t.embedding))}
  if method == "SP":
    return {"sp": 3000.0 * np_sp(s.features[-1], t.features[-1])}
  if method == "CC":
    return {"cc": 100.0 * np_cc(s.embedding, t.embedding)}
  if method == "IRG":
    return {"irg": float(L.irg((s.features[2], s.features[3]), (t.features[2], t.features[3]),
                               s.embedding, t.embedding, s.logits, t.logits, 0.1, 5.0, 5.0))}
  if method == "DKD":  # engine epoch 0 = mdistiller's epoch 1: warm-up factor 1/20
    return {"dkd": float(L.dkd(s.logits, t.logits, labels, 1.0, 8.0, 4.0)) / 20.0}
  if method == "DIST":
    return {"dist": 2.0 * float(L.dist(s.logits, t.logits, 1.0, 1.0, 4.0))}
  if method == "KD_SVD":
    return {"kd_svd": float(L.kd_svd(s.features[1:4], t.features[1:4], k=1))}
  raise AssertionError(method)


# ----------------------------------------------------------------------------- registry, defaults

def test_every_method_is_registered_case_insensitively():
  names = distillers.available()
  for method in METHODS:
    assert method in names
    assert distillers.canonical_name(method.lower()) == method
  assert distillers.canonical_name("kdsvd") == "KD_SVD"


def test_method_specific_defaults(pair):
  def hparams(method):  # the constructor alone (no setup) is enough to read them
    return distillers.get(method)(*pair).hparams()

  assert (hparams("RKD")["distance_weight"], hparams("RKD")["angle_weight"]) == (25.0, 50.0)
  assert (hparams("CC")["form"], hparams("CC")["feat_dim"]) == ("repdistiller", 128)
  zoo_cc = distillers.get("CC")(*pair, form="zoo")
  assert (zoo_cc.hparams()["gamma"], zoo_cc.hparams()["order"]) == (0.4, 2)
  assert (distillers.get("CC")(*pair).method_weight, zoo_cc.method_weight) == (0.02, 100.0)
  assert (hparams("DKD")["alpha"], hparams("DKD")["beta"], hparams("DKD")["warmup"]) == (1, 8, 20)
  assert (hparams("DIST")["beta"], hparams("DIST")["gamma"]) == (1.0, 1.0)
  irg = hparams("IRG")
  assert (irg["w_vertex"], irg["w_edge"], irg["w_transform"]) == (0.1, 5.0, 5.0)
  assert hparams("KD_SVD")["k"] == 1
  assert hparams("PKT")["eps"] == 1e-7


@pytest.mark.parametrize("method", METHODS)
def test_defaults_and_terms_follow_the_catalog(method, pair, outputs, batch):
  s, t = outputs
  images, labels = batch
  d = distillers.create(method, *pair, **FORM.get(method, {}))
  assert (d.ce_weight, d.kd_weight, d.method_weight, d.temperature) == DEFAULTS[method]
  assert d.init_epochs is None and d.stages() == []
  assert d.trainable_variables == []  # no learnable connector in any of these methods
  got = d.terms(s, t, {"label": labels, "image": images}, training=False)
  want = expected_terms(method, s, t, labels)
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    assert got[key].dtype == tf.float32 and got[key].shape == ()
    assert float(got[key]) > 0
    np.testing.assert_allclose(float(got[key]), value, rtol=2e-4, err_msg=key)


@pytest.mark.parametrize("method", METHODS)
def test_a_copy_of_the_teacher_has_zero_method_loss(method, twins, batch):
  student, teacher = twins
  images, labels = batch
  # DIST adds 1e-8 to the product of norms, so even equal probabilities leave 1 - rho ~ 1e-4
  # (nearly uniform columns; more at the CIFAR protocol's T = 4, hence T = 1 here); every other
  # term vanishes to float32 rounding.
  hparams = dict(FORM.get(method, {}))
  if method == "DIST":
    hparams["protocol"] = "imagenet"
  d = distillers.create(method, student, teacher, **hparams)
  s = d.student_outputs(images, training=False)
  terms = d.terms(s, d.teacher_outputs(images), {"label": labels, "image": images}, training=False)
  tolerance = 1e-3 if method == "DIST" else 1e-4
  for key, value in terms.items():
    assert abs(float(value)) < tolerance, (key, float(value))


# ----------------------------------------------------------------------------- gradients, steps

@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_the_student_and_never_the_teacher(method, pair, batch):
  student, teacher = pair
  images, labels = batch
  d = distillers.create(method, student, teacher, **FORM.get(method, {}))
  assert teacher.trainable_variables == []
  with tf.GradientTape(persistent=True) as tape:
    s = d.student_outputs(images, training=True)
    t = d.teacher_outputs(images)
    terms = d.terms(s, t, {"label": labels, "image": images}, training=True)
    total = tf.add_n(list(terms.values()))
  assert np.isfinite(float(total))
  grads = tape.gradient(total, student.trainable_variables)
  assert all(g is None or np.all(np.isfinite(g.numpy())) for g in grads)
  stem = student.trainable_variables[0]
  assert "kernel" in stem.path, stem.path
  assert np.abs(grads[0].numpy()).max() > 0  # the method term alone reaches the first layer
  assert all(g is None for g in tape.gradient(total, teacher.variables))


# ----------------------------------------------------------------------------- method specifics

def test_dkd_warm_up_follows_mdistillers_one_based_epochs(pair, outputs, batch):
  s, t = outputs
  images, labels = batch
  d = distillers.create("DKD", *pair)
  full = float(L.dkd(s.logits, t.logits, labels, 1.0, 8.0, 4.0))
  for epoch, factor in ((0, 1 / 20), (9, 10 / 20), (19, 1.0), (150, 1.0)):
    d.epoch.assign(float(epoch))
    got = float(d.terms(s, t, {"label": labels, "image": images})["dkd"])
    np.testing.assert_allclose(got, factor * full, rtol=1e-5, err_msg=f"epoch {epoch}")
  no_warmup = distillers.create("DKD", *pair, warmup=0)
  np.testing.assert_allclose(float(no_warmup.terms(s, t, {"label": labels, "image": images})["dkd"]), full, rtol=1e-5)


def test_rkd_logs_both_terms_and_drops_a_zero_weight(pair, outputs, batch):
  s, t = outputs
  images, labels = batch
  both = distillers.create("RKD", *pair).terms(s, t, {"label": labels, "image": images})
  np.testing.assert_allclose(float(both["rkd_distance"] + both["rkd_angle"]),
                             float(L.rkd(s.embedding, t.embedding)), rtol=1e-5)
  angle_only = distillers.create("RKD", *pair, distance_weight=0, method_weight=2.0)
  terms = angle_only.terms(s, t, {"label": labels, "image": images})
  assert list(terms) == ["rkd_angle"]
  np.testing.assert_allclose(float(terms["rkd_angle"]), 2.0 * float(both["rkd_angle"]), rtol=1e-6)


def test_hyper_parameters_reach_the_loss(pair, outputs, batch):
  s, t = outputs
  images, labels = batch
  cc = distillers.create("CC", *pair, form="zoo", gamma=0.8,
                        order=3).terms(s, t, {"label": labels, "image": images})["cc"]
  np.testing.assert_allclose(float(cc), 100.0 * np_cc(s.embedding, t.embedding, 0.8, 3), rtol=2e-4)
  dist = distillers.create("DIST", *pair, beta=2.0, gamma=0.5, temperature=4.0)
  np.testing.assert_allclose(float(dist.terms(s, t, {"label": labels, "image": images})["dist"]),
                             2.0 * float(L.dist(s.logits, t.logits, 2.0, 0.5, 4.0)), rtol=1e-5)
  pkt = distillers.create("PKT", *pair, eps=1e-6).terms(s, t, {"label": labels, "image": images})["pkt"]
  np.testing.assert_allclose(float(pkt), 30000.0 * float(L.pkt(s.embedding, t.embedding, 1e-6)),
                             rtol=1e-6)


def test_dist_defaults_follow_the_protocol(pair):
  """DIST_KD configs: CIFAR T 4 (kd dist_t4), ImageNet T 1; beta = gamma = 1 weighted by 2."""
  cls = distillers.get("DIST")
  assert cls.defaults_for("cifar") == dict(temperature=4.0, beta=1.0, gamma=1.0, method_weight=2.0)
  assert cls.defaults_for("imagenet") == dict(temperature=1.0, beta=1.0, gamma=1.0,
                                              method_weight=2.0)
  imagenet = cls(*pair, protocol="imagenet")
  assert (imagenet.temperature, imagenet.method_weight) == (1.0, 2.0)
  assert cls(*pair).hparams()["protocol"] == "cifar"
  mixed = cls(*pair, protocol="imagenet", temperature=2.0, beta=3.0, method_weight=1.0)
  assert (mixed.temperature, mixed.beta, mixed.gamma, mixed.method_weight) == (2.0, 3.0, 1.0, 1.0)
  with pytest.raises(UsageError, match=r"DIST protocol='tiny': accepted cifar, imagenet"):
    cls(*pair, protocol="tiny")


def test_the_engine_picks_the_protocol_from_the_dataset():
  from kd_tf2.distillers._pairs import dataset_protocol
  names = ("cifar100", "cifar10", "synthetic", "ImageNet", "imagenet64")
  assert [dataset_protocol(d) for d in names] == ["cifar", "cifar", "cifar", "imagenet", "imagenet"]
  kwargs = distillers.engine_kwargs(distillers.get("DIST"), train_labels=lambda: None,
                                    jit_compiled=lambda: False, protocol=lambda: "imagenet")
  assert kwargs == {"protocol": "imagenet"}


@pytest.mark.parametrize("student, teacher, beta", [
    ("wrn_16_2", "wrn_40_2", 6.0), ("wrn_40_1", "wrn_40_2", 6.0), ("vgg8", "vgg13", 6.0),
    ("MobileNetV2", "vgg13", 6.0), ("resnet20", "resnet56", 2.0), ("resnet32", "resnet110", 2.0),
    ("resnet8x4", "resnet32x4", 8.0), ("ShuffleV1", "wrn_40_2", 8.0)])
def test_dkd_beta_is_mdistillers_per_pair_value_unless_given(student, teacher, beta):
  def net(arch):
    return types.SimpleNamespace(arch=arch)

  cls = distillers.get("DKD")
  d = cls(net(student), net(teacher))
  assert d.beta == beta
  assert ("pair_defaults" in d.hparams()) == (beta != 8.0)
  if beta != 8.0:
    assert d.hparams()["pair_defaults"].startswith(f"beta={beta:g} (mdistiller configs/cifar100/")
  assert cls(net(student), net(teacher), beta=3.0).beta == 3.0
  assert "pair_defaults" not in cls(net(student), net(teacher), beta=3.0).hparams()


# ----------------------------------------------------------------------------- refusals

def test_kd_svd_refuses_different_channel_counts(pair):
  student, _ = pair
  with pytest.raises(UsageError, match=r"KD_SVD.*resnet8.*wrn_16_2.*16 vs 32 channels"):
    distillers.create("KD_SVD", student, nets.create("wrn_16_2", NUM_CLASSES))


def test_kd_svd_refuses_maps_too_small_for_k(pair):
  with pytest.raises(UsageError, match=r"KD_SVD with k=1 needs .*H\*W >= 4.* stage 3 is 1x1x64"):
    distillers.create("KD_SVD", *pair, input_shape=(4, 4, 3))
  with pytest.raises(UsageError, match=r"C >= 20.*stage 1 is 32x32x16"):
    distillers.create("KD_SVD", *pair, k=17)


def test_irg_refuses_a_net_whose_last_stage_it_cannot_relate(pair):
  student, _ = pair
  teacher = nets.create("MobileNetV2", NUM_CLASSES)
  with pytest.raises(UsageError, match=r"IRG.*teacher MobileNetV2.*160 channels.*48"):
    distillers.create("IRG", student, teacher)


@pytest.mark.parametrize("method", ["Logits", "IRG", "DKD", "DIST"])
def test_logit_methods_refuse_different_class_counts(method, pair):
  student, _ = pair
  with pytest.raises(UsageError, match=rf"{method} needs the same number of classes"):
    distillers.create(method, student, nets.create("resnet8", 5))


@pytest.mark.parametrize("method, hparams", [
    ("KD_SVD", {"k": 0}), ("KD_SVD", {"k": 1.0}), ("CC", {"order": 1.5}), ("CC", {"gamma": 0}),
    ("DKD", {"warmup": -1}), ("DKD", {"beta": "8"}), ("RKD", {"angle_weight": -1}),
    ("PKT", {"eps": 0}), ("CC", {"form": "paper"}), ("CC", {"feat_dim": 0}), ("IRG", {"w_edge": True}), ("DIST", {"gamma": -2}),
])
def test_bad_hyper_parameters_are_refused(method, hparams, pair):
  name = next(iter(hparams))
  with pytest.raises(UsageError, match=rf"{method} {name}="):
    distillers.create(method, *pair, **hparams)


def test_cc_repdistiller_form(pair, outputs, batch):
  """RepDistiller's CC: trainable 128-d embeds on both nets, mean over consecutive samples of
  sum_d |E_s - E_t|_i |E_s - E_t|_(i+1), weight 0.02; both embeds learn with the student."""
  s, t = outputs
  images, labels = batch
  d = distillers.create("CC", *pair)
  assert d.method_weight == 0.02 and d.form == "repdistiller"
  assert d.embed_s.kernel.shape == (64, 128) and d.embed_t.kernel.shape == (64, 128)
  e_s = _np(s.embedding) @ d.embed_s.kernel.numpy() + d.embed_s.bias.numpy()
  e_t = _np(t.embedding) @ d.embed_t.kernel.numpy() + d.embed_t.bias.numpy()
  delta = np.abs(e_s - e_t)
  want = 0.02 * np.mean(np.sum(delta[:-1] * delta[1:], axis=1))
  got = d.terms(s, t, {"label": labels, "image": images}, training=False)["cc"]
  np.testing.assert_allclose(float(got), want, rtol=1e-4)
  ids = {id(v) for v in d.variables_to_train()}
  assert all(id(v) in ids for v in d.embed_s.trainable_variables + d.embed_t.trainable_variables)


def test_imagenet_pairs_take_mdistillers_imagenet_configs():
  """ST, DKD and ReviewKD on resnet34 -> resnet18 (torchvision nets) take mdistiller's
  configs/imagenet/r34_r18 values; an explicit value wins; OFD runs on the pair."""
  teacher = nets.create("resnet34_imagenet", 10)
  student = nets.create("resnet18_imagenet", 10)
  for net in (teacher, student):
    net.build((None, 64, 64, 3))
  st = distillers.create("ST", student, teacher, input_shape=(64, 64, 3))
  assert (st.ce_weight, st.kd_weight, st.temperature) == (0.5, 0.5, 1.0)
  assert "r34_r18/kd.yaml" in st.hparams()["pair_defaults"]
  dkd = distillers.create("DKD", student, teacher, input_shape=(64, 64, 3), temperature=2.0)
  assert (dkd.beta, dkd.warmup, dkd.temperature) == (0.5, 1.0, 2.0)
  review = distillers.create("ReviewKD", student, teacher, input_shape=(64, 64, 3))
  assert (review.method_weight, review.warmup_epochs) == (1.0, 1.0)
  # OFD finds the BatchNorms before the torchvision ResNets' preacts (a ResNetV2 family member)
  ofd = distillers.create("OFD", student, teacher, input_shape=(64, 64, 3))
  images = tf.random.normal([2, 64, 64, 3], seed=1)
  out = ofd.terms(ofd.student_outputs(images, training=False), ofd.teacher_outputs(images),
                  {"image": images, "label": tf.constant([0, 1])}, training=False)
  assert np.isfinite(float(out["ofd"])) and float(out["ofd"]) > 0
