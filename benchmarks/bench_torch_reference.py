"""PyTorch re-statement of the reference training step of each KD method, to time it on our CPU.

    /work/torchvenv/bin/python benchmarks/bench_torch_reference.py --arch=wrn_16_2 \\
        --teacher_arch=wrn_40_2 [--methods=all --batch_size=64 --steps=10 --warmup=3 --threads=1 \\
        --json=PATH]

torch is NOT a kd_tf2 dependency: run this file with an interpreter that has torch (e.g. a
separate venv: ``python3 -m venv /work/torchvenv && /work/torchvenv/bin/pip install torch numpy``);
without torch it exits with one line. It imports nothing from kd_tf2, so it runs anywhere.

What one step is (RepDistiller ``helper/loops.py`` ``train_distill``; Zoo / mdistiller / DIST_KD
loops for the methods taken from them): student forward in train mode, teacher forward in eval
mode under ``torch.no_grad``, the reference loss of the method (METHODS.md names the reference;
each loss below restates how that code computes it, with its tensor shapes, since the shapes are
what the step costs), ``zero_grad``, ``backward``, SGD (momentum 0.9, weight decay 5e-4) over the
student and the method's trainable modules, then ``loss.item()``. Like RepDistiller, its methods
always run the teacher and the soft-target KL term (even when ``-a 0`` or when the main-phase
method loss is 0: AB, FSP); ``none`` is RepDistiller's ``train_vanilla`` (student alone).

Nets: written here from /work/shared/NETS.md (CIFAR ResNet and WRN, NCHW, same feature
positions as ``nets``), parameter counts asserted equal to those of our nets.

Rows: ``none`` (student alone), ``floor`` (student step + teacher forward), then each method;
each row gets fresh nets and is timed interleaved step by step with a student-alone and a floor
step on their own copies, as ``python -m kd_tf2.bench speed`` does, so ``ratio_to_student`` and
``ratio_to_floor`` are medians of paired per-round ratios. ``ms_per_step`` is the median over
``--steps`` timed steps after ``--warmup`` untimed ones; ``cpu_ms_per_step`` the same in process
CPU time. Output: JSON rows with the keys of ``kd_tf2.bench.speed`` (``--json``) and markdown.

Deliberate departures from the reference code, none of which changes its cost noticeably: CRD's
negatives are drawn inside the step (vectorised) instead of in RepDistiller's DataLoader workers;
the data are random normal images; DKD's warm-up factor is 1.
"""

import argparse
import math
import json
import os
import platform
import statistics
import sys
import time
from typing import List, NamedTuple

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:
    print("bench_torch_reference.py: torch is not installed (it is not a kd_tf2 dependency); "
          "run it with an interpreter that has torch, e.g. python3 -m venv /work/torchvenv && "
          "/work/torchvenv/bin/pip install torch numpy", file=sys.stderr)
    sys.exit(2)

PROG = "bench_torch_reference.py"
STUDENT, FLOOR = "none", "floor"

# Trainable parameter counts of our nets for 100 classes (NETS.md §2, equal to nets.create(...)).
PARAMS_100 = {"resnet8x4": 1233540, "resnet32x4": 7433860,
              "wrn_16_2": 703284, "wrn_40_2": 2255156}


def fail(message):
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------- nets (NETS.md)

class Outputs(NamedTuple):
    """Like ``nets.Outputs``: stage maps (NCHW) stem first, their pre-activations, the pooled
    embedding [B, D] and the logits [B, K]."""
    logits: torch.Tensor
    features: List[torch.Tensor]
    preacts: List[torch.Tensor]
    embedding: torch.Tensor


def _he_fan_out(module):
    """NETS.md §1.5: convs N(0, sqrt(2 / (kh*kw*out))), BN gamma 1 / beta 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """CIFAR ResNet block (NETS.md §2.1): returns (ReLU(pre), pre)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        pre = h + (x if self.downsample is None else self.downsample(x))
        return F.relu(pre), pre


