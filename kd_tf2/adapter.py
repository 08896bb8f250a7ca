"""``kd_tf2.adapt``: any functional or Sequential Keras classifier -> ``nets.Outputs`` (contract 6).

    model = kd_tf2.adapt(keras_model)                        # automatic taps
    model = kd_tf2.adapt(keras_model, features=["conv2", "conv3"], embedding="pool")
    model(x, training=False)                  # logits [B, K] (a final softmax is stripped)
    model(x, training=False, features=True)   # nets.Outputs(logits, features, preacts, embedding)

Taps are layer names: the output of each named layer (a layer called once). Without names:

* ``features``: one NHWC map per spatial resolution, the output of the LAST layer (in topological
  order) that produces that resolution before the classifier, like timm's ``features_only``;
  branches that leave and rejoin a resolution (squeeze-excite) do not count, nor do padding /
  cropping layers nor tensors computed by no weighted layer (the input, a rescaling).
* ``preacts``: for each feature whose layer is a ReLU (``ReLU``, ReLU6, ``Activation("relu")``),
  that layer's input (the pre-activation AB and OFD want); otherwise the feature itself.
* ``embedding``: the [B, D] input of the final ``Dense`` (``model.classifier``).
* ``logits``: the final ``Dense`` before its activation; ``Softmax`` / ``Activation("softmax")``
  layers after it are stripped, and a ``Dense(..., activation="softmax")`` is applied without it.

A model whose taps cannot be found is refused with one ``UsageError`` line naming what is missing
and the argument that names it. Zoo nets (anything whose ``call`` takes ``features=``) pass through
unchanged. The adapted model shares the source's layers and weights; it is a ``keras.Model``
(``predict``/``evaluate``/``save`` work) and reloads with ``keras.saving.load_model`` once
``kd_tf2.adapter`` is imported; ``logits_model()`` is the plain-Keras export (no import needed).
"""
import inspect

import keras
from keras import ops

from kd_tf2.errors import UsageError
from nets.outputs import Outputs

__all__ = ["adapt", "Adapted", "is_adaptable_as_is", "functional_zoo_net"]

_PASS_THROUGH = ("Dropout", "Identity", "ActivityRegularization", "GaussianNoise",
                 "GaussianDropout", "AlphaDropout")
_SPATIAL_NOOP = ("ZeroPadding2D", "Cropping2D")


def is_adaptable_as_is(model):
  """Whether ``model`` already honours contract 1 (its ``call`` takes ``features=``)."""
  try:
    return "features" in inspect.signature(model.call).parameters
  except (TypeError, ValueError):
    return False


def _names(arg, what):
  if arg is None:
    return None
  if isinstance(arg, str):
    arg = [n for n in arg.split(",") if n.strip()]
  arg = [str(n).strip() for n in arg]
  if not arg:
    raise UsageError(f"adapt: {what}= is empty; give layer names or None for automatic taps")
  return arg


def adapt(model, features=None, preacts=None, embedding=None):
  """``model`` honouring contract 1 (``nets.Outputs`` with ``features=True``, logits without).

  model:      a functional or Sequential ``keras.Model`` (built, one image input, one output) whose
              last weighted layer is a ``Dense`` classifier; or a zoo net (returned unchanged).
  features:   layer names (list or comma-separated string) whose outputs are the NHWC feature maps,
              in order (stem first); None = one per spatial resolution (module docstring).
  preacts:    layer names, one per feature (same shapes); None = the ReLU input when the feature is
              a ReLU output, else the feature.
  embedding:  layer name of the [B, D] vector the final Dense reads; None = that Dense's input.
  """
  if not isinstance(model, keras.Model):
    raise UsageError(f"adapt expects a keras.Model, got {type(model).__name__}")
  if is_adaptable_as_is(model):
    if features is None and preacts is None and embedding is None:
      return model
    if isinstance(model, Adapted):
      model = model.source
    else:
      raise UsageError(f"adapt: {getattr(model, 'arch', model.name)} is a zoo net, its taps are "
                       "fixed; call adapt without features/preacts/embedding")
  return Adapted(model, features=_names(features, "features"), preacts=_names(preacts, "preacts"),
                 embedding=embedding)


