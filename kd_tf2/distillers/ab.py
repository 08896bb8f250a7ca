"""AB - activation boundaries, as an initialisation stage.

Heo, Lee, Yun, Choi, "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden
Neurons", AAAI 2019, arXiv:1811.03233. METHODS.md §2.10 / §3 (RepDistiller ``--distill abound``):

* Positions: the pre-ReLU stage outputs ``Outputs.preacts[1:]`` (RepDistiller ``feat[1:-1]`` with
  ``preact=True``), maps [B, H, W, C]; n = their number. Student map i goes through a connector:
  ``ConvReg(use_relu=False)`` (conv + BN onto the teacher's [H, W, C]) where the shapes differ, the
  identity where they are equal.
* ``init`` stage (``init_epochs``, default 30, constant base learning rate, no cross-entropy): the
  connectors and the student's feature modules (RepDistiller ``get_feat_modules``: every trainable
  variable but the classifier's and, for WRN students, the top ``bn1``, which produces the last
  preact and, as in RepDistiller's ``model_s.eval()``, runs in inference mode untrained)
  minimise  sum_i w_i * activation_boundary(conn_i(s_i), t_i, margin) * 3/1000,
  w_i = 2^(i - n + 1) (deepest 1, halving towards the input), margin 1, the criterion divided by B.
* main phase: cross-entropy only (plus KD if ``kd_weight`` is set); **method_weight has no effect**
  (RepDistiller's ``-b 1`` is inert: its main-stage AB loss is 0), a warning says so if it is given.
  The connectors are frozen after the stage (not optimised in the main phase) but stay part of the
  distiller, so a run resumed after the stage keeps them.

Zoo: margin 2, mean over elements, mean over 3 stages, weight 10, 50 epochs; the catalog follows
RepDistiller (§5.5). Both nets must expose the same number of positions, and every pair must be one
``ConvReg`` can map (Hs = 2 Ht, 2 Hs = Ht or Hs >= Ht); other pairs are refused at build time.
Per replica: the criterion is divided by this replica's batch (no batch relation); the connector BN
is synchronized when the student's is.
"""
import logging

import keras
import tensorflow as tf

from kd_tf2 import losses as kd_losses
from kd_tf2.checks import is_number
from kd_tf2.connectors import ConvReg
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller, Stage, arch_name as _arch, feature_variables
from kd_tf2.errors import UsageError

_log = logging.getLogger(__name__)


class _Identity(keras.layers.Layer):
  """The connector of a position whose student and teacher shapes already agree."""

  def call(self, x, training=None):
    del training
    return x


@register("AB")
class AB(Distiller):
  """Main phase: no method term. Stage ``init``: {"ab": sum_i w_i * AB(conn_i(s_i), t_i) * 3e-3}."""
  method_weight = 0.0
  init_epochs = 30

  def __init__(self, student, teacher, *, margin=1.0, **kwargs):
    super().__init__(student, teacher, **kwargs)
    if not is_number(margin) or margin < 0:
      raise UsageError(f"AB margin={margin!r}: must be a number >= 0")
    self.margin = float(margin)
    if kwargs.get("method_weight") is not None:
      _log.warning("AB: method_weight=%s has no effect (the AB loss acts only in the init stage "
                   "with the weights 2^(i-n+1)*3/1000; the main phase is cross-entropy only)",
                   kwargs["method_weight"])

  @property
  def needs_teacher(self):
    """The main phase reads the teacher only for the optional KD term."""
    return self.kd_weight != 0

  def build_connectors(self, s, t):
    pair = f"{_arch(self.student)} -> {_arch(self.teacher)}"
    s_pre, t_pre = s.preacts[1:], t.preacts[1:]
    if len(s_pre) != len(t_pre) or not s_pre:
      raise UsageError(f"AB cannot distil {pair}: the student has {len(s_pre)} stage outputs and "
                       f"the teacher {len(t_pre)}; AB needs the same number of positions")
    sync = self.synchronized_bn
    for i, (fs, ft) in enumerate(zip(s_pre, t_pre)):
      name = f"connector_{i}"
      if fs.shape[1:] == ft.shape[1:]:
        conn = _Identity(name=name)
      else:
        try:
          conn = ConvReg(fs.shape, ft.shape, use_relu=False, synchronized_bn=sync, name=name)
        except UsageError as e:
          raise UsageError(f"AB cannot distil {pair} at preacts[{i + 1}]: {e}") from None
      # One attribute per connector: tf.train.Checkpoint does not follow Keras' tracked lists.
      setattr(self, name, conn)
    self._num_connectors = n = len(s_pre)
    self.layer_weights = [2.0 ** (i - n + 1) * 3.0 / 1000.0 for i in range(n)]

  @property
  def connectors(self):
    """The connectors, shallowest first."""
    return [getattr(self, f"connector_{i}") for i in range(self._num_connectors)]

  def ab_loss(self, s, t, training):
    """sum_i w_i * activation_boundary(conn_i(s.preacts[i+1]), t.preacts[i+1], margin)."""
    terms = []
    for conn, w, fs, ft in zip(self.connectors, self.layer_weights, s.preacts[1:], t.preacts[1:]):
      guess = tf.cast(conn(fs, training=training), tf.float32)
      terms.append(w * kd_losses.activation_boundary(guess, ft, margin=self.margin))
    return tf.add_n(terms)

  def init_terms(self, s, t, batch, *, training=True):
    del batch
    return {"ab": self.ab_loss(s, t, training)}

  def connector_variables(self):
    return [v for conn in self.connectors for v in conn.trainable_variables]

  def variables_to_train(self):
    """Main phase: the student only (the connectors are frozen after the init stage)."""
    return list(self.student.trainable_variables)

  def head_bn(self):
    """The student's BatchNorm outside RepDistiller's feature modules that produces its last
    preact - WRN's top ``bn1`` (``get_feat_modules`` = conv1, block1..3) - or None."""
    if _arch(self.student).startswith("wrn_"):
      return self.student.bn1
    return None

  def init_variables(self):
    """Connectors + the student's feature modules (all but the classifier and the head BN)."""
    head = self.head_bn()
    skip = {id(v) for v in head.weights} if head is not None else set()
    return self.connector_variables() + [v for v in feature_variables(self.student)
                                         if id(v) not in skip]

  def stage_step(self, stage, batch, ctx):
    """RepDistiller's init stage runs the student in eval mode and only its feature modules in
    train mode: WRN's head BN (the last preact) uses its moving statistics and is not trained.
    ``trainable = False`` makes a Keras BatchNormalization run in inference mode; it is set while
    the step is traced (every trace of this stage)."""
    head = self.head_bn()
    if head is None:
      return super().stage_step(stage, batch, ctx)
    was = head.trainable
    head.trainable = False
    try:
      return super().stage_step(stage, batch, ctx)
    finally:
      head.trainable = was

  def stages(self):
    return [Stage("init", int(self.init_epochs), self.init_terms, self.init_variables)]
