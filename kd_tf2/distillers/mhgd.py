"""MHGD - graph-based distillation through a multi-head attention network.

Lee, Song, "Graph-based Knowledge Distillation by Multi-head Attention Network", BMVC 2019,
arXiv:1907.02226 (reference code: sseung0703/KD_methods_with_TF, TF1). METHODS.md §4 / §5.13.

* Points: the stage outputs ``Outputs.features[1:]`` (RepDistiller ``feat[1:-1]``), L >= 2 maps
  [B, H, W, C_l]; student and teacher must have the same number of points and equal channels at each.
* Compression (as KD_SVD, METHODS.md §2.19): X = reshape(f, [B, H*W, C]); the teacher keeps its
  first right-singular vector v_t [B, C] (unit, canonical sign: largest-magnitude component
  positive); the student takes, among its first 4, the one with the largest |cos| to v_t, sign-
  aligned to it: v_s [B, C]. Gradients flow through the student's SVD only.
* Attention (one module per consecutive pair (l-1, l), 8 heads, D = (C_(l-1) + C_l) // 2):
  K = BN(FC(v^l)), Q = BN(FC(v^(l-1))) [B, 8*D] split into heads, G[h, i, j] = <K_i^h, Q_j^h>,
  a sample-by-sample graph [8, B, B] (FC without bias, He fan-out init; BN eps 1e-5, momentum 0.1).
* ``attention`` stage (``init_epochs``, default 40 as in the reference; constant base learning
  rate; the student does not run): attention + estimator learn on the **teacher**: the estimator
  predicts v_t^l from v_t^(l-1): softmax_j(G) with random head drop (a head is kept for sample i
  when its N(0, 1) draw exceeds the mean draw over heads), aggregated ReLU(BN(FC(v_t^(l-1)))) per
  head, concatenated, FC(-> C_l, bias) and l2-normalised; loss sum_pairs mean_i(1 - <v_hat_i, v_t,i>).
* Main phase: the attention modules are frozen (inference-mode BN, not optimised);
  L = CE + method_weight * sum_pairs sum_{h,i} KL(softmax_j(tanh G_s) || softmax_j(tanh G_t))
  (summed over all entries, not averaged; KL direction student || teacher as in the code, §5.13),
  method_weight 1 (the reference adds the term unweighted). The distillation gradient is clipped
  **per variable** to the norm of that variable's main-task (CE [+ KD]) gradient times
  sigmoid(epoch of the main phase): ``train_step`` computes both gradients from one forward pass.

Differences from the reference, documented: the teacher vector's sign follows the catalog's
canonical rule (the reference leaves it to the SVD backend); singular vectors are unit-normalised
(the reference divides by sqrt(||v||^2 + 1e-3)); the vectors come from the eigendecomposition of
the smaller Gram matrix, shared with KD_SVD (``kd_tf2.losses.teacher_singular_vectors``), whose TF
gradient replaces the reference's custom eigen-decomposition gradient; the attention stage's weight decay is the engine's (PyTorch-coupled
5e-4, i.e. 2.5e-4 * ||w||^2, where the reference adds 5e-4 * ||w||^2 to the loss); the main phase's
weight decay is likewise added by the optimiser after the clipping, as in the reference.

Per replica: the graph relates the samples of this replica's batch (B_replica x B_replica); the
clipping uses this replica's gradients (the reference is single-device), the sum of the clipped
per-replica gradients is then all-reduced. Attention/estimator BN is synchronized when the
student's is.
"""
import keras
import tensorflow as tf

from kd_tf2 import losses as kd_losses
from kd_tf2.checks import is_int
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller, Stage, StepOutput, arch_name as _arch
from kd_tf2.errors import UsageError
from nets import layers as torch_layers
from op_util import l2_normalize

STUDENT_CANDIDATES = 4  # the student keeps its first 4 right-singular vectors (k + 3, k = 1)


def teacher_vector(f):
  """The teacher's first right-singular vector [B, C] of reshape(f, [B, H*W, C]), largest-magnitude
  component positive (``kd_tf2.losses.teacher_singular_vectors`` with k = 1)."""
  return kd_losses.teacher_singular_vectors(f, 1)[0][:, :, 0]


def student_vector(f, v_t):
  """The student's right-singular vector [B, C] best aligned with ``v_t`` [B, C] (of its first
  4), signed to make their cosine positive (``kd_tf2.losses.student_singular_vectors``)."""
  return kd_losses.student_singular_vectors(f, 1, v_t[:, :, None])[:, :, 0]


