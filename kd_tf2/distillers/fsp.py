"""FSP - flow of solution procedure, as an initialisation stage.

Yim, Joo, Bae, Kim, "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and
Transfer Learning", CVPR 2017 (no arXiv id). METHODS.md §2.9 / §3 (RepDistiller ``--distill fsp``):

* ``init`` stage (``init_epochs``, default 30, constant base learning rate, no cross-entropy):
  the student's feature modules (every trainable variable but the classifier's) minimise the
  **unweighted** ``fsp(s.features, t.features)`` over RepDistiller's ``feat[:-1]`` = stem + stage
  outputs (``Outputs.features``, maps [B, H, W, C]): the sum over consecutive pairs l of
  mean((G_s^l - G_t^l)^2), G^l = fsp_matrix(f^l, f^(l+1)) of shape [B, C_l, C_(l+1)].
* main phase: cross-entropy only (plus the KD term if ``kd_weight`` is set). **method_weight has no
  effect**: RepDistiller's script passes ``-b 50`` but its main-stage FSP loss is 0; an explicit
  ``method_weight`` is accepted for uniformity and a warning says it is ignored.

The paper likewise trains the FSP loss first and the main task afterwards; the Zoo averages the
pairs (weight 1, 50 epochs); the catalog sums them (RepDistiller). The pair must have equal channel
counts at every position (spatial sizes may differ: pooling happens inside each network's FSP
matrix); other pairs are refused at build time. Per replica: the loss is a mean over this replica's
samples (no batch relation).
"""
import logging

from kd_tf2 import losses as kd_losses
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller, Stage, arch_name as _arch, feature_variables
from kd_tf2.errors import UsageError

_log = logging.getLogger(__name__)


@register("FSP")
class FSP(Distiller):
  """Main phase: no method term. Stage ``init``: {"fsp": fsp(s.features, t.features)}."""
  method_weight = 0.0
  init_epochs = 30

  def __init__(self, student, teacher, **kwargs):
    super().__init__(student, teacher, **kwargs)
    if kwargs.get("method_weight") is not None:
      _log.warning("FSP: method_weight=%s has no effect (the FSP loss acts only in the init "
                   "stage, unweighted; the main phase trains with cross-entropy only)",
                   kwargs["method_weight"])

  @property
  def needs_teacher(self):
    """The main phase reads the teacher only for the optional KD term."""
    return self.kd_weight != 0

  def build_connectors(self, s, t):
    pair = f"{_arch(self.student)} -> {_arch(self.teacher)}"
    if len(s.features) != len(t.features):
      raise UsageError(f"FSP cannot distil {pair}: the student has {len(s.features)} feature maps "
                       f"and the teacher {len(t.features)}; FSP needs the same positions")
    for i, (fs, ft) in enumerate(zip(s.features, t.features)):
      if fs.shape[-1] != ft.shape[-1]:
        raise UsageError(f"FSP cannot distil {pair}: channel counts differ at features[{i}] "
                         f"(student {fs.shape[-1]}, teacher {ft.shape[-1]}); FSP needs equal "
                         "channels at every position")

  def init_terms(self, s, t, batch, *, training=True):
    """The init stage's single, unweighted term."""
    del batch, training
    return {"fsp": kd_losses.fsp(s.features, t.features)}

  def stages(self):
    return [Stage("init", int(self.init_epochs), self.init_terms,
                  lambda: feature_variables(self.student))]
