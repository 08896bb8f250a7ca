"""Early exits: a staged zoo net cut after stage i, finished by a bottleneck classifier head.

BYOT (Zhang et al., "Be Your Own Teacher", ICCV 2019, arXiv:1905.08094) trains a classifier head
after every stage but the last; at inference a shallow head alone is a cheaper classifier
("anytime prediction"). ``EarlyExit`` is that classifier as a standalone Keras model: the stem and
the first ``stages`` stages of ``arch`` (``nets.branched.trunk``) and one ``BottleneckHead``. The
deeper stages and the net's own classifier are never built, so the model holds no weights of them
and costs only the trunk plus the head. It saves and loads as ``.keras`` with ``import nets``.

Shapes: images [B, H, W, C] -> logits [B, K]; ``BottleneckHead``: map [B, h, w, c] ->
(logits [B, K], feature [B, width]).
"""
import keras
from keras import ops

from nets import branched
from nets import registry


@keras.saving.register_keras_serializable(package="nets")
class BottleneckHead(keras.layers.Layer):
  """``steps`` x (conv3x3 stride 2 -> BN -> ReLU) of ``width`` channels, global average pool, FC."""

  def __init__(self, steps, width, num_classes, synchronized_bn=False, **kwargs):
    super().__init__(**kwargs)
    self.steps, self.width = int(steps), int(width)
    self.num_classes, self.synchronized_bn = int(num_classes), bool(synchronized_bn)
    self.convs, self.bns = [], []
    for i in range(self.steps):
      self.convs.append(keras.layers.Conv2D(self.width, 3, strides=2, padding="same",
                                            use_bias=False, name=f"conv{i}"))
      self.bns.append(keras.layers.BatchNormalization(
          momentum=0.9, epsilon=1e-5, synchronized=self.synchronized_bn, name=f"bn{i}"))
    self.fc = keras.layers.Dense(self.num_classes, name="fc")

  def call(self, x, training=None):
    for conv, bn in zip(self.convs, self.bns):
      x = ops.relu(bn(conv(x), training=training))
    feature = ops.mean(x, axis=(1, 2))
    return self.fc(feature), feature

  def get_config(self):
    return {**super().get_config(), "steps": self.steps, "width": self.width,
            "num_classes": self.num_classes, "synchronized_bn": self.synchronized_bn}


@keras.saving.register_keras_serializable(package="nets")
class EarlyExit(keras.Model):
  """Zoo net ``arch`` up to stage ``stages`` (1-based), then a ``BottleneckHead``: -> logits."""

  def __init__(self, arch, num_classes, stages, head_steps, head_width, synchronized_bn=False,
               **kwargs):
    kwargs.setdefault("name", f"{arch}_exit{stages}")
    super().__init__(**kwargs)
    self.base_arch, self.exit = str(arch), int(stages)
    self.arch = f"{self.base_arch}_exit{self.exit}"
    self.num_classes = int(num_classes)
    self.synchronized_bn = bool(synchronized_bn)
    self.net = registry.create(self.base_arch, self.num_classes,
                               synchronized_bn=self.synchronized_bn)
    try:
      branched.check_branchable(self.net, self.exit)
    except ValueError as e:
      raise ValueError(f"early exit after stage {stages}: {e}") from None
    self.head = BottleneckHead(head_steps, head_width, self.num_classes, self.synchronized_bn,
                               name=f"head{self.exit}")

  def call(self, inputs, training=None):
    x = branched.trunk(self.net, inputs, training, self.exit).features[-1]  # = features[exit]
    return self.head(x, training=training)[0]

  def build(self, input_shape=(None, 32, 32, 3)):
    """Create the trunk's and the head's variables by a symbolic trace (deeper stages stay
    unbuilt: no variables)."""
    self.compute_output_spec(keras.KerasTensor(tuple(input_shape)), training=False)

  def get_config(self):
    return {"name": self.name, "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
            "arch": self.base_arch, "num_classes": self.num_classes, "stages": self.exit,
            "head_steps": self.head.steps, "head_width": self.head.width,
            "synchronized_bn": self.synchronized_bn}

  @classmethod
  def from_config(cls, config):
    return cls(**config)


def export_exit(net, head, stages, input_shape):
  """A built ``EarlyExit`` computing ``head`` on stage ``stages`` of ``net`` (a trained staged
  zoo net), its weights copied from both. ``input_shape``: (H, W, C)."""
  model = EarlyExit(net.arch, net.num_classes, stages, head.steps, head.width,
                    synchronized_bn=net.synchronized_bn)
  model.build((None,) + tuple(int(d) for d in input_shape))
  pairs = [(a, b) for src, dst in zip(branched.trunk_layers(net, stages),
                                      branched.trunk_layers(model.net, stages))
           for a, b in zip(src.weights, dst.weights)]
  pairs += list(zip(head.weights, model.head.weights))
  if len(pairs) != len(model.weights):
    raise ValueError(f"{model.name}: {len(model.weights)} variables but {len(pairs)} copied; "
                     "the trunk's layers do not match what the trunk runs")
  for a, b in pairs:
    if tuple(a.shape) != tuple(b.shape):
      raise ValueError(f"{model.name}: {a.path} {tuple(a.shape)} != {b.path} {tuple(b.shape)}")
    b.assign(a)
  return model