def functional_zoo_net(net, input_shape=(32, 32, 3)):
  """A zoo net's own layers (shared weights) as a plain functional classifier image -> logits:
  its ``forward`` traced on a ``keras.Input``. ``adapt`` of it computes what the zoo net
  computes (the speed benchmark's ``--adapt`` compares the two); its automatic taps are one per
  resolution, not the zoo's stem + stages."""
  inputs = keras.Input(tuple(int(d) for d in input_shape))
  _, _, embedding = net.forward(inputs, training=None)
  return keras.Model(inputs, net.classifier(embedding), name=f"{net.name}_functional")


# ------------------------------------------------------------------ graph walking

def _history(tensor):
  return getattr(tensor, "_keras_history", None)


def _inputs_of(tensor):
  """The input tensors of the node that produced ``tensor`` ([] for a model input)."""
  hist = _history(tensor)
  if hist is None:
    return []
  op, node_index, _ = hist
  node = op._inbound_nodes[node_index]  # pylint: disable=protected-access
  return list(node.input_tensors)


def _layer_of(tensor):
  hist = _history(tensor)
  return None if hist is None else hist[0]


def _ancestors(tensor):
  """Every tensor ``tensor`` depends on, itself last, in topological (post-) order."""
  order, seen = [], set()
  stack = [(tensor, False)]
  while stack:
    t, expanded = stack.pop()
    if expanded:
      order.append(t)
      continue
    if id(t) in seen:
      continue
    seen.add(id(t))
    stack.append((t, True))
    for parent in reversed(_inputs_of(t)):
      if id(parent) not in seen:
        stack.append((parent, False))
  return order


def _is_softmax(layer):
  cls = type(layer).__name__
  if cls == "Softmax":
    return True
  if cls == "Activation":
    return getattr(layer.activation, "__name__", "") == "softmax"
  return False


def _is_linear_activation(layer):
  return type(layer).__name__ == "Activation" and getattr(
      layer.activation, "__name__", "") == "linear"


def _is_relu(layer):
  """A ReLU (or ReLU6, capped) layer: its input is the feature's pre-activation."""
  cls = type(layer).__name__
  if cls == "ReLU":
    return not getattr(layer, "negative_slope", 0) and not getattr(layer, "threshold", 0)
  if cls == "Activation":
    return getattr(layer.activation, "__name__", "") in ("relu", "relu6")
  return False


def _resolution(tensor):
  shape = tuple(tensor.shape)
  if len(shape) != 4:
    return None
  return shape[1], shape[2]


def _area(res):
  return res[0] * res[1]


class _Refs:
  """Plain holder: layers reachable from the adapted model without being tracked twice."""

  def __init__(self, source):
    self.source = source
    self.classifier = None


