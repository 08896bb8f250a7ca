"""BYOT - be your own teacher: the deepest classifier teaches heads attached to shallow stages.

Zhang, Song, Gao, Chen, Bao, Ma, "Be Your Own Teacher: Improve the Performance of Convolutional
Neural Networks via Self Distillation", ICCV 2019, arXiv:1905.08094. After every stage but the last
(the paper's setting; ``heads="1+2"``-style keyword: a chosen subset of stages 1..n-1) an auxiliary
head (``nets.exits.BottleneckHead``): a bottleneck (conv3x3/2 + BN + ReLU, repeated
until the map has the last stage's resolution; the last conv gives the embedding's width) + global
average pooling + an FC classifier. The net's own classifier is the deepest, teacher head. Loss
over the shallow heads i (q: logits [B, K], F: pooled features [B, d]):

    L = CE(q_C, y) + sum_i [ (1 - alpha) CE(q_i, y) + alpha KL(q_C^T || q_i^T)
                             + lambda mean_b ||F_i - F_C||^2 ]

q_C / F_C (the deepest logits and embedding) detached in the distillation terms. Checked against
the authors' public code (github.com/ArchipLab-LinfengZhang/pytorch-self-distillation-final,
``train.py``; the journal version): alpha = 0.3 (``--loss_coefficient``), lambda = 0.03
(``--feature_loss_coefficient``, here ``method_weight``), T = 3; the deepest head's CE has weight 1
(not 1 - alpha); the KL at temperature T is *not* multiplied by T^2 (they use the soft
cross-entropy, whose gradient is the KL's); F are pooled features (the deepest is the embedding,
not a map). Their feature term is the journal version's ||FC(F_i) - F_C|| (a learned FC adapter,
no square, one norm over the whole [B, d] batch, and skipped for the head after the second-last
stage although their comment says the shallowest); their comment gives the conference version's as
|F_i - F_C|^2, which we use for every shallow head as a per-sample squared distance averaged over
the batch. Their heads (attention map + separable-conv stacks) are not ours (README deviations).
Works on any zoo net (``Outputs.features`` and ``embedding``, contract 1): no branching needed.

Exports: the student (the full net) and, with ``early_exit``, ``exit<i>.keras`` per requested head:
a standalone ``nets.exits.EarlyExit`` running only the stem, stages 1..i and head i (any zoo net;
``nets.branched.trunk``); its logits equal the ``head<i>`` view. Each head's test accuracy is
logged (``head<i>``). Per replica: per-sample terms only (the heads' BatchNorm is synchronized like
the student's).
"""
import tensorflow as tf

from kd_tf2 import losses as kd_losses
from kd_tf2.distillers import register
from kd_tf2.distillers._online import _View
from kd_tf2.distillers.base import Distiller, arch_name, as_float32
from kd_tf2.errors import UsageError
from nets import branched as nb
from nets import exits as nx
from nets.base import ZooNet


def _stage_list(key, value, num_heads, who, why_none=""):
  """``heads`` / ``early_exit`` -> sorted stage indices 1..num_heads; UsageError naming the value
  and the accepted ones (``who``: the net's name; ``why_none``: why it has no head index)."""
  if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
    return ()
  accepted = (f"accepted: none, all, or head indices 1..{num_heads} (e.g. 1 or 1+2)"
              if num_heads >= 1 else
              f"accepted: none ({why_none or who + ' has fewer than 2 stages'})")
  if isinstance(value, str) and value.strip().lower() == "all" and num_heads >= 1:
    return tuple(range(1, num_heads + 1))
  items = value.split("+") if isinstance(value, str) else value
  items = items if isinstance(items, (list, tuple)) and items else [items]
  out = []
  for item in items:
    if isinstance(item, str) and item.strip().isdigit():
      item = int(item)
    if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= num_heads:
      raise UsageError(f"{key}={value!r} for BYOT on {who}: {accepted}")
    out.append(item)
  return tuple(sorted(set(out)))


