"""Step-parity harness: replay a reference training step (PyTorch) with our distillers.

A fixture ``tests/fixtures/parity/<name>.npz`` (see its README) records three training steps of a
reference implementation from a known state. This module rebuilds that state in our nets and
connectors, runs OUR compiled step three times on the same batches, and compares:

* every loss term of every step (our weighted term names, e.g. ``ce``, ``at``);
* the student's and the connectors' weights after step 1 and step 3 (the tensors the fixture kept);
each to a scaled error  max|ours - ref| / max|ref|  (per tensor) of at most ``TOL`` = 1e-4.

Fixture keys (all optional unless said so):
  ``meta``                    JSON string (required): {"student", "teacher", "num_classes",
                              "batch", "seed", "method", "hparams", "lr", "momentum",
                              "weight_decay", "reference": "...", ...}
  ``s/<key>``, ``t/<key>``,   initial state (PyTorch state_dict keys and layouts) of the student,
  ``c/<key>``                 teacher and connectors. A key that is absent is generated from
                              ``meta["seed"]`` by ``initial_array`` (the generator did the same).
  ``image``                   float32 [steps, B, 32, 32, 3] NHWC (absent: generated from the seed)
  ``label``, ``index``        int [steps, B]  (absent: generated)
  ``<other>``                 further per-step batch entries, [steps, ...] (e.g. ``contrast_idx``)
  ``terms/<name>``            float [steps]: the reference's weighted loss terms per step
                              (``meta["term_sums"][name]`` = our terms that add up to it)
  ``step<k>/s/<key>``, ``step<k>/c/<key>``  weights after step k (k = 1, 3), PyTorch layout
  ``f64/...``                 the same entries from a float64 run of the reference (ill-conditioned
                              steps: ours must be no farther from it than the reference's float32
                              run, see ``check_against``)

Connector mapping: a test gives ``connectors(distiller) -> [(torch_key, keras_variable, perm)]``
(``perm`` maps the PyTorch array to the Keras layout, None = as is); ``layer_entries`` builds the
rows of one conv / transposed conv / BN / dense layer.

Everything here is plain functions (no test module imports another); tests reach them through
the ``parity`` fixture.
"""
import json
import os
import types
import zlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import nets
from kd_tf2 import distillers
from kd_tf2.engine.step import compile_step
from kd_tf2.optim import TorchSGD

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "fixtures", "parity")
TOL = 1e-4
CONV = (2, 3, 1, 0)        # torch Conv2d [O, I, kh, kw] -> Keras [kh, kw, I, O]
CONV_T = (2, 3, 1, 0)      # torch ConvTranspose2d [I, O, kh, kw] -> Keras [kh, kw, O, I]
DENSE = (1, 0)             # torch Linear [out, in] -> Keras [in, out]


# ------------------------------------------------------------------------- fixture files

def load_fixture(name):
  """{key: np.ndarray} of ``tests/fixtures/parity/<name>.npz`` plus ``meta`` decoded (dict)."""
  path = os.path.join(FIXTURES, name + ".npz")
  if not os.path.exists(path):
    pytest.fail(f"missing parity fixture {path}")
  with np.load(path, allow_pickle=False) as data:
    fx = {k: data[k] for k in data.files}
  fx["meta"] = json.loads(str(fx["meta"]))
  return fx


def _rng(seed, *names):
  """A NumPy generator keyed by the seed and names (independent of the order of the calls)."""
  words = [int(seed)] + [zlib.crc32(n.encode()) for n in names]
  return np.random.default_rng(words)


