"""KD_SVD - self-supervised knowledge distillation using singular value decomposition.

Lee, Kim, Song, "Self-supervised Knowledge Distillation Using Singular Value Decomposition",
ECCV 2018, arXiv:1807.06819. METHODS.md §2.19 / §3: ``method_weight * kd_svd(f_s, f_t, k)`` over
the stage outputs of both nets (RepDistiller ``feat[1:-1]`` = ``Outputs.features[1:]``, maps
[B, H, W, C]), relating consecutive stages through their top right-singular vectors; k = 1,
weight 1 (mdistiller; RepDistiller's scripts do not run it), CE weight 1.

Catalog conventions (METHODS.md §5.9): the teacher's singular vectors get a canonical sign (largest
component positive) so the value does not depend on the SVD backend; any H, W (RepDistiller's
square-map reshape and mdistiller's reshape bug are not reproduced). The paper's custom SVD
gradient and its clipping of the distillation gradient to the CE gradient's norm are not done: the
decomposition and its gradient are those of ``kd_tf2.losses.kd_svd`` (TF's regularised ones).
XLA: the step compiles (``jit_unsupported`` stays None), but XLA's CPU decomposition kernels are
much slower than TF's default ones; prefer no ``--jit_compile`` for this method on CPU.

Pairs it refuses (at build time): different numbers of stages, a stage whose channel counts differ
between the nets, or a map with H*W < k+3 or C < k+3 (e.g. too small an input).

Per replica: the loss is a mean over this replica's samples (every relation is within one sample).
"""
from kd_tf2 import losses as kd_losses
from kd_tf2.checks import is_int
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller
from kd_tf2.errors import UsageError


@register("KD_SVD", "KDSVD")
class KDSVD(Distiller):
  """{"kd_svd": method_weight * kd_svd(features_s[1:], features_t[1:], k)}."""
  method_weight = 1.0

  def __init__(self, student, teacher, *, k=1, **kwargs):
    super().__init__(student, teacher, **kwargs)
    if not is_int(k) or k < 1:
      raise UsageError(f"KD_SVD k={k!r}: must be an integer >= 1 (default 1)")
    self.k = k

  def build_connectors(self, s, t):
    pair = f"student {self.student.arch}, teacher {self.teacher.arch}"
    s_maps, t_maps = s.features[1:], t.features[1:]
    if len(s_maps) != len(t_maps) or len(s_maps) < 2:
      raise UsageError(f"KD_SVD needs the same number (>= 2) of stages in both nets ({pair}): "
                       f"{len(s_maps)} vs {len(t_maps)}")
    need = self.k + 3
    for stage, (fs, ft) in enumerate(zip(s_maps, t_maps), start=1):
      if fs.shape[-1] != ft.shape[-1]:
        raise UsageError(f"KD_SVD needs equal channel counts per stage ({pair}): stage {stage} has "
                         f"{fs.shape[-1]} vs {ft.shape[-1]} channels")
      for role, f in (("student", fs), ("teacher", ft)):
        _, h, w, c = f.shape
        if h * w < need or c < need:
          raise UsageError(f"KD_SVD with k={self.k} needs maps with H*W >= {need} and C >= {need} "
                           f"({pair}): {role} stage {stage} is {h}x{w}x{c}")

  def terms(self, s, t, batch, *, training=True):
    loss = kd_losses.kd_svd(s.features[1:], t.features[1:], k=self.k)
    return {"kd_svd": self.method_weight * loss}

  def hparams(self):
    return dict(super().hparams(), k=self.k)
