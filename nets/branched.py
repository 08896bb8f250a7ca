"""Branched zoo nets: one net split after chosen stages into a tree of heads that share its trunk.

Used by online distillation over branches (ONE, Lan et al. NeurIPS 2018, arXiv:1806.04606; CL, Song
& Chai NeurIPS 2018, arXiv:1805.11761, whose "hierarchical ILR sharing" is the many-level tree;
OKDDip, Chen et al. AAAI 2020, arXiv:1912.00350). Works on every zoo net through the staged-forward
protocol of ``nets.base.ZooNet`` (stem -> stages -> head); no family is special here.

A ``Tree(splits, branches)``: ``splits`` = (s_1 < s_2 < ...) counts of shared stages, ``branches``
= (b_1, b_2, ...) children per node at each split. The trunk (stem + stages 1..s_1) is shared by
every head; at split l every node forks into b_l children, each with its own stages s_l+1..s_{l+1}
(the last level: up to the net's end, with the head and classifier). Heads = b_1·b_2·...; head h's
digits (d_1, d_2, ...) in base (b_1, b_2, ...) name its path, so heads of one group are contiguous.
One split level with m branches is ``Tree((s,), (m,))``.

The heads are whole zoo nets of one architecture, ``nets[h]``; ``nets[0]`` is the base net (the
trunk is its trunk). A segment of the tree runs on the net of the first head below it (the
"owner"); a net's parts owned by others are frozen and never run. So head h is a plain zoo net
once the parts it reads are copied in (``export_head``) — it saves and loads like any zoo net. The
unused copies cost parameters, not compute.

Per head the outputs follow contract 1 (``nets.Outputs``): features / preacts are the trunk's then
the head's path's, exactly what the exported net returns, so offline feature methods apply to one
head. Shapes: images [B, H, W, C] -> per head ``Outputs(logits [B, K], ...)``.
"""
import math

from nets.base import ZooNet
from nets.outputs import Outputs


class Tree:
  """The branching structure (integers only): ``splits`` increasing stage counts, ``branches`` the
  children per node at each split (same length)."""

  def __init__(self, splits, branches):
    self.splits, self.branches = tuple(splits), tuple(branches)
    self.heads = math.prod(self.branches)

  def __repr__(self):
    return f"Tree(splits={self.splits}, branches={self.branches})"

  def stride(self, level):
    """Heads below one child of a node at split ``level`` (0-based)."""
    return math.prod(self.branches[level + 1:])

  def owner(self, h, part):
    """The head whose net runs part ``part`` (0 stem, p = stage p, 1-based) of head h's path."""
    level = sum(part > s for s in self.splits) - 1  # the last split before the part; -1 = trunk
    return 0 if level < 0 else h - h % self.stride(level)

  def groups(self, level):
    """The heads below each node after split ``level``: a list of lists of head indices."""
    size = self.stride(level)
    return [list(range(g, g + size)) for g in range(0, self.heads, size)]


def check_branchable(net, split=None):
  """``ValueError`` unless ``net`` is a zoo net (only they have the staged-forward protocol) and,
  given ``split``, it can be cut after ``split`` stages (0..n-1)."""
  if not isinstance(net, ZooNet):
    raise ValueError(f"{getattr(net, 'arch', net.name)} cannot be branched: only zoo nets "
                     "(nets.create) are; an adapted model has no stages to split")
  if split is not None:
    check_tree(net, Tree((split,), (2,)))


def check_tree(net, tree, who=""):
  """``ValueError`` naming the bad value unless ``net`` is a zoo net that ``tree`` can split;
  ``who`` follows the value in the message (e.g. " for method CL")."""
  check_branchable(net)
  n = net.num_stages
  s, b = tree.splits, tree.branches
  if not _ints(s) or list(s) != sorted(set(s)) or s[0] < 0 or s[-1] >= n:
    raise ValueError(f"splits={joined(s)}{who}: {net.arch} has {n} stages; give increasing "
                     f"counts of shared stages in 0..{n - 1}")
  if not _ints(b) or len(b) != len(s) or min(b) < 2:
    raise ValueError(f"branches={joined(b)}{who}: must be an integer >= 2 per split level "
                     f"(splits={joined(s)})")