class CifarResNet(nn.Module):
    """resnet8...110, resnet8x4, resnet32x4 (NETS.md §2.1)."""

    def __init__(self, widths, blocks, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, cin = [], widths[0]
        for i, cout in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            stages.append(nn.ModuleList(
                [BasicBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1)
                 for j in range(blocks)]))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(widths[-1], num_classes)
        _he_fan_out(self)

    def forward(self, x, preact=False):
        del preact  # every block computes its pre-activation anyway
        h = F.relu(self.bn1(self.conv1(x)))
        features, preacts = [h], [h]
        for stage in self.stages:
            for block in stage:
                h, pre = block(h)
            features.append(h)
            preacts.append(pre)
        embedding = h.mean(dim=(2, 3))
        return Outputs(self.fc(embedding), features, preacts, embedding)


class WrnBlock(nn.Module):
    """Pre-activation WRN block (NETS.md §2.3); the projection reads ReLU(BN(x))."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        h = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return (x if self.shortcut is None else self.shortcut(a)) + h


class WideResNet(nn.Module):
    """wrn_d_k (NETS.md §2.3): raw stage sums as features, 'next BN' as preacts."""

    def __init__(self, depth, k, num_classes):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        groups, cin = [], 16
        for i, cout in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            groups.append(nn.Sequential(
                *[WrnBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1)
                  for j in range(n)]))
            cin = cout
        self.groups = nn.ModuleList(groups)
        self.bn1 = nn.BatchNorm2d(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes)
        _he_fan_out(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x, preact=False):
        h = self.conv1(x)
        features = [h]
        for group in self.groups:
            h = group(h)
            features.append(h)
        top = self.bn1(h)
        embedding = F.relu(top).mean(dim=(2, 3))
        preacts = list(features)
        if preact:  # RepDistiller calls the next BNs a second time to build them
            preacts = [features[0], self.groups[1][0].bn1(features[1]),
                       self.groups[2][0].bn1(features[2]), self.bn1(features[3])]
        return Outputs(self.fc(embedding), features, preacts, embedding)


def build_net(arch, num_classes):
    if arch == "resnet8x4":
        return CifarResNet([32, 64, 128, 256], 1, num_classes)
    if arch == "resnet32x4":
        return CifarResNet([32, 64, 128, 256], 5, num_classes)
    if arch.startswith("wrn_"):
        _, depth, k = arch.split("_")
        return WideResNet(int(depth), int(k), num_classes)
    fail(f"--arch/--teacher_arch={arch!r}: accepted: {', '.join(PARAMS_100)}")
    return None


def count_params(net):
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- shared pieces

def pool_to_match(f_s, f_t):
    """RepDistiller: adaptive-average-pool the taller NCHW map to the other's (H, H)."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return f_s, f_t


def distill_kl(z_s, z_t, temperature):
    """RepDistiller DistillKL: T^2 * KL(p_t || p_s) summed over classes, / B."""
    log_p_s = F.log_softmax(z_s / temperature, dim=1)
    p_t = F.softmax(z_t / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="sum") * temperature ** 2 / z_s.shape[0]


class ConvReg(nn.Module):
    """RepDistiller ConvReg (FitNet regressor; AB connector without the ReLU), NCHW shapes."""

    def __init__(self, s_shape, t_shape, use_relu=True):
        super().__init__()
        _, s_c, s_h, s_w = s_shape
        _, t_c, t_h, t_w = t_shape
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, 3, 2, 1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, 4, 2, 1)
        else:
            self.conv = nn.Conv2d(s_c, t_c, (1 + s_h - t_h, 1 + s_w - t_w))
        self.bn = nn.BatchNorm2d(t_c)
        self.use_relu = use_relu

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.relu(x) if self.use_relu else x


# ----------------------------------------------------------------------------- the methods

class Method:
    """One method's reference step. ``family``: whose training loop (RepDistiller runs the
    teacher and the KL term every step); ``weights``: (r, a, b) as RepDistiller's -r/-a/-b;
    ``modules``: trainable extra modules; ``loss(s, t, batch)`` -> the method's unweighted loss."""

    family = "RepDistiller"
    weights = (1.0, 0.0, 0.0)
    temperature = 4.0
    preact = False

    def __init__(self, s, t, config):
        del s, t, config
        self.modules = nn.ModuleList()

    def loss(self, s, t, batch):
        del s, t, batch
        return None


class ST(Method):
    """RepDistiller kd: 0.1 CE + 0.9 DistillKL(T = 4)."""
    weights = (0.1, 0.9, 0.0)


