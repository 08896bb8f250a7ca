"""OFD - a comprehensive overhaul of feature distillation (alias CO).

Heo, Kim, Yun, Park, Kwak, Choi, "A Comprehensive Overhaul of Feature Distillation", ICCV 2019,
arXiv:1904.01866. METHODS.md §2.11 / §5 item 6.

Points: the pre-ReLU stage outputs of both nets, ``Outputs.preacts[1:]`` (mdistiller
``preact_feats[1:]``). With unequal stage counts the LAST n stages of each net are paired
(n = the shorter count; mdistiller ``OFD._align_list`` keeps ``l[-n:]`` of both lists). At point i
of n (0 = shallowest paired point):

    L_i = ofd_distance(connector_i(s_pre_i), t_pre_i, margin_i)      # sum over elements / B
    {"ofd": method_weight * sum_i L_i / 2^(n-i-1)}

connector_i = conv1x1 (C_s -> C_t, no bias, He-normal fan-out) + BatchNorm (gamma 1, beta 0),
trained with the student. Spatial sizes that differ are average-pooled to the smaller one inside
``ofd_distance``. ``margin_i`` [C_t] = ``ofd_margin(gamma, beta)`` of the teacher BatchNorm that
produces the paired teacher preact (``teacher_preact_batchnorms``), computed once when the
distiller is built: the teacher's weights must be final by then (``refresh_margins()`` recomputes
them). mdistiller indexes its margins from the FIRST teacher stage while it pairs the last ones,
which only runs when those channel counts happen to agree; we take the paired stages' margins.

Teacher BatchNorm (``teacher_bn``): "batch" (default) follows clovaai/mdistiller, whose
``OFD.train()`` leaves the teacher in train mode: the teacher's BN normalises with the batch
statistics of the current (per-replica) batch. Unlike mdistiller, the teacher's moving statistics
are left untouched (they do not enter the step; the teacher stays exactly the loaded one).
"moving" runs the teacher in inference mode (moving statistics, the sseung0703 port and the
catalog's earlier choice, METHODS.md §5 item 6).

Defaults (METHODS.md §3, mdistiller; RepDistiller has no OFD): ``-r 1 -a 0 -b 1e-3`` (CIFAR; use
1e-4 for ImageNet-size runs).

Other catalog choices: margins from the BN parameters (not from batch statistics as in Zoo);
sum / B (not Zoo's mean).

Margins where the preact is not a plain BN output: for ResNet, ShuffleV1 and residual MobileNetV2
units the preact is BN + shortcut and the margin of that BN is used, as clovaai/mdistiller do. A
ShuffleV2 preact is concat[x1, BN output]; x1 is a ReLU output (never negative), for which every
margin <= 0 gives the same loss, so its channels get margin 0.

Per replica: the loss is a per-replica sum / B_replica; the connectors' BatchNorm uses per-replica
statistics unless the student uses synchronized BatchNorm.
"""
import contextlib
import re

import keras
import numpy as np
import tensorflow as tf

from kd_tf2 import losses as kd_losses
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller, as_float32
from kd_tf2.errors import UsageError
from nets import layers as torch_layers

__all__ = ["OFD", "OFDConnector", "teacher_preact_batchnorms", "teacher_margins",
           "batch_statistics"]

TEACHER_BN = ("batch", "moving")


# ------------------------------------------------------- the teacher's BN before each preact

def _batchnorms(model, pattern):
  """{tuple(int groups of ``pattern``): layer} over the model's BatchNorm layers whose reference
  (PyTorch state_dict) path matches ``pattern``."""
  found = {}
  for path, layer in model.torch_layers():
    match = re.fullmatch(pattern, path)
    if match and isinstance(layer, keras.layers.BatchNormalization):
      found[tuple(int(g) for g in match.groups())] = layer
  return found


def _last_bn_of_last_unit(model, prefix):
  """Per stage ``<prefix>{i}``: the last BN (``bn<k>``, largest k) of the stage's last unit."""
  bns = _batchnorms(model, prefix + r"(\d+)\.(\d+)\.bn(\d+)")
  out = []
  for stage in sorted({key[0] for key in bns}):
    unit = max(key[1] for key in bns if key[0] == stage)
    k = max(key[2] for key in bns if key[:2] == (stage, unit))
    out.append(bns[(stage, unit, k)])
  return out


def _wrn_bns(model):
  """WRN preacts are the next BN applied to each group's output (NETS.md §3)."""
  heads = _batchnorms(model, r"block(\d+)\.layer\.0\.bn1")
  top = _batchnorms(model, r"bn1")
  return [heads[key] for key in sorted(heads) if key[0] > 1] + [top[()]]


