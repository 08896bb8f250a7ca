"""CRD - contrastive representation distillation (RepDistiller's full method).

Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020, arXiv:1910.10699.
METHODS.md §2.18 and §4, defaults of §3 (``-r 1 -a 0 -b 0.8``; CRD+KD is ``--kd_weight 1``):

* embeddings: v_s = normalize(W_s e_s + b_s), v_t = normalize(W_t e_t + b_t), linear
  D -> ``feat_dim`` (128) on ``Outputs.embedding`` [B, D] of each net; both are trainable Keras
  layers of the distiller (PyTorch ``nn.Linear`` init), the teacher's embedding as well.
* memory banks: bank_s, bank_t [n_data, 128], uniform in +-1/sqrt(128/3), non-trainable variables of
  the distiller (checkpointed with it).
* indices [B, K+1] per sample (exact mode): column 0 its own ``batch["index"]``, then K = ``nce_k``
  (16384) indices drawn uniformly WITHOUT replacement from the training samples of *other* classes,
  as RepDistiller's data loader (with replacement only for a row whose class has fewer than K
  other-class samples, as ``np.random.choice(..., replace=K > len(...))``); the distiller draws them
  from ``train_labels``, or takes them from ``batch["contrast_idx"]`` [B, K+1] when the batch has it.
  ``replacement=True`` draws every row with replacement instead (the library's earlier rule, about
  15% duplicates per row at K = 16384 on CIFAR-100; cheaper: the exact draw costs ~0.19 s per
  64-sample batch on this 2-core CPU against ~0.02 s).
* scores against the other network's bank, T = ``nce_t`` (0.07):
  out_s[b, j] = exp(bank_t[idx[b, j]] . v_s[b] / T) (student anchor, teacher bank),
  out_t[b, j] = exp(bank_s[idx[b, j]] . v_t[b] / T) (teacher anchor, student bank), each divided by its normaliser Z = mean(out) * n_data, fixed from the first batch and then kept
  (two values, a non-trainable variable with a "fixed" flag, both checkpointed).
* L_crd = crd_contrast_loss(out_s / Z_s) + crd_contrast_loss(out_t / Z_t)
  (``kd_tf2.losses.crd_contrast_loss``, Eq. 18), weighted by ``method_weight`` (0.8).
* after the step the batch's bank rows move with momentum ``nce_m`` (0.5), without gradient:
  bank[i] <- normalize(m * bank[i] + (1 - m) * v[i]) (student embeddings into bank_s, teacher's into
  bank_t).

What the engine passes (constructor keywords, ``engine_hparams``): ``train_labels`` - int array [n_data], the label of
every index the data layer can emit (``Info.split_size`` entries: position in the full split), with
-1 for the samples outside the training subset (``--fraction``); such samples are never negatives.
``n_data`` is optional and, if given, must equal ``len(train_labels)``. The bank has one row per
index; the noise prior of the loss and the normaliser use the number of training samples
(labels >= 0), which is RepDistiller's ``n_data`` for a full split.

Library choices: K is capped at (training samples - 1) for small datasets (RepDistiller keeps K and
draws with replacement there); scores are computed as one [B, n_data] product with the
bank followed by a gather of the K+1 columns, the same numbers as RepDistiller's gathered rows with
O(B * n_data) memory instead of O(B * K * 128). When the step is not compiled as a whole, the
products are TensorFlow's matmul (faster on CPU than XLA's) and the gather + exp of both anchors,
then the loss, are XLA clusters (``jit_compile=True``): fused, the [B, K+1] gather, exp and logs
and their gradients (the gather's is a scatter into [B, n_data]) cost a few passes over memory
instead of one per op; on one CPU thread this saves about 30 of CRD's ~130 ms of extra CPU time per
wrn_40_2 -> wrn_16_2 step against one cluster holding the products too. Whether the step is
compiled as a whole is the engine's ``jit_compiled`` constructor keyword. ``terms`` reads the
sample indices from the batch, and ``after_step`` moves the banks with the step's embeddings (no
step of its own).

Per replica / tf.distribute: the loss is computed on the replica's batch (negatives drawn per
replica). The banks, Z and the flag are mirrored variables with per-replica updates
(aggregation NONE): every replica all-gathers the global batch's indices and embeddings and applies
the same momentum update to its own copy, and Z is the cross-replica mean of the first batch, so the
copies stay identical (the data layer never repeats an index within a global batch).
"""
import functools
import math

import numpy as np
import tensorflow as tf

from kd_tf2 import losses as kd_losses
from kd_tf2.checks import is_int, is_number
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller
from kd_tf2.errors import UsageError
from nets import layers as torch_layers
from op_util.ops import flatten_per_sample, l2_normalize


