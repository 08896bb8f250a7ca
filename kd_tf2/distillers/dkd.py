"""DKD - decoupled knowledge distillation.

Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022, arXiv:2203.08679.
METHODS.md §2.15 / §3, mdistiller's defaults: ``CE + warm * method_weight * dkd(z_s, z_t, y,
alpha, beta, T)`` on the logits [B, K] (equal K) and labels [B], alpha 1, beta 8, T 4 (the
``temperature`` shared with the KD term), CE weight 1, no separate KD term, method weight 1.

Per-pair beta (mdistiller ``configs/cifar100/dkd/*.yaml``), applied automatically when ``beta`` is
not given and reported in ``hparams()["pair_defaults"]`` (``kd_tf2.distillers._pairs``, the
mechanism ReviewKD's per-pair weight uses too): 6 for vgg13->vgg8, vgg13->MobileNetV2,
wrn_40_2->wrn_16_2 and wrn_40_2->wrn_40_1; 2 for resnet56->resnet20 and resnet110->resnet32; every
other pair 8. ImageNet (mdistiller ``configs/imagenet/*/dkd.yaml``: T 1, warm-up 1, beta 0.5 / 2)
is not a pair here: pass ``beta`` / ``--temperature`` / ``warmup``.

Warm-up (mdistiller): ``warm = min(epoch / warmup, 1)`` with mdistiller's 1-based epoch, i.e.
``min((self.epoch + 1) / warmup, 1)`` with the engine's 0-based ``self.epoch``; warmup = 20 epochs
(CIFAR; mdistiller uses 1 on ImageNet). ``warmup=0`` disables it. The factor changes per epoch,
never inside one.

Per replica: the loss is a mean over this replica's samples (no batch relation).
"""
import tensorflow as tf

from kd_tf2 import losses as kd_losses
from kd_tf2.checks import is_number
from kd_tf2.distillers import register
from kd_tf2.distillers._pairs import apply_pair_defaults, describe
from kd_tf2.distillers.base import Distiller
from kd_tf2.errors import UsageError


def _number(name, value, minimum=0.0):
  if not is_number(value) or value < minimum:
    raise UsageError(f"DKD {name}={value!r}: must be a number >= {minimum:g}")
  return float(value)


@register("DKD")
class DKD(Distiller):
  """{"dkd": warm(epoch) * method_weight * (alpha * TCKD + beta * NCKD)}."""
  method_weight = 1.0
  temperature = 4.0
  beta = 8.0
  _CFG = "mdistiller configs/cifar100/dkd/"
  pair_defaults = {("vgg8", "vgg13"): {"beta": 6.0}, ("MobileNetV2", "vgg13"): {"beta": 6.0},
                   ("wrn_16_2", "wrn_40_2"): {"beta": 6.0}, ("wrn_40_1", "wrn_40_2"): {"beta": 6.0},
                   ("resnet20", "resnet56"): {"beta": 2.0},
                   ("resnet32", "resnet110"): {"beta": 2.0}}
  pair_sources = {("vgg8", "vgg13"): _CFG + "vgg13_vgg8.yaml",
                  ("MobileNetV2", "vgg13"): _CFG + "vgg13_mv2.yaml",
                  ("wrn_16_2", "wrn_40_2"): _CFG + "wrn40_2_wrn_16_2.yaml",
                  ("wrn_40_1", "wrn_40_2"): _CFG + "wrn40_2_wrn_40_1.yaml",
                  ("resnet20", "resnet56"): _CFG + "res56_res20.yaml",
                  ("resnet32", "resnet110"): _CFG + "res110_res32.yaml"}

  def __init__(self, student, teacher, *, alpha=1.0, beta=None, warmup=20, **kwargs):
    super().__init__(student, teacher, **kwargs)
    self.alpha = _number("alpha", alpha)
    if beta is not None:
      self.beta = _number("beta", beta)
    self._pair_applied = apply_pair_defaults(self, {"beta": beta})
    self.warmup = _number("warmup", warmup)

  def build_connectors(self, s, t):
    if s.logits.shape[-1] != t.logits.shape[-1]:
      raise UsageError(f"DKD needs the same number of classes: student {self.student.arch} "
                       f"has {s.logits.shape[-1]}, teacher {self.teacher.arch} has "
                       f"{t.logits.shape[-1]}")

  def warm(self):
    """min((epoch + 1) / warmup, 1) as a float32 scalar (1 when warmup is 0)."""
    if not self.warmup:
      return tf.constant(1.0)
    return tf.minimum((tf.cast(self.epoch, tf.float32) + 1.0) / self.warmup, 1.0)

  def terms(self, s, t, batch, *, training=True):
    loss = kd_losses.dkd(s.logits, t.logits, batch["label"], alpha=self.alpha, beta=self.beta,
                         temperature=self.temperature)
    return {"dkd": self.warm() * self.method_weight * loss}

  def hparams(self):
    out = dict(super().hparams(), alpha=self.alpha, beta=self.beta, warmup=self.warmup)
    if self._pair_applied:
      out["pair_defaults"] = describe(self, self._pair_applied)
    return out
