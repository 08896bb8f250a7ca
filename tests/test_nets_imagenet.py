"""Tests for the ImageNet nets (nets/imagenet.py): parameter counts against torchvision, and the
logits, features, preacts and embedding of a fixed 64x64 input against torchvision's resnet18 /
resnet50 and mdistiller's MobileNetV1, run outside the repo (tests/fixtures/nets_imagenet/README.md).

The fixtures hold no weights: both sides build them from ``recipe_state`` (a NumPy recipe seeded
per state_dict key), so the test needs no torch.
"""
import os
import zlib

import keras
import numpy as np
import pytest

import nets
from nets.convert import main as convert_main
from nets.imagenet import max_pool3x3_s2_pad1

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "nets_imagenet")
NAMES = ("resnet18_imagenet", "resnet50_imagenet", "mobilenetv1_imagenet")

# Trainable parameters at 1000 classes: torchvision's published counts for resnet18/34/50; for
# MobileNetV1 (conv without bias + BN, as mdistiller's) the published MobileNet-224 count, which
# keras.applications.MobileNet(alpha=1) also has as trainable parameters; then BN statistics.
COUNTS = {"resnet18_imagenet": (11689512, 9600), "resnet34_imagenet": (21797672, 17024),
          "resnet50_imagenet": (25557032, 53120), "mobilenetv1_imagenet": (4231976, 21888)}

# Feature maps (= preact maps) at 64x64 input, then the embedding width.
SHAPES = {
    "resnet18_imagenet": ([(32, 32, 64), (16, 16, 64), (8, 8, 128), (4, 4, 256), (2, 2, 512)], 512),
    "resnet34_imagenet": ([(32, 32, 64), (16, 16, 64), (8, 8, 128), (4, 4, 256), (2, 2, 512)], 512),
    "resnet50_imagenet": ([(32, 32, 64), (16, 16, 256), (8, 8, 512), (4, 4, 1024), (2, 2, 2048)],
                          2048),
    "mobilenetv1_imagenet": ([(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512),
                              (2, 2, 1024)], 1024),
}


def recipe_state(shapes, seed, conv_gain):
  """PyTorch-layout weights {key: float32 array} for ``shapes`` {key: shape}, independent of key
  order: key k draws from ``np.random.default_rng([seed, crc32(k)])``. running_var U[0.5, 2];
  running_mean and every bias 0.1·N(0, 1); other 1-D weights (BN gamma) 1 + 0.1·N(0, 1); conv and
  linear weights N(0, conv_gain / fan_in), fan_in = prod(shape[1:])."""
  state = {}
  for key, shape in shapes.items():
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    if key.endswith("running_var"):
      value = rng.uniform(0.5, 2.0, shape)
    elif key.endswith("running_mean") or key.endswith("bias"):
      value = 0.1 * rng.standard_normal(shape)
    elif len(shape) == 1:
      value = 1 + 0.1 * rng.standard_normal(shape)
    else:
      value = rng.standard_normal(shape) * np.sqrt(conv_gain / np.prod(shape[1:]))
    state[key] = value.astype(np.float32)
  return state


def _model_state(model, seed, conv_gain):
  shapes = {k: v.shape for k, v in nets.reference_state(model).items()}
  return recipe_state(shapes, seed, conv_gain)


def _scaled_err(actual, expected, what):
  """NETS.md §5: same shape, finite; returns max|a - e| / max(1, max|e|)."""
  actual = np.asarray(actual, np.float64)
  assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
  assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
  return float(np.max(np.abs(actual - expected)) / max(1.0, float(np.max(np.abs(expected)))))


def _fixture(name):
  path = os.path.join(FIXTURES, f"{name}.npz")
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_imagenet_param_counts_and_shapes(name):
  model = nets.create(name, 1000)
  out = model.compute_output_spec(keras.KerasTensor((2, 64, 64, 3)), features=True)
  trainable, bn_stats = COUNTS[name]
  assert sum(int(np.prod(v.shape)) for v in model.trainable_weights) == trainable
  assert sum(int(np.prod(v.shape)) for v in model.non_trainable_weights) == bn_stats
  assert model.arch == name and name in nets.available()
  assert isinstance(model.classifier, keras.layers.Dense) and model.classifier.units == 1000
  maps, dim = SHAPES[name]
  assert [tuple(f.shape[1:]) for f in out.features] == maps
  assert [tuple(p.shape[1:]) for p in out.preacts] == maps
  assert tuple(out.embedding.shape) == (2, dim) and tuple(out.logits.shape) == (2, 1000)
  clone = type(model).from_config(model.get_config())
  assert [p for p, _ in clone.torch_layers()] == [p for p, _ in model.torch_layers()]


