"""PyTorch state_dict <-> Keras weights of the zoo nets, by key name (NETS.md §4).

Every net lists its weighted layers with their state_dict module paths (``model.torch_layers()``);
the mapping below turns each layer kind into (state_dict key, Keras variable, transform):

  Conv2d [O, I/g, kh, kw]            -> Conv2D kernel [kh, kw, I/g, O]        transpose (2, 3, 1, 0)
  depthwise Conv2d [C, 1, kh, kw]     -> DepthwiseConv2D kernel [kh, kw, C, 1] transpose (2, 3, 0, 1)
  Linear [out, in]                    -> Dense kernel [in, out]                transpose
  biases, BN weight/bias/running_mean/running_var -> bias, gamma/beta/moving_mean/moving_variance
  num_batches_tracked                 -> dropped
"""
import os
import zipfile

import keras
import numpy as np

_CONV = (2, 3, 1, 0)   # torch [O, I, kh, kw] -> keras [kh, kw, I, O]; inverse (3, 2, 0, 1)
_DEPTHWISE = (2, 3, 0, 1)  # torch [C, 1, kh, kw] -> keras [kh, kw, C, 1]; self-inverse


def _inverse(perm):
  return tuple(int(i) for i in np.argsort(perm))


def _slots(layer):
  """(suffix, variable, perm) for one layer; perm maps the torch array to the Keras layout."""
  if isinstance(layer, keras.layers.BatchNormalization):
    return [("weight", layer.gamma, None), ("bias", layer.beta, None),
            ("running_mean", layer.moving_mean, None),
            ("running_var", layer.moving_variance, None)]
  if isinstance(layer, keras.layers.DepthwiseConv2D):
    slots = [("weight", layer.kernel, _DEPTHWISE)]
  elif isinstance(layer, keras.layers.Conv2D):
    slots = [("weight", layer.kernel, _CONV)]
  elif isinstance(layer, keras.layers.Dense):
    slots = [("weight", layer.kernel, (1, 0))]
  else:
    raise TypeError(f"no state_dict mapping for layer {layer.name!r} of type {type(layer).__name__}")
  if layer.use_bias:
    slots.append(("bias", layer.bias, None))
  return slots


def _ensure_built(model):
  if not model.built:
    model.build((None, 32, 32, 3))


def weight_table(model):
  """[(state_dict key, Keras variable, perm torch->keras or None)] in the model's layer order."""
  _ensure_built(model)
  table = []
  for path, layer in model.torch_layers():
    for suffix, var, perm in _slots(layer):
      table.append((f"{path}.{suffix}", var, perm))
  return table


def clean_state(state):
  """Drop num_batches_tracked, strip a DataParallel ``module.`` prefix, convert to numpy."""
  out = {}
  for key, value in state.items():
    if key.endswith("num_batches_tracked"):
      continue
    if key.startswith("module."):
      key = key[len("module."):]
    if hasattr(value, "detach"):  # a torch tensor
      value = value.detach().cpu().numpy()
    out[key] = np.asarray(value)
  return out


def load_reference_weights(model, state):
  """Assign a reference (RepDistiller, torchvision) state_dict to a zoo net, in place; returns it.

  state: mapping from PyTorch state_dict keys to arrays (numpy or torch tensors). ``module.``
  prefixes and ``num_batches_tracked`` entries are ignored. Every other key must be consumed exactly
  once and every model weight assigned: a missing, unexpected or mis-shaped key raises one
  ValueError naming it, and then nothing is assigned.
  """
  state = clean_state(state)
  table = weight_table(model)
  assignments = []
  for key, var, perm in table:
    if key not in state:
      raise ValueError(f"state dict does not fit {model.arch}: missing key {key!r}")
    value = state[key]
    expected = tuple(var.shape) if perm is None else tuple(var.shape[i] for i in _inverse(perm))
    if tuple(value.shape) != expected:
      raise ValueError(f"state dict does not fit {model.arch}: key {key!r} has shape "
                       f"{tuple(value.shape)}, expected {expected} (PyTorch layout)")
    if perm is not None:
      value = np.transpose(value, perm)
    assignments.append((var, value))
  used = {key for key, _, _ in table}
  for key in state:
    if key not in used:
      raise ValueError(f"state dict does not fit {model.arch}: unexpected key {key!r}")
  for var, value in assignments:
    var.assign(value.astype(var.dtype))
  return model


def reference_state(model):
  """The inverse mapping: the model's weights as a PyTorch-layout state_dict {key: np.ndarray}
  (without num_batches_tracked)."""
  state = {}
  for key, var, perm in weight_table(model):
    value = np.asarray(var.numpy())
    state[key] = value if perm is None else np.transpose(value, _inverse(perm))
  return state


def read_state(path, trust_pickle=False):
  """Read a state_dict from ``.npz`` (keys containing a dot; others, e.g. a fixture's ``input``,
  are skipped) or ``.pth``/``.pt`` (needs torch; a RepDistiller checkpoint's ``'model'`` entry or a
  ``'state_dict'`` entry is unwrapped). ``trust_pickle`` allows full unpickling of ``.pth`` files that
  hold more than tensors (only for files you trust)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"no such state dict file: {path}")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".npz":
    try:
      data = np.load(path, allow_pickle=False)
      if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError("it holds one array, not named weights")
      with data:
        return {k: data[k] for k in data.files if "." in k}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
      reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
      if "pickled" in reason:
        reason = "not a zip archive of arrays"
      raise ValueError(f"{path} is not a readable .npz state dict ({reason}); write one with "
                       "numpy.savez(f, **state_dict)") from None
  if ext in (".pth", ".pt"):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(f"reading {path} needs torch (pip install torch), or save the state dict "
                        "as .npz: numpy.savez(f, **{k: v.numpy() for k, v in sd.items()})") from e
    try:
      obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # torch raises pickle.UnpicklingError for non-tensor payloads
      if trust_pickle:
        raise
      raise ValueError(f"{path} holds more than tensors and was not unpickled; if you trust the "
                       "file, pass trust_pickle=True (CLI: --trust_pickle)") from e
    for entry in ("model", "state_dict"):
      if isinstance(obj, dict) and isinstance(obj.get(entry), dict):
        obj = obj[entry]
        break
    return dict(obj)
  raise ValueError(f"unsupported state dict file {path!r}; expected .npz, .pth or .pt")