class Logits(Method):
    """Zoo Logits: MSE on logits, lambda 0.1."""
    family, weights = "Zoo", (1.0, 0.0, 0.1)

    def loss(self, s, t, batch):
        return F.mse_loss(s.logits, t.logits)


class AT(Method):
    """RepDistiller Attention over feat[1:-1], -b 1000."""
    weights = (1.0, 0.0, 1000.0)

    @staticmethod
    def _attention(f):
        return F.normalize(f.pow(2).mean(1).view(f.shape[0], -1))

    def loss(self, s, t, batch):
        total = 0.0
        for f_s, f_t in zip(s.features[1:], t.features[1:]):
            f_s, f_t = pool_to_match(f_s, f_t)
            total = total + (self._attention(f_s) - self._attention(f_t)).pow(2).mean()
        return total


class FitNet(Method):
    """RepDistiller hint: MSE(ConvReg(feat_s[2]), feat_t[2]), -b 100."""
    weights = (1.0, 0.0, 100.0)

    def __init__(self, s, t, config):
        super().__init__(s, t, config)
        self.regressor = ConvReg(s.features[2].shape, t.features[2].shape)
        self.modules.append(self.regressor)

    def loss(self, s, t, batch):
        return F.mse_loss(self.regressor(s.features[2]), t.features[2])


class NST(Method):
    """RepDistiller NSTLoss over feat[1:-1], -b 50: each poly kernel broadcasts
    [B, 1, C, HW] * [B, C', 1, HW] into a [B, C', C, HW] tensor before summing over HW."""
    weights = (1.0, 0.0, 50.0)

    @staticmethod
    def _poly(a, b):
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)

    def loss(self, s, t, batch):
        total = 0.0
        for f_s, f_t in zip(s.features[1:], t.features[1:]):
            f_s, f_t = pool_to_match(f_s, f_t)
            n_s = F.normalize(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), dim=2)
            n_t = F.normalize(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), dim=2)
            total = total + (self._poly(n_t, n_t).mean().detach() + self._poly(n_s, n_s).mean()
                             - 2 * self._poly(n_s, n_t).mean())
        return total


class PKT(Method):
    """RepDistiller PKT on feat[-1], -b 30000 (B x B cosine distributions, eps 1e-7)."""
    weights = (1.0, 0.0, 30000.0)

    @staticmethod
    def _distribution(x, eps):
        x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + eps)
        x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
        sim = (x @ x.t() + 1.0) / 2.0
        return sim / sim.sum(1, keepdim=True)

    def loss(self, s, t, batch):
        eps = 1e-7
        p_s, p_t = self._distribution(s.embedding, eps), self._distribution(t.embedding, eps)
        return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


class RKD(Method):
    """RepDistiller RKDLoss on feat[-1] (w_d 25, w_a 50), -b 1: the angle term builds the
    [B, B, D] pairwise differences and a [B, B, B] batched product."""
    weights = (1.0, 0.0, 1.0)

    @staticmethod
    def _pdist(e):
        sq = e.pow(2).sum(1)
        d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=1e-12).sqrt().clone()
        d[range(len(e)), range(len(e))] = 0
        return d

    @staticmethod
    def _angles(e):
        diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
        return torch.bmm(diff, diff.transpose(1, 2)).view(-1)

    def loss(self, s, t, batch):
        e_s, e_t = s.embedding.view(s.embedding.shape[0], -1), t.embedding
        with torch.no_grad():
            d_t = self._pdist(e_t)
            d_t = d_t / d_t[d_t > 0].mean()
            a_t = self._angles(e_t)
        d_s = self._pdist(e_s)
        d_s = d_s / d_s[d_s > 0].mean()
        return 25.0 * F.smooth_l1_loss(d_s, d_t) + 50.0 * F.smooth_l1_loss(self._angles(e_s), a_t)


class SP(Method):
    """RepDistiller Similarity on feat[-2], -b 3000 (B x B Gram of flattened maps)."""
    weights = (1.0, 0.0, 3000.0)

    def loss(self, s, t, batch):
        b = s.features[-1].shape[0]
        g_s = F.normalize(s.features[-1].reshape(b, -1) @ s.features[-1].reshape(b, -1).t())
        g_t = F.normalize(t.features[-1].reshape(b, -1) @ t.features[-1].reshape(b, -1).t())
        return (g_t - g_s).pow(2).sum() / (b * b)


