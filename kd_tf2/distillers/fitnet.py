"""FitNet - hints through a learned regressor.

Romero, Ballas, Kahou, Chassang, Gatta, Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015,
arXiv:1412.6550. METHODS.md §4 and §3: L_hint = MSE(r(f_s), f_t) (mean over all elements) at
``Outputs.features[hint_layer]`` of both nets, ``hint_layer = 2`` (RepDistiller's default: the middle
stage, not ``feat[-2]``), r = ``ConvReg`` (conv + BN + ReLU), weight 100 (``-b 100``), single stage
with the cross-entropy (catalog choice, = RepDistiller).

The paper's first stage is available with ``init_epochs > 0``: a ``hint`` stage before the main
phase optimises the regressor and the student (only the layers up to the hint point receive a
gradient, the rest stay untouched) on the same weighted hint loss, without cross-entropy, at the
constant base learning rate. The main phase stays RepDistiller's (hint + CE); for the paper's
second stage (KD only) add ``--method_weight 0 --kd_weight ...``.
"""
import tensorflow as tf

from kd_tf2.checks import is_int
from kd_tf2.connectors import ConvReg
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller, Stage
from kd_tf2.errors import UsageError


@register("FitNet")
class FitNet(Distiller):
  """{"hint": method_weight * MSE(ConvReg(f_s[h]), f_t[h])}; optional ``hint`` stage."""
  method_weight = 100.0
  init_epochs = 0

  def __init__(self, student, teacher, *, hint_layer=2, **kwargs):
    super().__init__(student, teacher, **kwargs)
    if not is_int(hint_layer):
      raise UsageError(f"hint_layer={hint_layer!r}: must be an integer feature position")
    self.hint_layer = hint_layer

  def build_connectors(self, s, t):
    h = self.hint_layer
    n = min(len(s.features), len(t.features))
    if not -n <= h < n:
      raise UsageError(f"FitNet hint_layer={h} is out of range for {self.student.name} "
                       f"({len(s.features)} feature maps) and {self.teacher.name} "
                       f"({len(t.features)}); accepted: 0..{n - 1}")
    self.regressor = ConvReg(s.features[h].shape, t.features[h].shape, use_relu=True,
                             synchronized_bn=self.synchronized_bn,
                             name="regressor")

  def hint(self, s, t, training):
    """MSE between the regressed student map and the teacher map at the hint position."""
    h = self.hint_layer
    guess = tf.cast(self.regressor(s.features[h], training=training), tf.float32)
    return tf.reduce_mean(tf.square(guess - t.features[h]))

  def terms(self, s, t, batch, *, training=True):
    return {"hint": self.method_weight * self.hint(s, t, training)}

  def stages(self):
    if not self.init_epochs:
      return []

    def variables():
      return list(self.student.trainable_variables) + list(self.regressor.trainable_variables)

    return [Stage("hint", int(self.init_epochs), self.terms, variables)]  # the hint alone
