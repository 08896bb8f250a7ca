"""NST - neuron selectivity transfer (polynomial kernel, d = 2, c = 0).

Huang, Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
arXiv:1707.01219. METHODS.md §2.4 / §3: ``method_weight * sum_l nst(f_s^l, f_t^l)`` over the stage
outputs (RepDistiller ``feat[1:-1]`` = ``Outputs.features[1:]``, maps [B, H, W, C]), weight 50
(RepDistiller ``-b 50``, mdistiller 50; the Zoo uses 10 on the last stage only; the paper's
Table weights differ again). Channel counts may differ (each net's channel Gram is its own); the
taller map is average-pooled to the other's size.

Stage pairs are formed as RepDistiller's ``zip``: stage l with stage l, up to the shorter list.
Per replica: the loss is a mean over this replica's samples (no batch relation).
"""
import tensorflow as tf

from kd_tf2 import losses as kd_losses
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller


@register("NST")
class NST(Distiller):
  """{"nst": method_weight * sum over stage pairs of nst(f_s, f_t)}."""
  method_weight = 50.0

  def terms(self, s, t, batch, *, training=True):
    pairs = zip(s.features[1:], t.features[1:])
    return {"nst": self.method_weight * tf.add_n([kd_losses.nst(fs, ft) for fs, ft in pairs])}