def _dense(units, use_bias, name):
  """tf.contrib fully_connected as configured in the reference (He fan-out truncated normal)."""
  return keras.layers.Dense(
      units, use_bias=use_bias, name=name, bias_initializer="zeros",
      kernel_initializer=keras.initializers.VarianceScaling(2.0, "fan_out", "truncated_normal"))


class GraphAttention(keras.layers.Layer):
  """Multi-head sample graph of one pair: (v_cur [B, C_l], v_prev [B, C_(l-1)]) -> G [H, B, B]."""

  def __init__(self, width, heads=8, synchronized_bn=False, **kwargs):
    super().__init__(**kwargs)
    self.width, self.heads = int(width), int(heads)
    self.sender = _dense(self.width * self.heads, False, "sender")
    self.sender_bn = torch_layers.batch_norm("sender_bn", synchronized=synchronized_bn)
    self.receiver = _dense(self.width * self.heads, False, "receiver")
    self.receiver_bn = torch_layers.batch_norm("receiver_bn", synchronized=synchronized_bn)

  def _heads(self, x):
    """[B, D*H] -> [H, B, D] (unit d*H + h of the FC feeds head h, as in the reference)."""
    return tf.transpose(tf.reshape(x, [-1, self.width, self.heads]), [2, 0, 1])

  def call(self, v_cur, v_prev, training=None):
    k = self._heads(self.sender_bn(self.sender(v_cur), training=training))
    q = self._heads(self.receiver_bn(self.receiver(v_prev), training=training))
    return tf.matmul(k, q, transpose_b=True)


