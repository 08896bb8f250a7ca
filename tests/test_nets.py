"""Tests for nets/: the zoo's names, counts, shapes, weight mapping, saving, compiling and errors.

Equivalence with PyTorch is checked two ways:
- the two worked examples of NETS.md §5 (resnet8, wrn_16_1: RepDistiller state dicts with
  PyTorch-computed outputs; skipped when /work/shared/nets_reference is absent);
- for every other family, an independent NumPy re-implementation in PyTorch's NCHW layout, written
  from NETS.md §2-§4, fed the raw PyTorch-layout state dict by key name, against the Keras net
  loaded from the same state dict. It checks key names, layouts, padding and dataflow, but it is
  our reading of the spec, not PyTorch itself.
"""
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import nets
from nets.convert import main as convert_main
from nets.resnetv2 import ResNetV2
from nets.shufflenetv1 import ShuffleNetV1
from nets.shufflenetv2 import ShuffleNetV2

REF_DIR = os.environ.get("NETS_REFERENCE_DIR", "/work/shared/nets_reference")

# Trainable parameters and BN running-statistic entries at num_classes=100 — RepDistiller's numbers
# (issue 2, NETS.md §2, nets_reference/reference_nets.json).
COUNTS = {
    "resnet8": (83892, 672), "resnet14": (181108, 1120), "resnet20": (278324, 1568),
    "resnet32": (472756, 2464), "resnet44": (667188, 3360), "resnet56": (861620, 4256),
    "resnet110": (1736564, 8288), "resnet8x4": (1233540, 2752), "resnet32x4": (7433860, 9920),
    "ResNet50": (23705252, 53120), "ResNet18": (11220132, 9600),
    "wrn_16_1": (180916, 928), "wrn_16_2": (703284, 1824), "wrn_40_1": (569780, 2720),
    "wrn_40_2": (2255156, 5408), "wrn_16_4": (2772020, 3616), "wrn_40_4": (8972340, 10784),
    "vgg8": (3965028, 2944), "vgg11": (9277284, 5504), "vgg13": (9462180, 5888),
    "vgg16": (14774436, 8448), "vgg19": (20086692, 11008),
    "MobileNetV2": (812836, 18368), "ShuffleV1": (949258, 23736), "ShuffleV2": (1355528, 16180),
}

# NETS.md §3: feature/preact shapes (NHWC, batch omitted), then the embedding width.
_NARROW = ([(32, 32, 16), (32, 32, 16), (16, 16, 32), (8, 8, 64)], 64)
_VGG = ([(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512)], 512)


def _wrn_shapes(k):
  return [(32, 32, 16), (32, 32, 16 * k), (16, 16, 32 * k), (8, 8, 64 * k)], 64 * k


SHAPES = {
    **{n: _NARROW for n in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44",
                            "resnet56", "resnet110")},
    "resnet8x4": ([(32, 32, 32), (32, 32, 64), (16, 16, 128), (8, 8, 256)], 256),
    "resnet32x4": ([(32, 32, 32), (32, 32, 64), (16, 16, 128), (8, 8, 256)], 256),
    "ResNet50": ([(32, 32, 64), (32, 32, 256), (16, 16, 512), (8, 8, 1024), (4, 4, 2048)], 2048),
    "ResNet18": ([(32, 32, 64), (32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512)], 512),
    "wrn_16_1": _wrn_shapes(1), "wrn_40_1": _wrn_shapes(1), "wrn_16_2": _wrn_shapes(2),
    "wrn_40_2": _wrn_shapes(2), "wrn_16_4": _wrn_shapes(4), "wrn_40_4": _wrn_shapes(4),
    **{n: _VGG for n in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")},
    "MobileNetV2": ([(16, 16, 16), (16, 16, 12), (8, 8, 16), (4, 4, 48), (2, 2, 160)], 1280),
    "ShuffleV1": ([(32, 32, 24), (16, 16, 240), (8, 8, 480), (4, 4, 960)], 960),
    "ShuffleV2": ([(32, 32, 24), (16, 16, 116), (8, 8, 232), (4, 4, 464)], 1024),
}


def _count(variables):
  return sum(int(np.prod(v.shape)) for v in variables)


def _bns(model):
  return [layer for _, layer in model.torch_layers()
          if isinstance(layer, keras.layers.BatchNormalization)]


