"""CC - correlation congruence.

Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019, arXiv:1904.01802.
METHODS.md §2.8 / §3. Two forms, chosen by ``form``:

* ``form="repdistiller"`` (default; RepDistiller ``--distill correlation``, ``train_student.py``
  and ``distiller_zoo/CC.py``, the form whose numbers the README compares against): both penultimate
  embeddings (``Outputs.embedding`` [B, D_s], [B, D_t]) go through their own trainable
  ``LinearEmbed`` (a linear layer D -> ``feat_dim`` = 128 with bias, PyTorch ``nn.Linear`` init;
  the teacher's embed is trained too, with the student), delta = |W_s e_s - W_t e_t| [B, 128], and
      L = mean_{i=0..B-2} sum_d delta[i, d] * delta[i+1, d]   (consecutive samples of the batch),
  weight 0.02 (``-b 0.02``).
* ``form="zoo"`` (the KD-Zoo / paper kernel form, no parameters):
  ``correlation_congruence(e_s, e_t, gamma, order)`` - Gaussian RBF on the l2-normalised
  embeddings, Taylor-expanded to order P, gamma 0.4, P = 2 - weight 100 (Zoo) when
  ``method_weight`` is not given.

The paper also adds an instance-level KD term (use ``--kd_weight``) and a class-aware batch sampler
(not done, as neither reference does). Per replica: both forms relate this replica's samples only
(consecutive pairs, or the B x B correlation matrices); the value depends on the per-replica batch.
"""
import tensorflow as tf

from kd_tf2 import losses as kd_losses
from kd_tf2.checks import is_int, is_number
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller
from kd_tf2.errors import UsageError
from nets import layers as torch_layers
from op_util.ops import flatten_per_sample

FORMS = ("repdistiller", "zoo")
ZOO_WEIGHT = 100.0


@register("CC")
class CC(Distiller):
  """repdistiller: {"cc": b * mean_i sum_d |E_s - E_t|_i |E_s - E_t|_(i+1)} with trainable embeds;
  zoo: {"cc": b * correlation_congruence(embedding_s, embedding_t, gamma, order)}."""
  method_weight = 0.02

  def __init__(self, student, teacher, *, form="repdistiller", feat_dim=128, gamma=0.4, order=2,
               **kwargs):
    super().__init__(student, teacher, **kwargs)
    if form not in FORMS:
      raise UsageError(f"CC form={form!r}: accepted: {', '.join(FORMS)}")
    if not is_int(feat_dim) or feat_dim < 1:
      raise UsageError(f"CC feat_dim={feat_dim!r}: must be an integer >= 1 (default 128)")
    if not is_number(gamma) or gamma <= 0:
      raise UsageError(f"CC gamma={gamma!r}: must be a number > 0 (default 0.4)")
    if not is_int(order) or order < 0:
      raise UsageError(f"CC order={order!r}: must be an integer >= 0 (default 2)")
    self.form, self.feat_dim = form, feat_dim
    self.gamma, self.order = float(gamma), order
    if form == "zoo" and kwargs.get("method_weight") is None:
      self.method_weight = ZOO_WEIGHT

  def build_connectors(self, s, t):
    if self.form != "repdistiller":
      return
    d_s = int(flatten_per_sample(s.embedding).shape[-1])
    d_t = int(flatten_per_sample(t.embedding).shape[-1])
    self.embed_s = torch_layers.dense(self.feat_dim, d_s, "torch", name="embed_s")
    self.embed_t = torch_layers.dense(self.feat_dim, d_t, "torch", name="embed_t")
    self.embed_s.build((None, d_s))
    self.embed_t.build((None, d_t))

  def terms(self, s, t, batch, *, training=True):
    if self.form == "zoo":
      loss = kd_losses.correlation_congruence(s.embedding, t.embedding, gamma=self.gamma,
                                              order=self.order)
      return {"cc": self.method_weight * loss}
    e_s = tf.cast(self.embed_s(flatten_per_sample(s.embedding)), tf.float32)
    e_t = tf.cast(self.embed_t(flatten_per_sample(t.embedding)), tf.float32)
    delta = tf.abs(e_s - e_t)
    loss = tf.reduce_mean(tf.reduce_sum(delta[:-1] * delta[1:], axis=1))
    return {"cc": self.method_weight * loss}

  def hparams(self):
    out = dict(super().hparams(), form=self.form)
    if self.form == "zoo":
      out.update(gamma=self.gamma, order=self.order)
    else:
      out.update(feat_dim=self.feat_dim)
    return out