class NegativeSampler:
  """RepDistiller's negatives: per sample, k indices drawn uniformly WITHOUT replacement among the
  training samples of the other classes (``dataset/cifar100.py`` ``CIFAR100InstanceSample``:
  ``np.random.choice(cls_negative[target], k, replace=k > len(cls_negative[target]))``), i.e.
  with replacement only for a row whose class has fewer than k other-class samples.

  train_labels: int [n_data] (-1 = not a training sample). ``sampler(labels, k)`` -> int64 [B, k]
  indices whose label is >= 0 and differs from ``labels[b]``; rows are independent. Without
  replacement, each row is the first k of a random permutation (``tf.random.shuffle``, O(others)
  per row, rows in parallel) of its other-class positions; in an XLA-compiled step, where that op
  does not compile, the k smallest of independent uniform keys (the same distribution, O(B *
  n_active log k), about 5x slower on CPU).
  """

  def __init__(self, train_labels):
    labels = np.asarray(train_labels).reshape(-1).astype(np.int64)
    active = labels[labels >= 0]
    self.n_data = int(labels.size)
    self.n_active = int(active.size)
    self.num_classes = int(active.max()) + 1 if active.size else 0
    # Indices sorted by label: excluded samples (-1) first, then one block per class.
    self._order = np.argsort(labels, kind="stable").astype(np.int64)
    self._n_excluded = self.n_data - self.n_active
    self.class_counts = np.bincount(active, minlength=self.num_classes).astype(np.int64)
    # First position of each class block within the active part.
    self._start = (np.cumsum(self.class_counts) - self.class_counts).astype(np.int64)
    self._active_labels = np.sort(active)  # label of each position of the active part

  def min_others(self):
    """The smallest number of other-class samples over the classes present."""
    present = self.class_counts[self.class_counts > 0]
    return int(self.n_active - present.max()) if present.size else 0

  def with_replacement(self, labels, k):
    """Uniform draws WITH replacement among the other classes' samples: int64 [B, k]."""
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
    count = tf.gather(tf.constant(self.class_counts), labels)[:, None]
    start = tf.gather(tf.constant(self._start), labels)[:, None]
    others = self.n_active - count  # [B, 1]
    u = tf.random.uniform([tf.shape(labels)[0], k], dtype=tf.float32)
    pick = tf.minimum(tf.cast(u * tf.cast(others, tf.float32), tf.int64), others - 1)
    pos = self._n_excluded + pick + tf.where(pick >= start, count, tf.zeros_like(count))
    return tf.gather(tf.constant(self._order), pos)

  def without_replacement(self, labels, k, jit_compiled=False):
    """k distinct other-class samples per row (k <= every row's other-class count): [B, k]."""
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
    if not jit_compiled:
      count = tf.gather(tf.constant(self.class_counts), labels)
      start = tf.gather(tf.constant(self._start), labels)[:, None]
      pick = tf.map_fn(functools.partial(_first_k_of_a_permutation, k=k), self.n_active - count,
                       fn_output_signature=tf.TensorSpec([k], tf.int64),
                       parallel_iterations=64)  # [B, k] positions among the row's others
      pos = self._n_excluded + pick + tf.where(pick >= start, count[:, None], tf.zeros_like(pick))
      return tf.gather(tf.constant(self._order), pos)
    keys = tf.random.uniform([tf.shape(labels)[0], self.n_active], dtype=tf.float32)
    own = tf.equal(tf.constant(self._active_labels)[None, :], labels[:, None])
    keys = tf.where(own, tf.constant(2.0), keys)  # own class last: never among the k smallest
    _, pos = tf.math.top_k(-keys, k=k, sorted=False)
    active_order = tf.constant(self._order[self._n_excluded:])
    return tf.gather(active_order, tf.cast(pos, tf.int64))

  def __call__(self, labels, k, jit_compiled=False):
    if k > self.min_others():
      # Some class has fewer than k other-class samples: those rows draw with replacement.
      labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
      few = tf.gather(tf.constant(self.n_active - self.class_counts < k), labels)[:, None]
      if k > self.n_active - 1:
        return self.with_replacement(labels, k)
      return tf.where(few, self.with_replacement(labels, k),
                      self.without_replacement(labels, k, jit_compiled))
    return self.without_replacement(labels, k, jit_compiled)