def _vgg_bns(model):
  """VGG preacts 1.. are each block's last BN output (block 0 is post-ReLU, not a point)."""
  bns = _batchnorms(model, r"block(\d+)\.(\d+)")
  blocks = sorted({key[0] for key in bns if key[0] >= 1})
  return [bns[max(key for key in bns if key[0] == b)] for b in blocks]


def _mobilenetv2_bns(model):
  """MobileNetV2 features 1.. are the outputs of stages (1, 2, 4, 6): the last unit's last BN."""
  from nets import mobilenetv2  # pylint: disable=import-outside-toplevel
  bns = _batchnorms(model, r"blocks\.(\d+)\.(\d+)\.conv\.(\d+)")
  out = []
  for stage in mobilenetv2._FEATURE_STAGES:  # pylint: disable=protected-access
    unit = max(key[1] for key in bns if key[0] == stage)
    out.append(bns[max(key for key in bns if key[:2] == (stage, unit))])
  return out


_LOCATORS = {
    "CifarResNet": lambda m: _last_bn_of_last_unit(m, "layer"),
    "ResNetV2": lambda m: _last_bn_of_last_unit(m, "layer"),
    "ShuffleNetV1": lambda m: _last_bn_of_last_unit(m, "layer"),
    "ShuffleNetV2": lambda m: _last_bn_of_last_unit(m, "layer"),
    "WideResNet": _wrn_bns,
    "VGG": _vgg_bns,
    "MobileNetV2": _mobilenetv2_bns,
}


def teacher_preact_batchnorms(model):
  """The BatchNorm layer that produces each stage preact ``Outputs.preacts[1:]`` of ``model``
  (clovaai/mdistiller ``get_bn_before_relu``), found by the reference state_dict paths of
  ``model.torch_layers()`` (NETS.md §4). Returns a list of ``keras.layers.BatchNormalization``,
  one per stage. A family without a known mapping raises ``UsageError``."""
  if hasattr(model, "preact_batchnorms"):  # kd_tf2.adapt models find theirs in the Keras graph
    return model.preact_batchnorms()
  # The family is the nearest class with a locator (ImageNetResNet is a ResNetV2).
  family = next((k.__name__ for k in type(model).__mro__ if k.__name__ in _LOCATORS),
                type(model).__name__)
  if family not in _LOCATORS:
    raise UsageError(f"OFD cannot locate the BatchNorm before the preacts of "
                     f"{getattr(model, 'arch', model.name)} (family {family}); "
                     f"known families: {', '.join(sorted(_LOCATORS))}")
  return _LOCATORS[family](model)


def teacher_margins(model, preact_channels):
  """Per stage preact: the OFD margin [C] (numpy float32) from the teacher's BN before it.

  ``preact_channels``: the channel count of each ``preacts[1:]`` entry. A ShuffleV2 preact has
  its first ``C - C_bn`` channels passed through from a ReLU output: they get margin 0.
  """
  bns = teacher_preact_batchnorms(model)
  arch = getattr(model, "arch", model.name)
  if len(bns) != len(preact_channels):
    raise UsageError(f"OFD found {len(bns)} BatchNorms before the preacts of {arch} but it has "
                     f"{len(preact_channels)} stage preacts")
  margins = []
  for i, (bn, channels) in enumerate(zip(bns, preact_channels)):
    margin = kd_losses.ofd_margin(bn.gamma, bn.beta).numpy()
    passthrough = channels - margin.shape[0]
    shufflev2_half = type(model).__name__ == "ShuffleNetV2" and passthrough > 0
    if passthrough and not shufflev2_half:
      raise UsageError(f"OFD: teacher {arch} preact {i + 1} has {channels} channels but the "
                       f"BatchNorm before it has {margin.shape[0]}")
    margins.append(np.concatenate([np.zeros([passthrough], np.float32), margin]))
  return margins


@contextlib.contextmanager
def batch_statistics(model):
  """While active (i.e. while a call is traced or run eagerly), ``model``'s BatchNorm layers called
  with ``training=True`` normalise with batch statistics and leave their moving statistics as they
  are: each BN is made trainable (a frozen Keras BN would ignore ``training``) with momentum 1
  (moving <- 1 * moving + 0 * batch, the same value). Restored on exit."""
  saved = []
  if hasattr(model, "torch_layers"):
    layers = [layer for _, layer in model.torch_layers()]
  else:  # a kd_tf2.adapt model
    layers = model._flatten_layers(include_self=False)  # pylint: disable=protected-access
  for layer in layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      saved.append((layer, layer.trainable, layer.momentum))
      layer.trainable, layer.momentum = True, 1.0
  try:
    yield
  finally:
    for layer, trainable, momentum in saved:
      layer.trainable, layer.momentum = trainable, momentum