@register("BYOT")
class BYOT(Distiller):
  """{"ce": CE(deepest), "byot_ce": (1-a) sum CE(q_i), "byot_kl": a sum KL_T(q_C||q_i),
  "byot_feat": lambda sum ||F_i - F_C||^2}. ``early_exit``: None, "all", an index, "1+2" or a
  list."""
  uses_teacher = False
  method_weight = 0.03
  temperature = 3.0

  def __init__(self, student, teacher, *, alpha=0.3, heads="all", early_exit=None, **kwargs):
    super().__init__(student, teacher, **kwargs)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
      raise UsageError(f"alpha={alpha!r} for BYOT: must be a number in [0, 1]")
    self.alpha = float(alpha)
    self.heads_arg, self.early_exit_arg = heads, early_exit
    # exits run a truncated zoo net (nets.exits); heads read any net's features (set in setup)
    zoo = isinstance(student, ZooNet)
    self.exits = _stage_list("early_exit", early_exit, student.num_stages - 1 if zoo else 0,
                             arch_name(student), "" if zoo else
                             f"{arch_name(student)} is not a zoo net: early exits need one")
    self.head_stages = ()
    for i in self.exits:
      try:
        nb.check_branchable(student, i)
      except ValueError as e:
        raise UsageError(f"early_exit={early_exit!r} for BYOT: {e}") from None
    self.image_shape = None

  def setup(self, input_shape):
    self.image_shape = tuple(int(d) for d in input_shape)
    return super().setup(input_shape)

  def build_connectors(self, s, t):
    del t
    heads = self.heads_arg
    self.head_stages = _stage_list("heads", heads, len(s.features) - 2, arch_name(self.student))
    if not self.head_stages:
      raise UsageError(f"heads={heads!r} for BYOT: needs at least one head (all, or stage "
                       "indices such as 1 or 1+2)")
    if set(self.exits) - set(self.head_stages):
      raise UsageError(f"early_exit={self.early_exit_arg!r} for BYOT: exits need heads; the "
                       f"heads are at stages {'+'.join(map(str, self.head_stages))} "
                       f"(heads={heads!r})")
    last = s.features[-1]
    width = int(s.embedding.shape[-1])
    heads = []
    for i in self.head_stages:
      f = s.features[i]
      steps, size = 0, int(f.shape[1])
      while size > int(last.shape[1]):
        size = (size + 1) // 2
        steps += 1
      head = nx.BottleneckHead(max(steps, 1), width, int(s.logits.shape[-1]),
                               self.synchronized_bn, name=f"head{i}")
      head(f)
      heads.append(head)
    self.heads = heads
    for i in self.exits:  # the exit's trunk must end where head i reads
      images = tf.zeros((1,) + self.image_shape, tf.float32)
      got = tuple(nb.trunk(self.student, images, False, i).features[-1].shape[1:])
      if got != tuple(s.features[i].shape[1:]):
        raise UsageError(f"early_exit={i} for BYOT: {arch_name(self.student)}'s trunk after "
                         f"stage {i} gives {got}, head {i} reads {tuple(s.features[i].shape[1:])}")

  def head_outputs(self, s, training):
    return [tuple(tf.cast(x, tf.float32) for x in h(s.features[i], training=training))
            for h, i in zip(self.heads, self.head_stages)]

  def head_at(self, stage):
    """The head reading stage ``stage``'s feature."""
    return self.heads[self.head_stages.index(stage)]

  def terms(self, s, t, batch, *, training=True):
    del t
    labels = batch["label"]
    deep_logits = tf.stop_gradient(s.logits)
    deep_feature = tf.stop_gradient(s.embedding)
    outs = self.head_outputs(s, training)
    ce = tf.add_n([self.cross_entropy(z, labels) for z, _ in outs])
    # the authors' code has no T^2 factor
    kl = tf.add_n([kd_losses.kl_without_t2(z, deep_logits, self.temperature) for z, _ in outs])
    feat = tf.add_n([tf.reduce_mean(tf.reduce_sum(tf.square(f - deep_feature), axis=-1))
                     for _, f in outs])
    return {"byot_ce": (1.0 - self.alpha) * ce, "byot_kl": self.alpha * kl,
            "byot_feat": self.method_weight * feat}

  def extra_exports(self):
    """``exit<i>``: standalone early-exit classifiers (``nets.exits.EarlyExit``)."""
    return {f"exit{i}": nx.export_exit(self.student, self.head_at(i), i, self.image_shape)
            for i in self.exits}

  def eval_models(self):
    def view(i):
      def fn(x, training):
        s = as_float32(self.student(x, training=training, features=True))
        return self.head_at(i)(s.features[i], training=training)[0]
      return _View(fn)
    return {f"head{i}": view(i) for i in self.head_stages}

  def hparams(self):
    return {**super().hparams(), "alpha": self.alpha,
            "heads": ",".join(map(str, self.head_stages)),
            "early_exit": ",".join(map(str, self.exits)) or "none"}