class Estimator(keras.layers.Layer):
  """Predicts the unit vector v^l [B, C_l] from v^(l-1) [B, C_(l-1)] and the graph G [H, B, B]."""

  def __init__(self, in_channels, out_channels, heads=8, synchronized_bn=False, **kwargs):
    super().__init__(**kwargs)
    self.heads = int(heads)
    self.embed = _dense((int(in_channels) + int(out_channels)) // 2, False, "embed")
    self.embed_bn = torch_layers.batch_norm("embed_bn", synchronized=synchronized_bn)
    self.out = _dense(int(out_channels), True, "out")

  def call(self, v_prev, graph, training=None):
    weights = tf.nn.softmax(graph, axis=-1)                         # [H, B, B]
    if training:
      noise = tf.random.normal(tf.shape(weights[:, :, :1]))        # [H, B, 1]
      keep = noise - tf.reduce_mean(noise, axis=0, keepdims=True) > 0
      weights = weights * tf.cast(keep, weights.dtype)
    x = tf.nn.relu(self.embed_bn(self.embed(v_prev), training=training))  # [B, D]
    x = tf.einsum("hij,jd->ihd", tf.cast(weights, x.dtype), x)      # [B, H, D]
    x = tf.reshape(x, [-1, self.heads * x.shape[-1]])
    return l2_normalize(self.out(x), axis=-1)


def clip_distillation(g_main, g_dist, factor):
  """Per-variable sum g_main + g_dist * min(1, factor * ||g_main|| / ||g_dist||) (None-aware).

  A variable without a distillation gradient keeps its main gradient; one without a main gradient
  gets a zero-norm budget, hence no distillation gradient either.
  """
  out = []
  for gm, gd in zip(g_main, g_dist):
    if gd is None:
      out.append(gm)
      continue
    gd = tf.convert_to_tensor(gd)
    if gm is None:
      out.append(tf.zeros_like(gd))
      continue
    gm = tf.convert_to_tensor(gm)
    limit = factor * tf.norm(gm)
    scale = tf.minimum(1.0, limit / tf.maximum(tf.norm(gd), 1e-12))
    out.append(gm + gd * scale)
  return out


@register("MHGD")
class MHGD(Distiller):
  """{"mhgd": method_weight * sum_pairs KL(tanh G_s || tanh G_t)}, clipped distillation gradient;
  stage ``attention``: {"attention": sum_pairs mean(1 - cos(estimate, v_t))}."""
  method_weight = 1.0
  init_epochs = 40

  def __init__(self, student, teacher, *, heads=8, **kwargs):
    super().__init__(student, teacher, **kwargs)
    if not is_int(heads) or heads < 1:
      raise UsageError(f"MHGD heads={heads!r}: must be an integer >= 1 (the paper uses 8)")
    self.heads = heads

  def build_connectors(self, s, t):
    pair = f"{_arch(self.student)} -> {_arch(self.teacher)}"
    fs, ft = s.features[1:], t.features[1:]
    if len(fs) != len(ft) or len(fs) < 2:
      raise UsageError(f"MHGD cannot distil {pair}: the student has {len(fs)} stage outputs and the "
                       f"teacher {len(ft)}; MHGD needs the same number, at least 2")
    for i, (a, b) in enumerate(zip(fs, ft), start=1):
      if a.shape[-1] != b.shape[-1]:
        raise UsageError(f"MHGD cannot distil {pair}: channel counts differ at features[{i}] "
                         f"(student {a.shape[-1]}, teacher {b.shape[-1]}); MHGD needs equal "
                         "channels at every stage output")
      for who, m in (("student", a), ("teacher", b)):
        if m.shape[1] * m.shape[2] < STUDENT_CANDIDATES or m.shape[3] < STUDENT_CANDIDATES:
          raise UsageError(f"MHGD cannot distil {pair}: features[{i}] of the {who} is "
                           f"{m.shape[1]}x{m.shape[2]}x{m.shape[3]}; the SVD compression needs "
                           f"H*W >= {STUDENT_CANDIDATES} and C >= {STUDENT_CANDIDATES}")
    sync = self.synchronized_bn
    channels = [int(f.shape[-1]) for f in ft]
    self._num_pairs = len(channels) - 1
    for l in range(1, len(channels)):
      c_prev, c_cur = channels[l - 1], channels[l]
      # One attribute per module: tf.train.Checkpoint does not follow Keras' tracked lists.
      setattr(self, f"attention_{l}", GraphAttention((c_prev + c_cur) // 2, self.heads, sync,
                                                     name=f"attention_{l}"))
      setattr(self, f"estimator_{l}", Estimator(c_prev, c_cur, self.heads, sync,
                                                name=f"estimator_{l}"))

  @property
  def attentions(self):
    return [getattr(self, f"attention_{l}") for l in range(1, self._num_pairs + 1)]

  @property
  def estimators(self):
    return [getattr(self, f"estimator_{l}") for l in range(1, self._num_pairs + 1)]

  def module_variables(self):
    """Attention + estimator trainables: what the ``attention`` stage optimises."""
    return [v for m in self.attentions + self.estimators for v in m.trainable_variables]

  # ------------------------------------------------------------------- terms
  def terms(self, s, t, batch, *, training=True):
    del batch, training  # the attention modules are frozen: inference-mode BN
    v_t = [teacher_vector(f) for f in t.features[1:]]
    v_s = [student_vector(f, v) for f, v in zip(s.features[1:], v_t)]
    total = tf.constant(0.0)
    for l, attention in enumerate(self.attentions, start=1):
      g_s = tf.tanh(tf.cast(attention(v_s[l], v_s[l - 1], training=False), tf.float32))
      g_t = tf.tanh(tf.cast(attention(v_t[l], v_t[l - 1], training=False), tf.float32))
      total += kd_losses.kl_rows_sum(g_s, tf.stop_gradient(g_t))
    return {"mhgd": self.method_weight * total}

  def attention_terms(self, s, t, batch, *, training=True):
    """The attention stage's term, on the teacher only."""
    del s, batch
    v_t = [teacher_vector(f) for f in t.features[1:]]
    total = tf.constant(0.0)
    for l, (attention, estimator) in enumerate(zip(self.attentions, self.estimators), start=1):
      graph = tf.cast(attention(v_t[l], v_t[l - 1], training=training), tf.float32)
      guess = tf.cast(estimator(v_t[l - 1], graph, training=training), tf.float32)
      total += tf.reduce_mean(1.0 - tf.reduce_sum(guess * v_t[l], axis=-1))
    return {"attention": total}

  def variables_to_train(self):
    """Main phase: the student only (attention and estimator are frozen after their stage)."""
    return list(self.student.trainable_variables)

  def stages(self):
    return [Stage("attention", int(self.init_epochs), self.attention_terms,
                  self.module_variables, uses_student=False)]

  # -------------------------------------------------------------------- step
  def train_step(self, batch, ctx):
    """CE (+ KD) gradient plus the distillation gradient clipped per variable to
    ``sigmoid(epoch) * ||CE gradient||`` (reference ``Optimizer_w_MHGD``)."""
    images = batch["image"]
    t = self.teacher_outputs(images)
    with tf.GradientTape(persistent=True) as tape:
      s = self.student_outputs(images, training=True)
      terms = self.total_terms(s, t, batch, training=True)
      main = tf.add_n([v for k, v in terms.items() if k != "mhgd"])
      dist = terms["mhgd"]
    g_main = ctx.gradients(main, tape)
    g_dist = ctx.gradients(dist, tape)
    del tape
    factor = tf.sigmoid(tf.cast(self.epoch, tf.float32))
    ctx.apply(clip_distillation(g_main, g_dist, factor))
    return StepOutput(terms, s.logits)