class Adapted(keras.Model):
  """A Keras classifier with the ``nets.Outputs`` contract (``kd_tf2.adapt`` builds it).

  Attributes: ``source`` (the wrapped model; shares its layers and weights), ``classifier`` (its
  final Dense), ``arch`` (the source's name), ``num_classes``, ``tap_names`` (the resolved
  feature / preact / embedding layer names, ``None`` where a tap is a tensor without own layer).
  """

  def __init__(self, source, features=None, preacts=None, embedding=None, **kwargs):
    kwargs.setdefault("name", f"adapted_{source.name}")
    super().__init__(**kwargs)
    self._refs = _Refs(source)  # untracked: the tap model holds every layer once
    self.arch = source.name
    self.synchronized_bn = False
    self._requested = dict(features=features, preacts=preacts, embedding=embedding)
    inputs = self._source_inputs(source)
    out = self._source_output(source)
    dense, dense_out, softmax_in_dense = self._find_classifier(source, out)
    self._refs.classifier = dense
    emb = self._embedding(source, dense, embedding)
    self.num_classes = int(dense_out.shape[-1])
    feats = self._features(source, features, emb)
    pre = self._preacts(source, preacts, feats)
    self._softmax_in_dense = softmax_in_dense
    if softmax_in_dense:
      self.head = dense  # not in the tap graph (its softmax output is not computed): track it here
    self._refs.preacts = list(pre)
    logits = emb if softmax_in_dense else dense_out
    self.taps = keras.Model(inputs, [logits, emb, list(feats), list(pre)],
                            name=f"taps_{source.name}")
    self.built = True
    self.tap_names = dict(features=[_name(f) for f in feats], preacts=[_name(p) for p in pre],
                          embedding=_name(emb))

  # ---------------------------------------------------------------- discovery
  @staticmethod
  def _source_inputs(source):
    inputs = getattr(source, "inputs", None) if source.built else None
    if not inputs:
      raise UsageError(f"adapt: {source.name} has no symbolic input (a subclassed model, or a "
                       "Sequential without an input shape); build it from keras.Input(shape=...) "
                       "or start the Sequential with keras.Input")
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
      raise UsageError(f"adapt: {source.name} must take one image input [B, H, W, C]; it takes "
                       f"{[tuple(i.shape) for i in inputs]}")
    return inputs[0]

  @staticmethod
  def _source_output(source):
    outputs = source.outputs
    if len(outputs) != 1:
      raise UsageError(f"adapt: {source.name} has {len(outputs)} outputs; a classifier has one "
                       "(the class scores)")
    return outputs[0]

  @staticmethod
  def _find_classifier(source, out):
    """(final Dense, its linear output or None, whether its own activation is a softmax)."""
    t = out
    while True:
      layer = _layer_of(t)
      if layer is None:
        break
      cls = type(layer).__name__
      if _is_softmax(layer) or _is_linear_activation(layer) or cls in _PASS_THROUGH:
        t = _inputs_of(t)[0]
        continue
      break
    if layer is None or type(layer).__name__ != "Dense" or len(t.shape) != 2:
      what = "nothing" if layer is None else f"layer {layer.name!r} ({type(layer).__name__})"
      raise UsageError(f"adapt: {source.name} has no logits: its output comes from {what}, not "
                       "from a final Dense on a [B, D] vector (possibly followed by a softmax); "
                       "end the model with keras.layers.Dense(num_classes)")
    act = getattr(layer.activation, "__name__", "linear")
    if act not in ("linear", "softmax"):
      raise UsageError(f"adapt: {source.name}'s final Dense {layer.name!r} has activation {act!r}; "
                       "expected logits (no activation) or a softmax")
    return layer, t, act == "softmax"

  def _embedding(self, source, dense, name):
    if name is None:
      emb = _inputs_of(_history_output(dense))[0]
    else:
      emb = _tap(source, name, "embedding")
    if len(emb.shape) != 2:
      where = _name(emb) or "the final Dense input"
      raise UsageError(f"adapt: the embedding of {source.name} ({where}) has shape "
                       f"{tuple(emb.shape)}, not [B, D]; pool it to a vector before the Dense")
    if name is not None and emb is not _inputs_of(_history_output(dense))[0]:
      raise UsageError(f"adapt: embedding={name!r} is not the input of {source.name}'s final "
                       f"Dense {dense.name!r}; the embedding is the vector the classifier reads")
    return emb

  def _features(self, source, names, emb):
    if names is not None:
      feats = [_tap(source, n, "features") for n in names]
      for n, f in zip(names, feats):
        if len(f.shape) != 4:
          raise UsageError(f"adapt: features layer {n!r} of {source.name} outputs "
                           f"{tuple(f.shape)}, not an NHWC map [B, H, W, C]")
      return feats
    order = _ancestors(emb)
    weighted, levels = set(), []
    for t in order:
      layer = _layer_of(t)
      parents = _inputs_of(t)
      if (layer is not None and getattr(layer, "weights", None)) or any(
          id(p) in weighted for p in parents):
        weighted.add(id(t))
      if id(t) not in weighted or layer is None or type(layer).__name__ in _SPATIAL_NOOP:
        continue
      res = _resolution(t)
      if res is None or None in res:
        if res is not None:
          raise UsageError(f"adapt: {source.name} has a dynamic spatial size; build it with a "
                           "fixed input shape or pass features=[layer names]")
        continue
      while levels and _area(levels[-1][0]) < _area(res):
        levels.pop()  # a branch that left the resolution and came back (squeeze-excite)
      if levels and levels[-1][0] == res:
        levels[-1] = (res, t)
      else:
        levels.append((res, t))
    if not levels:
      raise UsageError(f"adapt: found no NHWC feature map in {source.name} before its embedding; "
                       "pass features=[layer names]")
    return [t for _, t in levels]

  @staticmethod
  def _preacts(source, names, feats):
    if names is None:
      out = []
      for f in feats:
        layer = _layer_of(f)
        out.append(_inputs_of(f)[0] if layer is not None and _is_relu(layer) else f)
      return out
    if len(names) != len(feats):
      raise UsageError(f"adapt: {len(names)} preacts for {len(feats)} features of {source.name}; "
                       "give one preact layer name per feature")
    pre = [_tap(source, n, "preacts") for n in names]
    for n, p, f in zip(names, pre, feats):
      if tuple(p.shape) != tuple(f.shape):
        raise UsageError(f"adapt: preacts layer {n!r} outputs {tuple(p.shape)} but its feature "
                         f"{_name(f)!r} is {tuple(f.shape)}; a preact has its feature's shape")
    return pre

  # ---------------------------------------------------------------- the contract
  @property
  def source(self):
    return self._refs.source

  @property
  def classifier(self):
    """The source's final Dense (some methods exclude its variables from feature training)."""
    return self._refs.classifier

  def call(self, inputs, training=None, features=False):
    logits, emb, feats, pre = self.taps(inputs, training=training)
    if self._softmax_in_dense:
      logits = _linear(self.classifier, emb)
    if not features:
      return logits
    return Outputs(logits, tuple(feats), tuple(pre), emb)

  def preact_batchnorms(self):
    """Per stage preact (``preacts[1:]``, as the zoo's OFD locators): the BatchNormalization that
    produces it, looking through ReLU, identity and Add layers (an Add's first input that leads to
    one); ``UsageError`` where there is none (OFD reads its margin from these, as mdistiller's
    ``get_bn_before_relu``)."""
    out = []
    for i, p in enumerate(self._refs.preacts[1:], start=1):
      bn = _batchnorm_behind(p)
      if bn is None:
        raise UsageError(f"no BatchNormalization produces preact {i} ({_name(p)!r}) of "
                         f"{self.arch}; pass adapt(..., preacts=[BatchNormalization layer names])")
      out.append(bn)
    return out

  def logits_model(self):
    """A plain functional ``keras.Model`` image -> logits made of the source's own (built-in)
    layers, sharing their weights; a ``Dense(softmax)`` classifier becomes a linear copy holding
    its current weights. It loads with ``keras.saving.load_model`` where only Keras is installed
    (the engine exports adapted students this way)."""
    logits, emb = self.taps.outputs[0], self.taps.outputs[1]
    if self._softmax_in_dense:
      dense = self.classifier
      linear = keras.layers.Dense(dense.units, use_bias=dense.use_bias, name=f"{dense.name}_logits")
      logits = linear(emb)
      linear.set_weights(dense.get_weights())
    return keras.Model(self.taps.inputs, logits, name=self.source.name)

  def get_config(self):
    return {"name": self.name, "trainable": self.trainable,
            "source": keras.saving.serialize_keras_object(self.source), **self._requested}

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    source = keras.saving.deserialize_keras_object(config.pop("source"))
    return cls(source, **config)