# ------------------------------------------------------------------------------- connector

@keras.saving.register_keras_serializable(package="kd_tf2")
class OFDConnector(keras.layers.Layer):
  """conv1x1 (C_s -> C_t, no bias, N(0, sqrt(2/C_t))) + BatchNorm: [B, H, W, C_s] -> [B, H, W, C_t]
  (clovaai/mdistiller ``build_feature_connector``)."""

  def __init__(self, out_channels, synchronized_bn=False, **kwargs):
    super().__init__(**kwargs)
    self.out_channels, self.synchronized_bn = int(out_channels), bool(synchronized_bn)
    self.conv = torch_layers.Conv2D(self.out_channels, 1, use_bias=False,
                                    kernel_initializer=torch_layers.he_normal_fan_out(), name="conv")
    self.bn = torch_layers.batch_norm("bn", synchronized=self.synchronized_bn)

  def call(self, x, training=None):
    return self.bn(self.conv(x), training=training)

  def get_config(self):
    config = super().get_config()
    config.update(out_channels=self.out_channels, synchronized_bn=self.synchronized_bn)
    return config


# ------------------------------------------------------------------------------- distiller

@register("OFD", "CO")
class OFD(Distiller):
  """{"ofd": method_weight * sum_i ofd_distance(connector_i(s_pre_i), t_pre_i, m_i) / 2^(n-i-1)}."""
  method_weight = 1e-3

  def __init__(self, student, teacher, *, teacher_bn="batch", **kwargs):
    super().__init__(student, teacher, **kwargs)
    if teacher_bn not in TEACHER_BN:
      raise UsageError(f"OFD teacher_bn={teacher_bn!r}: accepted {', '.join(TEACHER_BN)}")
    self.teacher_bn = teacher_bn

  def teacher_outputs(self, images):
    """The teacher's ``Outputs`` (stop-gradient, float32); its BN uses batch statistics when
    ``teacher_bn == "batch"`` (mdistiller), moving statistics when "moving"."""
    if self.teacher_bn == "moving":
      return super().teacher_outputs(images)
    with batch_statistics(self.teacher):
      out = self.teacher(images, training=True, features=True)
    return as_float32(tf.nest.map_structure(tf.stop_gradient, out))

  @staticmethod
  def _paired(s_list, t_list):
    """The last n entries of each list, n = the shorter length (mdistiller ``_align_list``)."""
    n = min(len(s_list), len(t_list))
    return list(s_list[len(s_list) - n:]), list(t_list[len(t_list) - n:])

  def build_connectors(self, s, t):
    s_pre, t_pre = self._paired(s.preacts[1:], t.preacts[1:])
    if not s_pre:
      raise UsageError(f"OFD needs stage preacts; {self.student.arch} has "
                       f"{len(s.preacts) - 1} and {self.teacher.arch} has {len(t.preacts) - 1}")
    self.connectors = [
        OFDConnector(int(tp.shape[-1]), self.synchronized_bn,
                     name=f"connector_{i}")
        for i, tp in enumerate(t_pre)]
    self._t_channels = [int(tp.shape[-1]) for tp in t.preacts[1:]]
    self.refresh_margins()

  def refresh_margins(self):
    """(Re)compute the paired points' margins from the teacher's current BatchNorm parameters."""
    margins = teacher_margins(self.teacher, self._t_channels)
    self._margins = tuple(margins[len(margins) - len(self.connectors):])

  def terms(self, s, t, batch, *, training=True):
    n = len(self.connectors)
    terms = []
    s_pre, t_pre = self._paired(s.preacts[1:], t.preacts[1:])
    for i, (connector, sp, tp) in enumerate(zip(self.connectors, s_pre, t_pre)):
      guess = tf.cast(connector(sp, training=training), tf.float32)
      distance = kd_losses.ofd_distance(guess, tp, tf.constant(self._margins[i]))
      terms.append(distance / float(2 ** (n - i - 1)))
    return {"ofd": self.method_weight * tf.add_n(terms)}

  def hparams(self):
    return dict(super().hparams(), teacher_bn=self.teacher_bn)