class CC(Method):
    """Zoo CC (Taylor-expanded Gaussian RBF, gamma 0.4, order 2) on feat[-1], lambda 100."""
    family, weights = "Zoo", (1.0, 0.0, 100.0)

    @staticmethod
    def _kernel(f, gamma=0.4, order=2):
        f = F.normalize(f, p=2, dim=1)
        sim = f @ f.t()
        out = torch.zeros_like(sim)
        for p in range(order + 1):
            out = out + math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * sim.pow(p)
        return out

    def loss(self, s, t, batch):
        return F.mse_loss(self._kernel(s.embedding), self._kernel(t.embedding))


class VIDLoss(nn.Module):
    """RepDistiller VIDLoss(C_s, C_t, C_t): conv1x1 regressor + per-channel log-scale."""

    def __init__(self, c_in, c_mid, c_out, init_var=5.0, eps=1e-5):
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(c_in, c_mid, 1, bias=False), nn.ReLU(),
            nn.Conv2d(c_mid, c_mid, 1, bias=False), nn.ReLU(),
            nn.Conv2d(c_mid, c_out, 1, bias=False))
        self.log_scale = nn.Parameter(
            math.log(math.exp(init_var - eps) - 1.0) * torch.ones(c_out))
        self.eps = eps

    def forward(self, x, target):
        x, target = pool_to_match(x, target)
        mean = self.regressor(x)
        var = (torch.log(1.0 + torch.exp(self.log_scale)) + self.eps).view(1, -1, 1, 1)
        return torch.mean(0.5 * ((mean - target) ** 2 / var + torch.log(var)))


class VID(Method):
    """RepDistiller vid over feat[1:-1], -b 1."""
    weights = (1.0, 0.0, 1.0)

    def __init__(self, s, t, config):
        super().__init__(s, t, config)
        for f_s, f_t in zip(s.features[1:], t.features[1:]):
            self.modules.append(VIDLoss(f_s.shape[1], f_t.shape[1], f_t.shape[1]))

    def loss(self, s, t, batch):
        return sum(vid(f_s, f_t) for vid, f_s, f_t in
                   zip(self.modules, s.features[1:], t.features[1:]))


class Embed(nn.Module):
    """RepDistiller CRD Embed: linear to 128-d, then divided by its l2 norm."""

    def __init__(self, d_in, d_out=128):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x):
        x = self.linear(x.view(x.shape[0], -1))
        return x / x.pow(2).sum(1, keepdim=True).pow(0.5)


class CRD(Method):
    """RepDistiller CRDLoss (feat_dim 128, K 16384, T 0.07, momentum 0.5), -b 0.8: two
    ``n_data x 128`` memory banks; per step ``index_select`` of B*(K+1) rows of each bank,
    [B, K+1, 128] x [B, 128, 1] ``bmm``, exp, Eq. 18, momentum update of the batch's rows."""
    weights = (1.0, 0.0, 0.8)

    def __init__(self, s, t, config):
        super().__init__(s, t, config)
        self.k, self.temp, self.momentum, dim = 16384, 0.07, 0.5, 128
        self.n_data = config.train_size
        self.embed_s, self.embed_t = Embed(s.embedding.shape[1]), Embed(t.embedding.shape[1])
        self.modules.extend([self.embed_s, self.embed_t])
        stdv = 1.0 / math.sqrt(dim / 3)
        self.memory_s = torch.rand(self.n_data, dim).mul_(2 * stdv).add_(-stdv)
        self.memory_t = torch.rand(self.n_data, dim).mul_(2 * stdv).add_(-stdv)
        self.z_s = self.z_t = None
        labels = torch.arange(self.n_data) % config.num_classes
        self.order = torch.argsort(labels, stable=True)
        self.count = torch.bincount(labels, minlength=config.num_classes)
        self.start = torch.cumsum(self.count, 0) - self.count

    def negatives(self, labels):
        """[B, K] uniform draws among the samples of other classes (RepDistiller's dataset
        draws the same, per sample, with np.random.choice)."""
        count, start = self.count[labels][:, None], self.start[labels][:, None]
        pick = (torch.rand(labels.shape[0], self.k) * (self.n_data - count)).long()
        return self.order[pick + (pick >= start).long() * count]

    def _scores(self, memory, v, idx):
        rows = torch.index_select(memory, 0, idx.view(-1)).detach()
        rows = rows.view(idx.shape[0], self.k + 1, v.shape[1])
        return torch.exp(torch.bmm(rows, v.view(v.shape[0], v.shape[1], 1)) / self.temp)

    def _contrast_loss(self, x):
        b, m = x.shape[0], x.shape[1] - 1
        noise = m / float(self.n_data)
        log_d1 = torch.div(x[:, 0], x[:, 0] + noise + 1e-7).log()
        neg = x[:, 1:]
        log_d0 = torch.div(neg.clone().fill_(noise), neg + noise + 1e-7).log()
        return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / b

    def _update(self, memory, v, index):
        with torch.no_grad():
            rows = torch.index_select(memory, 0, index).mul_(self.momentum)
            rows.add_(v * (1 - self.momentum))
            memory.index_copy_(0, index, rows.div(rows.pow(2).sum(1, keepdim=True).pow(0.5)))

    def loss(self, s, t, batch):
        index, labels = batch["index"], batch["label"]
        idx = torch.cat([index[:, None], self.negatives(labels)], dim=1)
        v_s, v_t = self.embed_s(s.embedding), self.embed_t(t.embedding)
        out_t = self._scores(self.memory_s, v_t, idx)  # teacher anchor, student bank
        out_s = self._scores(self.memory_t, v_s, idx)  # student anchor, teacher bank
        if self.z_s is None:
            self.z_s = (out_s.mean() * self.n_data).item()
            self.z_t = (out_t.mean() * self.n_data).item()
        out_s, out_t = out_s / self.z_s, out_t / self.z_t
        self._update(self.memory_s, v_s.detach(), index)
        self._update(self.memory_t, v_t.detach(), index)
        return self._contrast_loss(out_s) + self._contrast_loss(out_t)