def _ints(values):
  return bool(values) and all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def joined(values):
  """(1, 2) -> '1-2': how splits/branches read in messages and settings (``--method_args``)."""
  return "-".join(str(v) for v in values)


def trunk_layers(net, split):
  """The layers of the stem and the first ``split`` stages of ``net``."""
  return [layer for part in net.part_layers()[:split + 1] for layer in part]


def trunk(net, x, training, split):
  """Stem and the first ``split`` stages of ``net`` -> ``Trace`` (map [B, h, w, c], features,
  preacts)."""
  return run(net, net.forward_stem(x, training), training, 0, split)


def run(net, trace, training, start, stop):
  """Stages ``start``..``stop - 1`` (0-based) of ``net`` on ``trace``."""
  for i in range(start, stop):
    trace = net.forward_stage(i, trace, training)
  return trace


def finish(net, trace, training):
  """``net``'s head and classifier on the trace after its last stage -> ``Outputs``."""
  feats, preacts, embedding = net.forward_head(trace, training)
  return Outputs(net.classifier(embedding), tuple(feats), tuple(preacts), embedding)


def branch(net, trace, training, split):
  """The branch ``net`` (its stages after ``split``, head, classifier) on a trunk's trace."""
  return finish(net, run(net, trace, training, split, net.num_stages), training)


def tree_outputs(nets, tree, root, training, at_split=None):
  """``Outputs`` of every head, head 0 first, from the trunk's trace ``root``.

  at_split(x, children) -> x: applied once to a node's output map where it forks (e.g. CL's
  backpropagation rescaling); None = identity."""
  n = nets[0].num_stages
  ends = tree.splits[1:] + (n,)

  def grow(trace, level, first):
    if at_split is not None:
      trace = trace._replace(x=at_split(trace.x, tree.branches[level]))
    outs = []
    for c in range(tree.branches[level]):
      h = first + c * tree.stride(level)
      child = run(nets[h], trace, training, tree.splits[level], ends[level])
      outs += grow(child, level + 1, h) if level + 1 < len(tree.splits) else [
          finish(nets[h], child, training)]
    return outs

  return grow(root, 0, 0)


def head_outputs(nets, tree, h, x, training):
  """``Outputs`` of head ``h`` alone: its path through the tree (what ``export_head`` computes)."""
  trace = nets[0].forward_stem(x, training)
  for i in range(nets[h].num_stages):
    trace = nets[tree.owner(h, i + 1)].forward_stage(i, trace, training)
  return finish(nets[h], trace, training)


def unused_layers(tree, h, net):
  """The layers of ``net`` (head h's net) that other nets run for head h: to freeze."""
  return [layer for p, layers in enumerate(net.part_layers()) if tree.owner(h, p) != h
          for layer in layers]


def freeze_unused(tree, h, net):
  for layer in unused_layers(tree, h, net):
    layer.trainable = False


def export_head(nets, tree, h):
  """Copy into ``nets[h]`` (in place) every part of head h's path that another net runs; returns
  ``nets[h]``, now a plain zoo net computing head h."""
  dst = nets[h].part_layers()
  for p, layers in enumerate(dst):
    src = tree.owner(h, p)
    if src != h:
      for a, b in zip(nets[src].part_layers()[p], layers):
        for va, vb in zip(a.weights, b.weights):
          vb.assign(va)
  return nets[h]


def default_split(net):
  """Share every stage but the last (ONE's and OKDDip's choice)."""
  return net.num_stages - 1


__all__ = ["Tree", "check_branchable", "check_tree", "trunk", "trunk_layers", "run", "finish",
           "branch", "tree_outputs", "head_outputs", "joined", "unused_layers", "freeze_unused",
           "export_head", "default_split"]