def _close(actual, expected, what):
  """NETS.md §5: same shape, finite, max|a - e| <= 1e-4 * max(1, max|e|)."""
  actual = np.asarray(actual)
  assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
  assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
  assert np.all(np.isfinite(expected)), f"{what}: non-finite reference"
  err = float(np.max(np.abs(actual - expected)))
  tol = 1e-4 * max(1.0, float(np.max(np.abs(expected))))
  assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


# --- registry ----------------------------------------------------------------------------------

def test_available_lists_every_zoo_name():
  imagenet = {"resnet18_imagenet", "resnet34_imagenet", "resnet50_imagenet",
              "mobilenetv1_imagenet"}  # tests/test_nets_imagenet.py
  assert set(nets.available()) == set(COUNTS) | imagenet


def test_canonical_name_is_case_insensitive():
  assert nets.canonical_name("RESNET8X4") == "resnet8x4"
  assert nets.canonical_name("resnet50") == "ResNet50"
  assert nets.canonical_name("mobilenetv2") == "MobileNetV2"
  assert nets.canonical_name("WRN_28_10") == "wrn_28_10"


@pytest.mark.parametrize("bad", ["resnet9", "wrn_17_2", "wrn_16_0", "", None])
def test_unknown_name_lists_known_ones(bad):
  with pytest.raises(ValueError) as e:
    nets.create(bad)
  assert repr(bad) in str(e.value) or str(bad) in str(e.value)
  assert "resnet32x4" in str(e.value) and "ShuffleV2" in str(e.value)


def test_register_decorator_adds_a_name():
  @nets.register(name="tiny_test_net")
  def tiny(num_classes=100, **kwargs):
    return nets.resnet.CifarResNet(8, (4, 4, 4, 4), num_classes=num_classes, **kwargs)

  model = nets.create("TINY_TEST_NET", 3)
  assert model.arch == "tiny_test_net" and model.num_classes == 3
  assert "tiny_test_net" in nets.available()
  nets.registry._BUILDERS.pop("tiny_test_net")  # keep the registry as the other tests expect


def test_general_wrn_builds_the_requested_shape():
  model = nets.create("wrn_22_3", 7)
  out = model.compute_output_spec(keras.KerasTensor((1, 32, 32, 3)), features=True)
  assert model.arch == "wrn_22_3" and len(model.groups[0]) == 3
  assert tuple(out.features[3].shape) == (1, 8, 8, 192) and tuple(out.logits.shape) == (1, 7)


# --- counts, shapes, BN settings -----------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(COUNTS))
def test_param_counts_and_feature_shapes(name):
  model = nets.create(name, 100)
  out = model.compute_output_spec(keras.KerasTensor((2, 32, 32, 3)), features=True)
  trainable, bn_stats = COUNTS[name]
  assert _count(model.trainable_weights) == trainable
  assert _count(model.non_trainable_weights) == bn_stats
  assert model.arch == name and model.num_classes == 100
  assert isinstance(model.classifier, keras.layers.Dense) and model.classifier.units == 100
  maps, dim = SHAPES[name]
  assert isinstance(out, nets.Outputs)
  assert [tuple(f.shape[1:]) for f in out.features] == maps
  assert [tuple(p.shape[1:]) for p in out.preacts] == maps
  assert tuple(out.embedding.shape) == (2, dim) and tuple(out.logits.shape) == (2, 100)
  for bn in _bns(model):
    assert bn.epsilon == 1e-5 and bn.momentum == 0.9 and not bn.synchronized


def test_vgg_pools_after_block3_only_at_64x64():
  out = nets.create("vgg8").compute_output_spec(keras.KerasTensor((1, 64, 64, 3)), features=True)
  assert [tuple(f.shape[1:3]) for f in out.features] == [(64, 64), (32, 32), (16, 16), (8, 8),
                                                         (4, 4)]


def test_synchronized_bn_flag_reaches_every_bn():
  model = nets.create("ShuffleV2", 10, synchronized_bn=True)
  assert len(_bns(model)) == 56 and all(bn.synchronized for bn in _bns(model))


@pytest.mark.skipif(not os.path.exists(os.path.join(REF_DIR, "reference_nets.json")),
                    reason="nets_reference not available")
def test_counts_table_matches_reference_json():
  with open(os.path.join(REF_DIR, "reference_nets.json")) as f:
    ref = json.load(f)["models"]
  for name, (trainable, bn_stats) in COUNTS.items():
    if name in ref:
      assert (ref[name]["trainable_params"], ref[name]["bn_running_stats"]) == (trainable, bn_stats)