class KDSVD(Method):
    """RepDistiller KDSVD (k = 1) over feat[1:-1], weight 1 (mdistiller): batched LAPACK SVD of
    each [B, HW, C] map (student with gradient), sign alignment, [B, C, C', k] RBF relations."""
    weights = (1.0, 0.0, 1.0)
    k = 1

    @staticmethod
    def _finite(x):
        return torch.where(torch.isfinite(x), x, torch.zeros_like(x))

    def _svd(self, f, n):
        b, c, h, _ = f.shape
        x = f.reshape(b, c, h * h).transpose(-2, -1)
        u, sv, vh = torch.linalg.svd(x, full_matrices=False)
        u, sv, v = self._finite(u), self._finite(sv), self._finite(vh.transpose(-2, -1))
        return (F.normalize(u[:, :, :n], dim=1), F.normalize(sv[:, :n], dim=1),
                F.normalize(v[:, :, :n], dim=1))

    @staticmethod
    def _align(a, b):
        cos = torch.matmul(a.transpose(-2, -1), b)
        best, _ = torch.max(torch.abs(cos), 1, keepdim=True)
        mask = torch.where(torch.eq(best, torch.abs(cos)), torch.sign(cos), torch.zeros_like(cos))
        return torch.matmul(a, mask)

    def loss(self, s, t, batch):
        total, prev_s, prev_t = 0.0, None, None
        for f_s, f_t in zip(s.features[1:], t.features[1:]):
            _, s_t, v_t = self._svd(f_t, self.k)
            _, _, v_s = self._svd(f_s, self.k + 3)
            v_s = self._align(v_s, v_t)
            v_t, v_s = v_t * s_t.unsqueeze(1), v_s * s_t.unsqueeze(1)
            if prev_s is not None:
                r_s = torch.exp(-(v_s.unsqueeze(2) - prev_s.unsqueeze(1)).pow(2) / 8)
                r_t = torch.exp(-(v_t.unsqueeze(2) - prev_t.unsqueeze(1)).pow(2) / 8)
                sq = self._finite((r_s - r_t.detach()).pow(2))
                total = total + sq.sum() / f_s.shape[0]
            prev_s, prev_t = v_s, v_t
        return total