def initial_array(seed, prefix, key, shape):
  """The generated initial value of state_dict entry ``key`` of ``prefix`` (s, t or c), float32.

  BN running_var U(0.5, 1.5), running_mean N(0, 0.1^2); other 1-D ``.weight`` (BN gamma)
  U(0.5, 1.5); 1-D ``.bias`` N(0, 0.1^2); tensors of rank >= 2 N(0, 2/fan_in) with fan_in the
  product of all dims but the first. Anything else must be stored in the fixture.
  """
  rng = _rng(seed, prefix, key)
  shape = tuple(int(d) for d in shape)
  if key.endswith("running_var"):
    return rng.uniform(0.5, 1.5, shape).astype(np.float32)
  if key.endswith("running_mean"):
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)
  if len(shape) == 1 and key.endswith(".weight"):
    return rng.uniform(0.5, 1.5, shape).astype(np.float32)
  if len(shape) == 1 and key.endswith(".bias"):
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)
  if len(shape) >= 2:
    fan_in = int(np.prod(shape[1:]))
    return (np.sqrt(2.0 / fan_in) * rng.standard_normal(shape)).astype(np.float32)
  raise KeyError(f"no generation rule for {prefix}/{key} {shape}: store it in the fixture")


def batches(fx):
  """The fixture's per-step batches: a list of dicts {"image", "label", "index", ...}."""
  meta = fx["meta"]
  steps, b = int(meta.get("steps", 3)), int(meta["batch"])
  rng = _rng(meta["seed"], "batches")
  image = fx.get("image")
  if image is None:
    image = rng.standard_normal((steps, b, 32, 32, 3)).astype(np.float32)
  label = fx.get("label")
  if label is None:
    label = rng.integers(0, int(meta["num_classes"]), (steps, b))
  index = fx.get("index")
  if index is None:
    index = np.stack([rng.permutation(int(meta.get("n_data", 1000)))[:b] for _ in range(steps)])
  extra = [k for k in meta.get("batch_keys", [])]
  out = []
  for i in range(steps):
    batch = {"image": tf.constant(image[i]), "label": tf.constant(label[i].astype(np.int32)),
             "index": tf.constant(index[i].astype(np.int64))}
    for k in extra:
      batch[k] = tf.constant(fx[k][i])
    out.append(batch)
  return out


# ------------------------------------------------------------------------ weight mapping

def layer_entries(path, layer):
  """[(torch_key, variable, perm)] for one Keras conv / transposed conv / BN / dense layer
  standing for the PyTorch module at ``path``."""
  if isinstance(layer, keras.layers.BatchNormalization):
    return [(f"{path}.weight", layer.gamma, None), (f"{path}.bias", layer.beta, None),
            (f"{path}.running_mean", layer.moving_mean, None),
            (f"{path}.running_var", layer.moving_variance, None)]
  if isinstance(layer, keras.layers.Conv2DTranspose):
    rows = [(f"{path}.weight", layer.kernel, CONV_T)]
  elif isinstance(layer, keras.layers.Conv2D):
    rows = [(f"{path}.weight", layer.kernel, CONV)]
  elif isinstance(layer, keras.layers.Dense):
    rows = [(f"{path}.weight", layer.kernel, DENSE)]
  else:
    raise TypeError(f"no mapping for {path}: {type(layer).__name__}")
  if layer.use_bias:
    rows.append((f"{path}.bias", layer.bias, None))
  return rows


def _inverse(perm):
  return tuple(int(i) for i in np.argsort(perm))


def _torch_shape(var, perm):
  return tuple(var.shape) if perm is None else tuple(var.shape[i] for i in _inverse(perm))


def _to_keras(value, perm):
  return value if perm is None else np.transpose(value, perm)


def _to_torch(value, perm):
  return value if perm is None else np.transpose(value, _inverse(perm))


def net_entries(model):
  """The zoo net's [(torch_key, variable, perm)] (NETS.md §4, ``nets.weights.weight_table``)."""
  from nets import weights as net_weights
  return list(net_weights.weight_table(model))


def assign_state(fx, prefix, entries):
  """Assign fixture state ``prefix`` (s, t, c) to ``entries``; generated where not stored."""
  seed = fx["meta"]["seed"]
  for key, var, perm in entries:
    stored = fx.get(f"{prefix}/{key}")
    shape = _torch_shape(var, perm)
    value = stored if stored is not None else initial_array(seed, prefix, key, shape)
    if tuple(value.shape) != shape:
      raise ValueError(f"{prefix}/{key}: fixture shape {value.shape}, ours {shape}")
    var.assign(_to_keras(np.asarray(value, np.float32), perm).astype(var.dtype))