@pytest.mark.parametrize("name", NAMES)
def test_imagenet_net_matches_reference_outputs(name):
  ref = _fixture(name)
  model = nets.create(name, 10)
  state = _model_state(model, int(ref["seed"]), float(ref["conv_gain"]))
  assert sorted(state) == list(ref["keys"])  # the reference's state_dict keys, one for one
  # A torchvision state dict carries BN counters: ignored.
  torch_like = dict(state, **{k.replace("running_var", "num_batches_tracked"): np.array(5)
                              for k in state if k.endswith("running_var")})
  nets.load_reference_weights(model, torch_like)
  out = model(ref["input"], training=False, features=True)
  errs = {"logits": _scaled_err(out.logits, ref["logits"], "logits"),
          "embedding": _scaled_err(out.embedding, ref["embedding"], "embedding")}
  assert len(out.features) == len(out.preacts) == 5
  for i in range(5):
    pre = ref[f"preact_{i}"]
    errs[f"preact_{i}"] = _scaled_err(out.preacts[i], pre, f"preact_{i}")
    errs[f"feat_{i}"] = _scaled_err(out.features[i], np.maximum(pre, 0), f"feat_{i}")
  worst = max(errs, key=errs.get)
  assert errs[worst] <= 1e-4, f"{name}: {worst} scaled error {errs[worst]:.3g}"
  np.testing.assert_array_equal(model(ref["input"], training=False), out.logits)


def test_max_pool_pads_like_pytorch():
  x = -np.arange(2 * 6 * 6 * 1, dtype=np.float32).reshape(2, 6, 6, 1)  # all <= 0: padding shows
  got = np.asarray(max_pool3x3_s2_pad1(x))
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  want = np.array([[[padded[b, 2 * i:2 * i + 3, 2 * j:2 * j + 3, 0].max() for j in range(3)]
                    for i in range(3)] for b in range(2)])[..., None]
  np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def r18_state():
  return _model_state(nets.create("resnet18_imagenet", 10), 18, 1.0)


def test_convert_cli_reads_a_torchvision_npz(tmp_path, r18_state, capsys):
  src = str(tmp_path / "resnet18.npz")
  np.savez(src, **r18_state, **{"bn1.num_batches_tracked": np.array(3)})
  out = str(tmp_path / "r18.keras")
  assert convert_main([src, out, "--arch", "ResNet18_ImageNet"]) == 0
  loaded = keras.models.load_model(out)
  assert loaded.arch == "resnet18_imagenet" and loaded.num_classes == 10
  np.testing.assert_array_equal(loaded.get_layer("layer4.1").bn2.moving_variance.numpy(),
                                r18_state["layer4.1.bn2.running_var"])
  np.testing.assert_array_equal(loaded.classifier.kernel.numpy(), r18_state["fc.weight"].T)
  assert convert_main([src, out, "--arch", "resnet34_imagenet"]) == 2  # one-line error, exit 2
  err = capsys.readouterr().err.strip()
  assert "missing key 'layer1.2.conv1.weight'" in err and len(err.splitlines()) == 1


def test_bad_torchvision_state_dicts_name_the_key(r18_state):
  model = nets.create("resnet18_imagenet", 10)
  before = nets.reference_state(model)
  cases = [
      (dict(r18_state, **{"layer2.0.downsample.0.weight": np.zeros((128, 64, 3, 3), np.float32)}),
       r"'layer2\.0\.downsample\.0\.weight' has shape \(128, 64, 3, 3\), expected "
       r"\(128, 64, 1, 1\)"),
      ({k: v for k, v in r18_state.items() if k != "layer3.0.downsample.1.running_mean"},
       r"missing key 'layer3\.0\.downsample\.1\.running_mean'"),
      ({("linear" + k[2:] if k.startswith("fc.") else k): v for k, v in r18_state.items()},
       r"missing key 'fc\.weight'"),
      (dict(r18_state, **{"layer1.0.shortcut.0.weight": np.zeros((64, 64, 1, 1), np.float32)}),
       r"unexpected key 'layer1\.0\.shortcut\.0\.weight'"),
  ]
  for state, message in cases:
    with pytest.raises(ValueError, match=message):
      nets.load_reference_weights(model, state)
  after = nets.reference_state(model)  # nothing assigned
  assert all(np.array_equal(before[k], after[k]) for k in before)


def test_pth_state_dict_loads_when_torch_is_installed(tmp_path, r18_state):
  torch = pytest.importorskip("torch")
  path = str(tmp_path / "resnet18.pth")
  torch.save({k: torch.from_numpy(v) for k, v in r18_state.items()}, path)
  model = nets.load_reference_weights(nets.create("resnet18_imagenet", 10), nets.read_state(path))
  np.testing.assert_array_equal(model.conv1.kernel.numpy(),
                                r18_state["conv1.weight"].transpose(2, 3, 1, 0))