@tf.autograph.experimental.do_not_convert  # plain ops: nothing for AutoGraph to rewrite
def _first_k_of_a_permutation(n, k):
  """[k] int64: the first k of a uniformly random permutation of range(n) (n >= 1; for n < k the
  permutation repeats - such rows are the caller's to replace)."""
  perm = tf.random.shuffle(tf.range(n))
  return tf.tile(perm, [(k + n - 1) // n])[:k]


def _dots(v, bank):
  """bank . v[b]: v [B, D], bank [N, D] (constant) -> [B, N], one product with the whole bank."""
  return tf.matmul(v, bank, transpose_b=True)


def _exp_scores(dots_s, dots_t, idx, temperature):
  """exp(dots[b, idx[b, j]] / T) of both anchors: dots_* [B, N], idx int32 [B, K+1] -> two
  [B, K+1]."""
  return tuple(tf.exp(tf.gather(dots, idx, axis=1, batch_dims=1) / temperature)
               for dots in (dots_s, dots_t))


def _contrast_pair(out_s, out_t, z, n_data):
  """crd_contrast_loss of both anchors' scores [B, K+1], each divided by its normaliser z[i]."""
  return (kd_losses.crd_contrast_loss(out_s / z[0], n_data)
          + kd_losses.crd_contrast_loss(out_t / z[1], n_data))


# The same, each an XLA cluster of its own, for steps that are not compiled as a whole (nesting
# them in an XLA-compiled step makes TF 2.21 compile for minutes). The bank products stay outside:
# TensorFlow's own matmul is faster on CPU than XLA's.
_FUSED = {f: tf.function(f, jit_compile=True) for f in (_exp_scores, _contrast_pair)}


def _int_at_least(key, value, low):
  if not (is_int(value) or isinstance(value, np.integer)) or value < low:
    raise UsageError(f"{key}={value!r} for method CRD: must be an integer >= {low}")
  return int(value)


def _replica_context():
  """The replica context when running under ``strategy.run`` with several replicas, else None."""
  ctx = tf.distribute.get_replica_context()
  return ctx if ctx is not None and ctx.num_replicas_in_sync > 1 else None


@register("CRD")
class CRD(Distiller):
  """{"crd": method_weight * (NCE(student anchor) + NCE(teacher anchor))} with memory banks."""
  method_weight = 0.8
  engine_hparams = ("train_labels", "jit_compiled")

  def __init__(self, student, teacher, *, train_labels=None, n_data=None, feat_dim=128,
               nce_k=16384, nce_t=0.07, nce_m=0.5, replacement=False, jit_compiled=False,
               **kwargs):
    super().__init__(student, teacher, **kwargs)
    self.jit_compiled = bool(jit_compiled)  # the step is XLA-compiled as a whole
    if train_labels is None:
      raise UsageError("method CRD needs train_labels: the label of every index of the training "
                       "split (-1 outside the training subset); the engine passes them")
    if np.asarray(train_labels).dtype.kind not in "iu":
      raise UsageError(f"train_labels for method CRD must be integers (class ids, -1 = not a "
                       f"training sample); got dtype {np.asarray(train_labels).dtype}")
    self.sampler = NegativeSampler(train_labels)
    if n_data is not None and n_data != self.sampler.n_data:
      raise UsageError(f"n_data={n_data!r} for method CRD: must equal len(train_labels) = "
                       f"{self.sampler.n_data}")
    if np.count_nonzero(self.sampler.class_counts) < 2:
      raise UsageError("method CRD needs training samples of at least 2 classes in train_labels "
                       "(negatives come from the other classes)")
    if not isinstance(replacement, (bool, np.bool_)):
      raise UsageError(f"replacement={replacement!r} for method CRD: must be True or False "
                       "(False: negatives without replacement, as RepDistiller)")
    self.replacement = bool(replacement)
    self.feat_dim = _int_at_least("feat_dim", feat_dim, 1)
    self.nce_k = _int_at_least("nce_k", nce_k, 1)
    self.num_negatives = min(self.nce_k, self.sampler.n_active - 1)
    if not is_number(nce_t) or nce_t <= 0:
      raise UsageError(f"nce_t={nce_t!r} for method CRD: must be a number > 0")
    if not is_number(nce_m) or not 0 <= nce_m < 1:
      raise UsageError(f"nce_m={nce_m!r} for method CRD: must be a number in [0, 1)")
    self.nce_t, self.nce_m = float(nce_t), float(nce_m)

    stdv = 1.0 / math.sqrt(self.feat_dim / 3.0)
    bank = dict(shape=(self.sampler.n_data, self.feat_dim), dtype="float32", trainable=False,
                initializer=torch_layers.uniform(stdv), aggregation="none")
    self.bank_s = self.add_weight(name="bank_s", **bank)
    self.bank_t = self.add_weight(name="bank_t", **bank)
    self.z = self.add_weight(name="z", shape=(2,), dtype="float32", initializer="zeros",
                             trainable=False, aggregation="none")
    self.z_fixed = self.add_weight(name="z_fixed", shape=(), dtype="bool", initializer="zeros",
                                   trainable=False, aggregation="none")

  def build_connectors(self, s, t):
    d_s, d_t = int(s.embedding.shape[-1]), int(t.embedding.shape[-1])
    self.embed_s = torch_layers.dense(self.feat_dim, d_s, "torch", name="embed_s")
    self.embed_t = torch_layers.dense(self.feat_dim, d_t, "torch", name="embed_t")
    self.embed_s.build((None, d_s))
    self.embed_t.build((None, d_t))

  def hparams(self):
    out = super().hparams()
    out.update(feat_dim=self.feat_dim, nce_k=self.num_negatives, nce_t=self.nce_t,
               nce_m=self.nce_m, n_data=self.sampler.n_data, replacement=self.replacement)
    return out

  # ------------------------------------------------------------------ pieces of the step
  def embed(self, s, t):
    """Unit-norm 128-d embeddings (float32) of both nets: ([B, 128], [B, 128])."""
    v_s = tf.cast(self.embed_s(flatten_per_sample(s.embedding)), tf.float32)
    v_t = tf.cast(self.embed_t(flatten_per_sample(t.embedding)), tf.float32)
    return l2_normalize(v_s, axis=1), l2_normalize(v_t, axis=1)

  def sample_indices(self, index, labels):
    """[B, K+1] int64: each sample's own index, then K negatives of other classes."""
    own = tf.cast(tf.reshape(index, [-1, 1]), tf.int64)
    if self.replacement:
      negatives = self.sampler.with_replacement(labels, self.num_negatives)
    else:
      negatives = self.sampler(labels, self.num_negatives, self.jit_compiled)
    return tf.concat([own, negatives], axis=1)

  def _scores(self, v_s, v_t, idx):
    """exp(bank[idx[b, j]] . v[b] / T) of the student anchor against the teacher bank and of the
    teacher anchor against the student bank: two [B, K+1]; the banks are constants."""
    banks = (tf.stop_gradient(tf.convert_to_tensor(b.value)) for b in (self.bank_t, self.bank_s))
    dots_s, dots_t = (_dots(v, bank) for v, bank in zip((v_s, v_t), banks))
    scores = _exp_scores if self.jit_compiled else _FUSED[_exp_scores]
    # int32 positions: the gather (and its gradient's scatter) index half the bytes.
    return scores(dots_s, dots_t, tf.cast(idx, tf.int32), self.nce_t)

  def _normalisers(self, out_s, out_t, training):
    """Z = mean(out) * n_data of the first training batch (global mean over replicas), then fixed
    (a call with ``training=False`` - ``setup``'s - leaves Z unset)."""
    means = tf.stop_gradient(tf.stack([tf.reduce_mean(out_s), tf.reduce_mean(out_t)]))
    replicas = _replica_context()
    if replicas is not None:
      means = replicas.all_reduce(tf.distribute.ReduceOp.MEAN, means)
    z = tf.where(self.z_fixed.value, self.z.value, means * float(self.sampler.n_active))
    if training:
      self.z.assign(z)
      self.z_fixed.assign(True)
    return z

  def contrast(self, v_s, v_t, idx, training=True):
    """The weighted CRD term of the batch (reads the banks, fixes Z on the first training call)."""
    out_s, out_t = self._scores(v_s, v_t, idx)  # student anchor: teacher bank, and vice versa
    z = self._normalisers(out_s, out_t, training)
    pair = _contrast_pair if self.jit_compiled else _FUSED[_contrast_pair]
    return self.method_weight * pair(out_s, out_t, z, float(self.sampler.n_active))

  def update_banks(self, index, v_s, v_t):
    """Momentum update of the batch's rows (global batch under several replicas)."""
    index = tf.cast(tf.reshape(index, [-1]), tf.int64)
    v_s, v_t = tf.stop_gradient(v_s), tf.stop_gradient(v_t)
    replicas = _replica_context()
    if replicas is not None:
      index, v_s, v_t = (replicas.all_gather(x, axis=0) for x in (index, v_s, v_t))
    for bank, v in ((self.bank_s, v_s), (self.bank_t, v_t)):
      rows = tf.gather(bank.value, index)
      new = l2_normalize(self.nce_m * rows + (1.0 - self.nce_m) * v, axis=1)
      bank.value.scatter_update(tf.IndexedSlices(new, index))

  # --------------------------------------------------------------------------- the hooks
  def terms(self, s, t, batch, *, training=True):
    # The data side may supply the [B, K+1] indices (RepDistiller's loader does); else draw them.
    if "contrast_idx" in batch:
      idx = tf.cast(batch["contrast_idx"], tf.int64)
    else:
      idx = self.sample_indices(batch["index"], batch["label"])
    v_s, v_t = self.embed(s, t)
    return {"crd": self.contrast(v_s, v_t, idx, training)}

  def after_step(self, batch, s, t):
    v_s, v_t = self.embed(s, t)
    self.update_banks(batch["index"], v_s, v_t)