def read_state(entries):
  """{torch_key: np.ndarray in PyTorch layout} of ``entries``."""
  return {key: _to_torch(np.asarray(var.numpy()), perm) for key, var, perm in entries}


# --------------------------------------------------------------------------- the step

def compile_ours(step_fn, optimizer, variables):
  """OUR step as the engine compiles it (``kd_tf2.engine.step.compile_step`` under the default
  strategy): ``step(batch) -> (terms, metrics)``."""
  return compile_step(tf.distribute.get_strategy(), step_fn, optimizer, variables)


def build(fx, connectors=None, **hparams):
  """Our nets and distiller in the fixture's initial state.

  Returns a namespace: student, teacher, distiller, s_entries, c_entries (lists of
  (torch_key, variable, perm)). ``connectors(distiller)`` gives the connector rows; ``hparams``
  override the fixture's ``meta["hparams"]``.
  """
  meta = fx["meta"]
  k = int(meta["num_classes"])
  keras.utils.set_random_seed(int(meta["seed"]))
  student = nets.create(meta["student"], num_classes=k)
  teacher = nets.create(meta["teacher"], num_classes=k)
  for model in (student, teacher):
    model.build((None, 32, 32, 3))
  kwargs = dict(meta.get("hparams", {}))
  kwargs.update(hparams)
  distiller = distillers.create(meta["method"], student, teacher, **kwargs)
  s_entries, t_entries = net_entries(student), net_entries(teacher)
  c_entries = list(connectors(distiller)) if connectors else []
  assign_state(fx, "s", s_entries)
  assign_state(fx, "t", t_entries)
  assign_state(fx, "c", c_entries)
  return types.SimpleNamespace(student=student, teacher=teacher, distiller=distiller,
                               s_entries=s_entries, c_entries=c_entries)


def optimizer_for(fx, variables, lr=None):
  """PyTorch SGD (``TorchSGD``) with the fixture's lr / momentum / weight decay, built."""
  meta = fx["meta"]
  opt = TorchSGD(learning_rate=float(lr if lr is not None else meta["lr"]),
                 momentum=float(meta["momentum"]), weight_decay=float(meta["weight_decay"]),
                 nesterov=bool(meta.get("nesterov", False)))  # the Zoo's SGD is Nesterov
  opt.build(list(variables))
  return opt


def run(fx, ours, step_fn, variables, lr=None):
  """Run OUR step over the fixture's batches. Returns (terms {name: [steps]}, states
  {k: {"s/<key>" | "c/<key>": array}} after steps 1 and 3)."""
  opt = optimizer_for(fx, variables, lr)
  step = compile_ours(step_fn, opt, variables)
  terms, states = {}, {}
  for i, batch in enumerate(batches(fx), start=1):
    out, _ = step(batch)
    for name, value in out.items():
      if not name.startswith("_") and name != "loss":
        terms.setdefault(name, []).append(float(value))
    if i in (1, 3):
      state = {f"s/{k}": v for k, v in read_state(ours.s_entries).items()}
      state.update({f"c/{k}": v for k, v in read_state(ours.c_entries).items()})
      states[i] = state
  return {k: np.asarray(v) for k, v in terms.items()}, states


# ---------------------------------------------------------------------------- comparing