class DKD(Method):
    """mdistiller dkd_loss (alpha 1, beta 8, T 4), CE weight 1, warm-up factor 1."""
    family, weights = "mdistiller", (1.0, 0.0, 1.0)

    def loss(self, s, t, batch):
        labels, temp = batch["label"], self.temperature
        gt = torch.zeros_like(s.logits).scatter_(1, labels.unsqueeze(1), 1).bool()
        other = ~gt
        p_s, p_t = F.softmax(s.logits / temp, dim=1), F.softmax(t.logits / temp, dim=1)

        def binary(p):
            return torch.cat([(p * gt).sum(1, keepdim=True), (p * other).sum(1, keepdim=True)], 1)

        tckd = F.kl_div(torch.log(binary(p_s)), binary(p_t), reduction="sum") * temp ** 2
        log_hat_s = F.log_softmax(s.logits / temp - 1000.0 * gt, dim=1)
        hat_t = F.softmax(t.logits / temp - 1000.0 * gt, dim=1)
        nckd = F.kl_div(log_hat_s, hat_t, reduction="sum") * temp ** 2
        return (1.0 * tckd + 8.0 * nckd) / s.logits.shape[0]


class DIST(Method):
    """DIST_KD DIST loss (beta = gamma = 1, T = 1): Pearson relations of softmax rows/columns."""
    family, weights, temperature = "DIST_KD", (1.0, 0.0, 1.0), 1.0

    @staticmethod
    def _pearson(a, b, eps=1e-8):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    def loss(self, s, t, batch):
        y_s = F.softmax(s.logits / self.temperature, dim=1)
        y_t = F.softmax(t.logits / self.temperature, dim=1)
        inter = 1 - self._pearson(y_s, y_t).mean()
        intra = 1 - self._pearson(y_s.t(), y_t.t()).mean()
        return self.temperature ** 2 * (inter + intra)


class Paraphraser(nn.Module):
    """RepDistiller Paraphraser encoder (k = 0.5, no BN): 3 x (conv3x3 + LeakyReLU 0.1)."""

    def __init__(self, c, k=0.5):
        super().__init__()
        m = int(c * k)
        self.encoder = nn.Sequential(
            nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.1), nn.Conv2d(c, m, 3, 1, 1),
            nn.LeakyReLU(0.1), nn.Conv2d(m, m, 3, 1, 1), nn.LeakyReLU(0.1))

    def forward(self, x):
        return self.encoder(x)


class Translator(nn.Module):
    """RepDistiller Translator: 3 x (conv3x3 + BN + LeakyReLU 0.1), C_s -> int(k C_t)."""

    def __init__(self, c_s, c_t, k=0.5):
        super().__init__()
        m = int(c_t * k)
        layers, cin = [], c_s
        for cout in (c_s, m, m):
            layers += [nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1)]
            cin = cout
        self.encoder = nn.Sequential(*layers)

    def forward(self, x):
        return self.encoder(x)


class FT(Method):
    """RepDistiller factor, main phase, -b 200: translator(feat_s[-2]) vs the frozen
    paraphraser's factor of feat_t[-2] (its weights still require grad, as in the reference,
    so backward computes their gradients; the optimiser does not hold them), FactorTransfer
    (p1 = 2, p2 = 1)."""
    weights = (1.0, 0.0, 200.0)

    def __init__(self, s, t, config):
        super().__init__(s, t, config)
        self.translator = Translator(s.features[-1].shape[1], t.features[-1].shape[1])
        self.paraphraser = Paraphraser(t.features[-1].shape[1]).eval()
        self.modules.append(self.translator)

    @staticmethod
    def _factor(f):
        return F.normalize(f.pow(2).mean(1).view(f.shape[0], -1))

    def loss(self, s, t, batch):
        f_s, f_t = pool_to_match(self.translator(s.features[-1]),
                                 self.paraphraser(t.features[-1]))
        return (self._factor(f_s) - self._factor(f_t)).abs().mean()


class AB(Method):
    """RepDistiller abound, main phase: CE only (loss_kd = 0), teacher and student with
    preact=True, KL term computed with -a 0."""
    preact = True


class FSP(Method):
    """RepDistiller fsp, main phase: CE only (loss_kd = 0), teacher run, KL term with -a 0."""


METHODS = {"ST": ST, "Logits": Logits, "AT": AT, "FitNet": FitNet, "NST": NST, "PKT": PKT,
           "RKD": RKD, "SP": SP, "CC": CC, "VID": VID, "CRD": CRD, "KD_SVD": KDSVD, "DKD": DKD,
           "DIST": DIST, "FT": FT, "AB": AB, "FSP": FSP}


