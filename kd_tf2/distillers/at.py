"""AT - attention transfer.

Zagoruyko, Komodakis, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer", ICLR 2017, arXiv:1612.03928.
METHODS.md §2.3 / §3: ``method_weight * sum_l at(f_s^l, f_t^l)`` over the stage outputs
(RepDistiller ``feat[1:-1]`` = ``Outputs.features[1:]``), p = 2, weight 1000 (``-b 1000``).

Pairs are formed as RepDistiller's ``zip`` does: stage l of the student with stage l of the teacher,
up to the shorter of the two lists; channel counts may differ and the taller map is pooled.
"""
import tensorflow as tf

from kd_tf2 import losses as kd_losses
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller


@register("AT")
class AT(Distiller):
  """{"at": method_weight * sum over stage pairs of attention_transfer(f_s, f_t, p)}."""
  method_weight = 1000.0

  def __init__(self, student, teacher, *, p=2.0, **kwargs):
    super().__init__(student, teacher, **kwargs)
    self.p = float(p)

  def terms(self, s, t, batch, *, training=True):
    pairs = list(zip(s.features[1:], t.features[1:]))
    terms = [kd_losses.attention_transfer(fs, ft, p=self.p) for fs, ft in pairs]
    return {"at": self.method_weight * tf.add_n(terms)}