def scaled_error(ours, ref):
  """max|ours - ref| / max|ref| (absolute error when ref is all zeros)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  if ours.shape != ref.shape:
    raise ValueError(f"shape {ours.shape} vs reference {ref.shape}")
  scale = np.max(np.abs(ref)) if ref.size else 0.0
  diff = np.max(np.abs(ours - ref)) if ref.size else 0.0
  return float(diff / scale) if scale > 0 else float(diff)


def is_moving_stat(key):
  return key.endswith("running_mean") or key.endswith("running_var")


def compare(fx, terms, states, *, moving_stats=True, prefix=""):
  """{name: scaled error} of every term (key ``terms/<name>``) and every stored tensor after
  steps 1 and 3 (key ``step<k>/<s|c>/<torch_key>``) against the fixture entries under
  ``prefix`` ("" = the float32 reference run, "f64/" = the float64 one). A reference term or
  tensor we do not produce is an error (reported as inf)."""
  errors = {}
  for key, ref in fx.items():
    if key == "meta" or not key.startswith(prefix):
      continue
    rest = key[len(prefix):]
    if rest.startswith("f64/"):
      continue
    if rest.startswith("terms/"):
      name = rest[len("terms/"):]
      parts = fx["meta"].get("term_sums", {}).get(name, [name])
      if all(p in terms for p in parts):
        errors[rest] = scaled_error(sum(terms[p] for p in parts), ref)
      else:
        errors[rest] = float("inf")
    elif rest.startswith("step"):
      k, sub = rest.split("/", 1)
      if not moving_stats and is_moving_stat(sub):
        continue
      state = states.get(int(k[len("step"):]), {})
      errors[rest] = scaled_error(state[sub], ref) if sub in state else float("inf")
  return errors


def check(errors, tol=TOL, what=""):
  """Fail listing every entry whose error exceeds ``tol``."""
  bad = {k: v for k, v in errors.items() if not v <= tol}
  assert errors, f"{what}: nothing compared"
  assert not bad, f"{what}: scaled error > {tol}: " + ", ".join(
      f"{k}={v:.2e}" for k, v in sorted(bad.items()))


def check_against_f64(fx, terms, states, what="", moving_stats=False):
  """For ill-conditioned steps: against the float64 reference run, each entry of ours must be
  no farther than the reference's own float32 run, up to TOL:
  err(ours, f64) <= err(ref32, f64) + TOL."""
  ours = compare(fx, terms, states, prefix="f64/", moving_stats=moving_stats)
  ref32 = {}
  for key in ours:
    ref64 = fx["f64/" + key]
    ref32[key] = scaled_error(fx[key], ref64) if key in fx else 0.0
  bad = {k: (v, ref32[k]) for k, v in ours.items() if not v <= ref32[k] + TOL}
  assert ours, f"{what}: no float64 entries"
  assert not bad, f"{what}: farther from the float64 run than the reference's float32 run: " + \
      ", ".join(f"{k}: ours {a:.2e} vs ref32 {b:.2e}" for k, (a, b) in sorted(bad.items()))
  return ours, ref32


def bn_is_unbiased():
  """Whether our BatchNorm updates moving_variance with the unbiased batch variance (PyTorch)."""
  keras.utils.set_random_seed(0)
  bn = nets.layers.batch_norm("probe")
  x = tf.constant([[[[0.0]], [[2.0]]]])  # [B=1, H=2, W=1, C=1]: batch variance 1 (biased)
  bn(x, training=False)
  before = float(bn.moving_variance.numpy()[0])
  bn(x, training=True)
  after = float(bn.moving_variance.numpy()[0])
  update = after - 0.9 * before  # (1 - m) * var_batch with m = 0.9
  return abs(update - 0.2) < 1e-6  # unbiased variance of {0, 2} is 2 (biased: 1)


@pytest.fixture
def parity():
  """The harness functions as one namespace (tests call ``parity.build(...)`` etc.)."""
  return types.SimpleNamespace(
      TOL=TOL, load_fixture=load_fixture, initial_array=initial_array, batches=batches,
      layer_entries=layer_entries, net_entries=net_entries, assign_state=assign_state,
      read_state=read_state, compile_ours=compile_ours, build=build, optimizer_for=optimizer_for,
      run=run, scaled_error=scaled_error, compare=compare, check=check,
      check_against_f64=check_against_f64, bn_is_unbiased=bn_is_unbiased,
      is_moving_stat=is_moving_stat)