keras.saving.register_keras_serializable(package="kd_tf2")(Adapted)


def _history_output(layer):
  """The output tensor of ``layer``'s first call."""
  return layer._inbound_nodes[0].output_tensors[0]  # pylint: disable=protected-access


def _tap(source, name, what):
  try:
    layer = source.get_layer(name)
  except ValueError:
    names = [l.name for l in source.layers]
    import difflib  # pylint: disable=import-outside-toplevel
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; its layers: {', '.join(names)}"
    raise UsageError(f"adapt: {what}={name!r}: {source.name} has no layer of that name{hint}") \
        from None
  nodes = layer._inbound_nodes  # pylint: disable=protected-access
  if len(nodes) != 1 or len(nodes[0].output_tensors) != 1:
    raise UsageError(f"adapt: {what}={name!r}: layer {name!r} of {source.name} is called "
                     f"{len(nodes)} times or has several outputs; tap a layer called once")
  return nodes[0].output_tensors[0]


def _name(tensor):
  layer = _layer_of(tensor)
  return None if layer is None else layer.name


def _linear(dense, x):
  """``dense`` applied without its activation."""
  y = ops.matmul(x, ops.cast(dense.kernel, x.dtype))
  if dense.use_bias:
    y = y + ops.cast(dense.bias, x.dtype)
  return y


def _batchnorm_behind(tensor):
  layer = _layer_of(tensor)
  while layer is not None:
    cls = type(layer).__name__
    if cls == "BatchNormalization":
      return layer
    if _is_relu(layer) or _is_linear_activation(layer) or cls in _PASS_THROUGH:
      tensor = _inputs_of(tensor)[0]
    elif cls == "Add":
      for parent in _inputs_of(tensor):
        bn = _batchnorm_behind(parent)
        if bn is not None:
          return bn
      return None
    else:
      return None
    layer = _layer_of(tensor)
  return None
