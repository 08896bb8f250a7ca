"""Branched zoo nets: one staged net split after a chosen stage into m branches sharing its trunk.

Used by online distillation over branches (ONE, Lan et al. NeurIPS 2018, arXiv:1806.04606; CL, Song
& Chai NeurIPS 2018, arXiv:1805.11761). The branches are whole zoo nets of the same architecture:
branch 0 is the ``base`` net itself (its trunk is *the* trunk), branches 1..m-1 are further
instances whose own trunk layers are frozen and never run. Each branch with the shared trunk is
therefore a plain single-branch net of the zoo: ``export_branch`` copies the trunk into branch i
and the result saves and loads like any zoo net. The unused trunk copies cost parameters (not
compute); for a CIFAR ResNet split before its last stage they are the cheap low-resolution-free
half of the net (e.g. resnet32: 0.19M of 0.47M parameters).

Per branch the outputs follow the zoo contract (``nets.Outputs``): features / preacts are the
trunk's followed by the branch's stages, so offline feature methods apply to one branch.

Supported: ``nets.base.StagedNet`` (CIFAR ResNets, resnetv2, ShuffleNets). Shapes: images
[B, H, W, C] -> per branch ``Outputs(logits [B, K], ...)``; ``trunk`` also returns the shared map.
"""
from nets.base import StagedNet
from nets.outputs import Outputs


def check_branchable(net, split):
  """``ValueError`` unless ``net`` is a staged net that can be split after stage ``split``
  (1-based count of shared stages; 0 shares the stem only; < number of stages)."""
  if not isinstance(net, StagedNet):
    raise ValueError(f"{getattr(net, 'arch', net.name)} cannot be branched: only staged nets "
                     "(resnet*, ResNet18/34/50, ShuffleV1/V2) are supported")
  n = len(net.stages)
  if isinstance(split, bool) or not isinstance(split, int) or not 0 <= split < n:
    raise ValueError(f"split={split!r}: {net.arch} has {n} stages; the trunk must keep 0..{n - 1} "
                     "of them")


def default_split(net):
  """Share every stage but the last (ONE's and CL's choice for CIFAR ResNets)."""
  return len(net.stages) - 1


def trunk_layers(net, split):
  """The layers of the shared trunk: stem and the first ``split`` stages' blocks."""
  layers = [net.conv1, net.bn1]
  for blocks in net.stages[:split]:
    layers.extend(blocks)
  return layers


def freeze_trunk(net, split):
  """Mark a branch net's own (unused) trunk layers non-trainable."""
  for layer in trunk_layers(net, split):
    layer.trainable = False


def trunk(net, x, training, split):
  """Shared part of ``net``: -> (map [B, h, w, c], features list, preacts list)."""
  x, pre = net.stem(x, training)
  feats, preacts = [x], [pre]
  for blocks in net.stages[:split]:
    for block in blocks:
      x, pre = block(x, training=training)
    feats.append(x)
    preacts.append(pre)
  return x, feats, preacts


def branch(net, shared, training, split):
  """The branch ``net`` (its stages after ``split``, head, classifier) on the trunk's output
  ``shared = (map, features, preacts)`` -> ``Outputs`` of the whole branch."""
  x, feats, preacts = shared
  feats, preacts = list(feats), list(preacts)
  for blocks in net.stages[split:]:
    for block in blocks:
      x, pre = block(x, training=training)
    feats.append(x)
    preacts.append(pre)
  embedding = net.head(x, training)
  return Outputs(net.classifier(embedding), tuple(feats), tuple(preacts), embedding)


def export_branch(base, branch_net, split):
  """Copy ``base``'s trunk weights into ``branch_net`` (in place); returns ``branch_net``, now a
  plain zoo net computing branch i."""
  for src, dst in zip(trunk_layers(base, split), trunk_layers(branch_net, split)):
    for a, b in zip(src.weights, dst.weights):
      b.assign(a)
  return branch_net
