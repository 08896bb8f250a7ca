"""IRG - instance relationship graph.

Liu, Cao, Li, Yuan, Hu, Li, Duan, "Knowledge Distillation via Instance Relationship Graph",
CVPR 2019 (no arXiv). METHODS.md §2.14 / §3: the Zoo's "one-to-one" IRG,
``method_weight * irg((fm1_s, fm2_s), (fm1_t, fm2_t), e_s, e_t, z_s, z_t, 0.1, 5, 5)`` with
fm1 / fm2 = the last two stage outputs (the Zoo's rb2 / rb3 of its 3-stage CIFAR nets, i.e.
``Outputs.features[-2]`` and ``features[-1]``, post-ReLU maps [B, H, W, C]),
e = ``Outputs.embedding`` [B, D], z = logits [B, K]; weight 1 (Zoo ``lambda 1``; RepDistiller has no
IRG). Vertex, edge and transformation weights 0.1 / 5 / 5 are keyword arguments.

Pairs it refuses (at build time): different numbers of classes, or a net whose last stage does not
relate to the one before it the way the Zoo's transformation term needs (the later map no larger in
H, W, with the same or twice the channels - e.g. MobileNetV2's 48 -> 160 channels).
Only the Zoo's one-to-one mode is implemented (one fm1 -> fm2 transformation per net).

Per replica: the edge matrices and the transformation normaliser (max over the batch) use this
replica's samples only; the value depends on the per-replica batch.
"""
from kd_tf2 import losses as kd_losses
from kd_tf2.checks import is_number
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller
from kd_tf2.errors import UsageError


def _weight(name, value):
  if not is_number(value) or value < 0:
    raise UsageError(f"IRG {name}={value!r}: must be a number >= 0")
  return float(value)


def _transform_problem(fm1, fm2):
  """Why the Zoo's fm1 -> fm2 transformation is undefined for these maps, or None."""
  (h1, w1, c1), (h2, w2, c2) = fm1.shape[1:], fm2.shape[1:]
  if h1 < h2 or w1 < w2:
    return f"its last stage ({h2}x{w2}) is larger than the one before ({h1}x{w1})"
  if c2 not in (c1, 2 * c1):
    return (f"its last stage has {c2} channels, the one before {c1} (needs the same or twice as "
            "many)")
  return None


@register("IRG")
class IRG(Distiller):
  """{"irg": method_weight * irg(last two stage maps, embeddings, logits)}."""
  method_weight = 1.0

  def __init__(self, student, teacher, *, w_vertex=0.1, w_edge=5.0, w_transform=5.0, **kwargs):
    super().__init__(student, teacher, **kwargs)
    self.w_vertex = _weight("w_vertex", w_vertex)
    self.w_edge = _weight("w_edge", w_edge)
    self.w_transform = _weight("w_transform", w_transform)

  def build_connectors(self, s, t):
    pair = f"student {self.student.arch}, teacher {self.teacher.arch}"
    if s.logits.shape[-1] != t.logits.shape[-1]:
      raise UsageError(f"IRG needs the same number of classes ({pair}): "
                       f"{s.logits.shape[-1]} vs {t.logits.shape[-1]}")
    for role, arch, out in (("student", self.student.arch, s), ("teacher", self.teacher.arch, t)):
      if len(out.features) < 3:
        raise UsageError(f"IRG needs two stage outputs per net; {role} {arch} has "
                         f"{len(out.features) - 1} ({pair})")
      problem = _transform_problem(out.features[-2], out.features[-1])
      if problem:
        raise UsageError(f"IRG cannot use {role} {arch} ({pair}): {problem}")

  def terms(self, s, t, batch, *, training=True):
    loss = kd_losses.irg(s.features[-2:], t.features[-2:], s.embedding, t.embedding, s.logits,
                         t.logits, w_vertex=self.w_vertex, w_edge=self.w_edge,
                         w_transform=self.w_transform)
    return {"irg": self.method_weight * loss}

  def hparams(self):
    return dict(super().hparams(), w_vertex=self.w_vertex, w_edge=self.w_edge,
                w_transform=self.w_transform)