# ----------------------------------------------------------------------------- the steps

def make_optimizer(params):
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)


def student_step(student):
    """RepDistiller train_vanilla: student forward, CE, SGD step."""
    optimizer = make_optimizer(student.parameters())

    def step(batch):
        out = student(batch["image"])
        loss = F.cross_entropy(out.logits, batch["label"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def floor_step(student, teacher):
    """One student-alone step plus one teacher forward pass (no_grad), as our floor."""
    inner = student_step(student)

    def step(batch):
        with torch.no_grad():
            logits = teacher(batch["image"]).logits
        return inner(batch) + logits.sum().item()

    return step


def method_step(cls, student, teacher, config, batch):
    """The reference training step of ``cls`` (see the module docstring)."""
    with torch.no_grad():
        student.eval()
        probe_s = student(batch["image"][:2], preact=cls.preact)
        probe_t = teacher(batch["image"][:2], preact=cls.preact)
        student.train()
    method = cls(probe_s, probe_t, config)
    params = list(student.parameters()) + list(method.modules.parameters())
    optimizer = make_optimizer(params)
    r, a, b = cls.weights

    def step(batch):
        s = student(batch["image"], preact=cls.preact)
        with torch.no_grad():
            t = teacher(batch["image"], preact=cls.preact)
        loss = r * F.cross_entropy(s.logits, batch["label"])
        if cls.family == "RepDistiller":
            loss = loss + a * distill_kl(s.logits, t.logits, cls.temperature)
        kd = method.loss(s, t, batch)
        if kd is not None:
            loss = loss + b * kd
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


class Pair:
    """Fresh student and teacher nets (student train mode, teacher eval mode)."""

    def __init__(self, config):
        self.student = build_net(config.arch, config.num_classes).train()
        self.teacher = build_net(config.teacher_arch, config.num_classes).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)


def random_batch(config):
    gen = torch.Generator().manual_seed(config.seed)
    index = torch.randperm(config.train_size, generator=gen)[:config.batch_size]
    image = torch.randn(config.batch_size, 3, config.image_size, config.image_size, generator=gen)
    return {"image": image, "label": index % config.num_classes, "index": index}


def timed(step, batch):
    wall, cpu = time.perf_counter(), time.process_time()
    step(batch)
    return 1000.0 * (time.perf_counter() - wall), 1000.0 * (time.process_time() - cpu)


def paired_ratio(times, reference):
    return statistics.median(a / b for a, b in zip(times, reference))


def measure(row, config, batch):
    """One row: its step interleaved with a student-alone and a floor step on their own nets."""
    torch.manual_seed(config.seed)
    main = Pair(config)
    if row == STUDENT:
        steps = {row: student_step(main.student)}
    elif row == FLOOR:
        steps = {row: floor_step(main.student, main.teacher)}
    else:
        steps = {row: method_step(METHODS[row], main.student, main.teacher, config, batch)}
    refs = Pair(config)
    if row != STUDENT:
        steps[STUDENT] = student_step(build_net(config.arch, config.num_classes).train())
    if row != FLOOR:
        steps[FLOOR] = floor_step(refs.student, refs.teacher)
    for step in steps.values():
        for _ in range(max(config.warmup, 1)):
            step(batch)
    wall = {kind: [] for kind in steps}
    cpu = {kind: [] for kind in steps}
    for _ in range(config.steps):
        for kind, step in steps.items():
            w, c = timed(step, batch)
            wall[kind].append(w)
            cpu[kind].append(c)
    median = statistics.median(wall[row])
    return {"method": row, "images_per_sec": config.batch_size * 1000.0 / median,
            "ms_per_step": median, "peak_rss_mb": None,
            "ratio_to_student": 1.0 if row == STUDENT else paired_ratio(wall[row], wall[STUDENT]),
            "ratio_to_floor": 1.0 if row == FLOOR else paired_ratio(wall[row], wall[FLOOR]),
            "cpu_ms_per_step": statistics.median(cpu[row]),
            "cpu_ratio_to_student": (1.0 if row == STUDENT
                                     else paired_ratio(cpu[row], cpu[STUDENT])),
            "cpu_ratio_to_floor": 1.0 if row == FLOOR else paired_ratio(cpu[row], cpu[FLOOR]),
            "status": "ok", "note": _note(row),
            "samples_ms": {k: [round(v, 3) for v in vals] for k, vals in wall.items()}}


def _note(row):
    if row == STUDENT:
        return "student trained alone (train_vanilla)"
    if row == FLOOR:
        return "one student step + one teacher forward pass"
    return " ".join(METHODS[row].__doc__.split()).split(": ")[0]


# ----------------------------------------------------------------------------- the command

def resolve_methods(spec):
    by_lower = {name.lower(): name for name in METHODS}
    by_lower.update({"kd": "ST", "kdsvd": "KD_SVD"})
    if spec.strip().lower() == "all":
        names = list(METHODS)
    else:
        names = []
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            if part.lower() not in by_lower:
                fail(f"--methods: unknown method {part!r}; accepted: all, {', '.join(METHODS)}")
            names.append(by_lower[part.lower()])
    rows = [STUDENT, FLOOR]
    rows += [n for n in names if n not in rows]
    return rows


def check_params(config):
    for arch in (config.arch, config.teacher_arch):
        if arch not in PARAMS_100:
            fail(f"--arch/--teacher_arch={arch!r}: accepted: {', '.join(PARAMS_100)}")
        got = count_params(build_net(arch, 100))
        assert got == PARAMS_100[arch], f"{arch}: {got} parameters, ours have {PARAMS_100[arch]}"


def markdown(rows, config):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    lines = [f"PyTorch reference step, {config.teacher_arch} -> {config.arch}, batch "
             f"{config.batch_size}, {config.image_size}x{config.image_size} random images, "
             f"{config.num_classes} classes, float32, eager; median of {config.steps} steps after "
             f"{config.warmup} warm-up; torch {torch.__version__}, {torch.get_num_threads()} "
             f"thread(s); {cpu}.", "",
             "| method | images/s | ms/step | × student | × floor | CPU ms/step | note |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | — | — | — | — | — | {r['status']}: {r['note']} |")
            continue
        lines.append(f"| {r['method']} | {r['images_per_sec']:.1f} | {r['ms_per_step']:.1f} | "
                     f"{r['ratio_to_student']:.2f} | {r['ratio_to_floor']:.2f} | "
                     f"{r['cpu_ms_per_step']:.1f} | {r['note']} |")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message):
        fail(f"{message} (see {PROG} --help)")


