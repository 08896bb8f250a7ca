"""The ensemble of a branched zoo net as one deployable Keras model (ONE's gated ensemble, a mean).

ONE (Lan, Zhu, Gong, NeurIPS 2018, arXiv:1806.04606) can deploy its on-the-fly ensemble: the
trunk runs once, every branch on it, and a gate - FC + softmax over the trunk's globally pooled
map - weights the branches' logits. OKDDip's ensemble of peers is the mean of some branches.
``BranchEnsemble`` is that model, built from the branches of ``nets.branched`` (branch i is a whole
zoo net; branch 0's trunk is the trunk), saved and loaded as ``.keras`` like any zoo net.

Shapes: images [B, H, W, C] -> logits [B, K]; gate: [B, c] (pooled trunk map) -> [B, m].
"""
import keras
from keras import ops

from nets import branched as nb
from nets.registry import create


@keras.saving.register_keras_serializable(package="nets")
class BranchEnsemble(keras.Model):
  """m branches of ``arch`` split after ``split`` shared stages; logits = the gated sum of all
  branches (``gated``) or the mean over ``members`` (default: every branch)."""

  def __init__(self, arch, num_classes, split, branches, members=None, gated=False,
               synchronized_bn=False, **kwargs):
    super().__init__(**kwargs)
    self.arch, self.num_classes, self.split = arch, int(num_classes), int(split)
    self.num_branches, self.gated = int(branches), bool(gated)
    self.members = list(range(self.num_branches)) if members is None else [int(i) for i in members]
    self.synchronized_bn = bool(synchronized_bn)
    self.branch_nets = [create(arch, self.num_classes, synchronized_bn=self.synchronized_bn)
                        for _ in range(self.num_branches)]
    self.gate = keras.layers.Dense(self.num_branches, name="gate") if self.gated else None

  @classmethod
  def of(cls, branch_nets, split, image_shape, members=None, gate=None):
    """A ``BranchEnsemble`` holding copies of ``branch_nets`` (and ``gate``'s weights), built for
    images of ``image_shape`` (H, W, C)."""
    base = branch_nets[0]
    out = cls(base.arch, base.num_classes, split, len(branch_nets), members=members,
              gated=gate is not None, synchronized_bn=base.synchronized_bn,
              name=f"{base.arch}_ensemble")
    out.build((None,) + tuple(int(d) for d in image_shape))
    for src, dst in zip(branch_nets, out.branch_nets):
      dst.set_weights(src.get_weights())
    if gate is not None:
      out.gate.set_weights(gate.get_weights())
    return out

  def build(self, input_shape=(None, 32, 32, 3)):
    """Create every variable (each branch net whole, its unused trunk copy too, so that weights
    transfer net for net) by tracing symbolically (no computation)."""
    for net in self.branch_nets:
      net.build(tuple(input_shape))
    self.compute_output_spec(keras.KerasTensor(tuple(input_shape)), training=False)

  def call(self, inputs, training=False):
    shared = nb.trunk(self.branch_nets[0], inputs, training, self.split)
    logits = [nb.branch(net, shared, training, self.split).logits for net in self.branch_nets]
    if self.gate is not None:
      weights = ops.softmax(self.gate(ops.mean(shared[0], axis=[1, 2])), axis=-1)  # [B, m]
      return ops.sum(ops.stack(logits, axis=1) * weights[:, :, None], axis=1)
    return ops.mean(ops.stack([logits[i] for i in self.members], axis=1), axis=1)

  def get_config(self):
    return {"name": self.name, "trainable": self.trainable, "arch": self.arch,
            "num_classes": self.num_classes, "split": self.split, "branches": self.num_branches,
            "members": self.members, "gated": self.gated,
            "synchronized_bn": self.synchronized_bn}

  @classmethod
  def from_config(cls, config):
    return cls(**config)
