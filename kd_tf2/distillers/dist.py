"""DIST - distillation from a stronger teacher (inter- and intra-class relations).

Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022,
arXiv:2205.10536. METHODS.md §2.16: ``method_weight * dist(z_s, z_t, beta, gamma, T)`` on the
logits [B, K] (equal K): T^2 * (beta * (1 - mean row Pearson) + gamma * (1 - mean column Pearson))
of softmax(z / T), plus CE (weight 1). ``temperature`` is the class temperature, so any KD term
added with ``--kd_weight`` uses the same T.

Defaults per protocol (``defaults_for``), from the authors' training configs (hunto/DIST_KD, its
``classification`` submodule hunto/image_classification_sota, ``lib/models/losses/kd_loss.py``
``KDLoss``: ``ori_loss_weight * CE + kd_loss_weight * DIST(beta=1, gamma=1, tau)``):

  protocol   T   beta  gamma  method_weight   config (configs/strategies/distill/)
  cifar      4   1     1      2               dist_cifar.yaml (kd: dist_t4)
  imagenet   1   1     1      2               resnet_dist.yaml (kd: dist)

(``kd_loss_weight: 2.`` in both; beta = gamma = 1 weighted by 2 is the paper's beta = gamma = 2.)
The engine passes ``protocol`` from the dataset (``kd_tf2.distillers._pairs.dataset_protocol``:
"imagenet" for ImageNet-like datasets, else "cifar"); ``beta`` / ``gamma`` / ``--temperature`` /
``--method_weight`` given explicitly win over the protocol's values.

Per replica: the intra-class term correlates each class column across this replica's samples
only (needs a per-replica batch >= 2); the value depends on the per-replica batch.
"""
from kd_tf2 import losses as kd_losses
from kd_tf2.checks import is_number
from kd_tf2.distillers import register
from kd_tf2.distillers._pairs import PROTOCOLS
from kd_tf2.distillers.base import Distiller
from kd_tf2.errors import UsageError

_PROTOCOL_DEFAULTS = {
    "cifar": dict(temperature=4.0, beta=1.0, gamma=1.0, method_weight=2.0),
    "imagenet": dict(temperature=1.0, beta=1.0, gamma=1.0, method_weight=2.0),
}


def _weight(name, value):
  if not is_number(value) or value < 0:
    raise UsageError(f"DIST {name}={value!r}: must be a number >= 0")
  return float(value)


@register("DIST")
class DIST(Distiller):
  """{"dist": method_weight * T^2 * (beta * inter + gamma * intra)}."""
  engine_hparams = ("protocol",)   # the engine passes the dataset's protocol
  # Class attributes = the "cifar" protocol (the default).
  method_weight = 2.0
  temperature = 4.0
  beta = 1.0
  gamma = 1.0

  @classmethod
  def defaults_for(cls, protocol):
    """{temperature, beta, gamma, method_weight} of the authors' config for ``protocol``."""
    if protocol not in _PROTOCOL_DEFAULTS:
      raise UsageError(f"DIST protocol={protocol!r}: accepted {', '.join(PROTOCOLS)}")
    return dict(_PROTOCOL_DEFAULTS[protocol])

  def __init__(self, student, teacher, *, beta=None, gamma=None, protocol="cifar", **kwargs):
    defaults = self.defaults_for(protocol)
    super().__init__(student, teacher, **kwargs)
    self.protocol = protocol
    explicit = dict(temperature=kwargs.get("temperature"),
                    method_weight=kwargs.get("method_weight"),
                    beta=None if beta is None else _weight("beta", beta),
                    gamma=None if gamma is None else _weight("gamma", gamma))
    for key, value in defaults.items():
      setattr(self, key, float(value if explicit[key] is None else explicit[key]))

  def build_connectors(self, s, t):
    if s.logits.shape[-1] != t.logits.shape[-1]:
      raise UsageError(f"DIST needs the same number of classes: student {self.student.arch} "
                       f"has {s.logits.shape[-1]}, teacher {self.teacher.arch} has "
                       f"{t.logits.shape[-1]}")

  def terms(self, s, t, batch, *, training=True):
    loss = kd_losses.dist(s.logits, t.logits, beta=self.beta, gamma=self.gamma,
                          temperature=self.temperature)
    return {"dist": self.method_weight * loss}

  def hparams(self):
    return dict(super().hparams(), beta=self.beta, gamma=self.gamma, protocol=self.protocol)