def parse_args(argv):
    p = _Parser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet8x4", choices=sorted(PARAMS_100))
    p.add_argument("--teacher_arch", default="resnet32x4", choices=sorted(PARAMS_100))
    p.add_argument("--methods", default="all", help="'all' or a comma-separated list")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--num_classes", type=int, default=100)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--train_size", type=int, default=50000, help="CRD memory bank rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="write the rows as a JSON list here")
    args = p.parse_args(argv)
    for name, low in (("batch_size", 2), ("steps", 1), ("warmup", 0), ("threads", 1),
                      ("num_classes", 2), ("train_size", 2)):
        if getattr(args, name) < low:
            fail(f"--{name}={getattr(args, name)}: must be an integer >= {low}")
    if args.image_size != 32:
        fail(f"--image_size={args.image_size}: the CIFAR nets here need 32")
    if args.train_size < args.batch_size:
        fail(f"--train_size={args.train_size} is smaller than --batch_size={args.batch_size}")
    return args


def main(argv=None):
    config = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(config.threads)
    check_params(config)
    rows_to_run = resolve_methods(config.methods)
    batch = random_batch(config)
    rows = []
    for i, row in enumerate(rows_to_run, 1):
        start = time.time()
        try:
            result = measure(row, config, batch)
        except Exception as e:  # pylint: disable=broad-except
            result = {"method": row, "status": "error", "note": f"{type(e).__name__}: {e}"[:300]}
        rows.append(result)
        what = (f"{result['ms_per_step']:.1f} ms/step, x{result['ratio_to_student']:.2f} student"
                if result["status"] == "ok" else result["note"])
        print(f"[{i}/{len(rows_to_run)}] {row}: {what} ({time.time() - start:.0f} s)",
              file=sys.stderr, flush=True)
    if config.json:
        os.makedirs(os.path.dirname(os.path.abspath(config.json)), exist_ok=True)
        with open(config.json, "w") as f:
            json.dump(rows, f, indent=2)
            f.write("\n")
    print(markdown(rows, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