# --- the worked examples (PyTorch outputs) ------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1"])
def test_worked_example_matches_pytorch(name):
  path = os.path.join(REF_DIR, f"{name}.npz")
  if not os.path.exists(path):
    pytest.skip(f"{path} not available")
  ref = dict(np.load(path))
  model = nets.create(name, 10)
  nets.load_reference_weights(model, nets.read_state(path))
  out = model(ref["input"], training=False, features=True)
  _close(out.logits, ref["logits"], "logits")
  _close(out.embedding, ref["embedding"], "embedding")
  for i in range(4):
    _close(out.features[i], ref[f"feat_{i}"], f"feat_{i}")
    _close(out.preacts[i], ref[f"preact_{i}"], f"preact_{i}")
  np.testing.assert_array_equal(model(ref["input"], training=False), out.logits)


# --- an independent NumPy (NCHW, PyTorch layout) reference of every family ------------------------

class _Keys(dict):
  """A state dict that records which keys the reference forward read."""

  def __init__(self, *args):
    super().__init__(*args)
    self.read = set()

  def __getitem__(self, key):
    self.read.add(key)
    return super().__getitem__(key)


def np_conv(x, w, stride=1, pad=0, groups=1, bias=None):
  """torch.nn.functional.conv2d: x [B, C, H, W], w [O, C/groups, kh, kw]."""
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  b, c, h, wd = x.shape
  o, cg, kh, kw = w.shape
  assert cg * groups == c and o % groups == 0, (x.shape, w.shape, groups)
  ho, wo = (h - kh) // stride + 1, (wd - kw) // stride + 1
  cols = np.empty((b, c, kh, kw, ho, wo), x.dtype)
  for i in range(kh):
    for j in range(kw):
      cols[:, :, i, j] = x[:, :, i:i + stride * (ho - 1) + 1:stride,
                           j:j + stride * (wo - 1) + 1:stride]
  cols = cols.reshape(b, groups, cg * kh * kw, ho * wo)
  out = np.matmul(w.reshape(1, groups, o // groups, cg * kh * kw), cols).reshape(b, o, ho, wo)
  return out if bias is None else out + bias[None, :, None, None]


def np_bn(sd, key, x):
  """Eval-mode BatchNorm2d, eps 1e-5."""
  m, v = sd[f"{key}.running_mean"], sd[f"{key}.running_var"]
  g, b = sd[f"{key}.weight"], sd[f"{key}.bias"]
  return ((x - m[:, None, None]) / np.sqrt(v[:, None, None] + 1e-5)) * g[:, None, None] \
      + b[:, None, None]


def relu(x):
  return np.maximum(x, 0)


def np_shuffle(x, g):
  """ShuffleBlock: view(B, g, C/g, H, W).permute(0, 2, 1, 3, 4)."""
  b, c, h, w = x.shape
  return x.reshape(b, g, c // g, h, w).transpose(0, 2, 1, 3, 4).reshape(b, c, h, w)


def np_avgpool3s2p1(x):
  """AvgPool2d(3, 2, padding=1), count_include_pad=True."""
  xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
  ho = (x.shape[2] - 1) // 2 + 1
  wo = (x.shape[3] - 1) // 2 + 1
  out = np.zeros(x.shape[:2] + (ho, wo))
  for i in range(3):
    for j in range(3):
      out += xp[:, :, i:i + 2 * (ho - 1) + 1:2, j:j + 2 * (wo - 1) + 1:2]
  return out / 9.0


def np_maxpool2(x):
  b, c, h, w = x.shape
  return x.reshape(b, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def np_linear(sd, key, x):
  return x @ sd[f"{key}.weight"].T + sd[f"{key}.bias"]


def _indices(sd, fmt):
  """0, 1, ... while ``fmt.format(i)`` is a key."""
  i = 0
  while fmt.format(i) in sd:
    yield i
    i += 1


def np_resnet(sd, x, head):
  """CIFAR ResNet (downsample.*), ResNet18 (shortcut.*) and ResNet50 (bottleneck), NETS.md §2.1-2."""
  x = relu(np_bn(sd, "bn1", np_conv(x, sd["conv1.weight"], 1, 1)))
  feats, preacts = [x], [x]
  for s in range(1, 5):
    if f"layer{s}.0.conv1.weight" not in sd:
      break
    for i in _indices(sd, f"layer{s}.{{}}.conv1.weight"):
      p, stride = f"layer{s}.{i}", 2 if (s > 1 and i == 0) else 1
      if f"{p}.conv3.weight" in sd:  # bottleneck, stride on the 3x3
        h = relu(np_bn(sd, f"{p}.bn1", np_conv(x, sd[f"{p}.conv1.weight"])))
        h = relu(np_bn(sd, f"{p}.bn2", np_conv(h, sd[f"{p}.conv2.weight"], stride, 1)))
        h = np_bn(sd, f"{p}.bn3", np_conv(h, sd[f"{p}.conv3.weight"]))
      else:
        h = relu(np_bn(sd, f"{p}.bn1", np_conv(x, sd[f"{p}.conv1.weight"], stride, 1)))
        h = np_bn(sd, f"{p}.bn2", np_conv(h, sd[f"{p}.conv2.weight"], 1, 1))
      r = x
      for proj in ("downsample", "shortcut"):
        if f"{p}.{proj}.0.weight" in sd:
          r = np_bn(sd, f"{p}.{proj}.1", np_conv(x, sd[f"{p}.{proj}.0.weight"], stride, 0))
      pre = h + r
      x = relu(pre)
    feats.append(x)
    preacts.append(pre)
  emb = x.mean(axis=(2, 3))
  return np_linear(sd, head, emb), feats, preacts, emb


def np_wrn(sd, x):
  """NETS.md §2.3."""
  x = np_conv(x, sd["conv1.weight"], 1, 1)
  feats, preacts = [x], [x]
  for g in (1, 2, 3):
    for i in _indices(sd, f"block{g}.layer.{{}}.conv1.weight"):
      p, stride = f"block{g}.layer.{i}", 2 if (g > 1 and i == 0) else 1
      bn_x = np_bn(sd, f"{p}.bn1", x)
      if g > 1 and i == 0:
        preacts.append(bn_x)
      a = relu(bn_x)
      h = relu(np_bn(sd, f"{p}.bn2", np_conv(a, sd[f"{p}.conv1.weight"], stride, 1)))
      h = np_conv(h, sd[f"{p}.conv2.weight"], 1, 1)
      r = np_conv(a, sd[f"{p}.convShortcut.weight"], stride, 0) \
          if f"{p}.convShortcut.weight" in sd else x
      x = h + r
    feats.append(x)
  bn_x = np_bn(sd, "bn1", x)
  preacts.append(bn_x)
  emb = relu(bn_x).mean(axis=(2, 3))
  return np_linear(sd, "fc", emb), feats, preacts, emb


def np_vgg(sd, x):
  """NETS.md §2.4 at 32x32."""
  feats, preacts = [], []
  for b in range(5):
    for j in range(0, 30, 3):  # module 3j is a conv, 3j+1 its BN, 3j+2 a ReLU
      if f"block{b}.{j}.weight" not in sd:
        break
      if j:
        x = relu(x)
      x = np_bn(sd, f"block{b}.{j + 1}",
                np_conv(x, sd[f"block{b}.{j}.weight"], 1, 1, bias=sd[f"block{b}.{j}.bias"]))
    pre, x = x, relu(x)
    feats.append(x)
    preacts.append(x if b == 0 else pre)
    if b < 3:
      x = np_maxpool2(x)
  emb = x.mean(axis=(2, 3))
  return np_linear(sd, "classifier", emb), feats, preacts, emb


def np_mobilenetv2(sd, x):
  """NETS.md §2.5 (mobile_half)."""
  first_strides = (1, 1, 2, 2, 1, 2, 1)
  x = relu(np_bn(sd, "conv1.1", np_conv(x, sd["conv1.0.weight"], 2, 1)))
  feats = [x]
  for s, first in enumerate(first_strides):
    for u in _indices(sd, f"blocks.{s}.{{}}.conv.0.weight"):
      p, stride = f"blocks.{s}.{u}", first if u == 0 else 1
      h = relu(np_bn(sd, f"{p}.conv.1", np_conv(x, sd[f"{p}.conv.0.weight"])))
      h = relu(np_bn(sd, f"{p}.conv.4",
                     np_conv(h, sd[f"{p}.conv.3.weight"], stride, 1, groups=h.shape[1])))
      h = np_bn(sd, f"{p}.conv.7", np_conv(h, sd[f"{p}.conv.6.weight"]))
      x = x + h if (stride == 1 and x.shape == h.shape) else h
    if s in (1, 2, 4, 6):
      feats.append(x)
  emb = relu(np_bn(sd, "conv2.1", np_conv(x, sd["conv2.0.weight"]))).mean(axis=(2, 3))
  return np_linear(sd, "classifier.0", emb), feats, list(feats), emb


def np_shufflev1(sd, x):
  """NETS.md §2.6 (groups 3)."""
  x = relu(np_bn(sd, "bn1", np_conv(x, sd["conv1.weight"])))
  feats, preacts = [x], [x]
  for s in (1, 2, 3):
    for u in _indices(sd, f"layer{s}.{{}}.conv1.weight"):
      p, stride = f"layer{s}.{u}", 2 if u == 0 else 1
      g1 = 1 if x.shape[1] == 24 else 3
      h = relu(np_bn(sd, f"{p}.bn1", np_conv(x, sd[f"{p}.conv1.weight"], groups=g1)))
      h = np_shuffle(h, g1)
      h = relu(np_bn(sd, f"{p}.bn2",
                     np_conv(h, sd[f"{p}.conv2.weight"], stride, 1, groups=h.shape[1])))
      h = np_bn(sd, f"{p}.bn3", np_conv(h, sd[f"{p}.conv3.weight"], groups=3))
      pre = np.concatenate([h, np_avgpool3s2p1(x)], axis=1) if stride == 2 else h + x
      x = relu(pre)
    feats.append(x)
    preacts.append(pre)
  emb = x.mean(axis=(2, 3))
  return np_linear(sd, "linear", emb), feats, preacts, emb


def np_shufflev2(sd, x):
  """NETS.md §2.7."""
  x = relu(np_bn(sd, "bn1", np_conv(x, sd["conv1.weight"])))
  feats, preacts = [x], [x]
  for s in (1, 2, 3):
    p = f"layer{s}.0"
    left = np_bn(sd, f"{p}.bn1", np_conv(x, sd[f"{p}.conv1.weight"], 2, 1, groups=x.shape[1]))
    left = relu(np_bn(sd, f"{p}.bn2", np_conv(left, sd[f"{p}.conv2.weight"])))
    right = relu(np_bn(sd, f"{p}.bn3", np_conv(x, sd[f"{p}.conv3.weight"])))
    right = np_bn(sd, f"{p}.bn4",
                  np_conv(right, sd[f"{p}.conv4.weight"], 2, 1, groups=right.shape[1]))
    right = relu(np_bn(sd, f"{p}.bn5", np_conv(right, sd[f"{p}.conv5.weight"])))
    x = np_shuffle(np.concatenate([left, right], axis=1), 2)
    for u in _indices(sd, f"layer{s}.{{}}.conv1.weight"):
      if u == 0:
        continue
      p, c = f"layer{s}.{u}", x.shape[1] // 2
      x1, x2 = x[:, :c], x[:, c:]
      h = relu(np_bn(sd, f"{p}.bn1", np_conv(x2, sd[f"{p}.conv1.weight"])))
      h = np_bn(sd, f"{p}.bn2", np_conv(h, sd[f"{p}.conv2.weight"], 1, 1, groups=c))
      b_pre = np_bn(sd, f"{p}.bn3", np_conv(h, sd[f"{p}.conv3.weight"]))
      pre = np.concatenate([x1, b_pre], axis=1)
      x = np_shuffle(np.concatenate([x1, relu(b_pre)], axis=1), 2)
    feats.append(x)
    preacts.append(pre)
  emb = relu(np_bn(sd, "bn2", np_conv(x, sd["conv2.weight"]))).mean(axis=(2, 3))
  return np_linear(sd, "linear", emb), feats, preacts, emb


def random_state(model, seed):
  """A PyTorch-layout state dict for ``model`` (keys/shapes from the model's table) with values
  like the worked examples': conv N(0, sqrt(2/fan_in)), BN gamma 1 + 0.1 N, beta 0.1 N, running
  mean 0.1 N, running var U[0.5, 2], biases 0.1 N."""
  rng = np.random.default_rng(seed)
  state = {}
  for key, value in nets.reference_state(model).items():
    shape = value.shape
    if key.endswith("running_var"):
      state[key] = rng.uniform(0.5, 2.0, shape)
    elif key.endswith("weight") and len(shape) == 1:
      state[key] = 1 + 0.1 * rng.standard_normal(shape)
    elif len(shape) == 1:
      state[key] = 0.1 * rng.standard_normal(shape)
    else:
      state[key] = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
  return {k: v.astype(np.float32) for k, v in state.items()}


NUMPY_CASES = {
    "resnet8x4": (lambda: nets.create("resnet8x4", 10), lambda sd, x: np_resnet(sd, x, "fc")),
    "ResNet18_small": (lambda: ResNetV2("basic", (2, 1, 1, 1), num_classes=10, arch="r18s"),
                       lambda sd, x: np_resnet(sd, x, "linear")),
    "ResNet50_small": (lambda: ResNetV2("bottleneck", (2, 1, 1, 1), num_classes=10, arch="r50s"),
                       lambda sd, x: np_resnet(sd, x, "linear")),
    "wrn_16_2": (lambda: nets.create("wrn_16_2", 10), np_wrn),
    "vgg11": (lambda: nets.create("vgg11", 10), np_vgg),  # one- and two-conv blocks
    "MobileNetV2": (lambda: nets.create("MobileNetV2", 10), np_mobilenetv2),
    "ShuffleV1": (lambda: nets.create("ShuffleV1", 10), np_shufflev1),
    "ShuffleV2": (lambda: nets.create("ShuffleV2", 10), np_shufflev2),
}


@pytest.mark.parametrize("case", sorted(NUMPY_CASES))
def test_family_matches_numpy_pytorch_layout_reference(case):
  build, reference = NUMPY_CASES[case]
  model = build()
  state = random_state(model, seed=len(case))
  nets.load_reference_weights(model, state)
  x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32) * 3
  out = model(x, training=False, features=True)
  sd = _Keys({k: v.astype(np.float64) for k, v in state.items()})
  logits, feats, preacts, emb = reference(sd, x.transpose(0, 3, 1, 2).astype(np.float64))
  assert sd.read == set(sd), f"keys the spec does not use: {sorted(set(sd) - sd.read)[:5]}"
  _close(out.logits, logits, "logits")
  _close(out.embedding, emb, "embedding")
  assert len(out.features) == len(feats) and len(out.preacts) == len(preacts)
  for i, (f, p) in enumerate(zip(feats, preacts)):
    _close(out.features[i], f.transpose(0, 2, 3, 1), f"feature {i}")
    _close(out.preacts[i], p.transpose(0, 2, 3, 1), f"preact {i}")


def _small_shufflev1():
  return ShuffleNetV1((48, 96, 192), (1, 2, 1), 3, num_classes=10, arch="small_v1")


def _small_shufflev2():
  return ShuffleNetV2((16, 32, 64, 128), (1, 1, 1), num_classes=10, arch="small_v2")


def test_export_import_round_trip_is_exact():
  src = _small_shufflev1()
  x = np.random.default_rng(2).standard_normal((2, 32, 32, 3)).astype(np.float32)
  state = nets.reference_state(src)
  assert state["layer2.1.conv3.weight"].shape == (96, 8, 1, 1)  # [out, mid/groups, 1, 1]
  assert state["layer2.1.conv2.weight"].shape == (24, 1, 3, 3)  # depthwise [C, 1, 3, 3]
  assert state["linear.weight"].shape == (10, 192)
  dst = nets.load_reference_weights(_small_shufflev1(), state)
  np.testing.assert_array_equal(dst(x, training=False), src(x, training=False))


# --- Keras behaviour -----------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
  model = _small_shufflev1()  # grouped (split) and depthwise convs, nested blocks, a custom config
  x = np.random.default_rng(3).standard_normal((2, 32, 32, 3)).astype(np.float32)
  nets.load_reference_weights(model, random_state(model, seed=3))
  path = str(tmp_path / "m.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  assert type(loaded) is ShuffleNetV1 and loaded.arch == "small_v1" and loaded.num_classes == 10
  assert loaded.num_blocks == (1, 2, 1) and loaded.out_planes == (48, 96, 192)
  np.testing.assert_allclose(loaded(x, training=False), model(x, training=False), atol=1e-6)
  a, b = loaded(x, features=True), model(x, features=True)
  np.testing.assert_allclose(a.preacts[2], b.preacts[2], atol=1e-6)

  model.trainable = False  # a frozen teacher stays frozen
  model.save(path)
  assert not keras.models.load_model(path).trainable


def test_jit_compiled_forward_matches_eager():
  model = _small_shufflev2()  # split, shuffle, depthwise stride 2 under XLA
  x = np.random.default_rng(4).standard_normal((2, 32, 32, 3)).astype(np.float32)
  eager = model(x, training=False, features=True)
  jitted = tf.function(lambda t: model(t, training=False, features=True), jit_compile=True)(x)
  _close(jitted.logits, np.asarray(eager.logits), "jit logits")
  _close(jitted.preacts[3], np.asarray(eager.preacts[3]), "jit preact")


def test_training_updates_bn_statistics_with_pytorch_momentum():
  model = nets.create("wrn_16_1", 10)
  x = np.random.default_rng(5).standard_normal((8, 32, 32, 3)).astype(np.float32) + 0.5
  bn = model.groups[0][0].bn1  # first BN of the net; its input is the raw stem conv = feature 0
  eval_out = model(x, training=False, features=True)
  assert np.all(bn.moving_mean.numpy() == 0)  # inference leaves the statistics alone
  train_logits = model(x, training=True)
  f0 = np.asarray(eval_out.features[0], np.float64)
  # PyTorch momentum 0.1: running = 0.9 running + 0.1 batch (unbiased variance, as PyTorch)
  n = f0.size // f0.shape[-1]
  np.testing.assert_allclose(bn.moving_mean.numpy(), 0.1 * f0.mean(axis=(0, 1, 2)), atol=1e-5)
  np.testing.assert_allclose(bn.moving_variance.numpy(),
                             0.9 + 0.1 * f0.var(axis=(0, 1, 2)) * n / (n - 1), rtol=1e-4)
  assert np.max(np.abs(np.asarray(train_logits) - np.asarray(eval_out.logits))) > 1e-3


# --- BatchNorm training mode = PyTorch's BatchNorm2d (issue 13) --------------------------------------
# (tests/replicas/test_nets_sync_bn.py: the synchronized BN under 2 replicas equals this one.)

def _bn_case(seed=6):
  """Three training batches [4, 5, 5, 6] (n = 100 values per channel) and non-trivial weights."""
  rng = np.random.default_rng(seed)
  xs = [(rng.standard_normal((4, 5, 5, 6)) * rng.uniform(0.5, 3, 6) + rng.normal(0, 2, 6))
        .astype(np.float32) for _ in range(3)]
  weights = [rng.uniform(0.5, 1.5, 6), rng.normal(0, 0.5, 6), rng.normal(0, 1, 6),
             rng.uniform(0.5, 2, 6)]  # gamma, beta, moving mean, moving variance
  return xs, [w.astype(np.float32) for w in weights]


def np_bn_train_replay(xs, gamma, beta, mean, var, unbiased=True, eps=1e-5, momentum=0.1):
  """PyTorch's BatchNorm2d training step, replayed in float64 on NHWC batches: normalise with the
  batch mean and biased variance; running_mean += m (mu - running_mean); running_var moves to the
  unbiased variance var_b · n/(n-1) (biased if ``unbiased=False``, Keras' rule).
  Returns [(output, running_mean, running_var)] after each step."""
  mean, var = np.float64(mean), np.float64(var)
  steps = []
  for x in xs:
    x = np.float64(x)
    n = x.size // x.shape[-1]
    mu, var_b = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    y = gamma * (x - mu) / np.sqrt(var_b + eps) + beta
    mean = (1 - momentum) * mean + momentum * mu
    var = (1 - momentum) * var + momentum * var_b * (n / (n - 1) if unbiased else 1.0)
    steps.append((y, mean, var))
  return steps


def _bn_scaled_err(a, e):
  return float(np.max(np.abs(np.asarray(a, np.float64) - e)) / max(1.0, np.max(np.abs(e))))


def _check_bn_steps(got, xs, weights):
  """got: [(output, moving_mean, moving_variance)] per step from Keras."""
  ref = np_bn_train_replay(xs, *weights)
  biased = np_bn_train_replay(xs, *weights, unbiased=False)
  for step, (g, r, b) in enumerate(zip(got, ref, biased), start=1):
    for what, a, e in zip(("output", "moving_mean", "moving_variance"), g, r):
      err = _bn_scaled_err(a, e)
      assert err <= 1e-6, f"step {step} {what}: scaled error {err:.2g}"
    assert _bn_scaled_err(g[2], b[2]) > 1e-4  # Keras' biased rule would be told apart


@pytest.mark.parametrize("synchronized", [False, True])
def test_bn_training_replays_pytorch_update(synchronized):
  xs, weights = _bn_case()
  bn = nets.layers.batch_norm("bn", synchronized)
  bn.build((None, 5, 5, 6))
  bn.set_weights(weights)
  got = []
  for x in xs:
    y = bn(x, training=True)
    got.append((y, bn.moving_mean.numpy(), bn.moving_variance.numpy()))
  _check_bn_steps(got, xs, weights)
  np.testing.assert_allclose(bn(xs[0], training=False),  # inference: the moving statistics
                             (xs[0] - got[-1][1]) / np.sqrt(got[-1][2] + 1e-5) * weights[0]
                             + weights[1], rtol=1e-5, atol=1e-5)


def test_frozen_model_runs_bn_in_inference_mode():
  model = nets.create("resnet8", 10)
  model.trainable = False
  x = np.ones((2, 32, 32, 3), np.float32)
  model(x, training=True)
  assert np.all(model.bn1.moving_mean.numpy() == 0)


# --- state dict errors, CLI --------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet8_state():
  return random_state(nets.create("resnet8", 10), seed=8)


def test_bad_state_dicts_name_the_key(resnet8_state):
  model = nets.create("resnet8", 10)
  before = nets.reference_state(model)

  missing = dict(resnet8_state)
  del missing["layer2.0.downsample.1.running_var"]
  with pytest.raises(ValueError, match=r"missing key 'layer2\.0\.downsample\.1\.running_var'"):
    nets.load_reference_weights(model, missing)

  unexpected = dict(resnet8_state, **{"layer4.0.conv1.weight": np.zeros((1,), np.float32)})
  with pytest.raises(ValueError, match=r"unexpected key 'layer4\.0\.conv1\.weight'"):
    nets.load_reference_weights(model, unexpected)

  wrong = dict(resnet8_state, **{"fc.weight": np.zeros((100, 64), np.float32)})
  with pytest.raises(ValueError, match=r"'fc\.weight' has shape \(100, 64\), expected \(10, 64\)"):
    nets.load_reference_weights(model, wrong)

  nhwc = dict(resnet8_state)
  nhwc["conv1.weight"] = resnet8_state["conv1.weight"].transpose(2, 3, 1, 0)  # Keras layout
  with pytest.raises(ValueError, match=r"'conv1\.weight' has shape \(3, 3, 3, 16\)"):
    nets.load_reference_weights(model, nhwc)

  after = nets.reference_state(model)  # a rejected state dict assigns nothing
  assert all(np.array_equal(before[k], after[k]) for k in before)


def test_prefix_and_counter_entries_are_ignored(resnet8_state):
  wrapped = {f"module.{k}": v for k, v in resnet8_state.items()}
  wrapped["module.bn1.num_batches_tracked"] = np.array(7)
  model = nets.load_reference_weights(nets.create("resnet8", 10), wrapped)
  np.testing.assert_array_equal(model.classifier.kernel.numpy(), resnet8_state["fc.weight"].T)


def test_convert_cli_infers_classes_and_round_trips(tmp_path, resnet8_state, capsys):
  src = str(tmp_path / "r8.npz")
  np.savez(src, input=np.zeros((1, 32, 32, 3), np.float32), **resnet8_state)  # dotless key skipped
  out = str(tmp_path / "r8.keras")
  assert convert_main([src, out, "--arch", "ResNet8"]) == 0
  loaded = keras.models.load_model(out)
  assert loaded.arch == "resnet8" and loaded.num_classes == 10
  np.testing.assert_array_equal(loaded.bn1.moving_variance.numpy(), resnet8_state["bn1.running_var"])

  assert convert_main([src, out, "--arch", "wrn_16_1"]) == 2
  assert "missing key 'block1.layer.0.bn1.weight'" in capsys.readouterr().err
  assert convert_main([str(tmp_path / "nope.npz"), out, "--arch", "resnet8"]) == 2
  assert convert_main([src, out, "--arch", "resnet9"]) == 2
  assert "unknown net 'resnet9'" in capsys.readouterr().err
