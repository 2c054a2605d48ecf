"""
glow_parts.py: Glow trained in gradient-isolated parts with a truncated local objective.

The reference, in reading order: the flow's layers, Glow cut into parts and the truncated objective,
the data, the settings, one training loop for every mechanism (full, alternate, sequential, parallel,
+ end-to-end finetuning), runs that resume exactly, the poster's side-by-side comparison, data
parallel under torchrun, the CLI. Research that goes beyond it (the budget sweep over seeds, the
pipeline of parts across processes, benchmarks) lives in experiments/ and imports this file.

Quickstart (CPU, offline, about a minute; scikit-learn's bundled 8x8 digits):
    python glow_parts.py --dataset digits --levels 2 --steps 8 --hidden 64 --warmup 50 \
        --mode alternate --epochs 10 --finetune 5
The poster's experiment (CIFAR-10, needs a GPU):
    python glow_parts.py --mode alternate --epochs 60 --finetune 30

Papers: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", NeurIPS 2018;
Dinh et al., "Density estimation using Real NVP", ICLR 2017 (multi-scale, affine coupling). Local
objectives: Loewe et al., "Putting an End to End-to-End", NeurIPS 2019; Belilovsky et al., "Decoupled
Greedy Learning of CNNs", ICML 2020. The parts and the truncated objective follow the poster.

The truncated objective
  Cut the flow into parts g_1 .. g_P: h_0 = x, h_k = g_k(h_{k-1}). A part may also split off
  latents z_k (multi-scale) scored by a conditional prior p(z_k | .) that the part owns. The flow
  truncated after part k maps x to (z_1 .. z_k, h_k) and is itself a flow; give h_k a prior p_k
  (N(0, I); the model's learned top prior for the last part) and change of variables gives
      log p_k(x) = sum_{j<=k} [ log|det dg_j/dh_{j-1}| + log p(z_j | .) ] + log p_k(h_k).
  Part k's parameters appear only in the j = k term and in log p_k(h_k): the terms j < k do not
  depend on them (the poster drops them), and the parts after k do not appear at all. So training
  part k alone on L_k = -log p_k(x), with h_{k-1} detached, is maximum likelihood of the flow
  truncated after part k. We keep the j < k terms as constants (computed without grad), so every
  L_k is a bits/dim of a real density model, and L_P is exactly the full model's NLL.
  The parts' objectives are not the full objective: L_k asks h_k to look Gaussian on its own,
  while end to end only the last part's output must. Finetuning end to end repairs the difference.

What differs from the paper (and the official code)
  - Adam with linear warmup and a constant rate; Polyak averaging only with --ema; no classes.
  - Zero-padded convolutions (the official code adds an "edge" channel instead).
  - The top prior is a free mean / log-std per latent position (the official code runs a zero conv
    over a constant: the same family at init, fewer weights).
  - The split prior and coupling use contiguous channel halves (the official code interleaves).
  - Bits/dim is measured with one uniform-noise dequantization sample, as in the paper's tables;
    every evaluation also reports the median image and the images that score worse than noise.
"""
import argparse
import copy
import fcntl
import functools
import glob
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# -----------------------------------------------------------------------------
# Invertible layers. One contract: forward(x) -> (y, logdet of shape (B,)), reverse(y) -> x.

class ActNorm(nn.Module):
    """Per-channel affine y = (x + loc) * exp(logs), set from one batch to give mean 0, std 1."""

    def __init__(self, channels):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        # A buffer, so it travels with the weights: a reloaded model is never re-initialised.
        self.register_buffer("initialized", torch.tensor(False))
        self.data_init = False  # set by Glow.initialize: the next forward pass sets loc and logs

    def forward(self, x):
        if self.data_init:  # the paper's data-dependent init, on the batch Glow.initialize runs
            with torch.no_grad():
                self.loc.copy_(-x.mean(dim=(0, 2, 3), keepdim=True))
                self.logs.copy_(-torch.log(x.std(dim=(0, 2, 3), keepdim=True) + 1e-6))
            self.initialized.fill_(True)
            self.data_init = False
        y = (x + self.loc) * torch.exp(self.logs)
        logdet = x.shape[2] * x.shape[3] * self.logs.sum()  # the same scale at every pixel
        return y, logdet.expand(x.shape[0])

    def reverse(self, y):
        return y * torch.exp(-self.logs) - self.loc

class InvConv2dLU(nn.Module):
    """Invertible 1x1 conv with W = P L (U + diag(sign_s * exp(log_s))): log|det W| = sum(log_s)."""

    def __init__(self, channels):
        super().__init__()
        rotation = torch.linalg.qr(torch.randn(channels, channels))[0]
        P, L, U = torch.linalg.lu(rotation)
        s = torch.diagonal(U)
        self.register_buffer("P", P)  # the permutation stays fixed
        self.register_buffer("sign_s", torch.sign(s))
        self.L = nn.Parameter(L)  # only the strict lower triangle is used (unit diagonal)
        self.U = nn.Parameter(torch.triu(U, 1))  # only the strict upper triangle is used
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def weight(self):
        eye = torch.eye(self.L.shape[0], device=self.L.device, dtype=self.L.dtype)
        L = torch.tril(self.L, -1) + eye
        U = torch.triu(self.U, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.P @ L @ U

    def forward(self, x):
        y = F.conv2d(x, self.weight()[:, :, None, None])
        logdet = x.shape[2] * x.shape[3] * self.log_s.sum()  # a triangular det: O(C), not O(C^3)
        return y, logdet.expand(x.shape[0])

    def reverse(self, y):
        return F.conv2d(y, torch.linalg.inv(self.weight())[:, :, None, None])

class ZeroConv2d(nn.Module):
    """3x3 conv initialised to zero, output scaled by exp(3 * logs) as in the official code."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x):
        return self.conv(x) * torch.exp(3 * self.logs)

class AffineCoupling(nn.Module):
    """y_a = x_a, y_b = (x_b + shift(x_a)) * sigmoid(logit(x_a)): triangular Jacobian, cheap inverse."""

    def __init__(self, channels, hidden):
        super().__init__()
        self.conv1 = nn.Conv2d(channels // 2, hidden, 3, padding=1, bias=False)
        self.norm1 = ActNorm(hidden)  # ActNorm replaces the bias, as in the official code
        self.conv2 = nn.Conv2d(hidden, hidden, 1, bias=False)
        self.norm2 = ActNorm(hidden)
        self.conv3 = ZeroConv2d(hidden, channels)  # zero at init: shift 0, scale sigmoid(2)

    def shift_and_logit(self, xa):
        """(shift, logit of the scale) of x_b, both functions of x_a only."""
        h = F.relu(self.norm1(self.conv1(xa))[0])
        h = F.relu(self.norm2(self.conv2(h))[0])
        shift, raw = self.conv3(h).chunk(2, dim=1)
        return shift, raw + 2.0  # sigmoid(2) = 0.88 at init: a gentle, stable contraction

    def forward(self, x):
        xa, xb = x.chunk(2, dim=1)
        shift, logit = self.shift_and_logit(xa)
        yb = (xb + shift) * torch.sigmoid(logit)
        return torch.cat([xa, yb], dim=1), F.logsigmoid(logit).flatten(1).sum(1)

    def reverse(self, y):
        ya, yb = y.chunk(2, dim=1)
        shift, logit = self.shift_and_logit(ya)
        return torch.cat([ya, yb / torch.sigmoid(logit) - shift], dim=1)

# -----------------------------------------------------------------------------
# A flow step, the multi-scale pieces (squeeze, split) and the Gaussian priors.

class FlowStep(nn.Module):
    """One step of Glow: ActNorm -> invertible 1x1 conv -> affine coupling."""

    def __init__(self, channels, hidden):
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.invconv = InvConv2dLU(channels)
        self.coupling = AffineCoupling(channels, hidden)

    def forward(self, x):
        x, ld1 = self.actnorm(x)
        x, ld2 = self.invconv(x)
        x, ld3 = self.coupling(x)
        return x, ld1 + ld2 + ld3

    def reverse(self, y):
        return self.actnorm.reverse(self.invconv.reverse(self.coupling.reverse(y)))

class Squeeze(nn.Module):
    """2x2 space-to-depth, (B, C, H, W) -> (B, 4C, H/2, W/2): a permutation, so logdet = 0."""

    def forward(self, x):
        return F.pixel_unshuffle(x, 2), x.new_zeros(x.shape[0])

    def reverse(self, y):
        return F.pixel_shuffle(y, 2)

def soft_bound(logs, bound):
    """bound * tanh(logs / bound): the identity near 0, never beyond +-bound (None: unbounded)."""
    return logs if bound is None else bound * torch.tanh(logs / bound)

def gaussian_log_prob(z, mean, logs):
    """log N(z; mean, exp(logs)^2), summed over all but the batch dimension -> (B,)."""
    lp = -0.5 * (math.log(2 * math.pi) + 2 * logs + (z - mean) ** 2 * torch.exp(-2 * logs))
    return lp.flatten(1).sum(1)

class Split(nn.Module):
    """Factor out half the channels as a latent z, scored by a learned prior N(z; mean(h), std(h)).

    Not a bijection of one tensor, so its contract is its own:
    forward(x) -> (h, z, log p(z | h)); reverse(h, z) -> x, sampling z when it is None."""

    def __init__(self, channels, bound=None):
        super().__init__()
        self.prior = ZeroConv2d(channels // 2, channels)  # h -> (mean, log std) of z; N(0, I) at init
        self.bound = bound

    def mean_logs(self, h):
        mean, logs = self.prior(h).chunk(2, dim=1)
        return mean, soft_bound(logs, self.bound)

    def forward(self, x):
        h, z = x.chunk(2, dim=1)
        return h, z, gaussian_log_prob(z, *self.mean_logs(h))

    def reverse(self, h, z=None, temperature=1.0):
        if z is None:
            mean, logs = self.mean_logs(h)
            z = mean + temperature * torch.exp(logs) * torch.randn_like(mean)
        return torch.cat([h, z], dim=1)

class GaussianPrior(nn.Module):
    """Diagonal Gaussian over a part's output h: learned (zero-initialised: N(0, I)) or fixed N(0, I)."""

    def __init__(self, shape, learned):
        super().__init__()
        zeros = torch.zeros(1, *shape)
        if learned:
            self.mean, self.logs = nn.Parameter(zeros.clone()), nn.Parameter(zeros.clone())
        else:
            self.register_buffer("mean", zeros.clone(), persistent=False)
            self.register_buffer("logs", zeros.clone(), persistent=False)

    def log_prob(self, h):
        return gaussian_log_prob(h, self.mean, self.logs)

    def sample(self, n, temperature=1.0):
        eps = torch.randn(n, *self.mean.shape[1:], device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + temperature * torch.exp(self.logs) * eps

# -----------------------------------------------------------------------------
# Glow cut into gradient-isolated parts, and the truncated objective.

def default_parts(n_levels, n_steps):
    """The poster's cut: one part per level, the middle level (of an odd number) halved.

    For Glow's 3 levels x 32 steps that is 32,16,16,32; for 2 levels, one part per level."""
    parts = [n_steps] * n_levels
    if n_levels % 2 == 1 and n_levels > 1 and n_steps > 1:
        mid = n_levels // 2
        parts[mid:mid + 1] = [n_steps // 2, n_steps - n_steps // 2]
    return parts

def step_macs(in_channels, image_size, n_levels, n_steps, hidden):
    """Multiply-adds per image of each flow step's convolutions (a split's prior counts with its
    level's last step): the cost model of a part is the sum over its steps."""
    macs, C, S = [], in_channels, image_size
    for level in range(n_levels):
        C, S = 4 * C, S // 2
        coupling = 9 * (C // 2) * hidden + hidden * hidden + 9 * hidden * C  # 3x3, 1x1, zero 3x3 convs
        macs += [S * S * (C * C + coupling)] * n_steps  # + the invertible 1x1 conv
        if level < n_levels - 1:
            macs[-1] += S * S * 9 * (C // 2) * C
            C //= 2
    return macs

def balanced_parts(n_parts, macs):
    """--parts auto:P: cut the steps into P contiguous parts whose most expensive part is as cheap as
    possible (exact: a dynamic programme over the last cut)."""
    if not 1 <= n_parts <= len(macs):
        raise ValueError(f"--parts auto:{n_parts} needs between 1 and {len(macs)} parts (a flow step each at most)")
    prefix = [0, *itertools.accumulate(macs)]

    @functools.cache
    def best(i, p):  # (the cheapest largest part, its sizes) when the first i steps form p parts
        if p == 1:
            return prefix[i], [i]
        cost, j = min((max(best(j, p - 1)[0], prefix[i] - prefix[j]), j) for j in range(p - 1, i))
        return cost, best(j, p - 1)[1] + [i - j]
    return best(len(macs), n_parts)[1]

def check_parts(parts, n_levels, n_steps):
    """A parts spec (step counts per part, in flow order) as a list of ints, or ValueError."""
    parts = list(parts)
    if not parts or not all(type(p) is int and p > 0 for p in parts):
        raise ValueError(f"--parts: want a non-empty list of positive integers, got {parts}")
    if sum(parts) != n_levels * n_steps:
        raise ValueError(f"--parts {','.join(map(str, parts))} sum to {sum(parts)}, but the flow has "
                         f"levels * steps = {n_levels} * {n_steps} = {n_levels * n_steps} steps")
    return parts

def isolate(h, const):
    """Where two parts meet: the ONE place gradient isolation happens.

    h is part k's input h_{k-1}; const holds the earlier parts' log-dets and split log-priors.
      - h.detach(): part k's loss cannot reach parts < k, so no part is trained by a later part's
        objective, and no gradient is ever computed, or sent, upstream of a part boundary.
      - const.detach(): the earlier terms are constants for part k (they do not depend on its
        parameters); detached, they add to L_k's value and nothing to anyone's gradient.
    Two things complete the picture, both for cost, neither for correctness: Glow.truncated runs
    the parts before the first learning part under no_grad (no graph is kept for them) and does not
    run the parts after the last one; and the training loop steps only the learning parts' Adams."""
    return h.detach(), const.detach()

class Part(nn.Module):
    """A contiguous run of flow steps (+ the squeezes and splits they own), and a prior for its output."""

    def __init__(self, layers, prior):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.prior = prior  # p_k(h_k) of the truncated flow; the model's top prior for the last part
        self.recompute = False  # memory-saving gradients (--recompute)

    def forward(self, h):
        """h_{k-1} -> (h_k, split-off latents, sum of log-dets (B,), sum of log p(z | .) (B,))."""
        zs, logdet, logp = [], 0, 0
        for layer in self.layers:
            if isinstance(layer, Split):
                h, z, lp = layer(h)
                zs.append(z)
                logp = logp + lp
            elif self.recompute and isinstance(layer, FlowStep) and torch.is_grad_enabled():
                # keep only the step's input; backward runs the step again to get what it needs
                h, ld = torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=False)
                logdet = logdet + ld
            else:
                h, ld = layer(h)
                logdet = logdet + ld
        return h, zs, logdet, logp

    def reverse(self, h, zs, temperature=1.0):
        """h_k -> h_{k-1}; pops this part's split-off latents (None: sample them) off the end of zs."""
        for layer in reversed(self.layers):
            if isinstance(layer, Split):
                h = layer.reverse(h, zs.pop(), temperature)
            else:
                h = layer.reverse(h)
        return h

class Glow(nn.Module):
    """Multi-scale Glow: per level a squeeze, n_steps flow steps, and (except the last) a split.

    The n_levels * n_steps flow steps form one sequence that `parts` (step counts; default: the
    poster's cut, see default_parts) cuts into contiguous parts. A squeeze goes to the part holding
    its level's first step, a split to the part holding its level's last step, the top prior to
    the last part: every parameter is in exactly one part. Call initialize(x) on a batch of data
    before training (ActNorm's data-dependent init); the training code does."""

    def __init__(self, in_channels=3, image_size=32, n_levels=3, n_steps=32, hidden=512, parts=None,
                 n_bits=8, part_prior="standard", prior_bound=None):
        super().__init__()
        parts = check_parts(default_parts(n_levels, n_steps) if parts is None else parts, n_levels, n_steps)
        if image_size % 2 ** n_levels:
            raise ValueError(f"image_size {image_size} is not divisible by 2^n_levels = {2 ** n_levels}")
        if part_prior not in ("standard", "learned"):
            raise ValueError(f"part_prior must be 'standard' or 'learned', got {part_prior!r}")
        self.n_bits, self.part_sizes, self.n_splits = n_bits, parts, n_levels - 1
        self.n_dims = in_channels * image_size ** 2  # D
        owner = [k for k, size in enumerate(parts) for _ in range(size)]  # the part of each step
        layers = [[] for _ in parts]
        shapes = [None] * len(parts)  # output shape of each part
        C, S = in_channels, image_size
        for level in range(n_levels):
            first = level * n_steps
            C, S = 4 * C, S // 2
            layers[owner[first]].append(Squeeze())
            for i in range(n_steps):
                layers[owner[first + i]].append(FlowStep(C, hidden))
                shapes[owner[first + i]] = (C, S, S)
            if level < n_levels - 1:
                layers[owner[first + n_steps - 1]].append(Split(C, prior_bound))
                C //= 2
                shapes[owner[first + n_steps - 1]] = (C, S, S)
        last = len(parts) - 1
        self.parts = nn.ModuleList(
            Part(layers[k], GaussianPrior(shapes[k], learned=(k == last or part_prior == "learned")))
            for k in range(len(parts)))

    @torch.no_grad()
    def initialize(self, x):
        """ActNorm's data init on batch x, in flow order, so each ActNorm sees normalised inputs.

        ActNorms already initialised (a model loaded from a checkpoint) are left as they are."""
        pending = [m for m in self.modules() if isinstance(m, ActNorm) and not m.initialized]
        for m in pending:
            m.data_init = True
        if pending:
            self(x)

    def forward(self, x):
        """x (B, C, H, W), preprocessed -> (zs, logdet, logpz), end to end: the latents (split-off
        first, final last), log|det| of the whole map (B,), and the latents' log-density under the
        priors (B,). So log p(x) = logdet + logpz, and gradients reach every part."""
        zs, logdet, logpz = [], x.new_zeros(x.shape[0]), x.new_zeros(x.shape[0])
        for part in self.parts:
            x, z, ld, lp = part(x)
            zs, logdet, logpz = zs + z, logdet + ld, logpz + lp
        return zs + [x], logdet, logpz + self.parts[-1].prior.log_prob(x)

    def log_prob(self, x):
        """log p(x) of the whole flow in nats, (B,)."""
        _, logdet, logpz = self(x)
        return logdet + logpz

    def truncated(self, x, parts=None):
        """[log p_k(x) in nats, (B,)] of the flows truncated after each part k in `parts` (ascending;
        default all), in one pass. Each reaches only part k's parameters, so -log p_k(x) is part k's
        truncated objective L_k. The parts before parts[0] run under no_grad (their terms are
        constants for every learner); the parts after parts[-1] do not run."""
        parts = list(range(len(self.parts))) if parts is None else list(parts)
        h, const, log_probs = x, x.new_zeros(x.shape[0]), []
        for k in range(parts[-1] + 1):
            with torch.set_grad_enabled(torch.is_grad_enabled() and k >= parts[0]):
                h, const = isolate(h, const)
                h, _, logdet, logp = self.parts[k](h)
                const = const + logdet + logp  # part k's own terms; the next part's isolate detaches them
                if k in parts:
                    log_probs.append(const + self.parts[k].prior.log_prob(h))
        return log_probs

    def part_loss(self, x, k):
        """L_k: bits/dim (batch mean) of the flow truncated after part k; only part k gets gradients."""
        return self.bits_per_dim(self.truncated(x, [k])[0]).mean()

    def bits_per_dim(self, log_prob):
        """Discrete NLL in bits per dimension from the continuous log-density log p(x) (nats, (B,)).

        Pixels are integers in n_bins = 2^n_bits bins of width 1/n_bins on [-0.5, 0.5]; with uniform
        dequantization log P(bin) >= log p(x) - D * log(n_bins), so the bits/dim are
        (-log p(x) + D log n_bins) / (D ln 2) = -log p(x) / (D ln 2) + n_bits."""
        return -log_prob / (self.n_dims * math.log(2)) + self.n_bits

    def reverse(self, zs, temperature=1.0):
        """Exact inverse of forward; a None among the split-off latents is sampled at `temperature`."""
        zs = list(zs)
        h = zs.pop()
        for part in reversed(self.parts):
            h = part.reverse(h, zs, temperature)
        return h

    @torch.no_grad()
    def sample(self, n, temperature=0.7):
        """n images in the preprocessed [-0.5, 0.5] scale; temperature 0 gives the mean image."""
        h = self.parts[-1].prior.sample(n, temperature)
        return self.reverse([None] * self.n_splits + [h], temperature)

def brute_logdet(fn, x):
    """log|det J| of fn at one sample x (1, ...) from autograd's full Jacobian, where fn returns a list
    of tensors: the oracle that the tests and the tutorial check every fast log-det against."""
    flat = lambda v: torch.cat([t.flatten() for t in fn(v.view_as(x))])  # noqa: E731
    return torch.linalg.slogdet(torch.autograd.functional.jacobian(flat, x.flatten()))[1]

# -----------------------------------------------------------------------------
# Data: whole datasets as uint8 tensors in memory, dequantized on the fly.

class UsageError(Exception):
    """Bad flags, data, checkpoint or run directory: the command says why in one line, exit code 2."""

DATASETS = ("cifar10", "mnist", "fashion-mnist", "digits")
NATIVE = {"cifar10": (3, 32), "mnist": (1, 28), "fashion-mnist": (1, 28), "digits": (1, 8)}  # C, size
WHERE = {"cifar10": "cifar-10-batches-py/ (the extracted cifar-10-python.tar.gz)",
         "mnist": "MNIST/raw/ (the four unzipped idx files)",
         "fashion-mnist": "FashionMNIST/raw/ (the four unzipped idx files; Debian's dataset-fashion-mnist "
                          "package has them gzipped)"}
INIT_BATCH = 256  # images for ActNorm's data-dependent init (the official code's n_batch_init)

def preprocess(x, n_bits, noise=True, generator=None):
    """uint8 images (B, C, H, W) -> floats in [-0.5, 0.5), the scale the flow models.

    Keep the top n_bits of each pixel, map the n_bins = 2^n_bits integers to bins of width 1/n_bins
    on [-0.5, 0.5], and add uniform noise in [0, 1/n_bins) (dequantization): a density on this scale
    then bounds the probability of the discrete image, and bits_per_dim adds the D log n_bins."""
    n_bins = 2 ** n_bits
    x = torch.div(x, 2 ** (8 - n_bits), rounding_mode="floor").float() / n_bins - 0.5
    if noise:
        x = x + torch.rand(x.shape, generator=generator, device=x.device) / n_bins
    return x.contiguous(memory_format=torch.channels_last)  # faster convolutions, measured on CPU

def postprocess(x):
    """The flow's scale back to [0, 1] for saving images."""
    return (x + 0.5).clamp(0, 1)

def idx_problem(path):
    """What is wrong with an idx file (magic 2049 labels / 2051 images, then its sizes), or None."""
    with open(path, "rb") as f:
        magic = int.from_bytes(f.read(4), "big")
        if magic not in (2049, 2051):
            return "is not an idx file"
        dims = [int.from_bytes(f.read(4), "big") for _ in range(magic - 2048)]
    want = 4 + 4 * len(dims) + math.prod(dims)
    size = os.path.getsize(path)
    return None if size == want else f"has {size:,} bytes where its header promises {want:,}"

def load_images(name, data_dir="./data", download=True):
    """(train, test) uint8 tensors (N, C, H, W) of a dataset.

    digits: scikit-learn's bundled 1797 8x8 digits (grey levels 0..16, clipped to 16 levels and
    scaled to 0..255 in steps of 17, so --n-bits 4 keeps every level); fixed split, the first 1500
    images train and the last 297 test. The others come through torchvision from data_dir."""
    if name == "digits":
        from sklearn.datasets import load_digits
        images = torch.from_numpy(load_digits().images).clamp(max=15).mul(17).to(torch.uint8)[:, None]
        return images[:1500], images[1500:]
    import torchvision
    cls = {"cifar10": torchvision.datasets.CIFAR10, "mnist": torchvision.datasets.MNIST,
           "fashion-mnist": torchvision.datasets.FashionMNIST}[name]
    created = not os.path.exists(data_dir)
    bad = [f"{path} {why}" for path in sorted(glob.glob(os.path.join(data_dir, cls.__name__, "raw", "*-ubyte")))
           for why in [idx_problem(path)] if why]
    try:
        if bad:
            raise UsageError(bad[0])
        splits = [cls(data_dir, train=train, download=download) for train in (True, False)]
    except Exception as e:  # offline download, missing or corrupt files: torchvision raises many kinds
        if created:
            shutil.rmtree(data_dir, ignore_errors=True)  # leave no half-made tree behind
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"could not load {name} ({why}); put it in {data_dir}/{WHERE[name]}, "
                         f"or try the offline --dataset digits") from None
    out = []
    for split in splits:
        data = torch.as_tensor(split.data)  # NHWC (CIFAR-10) or NHW (MNIST)
        out.append(data.permute(0, 3, 1, 2).contiguous() if data.ndim == 4 else data[:, None])
    return out[0], out[1]

def resize(images, size):
    """Antialiased bilinear resize of uint8 images to size x size."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)

def batches(images, batch_size, seed, epoch, num_workers=0):
    """An epoch's shuffled batches; the order depends on (seed, epoch) only, so a resumed run sees
    the same data."""
    from torch.utils.data import DataLoader, TensorDataset
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + epoch))
    return DataLoader(TensorDataset(images), batch_size=batch_size, sampler=order.tolist(),
                      drop_last=True, num_workers=num_workers)

def eval_batches(images, batch_size, n_bits, device):
    """The test batches, dequantized with noise from a fixed generator: every evaluation of every
    run sees the same noisy test set."""
    generator = torch.Generator(device=device).manual_seed(0)
    for i in range(0, len(images), batch_size):
        yield preprocess(images[i:i + batch_size].to(device), n_bits, generator=generator)

# -----------------------------------------------------------------------------
# The settings of a run. Each is a command-line flag; every Config is checked here, wherever it
# comes from (flags, a checkpoint, code), so a bad value is one line naming its flag.

MODES = ("full", "alternate", "sequential", "parallel")
END_TO_END = ("full", "finetune")  # the phases that backpropagate the whole flow's bits/dim

def setting(default, help, kind, low=None, high=None, choices=None, action=None, many=False):
    """A Config field and its check: kind (of each item, where `many` allows a list), range (closed
    for ints, open for floats), choices. `action`: argparse's, for on/off flags."""
    return field(default=default, metadata=dict(help=help, kind=kind, low=low, high=high, choices=choices,
                                                action=action, many=many))

def check_setting(f, value):
    """ValueError naming the flag if value is not a valid setting for Config field f."""
    m, name = f.metadata, "--" + f.name.replace("_", "-")
    if isinstance(value, list) and not (m["many"] and value):
        raise ValueError(f"{name}: want one {m['kind'].__name__}" + " or a list"* m["many"] + f", got {value!r}")
    for v in value if isinstance(value, list) else [value]:
        kind = m["kind"]
        if not isinstance(v, {float: (int, float)}.get(kind, kind)) or isinstance(v, bool) != (kind is bool):
            raise ValueError(f"{name}: want {kind.__name__}, got {v!r}")
        low, high = m["low"], math.inf if m["high"] is None else m["high"]
        if kind is int and low is not None and not low <= v <= high:
            raise ValueError(f"{name}: must be in [{low}, {high}], got {v}")
        if kind is float and low is not None and not low < v < high:  # nan fails too
            raise ValueError(f"{name}: must be in ({low}, {high}), got {v}")
        if kind is str and (not v or m["choices"] and v not in m["choices"]):
            raise ValueError(f"{name}: want " + (f"one of {', '.join(m['choices'])}" if m["choices"]
                                                 else "a non-empty value") + f", got {v!r}")

@dataclass
class Config:
    """A run's settings, each one a command-line flag; checkpoints store the whole Config."""
    mode: str = setting("alternate", "training mechanism", str, choices=MODES)
    epochs: int = setting(60, "epochs of the mechanism", int, 0)
    finetune: int = setting(0, "end-to-end epochs after the mechanism's epochs", int, 0)
    dataset: str = setting("cifar10", "the images", str, choices=DATASETS)
    data_dir: str = setting("./data", "torchvision datasets are read from / downloaded to here", str)
    image_size: int | None = setting(None, "resize to this size; None: native", int, 1, 1024)
    n_bits: int | None = setting(None, "bits per pixel kept; None: 8, or 4 for digits", int, 1, 8)
    subset: int | None = setting(None, "train on the first N training images; None: all", int, 1)
    levels: int = setting(3, "L, levels of the multi-scale flow", int, 1, 10)
    steps: int = setting(32, "K, flow steps per level", int, 1)
    hidden: int = setting(512, "channels of the coupling networks", int, 1)
    parts: list | str | None = setting(None, "steps per part, or auto:P (P parts of equal compute); None: the "
                                       "poster's cut, a part per level, the middle halved (32,16,16,32)", int, 1,
                                       many=True)
    part_prior: str = setting("standard", "prior on an intermediate part's output: N(0, I) or a learned "
                              "diagonal Gaussian", str, choices=("standard", "learned"))
    prior_bound: float | None = setting(None, "bound the split priors' log-std to (-B, B) by B tanh(./B); "
                                        "None: unbounded (the paper)", float, 0.0)
    batch_size: int = setting(64, "images per step (the global batch under torchrun)", int, 1)
    lr: float | list = setting(1e-3, "Adam learning rate, or one per part (1e-3,2e-3,2e-3,1e-3)", float, 0.0,
                               many=True)
    warmup: int | None = setting(None, "linear warmup over each part's first N updates; None: the steps of "
                                 "an epoch / the parts, at most 500", int, 1)
    alternate_every: int = setting(1, "steps per turn in alternate mode", int, 1)
    compile: bool | None = setting(None, "torch.compile every part; None: on a GPU (it pays at once), not on "
                                   "a CPU (it takes minutes)", bool, action=argparse.BooleanOptionalAction)
    recompute: bool = setting(False, "memory-saving gradients: keep each flow step's input only and run it "
                              "again in backward (torch.utils.checkpoint)", bool, action="store_true")
    ema: float | None = setting(None, "Polyak averaging: decay of the weights' moving average, which "
                                "evaluates, samples, is saved; None: off", float, 0.0, 1.0)
    seed: int = setting(0, "weights, data order and noise all follow from it", int, 0, 2 ** 32 - 1)
    device: str | None = setting(None, "cpu, cuda, cuda:1, mps; None: cuda if there is one", str)
    num_workers: int = setting(0, "DataLoader worker processes", int, 0)
    out: str | None = setting(None, "run directory; None: runs/<dataset>-<mode> (or -compare)", str)

    def __post_init__(self):
        """Check every setting (ValueError naming its flag); fill the defaults that depend on others."""
        auto = self.parts if isinstance(self.parts, str) else None  # auto:P, P parts of equal multiply-adds
        for f in fields(self):
            value = getattr(self, f.name)
            if (value is not None or f.default is not None) and not (f.name == "parts" and auto):
                check_setting(f, value)
        channels, native = NATIVE[self.dataset]
        self.image_size = self.image_size or native
        self.n_bits = self.n_bits or (4 if self.dataset == "digits" else 8)
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.compile = self.device.startswith("cuda") if self.compile is None else self.compile
        if auto is not None:
            if not (auto.startswith("auto:") and auto[5:].isdigit()):
                raise ValueError(f"--parts: want step counts like 32,16,16,32 or auto:P, got {auto!r}")
            macs = step_macs(channels, self.image_size, self.levels, self.steps, self.hidden)
            self.parts = balanced_parts(int(auto[5:]), macs)
        self.parts = check_parts(self.parts or default_parts(self.levels, self.steps), self.levels, self.steps)
        if self.image_size % 2 ** self.levels:
            fit = 2 ** self.levels * max(1, round(self.image_size / 2 ** self.levels))
            raise ValueError(f"--image-size {self.image_size} is not divisible by 2^levels = {2 ** self.levels};"
                             f" pass --image-size {fit}, say")
        self.lr = self.lr if isinstance(self.lr, list) else [self.lr]
        self.lr = self.lr * len(self.parts) if len(self.lr) == 1 else self.lr
        if len(self.lr) != len(self.parts):
            raise ValueError(f"--lr gives {len(self.lr)} rates for {len(self.parts)} parts")

# -----------------------------------------------------------------------------
# Training: one loop for every mechanism; a schedule says which parts learn on each step.

@dataclass
class Run:
    """A run between steps: everything its checkpoint holds."""
    cfg: Config
    model: Glow
    optimizers: list  # one Adam per part
    updates: list  # each part's own number of updates: its warmup counts these
    epoch: int = 0
    seconds: float = 0.0  # training time so far, evaluation excluded
    steps: int = 0
    history: list = field(default_factory=list)  # one metrics dict per finished epoch
    ema: Glow | None = None  # the moving average of the weights (--ema)
    owner: str | None = None  # the experiment directory whose run this is; None: a run of its own

def learning_parts(phase, step, phase_steps, n_parts, every=1):
    """The parts that learn on `step` of a phase.

    full / finetune / parallel: every part. alternate: one at a time, round-robin, `every` steps
    per turn. sequential: the phase's steps divided among the parts in order (greedy)."""
    if phase == "alternate":
        return [(step // every) % n_parts]
    if phase == "sequential":
        return [min(step * n_parts // phase_steps, n_parts - 1)]
    return list(range(n_parts))

def phase_of(cfg, epoch, steps_per_epoch):
    """(phase, index of the epoch's first step within its phase, steps in the phase), 1-based epoch."""
    if epoch <= cfg.epochs:
        return cfg.mode, (epoch - 1) * steps_per_epoch, cfg.epochs * steps_per_epoch
    return "finetune", (epoch - 1 - cfg.epochs) * steps_per_epoch, cfg.finetune * steps_per_epoch

def make_optimizers(model):
    """One Adam per part: a part keeps its moments and step count while it waits for its turn."""
    device = next(model.parameters()).device
    fused = device.type in ("cpu", "cuda")  # one kernel for all of a part's parameters
    return [torch.optim.Adam(part.parameters(), fused=fused) for part in model.parts]

def losses(model, x, phase, learning):
    """What a step of `phase` backpropagates. full and finetune: the whole flow's bits/dim, one
    gradient for every part. The others: each learning part's truncated loss L_k, which reaches
    only part k (parallel: every part's; their sum's gradient gives each part its own)."""
    if phase in END_TO_END:
        _, logdet, logpz = model(x)
        return [model.bits_per_dim(logdet + logpz).mean()]
    return [model.bits_per_dim(log_prob).mean() for log_prob in model.truncated(x, learning)]

def step_parts(run, learning):
    """Step the learning parts' Adams, each at its own rate, warmed up linearly over the part's own
    first cfg.warmup updates. The other parts' Adams keep their moments until their turn."""
    for k in learning:
        for group in run.optimizers[k].param_groups:
            group["lr"] = run.cfg.lr[k] * min(1.0, (run.updates[k] + 1) / run.cfg.warmup)
        run.optimizers[k].step()
        run.updates[k] += 1

class RunStopped(Exception):
    """The run cannot go on (a non-finite loss, a failed write, a lost peer): the last good
    checkpoint stays, and the message says which."""

def train(run, data, log=print, shard=slice(None)):
    """Train run.cfg's mechanism, then its finetuning, from run's epoch to epochs + finetune.

    Every mechanism is this one loop; they differ only in which parts learn on a step and in the
    loss that step backpropagates. `shard`: the rows of each batch this process trains on (all of
    them, except under data parallel). Returns run; writes into run.cfg.out when it is set."""
    from tqdm import tqdm
    cfg, model = run.cfg, run.model
    device, n_parts = torch.device(cfg.device), len(model.parts)
    params, averages = list(model.parameters()), list(run.ema.parameters()) if run.ema else None
    train_images, test_images = data
    steps_per_epoch = len(train_images) // cfg.batch_size
    model.train()
    for epoch in range(run.epoch + 1, cfg.epochs + cfg.finetune + 1):
        phase, first_step, phase_steps = phase_of(cfg, epoch, steps_per_epoch)
        loss_sums, loss_counts = [0.0] * n_parts, [0] * n_parts
        sync(device)
        t_epoch = time.perf_counter()
        loader = batches(train_images, cfg.batch_size, cfg.seed, epoch, cfg.num_workers)
        for i, (batch,) in enumerate(tqdm(loader, desc=f"epoch {epoch} {phase}", leave=False, disable=None)):
            x = preprocess(batch.to(device, non_blocking=True), cfg.n_bits)[shard]
            learning = learning_parts(phase, first_step + i, phase_steps, n_parts, cfg.alternate_every)
            step_losses = losses(model, x, phase, learning)
            values = [loss.item() for loss in step_losses]
            owners = [n_parts - 1] if phase in END_TO_END else learning  # the part each value belongs to
            if not all(math.isfinite(v) for v in values):
                k = first_nonfinite_part(model, x, owners, values)
                raise RunStopped(f"non-finite loss in part {k} of {n_parts} at epoch {epoch} ({phase}), "
                                 f"step {i}; {checkpoint_note(cfg.out)}")
            model.zero_grad(set_to_none=True)
            sum(step_losses).backward()
            step_parts(run, learning)  # only the learning parts step
            if run.ema:  # Polyak averaging; the decay grows from 0.1 so the average starts near the weights
                with torch.no_grad():
                    decay = min(cfg.ema, (1 + run.steps) / (10 + run.steps))
                    torch._foreach_lerp_(averages, params, 1 - decay)
            run.steps += 1
            for k, v in zip(owners, values):
                loss_sums[k], loss_counts[k] = loss_sums[k] + v, loss_counts[k] + 1
        sync(device)
        run.seconds += time.perf_counter() - t_epoch
        test = evaluate(run.ema or model, test_images, cfg.batch_size, device)
        raw_bpd = evaluate(model, test_images, cfg.batch_size, device)["test_bpd"] if run.ema else None
        train_parts = [s / c if c else None for s, c in zip(loss_sums, loss_counts)]
        finish_epoch(run, epoch, phase, train_parts, test, log, raw_bpd)
    return run

@torch.no_grad()
def first_nonfinite_part(model, x, owners, values):
    """The first part (1-based) whose truncated loss on x is not finite: where a failure starts, even
    when a later part's loss is the one that showed it; else the first part whose value was."""
    bad = [k for k, lp in enumerate(model.truncated(x)) if not torch.isfinite(lp).all()]
    bad += [k for k, v in zip(owners, values) if not math.isfinite(v)]
    return bad[0] + 1

@torch.no_grad()
def evaluate(model, images, batch_size, device):
    """The test metrics of model over all of `images`, with the same dequantization noise at every
    evaluation (eval_batches): the mean bits/dim of the full model (test_bpd, the paper's metric) and
    of the flow truncated after each part (part_losses), and what the mean rests on: the median
    image, the images that score worse than uniform noise on the cube (above n_bits bits/dim: how
    many, and the first 20), and whether the mean lies above the 99th percentile of the images'
    scores, which only the worst 1 % can do (dominated: a few images make the mean)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(len(model.parts), dtype=torch.float64, device=device)
    per_image = []
    for x in eval_batches(images, batch_size, model.n_bits, device):
        bpd = torch.stack([model.bits_per_dim(lp).double() for lp in model.truncated(x)])  # (parts, B)
        totals += bpd.sum(1)
        per_image.append(bpd[-1])
    model.train(was_training)
    part_bpd, bpd = (totals / len(images)).tolist(), torch.cat(per_image).cpu()
    worse = torch.nonzero(~(bpd <= model.n_bits)).flatten()  # nan counts as worse
    return {"test_bpd": part_bpd[-1], "part_losses": part_bpd, "test_median_bpd": bpd.median().item(),
            "test_outliers": len(worse), "test_outlier_ids": worse[:20].tolist(),
            "test_dominated": bool(part_bpd[-1] > torch.quantile(bpd, 0.99).item())}

def sync(device):
    """Wait for the device, so that a clock read afterwards times work that has really finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

def finish_epoch(run, epoch, phase, train_parts, test, log, raw_bpd=None):
    """Record and print the epoch's metrics; write samples, checkpoint and metrics.jsonl.

    test: evaluate()'s metrics; with --ema, the averaged weights', and raw_bpd the raw weights'."""
    test_bpd, part_bpd = test["test_bpd"], test["part_losses"]
    if not math.isfinite(test_bpd):
        k = next(k for k, v in enumerate(part_bpd) if not math.isfinite(v))
        raise RunStopped(f"non-finite test bits/dim in part {k + 1} of {len(part_bpd)} at epoch {epoch} "
                         f"({phase}); {checkpoint_note(run.cfg.out)}")
    run.epoch = epoch
    metrics = {"epoch": epoch, "phase": phase,
               "train_bpd": train_parts[-1],  # mean over the epoch's steps that ran the whole flow
               **test, "train_part_losses": None if phase in END_TO_END else train_parts,
               "seconds": run.seconds, "steps": run.steps}
    if raw_bpd is not None:
        metrics["raw_test_bpd"] = raw_bpd
    run.history.append(metrics)
    train_txt = f"{train_parts[-1]:.3f}" if train_parts[-1] is not None else "  -  "
    log(f"epoch {epoch:3d} | {phase:10s} | train {train_txt} | test {test_bpd:.3f} | parts "
        + " ".join(f"{v:.3f}" for v in part_bpd) + f" | {run.seconds:7.1f} s"
        + (f" | raw weights {raw_bpd:.3f}" if raw_bpd is not None else "")
        + (f" | a few images make the mean: median {test['test_median_bpd']:.3f}, {test['test_outliers']} "
           f"above {run.model.n_bits} bits/dim" if test["test_dominated"] else ""))
    out = run.cfg.out
    if out:
        from torchvision.utils import save_image
        samples = postprocess((run.ema or run.model).sample(64, temperature=0.7)).float().cpu()
        samples = F.interpolate(samples, scale_factor=max(1, 64 // samples.shape[-1]))  # big enough to see
        write_atomic(os.path.join(out, f"samples_{epoch:03d}.png"),
                     lambda tmp: save_image(samples, tmp, format="png", nrow=8, padding=4))
        save_checkpoint(run, os.path.join(out, "checkpoint.pt"))

        def write_metrics(path):  # after the checkpoint: it never holds an epoch a resume would redo
            with open(path, "w") as f:
                f.writelines(json.dumps(m) + "\n" for m in run.history)
        write_atomic(os.path.join(out, "metrics.jsonl"), write_metrics)

# -----------------------------------------------------------------------------
# Runs: build, checkpoint (atomic, checked whole), resume exactly.

def build_model(cfg):
    torch.manual_seed(cfg.seed)
    model = Glow(NATIVE[cfg.dataset][0], cfg.image_size, cfg.levels, cfg.steps, cfg.hidden, cfg.parts,
                 cfg.n_bits, cfg.part_prior, cfg.prior_bound).to(cfg.device, memory_format=torch.channels_last)
    if cfg.compile:  # a graph per part, grad mode and batch size, all sharing Part.forward's code
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(model.parts))
    for part in model.parts:
        part.recompute = cfg.recompute
        if cfg.compile:  # static shapes: each part sees its own; reverse and sample stay eager
            part.compile(dynamic=False)
    return model

def prepare_data(cfg):
    """(train, test) uint8 images of the dataset named in cfg, subset and resized."""
    train_images, test_images = load_images(cfg.dataset, cfg.data_dir)
    if cfg.subset and cfg.subset > len(train_images):
        raise UsageError(f"--subset {cfg.subset}: {cfg.dataset} has only {len(train_images)} training images")
    return resize(train_images[:cfg.subset], cfg.image_size), resize(test_images, cfg.image_size)

def write_atomic(path, write):
    """write(temporary path), then rename it onto path: a reader (or a resume) sees the old file or
    the new one, never half of one, and a failed write leaves no temporary file behind."""
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp) and not os.path.isdir(tmp):
            os.remove(tmp)

CHECKPOINT = {"config": dict, "model": dict, "optimizers": list, "updates": list, "epoch": int,
              "seconds": float, "steps": int, "history": list, "rng": dict, "ema": (dict, type(None)),
              "owner": (str, type(None))}  # what a checkpoint holds, and the type of each

def save_checkpoint(run, path):
    """Everything a resume needs: the config, weights, every part's Adam, counters, RNG, metrics."""
    device = torch.device(run.cfg.device)
    rng = {"cpu": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    state = {"config": asdict(run.cfg), "model": run.model.state_dict(),
             "optimizers": [o.state_dict() for o in run.optimizers], "updates": run.updates,
             "epoch": run.epoch, "seconds": run.seconds, "steps": run.steps, "history": run.history,
             "rng": rng, "ema": run.ema.state_dict() if run.ema else None, "owner": run.owner}
    write_atomic(path, lambda tmp: torch.save(state, tmp))

def load_checkpoint(path):
    """The checkpoint at path, its fields, types and config checked (start_run checks the weights
    against the config): UsageError naming what is wrong."""
    if not os.path.isfile(path):
        raise UsageError(f"--resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--resume: checkpoint {path} is corrupt or unreadable ({type(e).__name__})") from None
    wrong = [k for k, kind in CHECKPOINT.items() if not isinstance(ckpt, dict) or not isinstance(ckpt.get(k, ...), kind)]
    wrong += [k for k in ("updates", "history") if k not in wrong and not all(
        isinstance(v, int if k == "updates" else dict) for v in ckpt[k])]
    wrong += ["rng"] if "rng" not in wrong and not isinstance(ckpt["rng"].get("cpu"), torch.ByteTensor) else []
    if wrong:
        raise UsageError(f"--resume: checkpoint {path} lacks or has a malformed {', '.join(wrong)}")
    odd = sorted({f.name for f in fields(Config)} ^ set(ckpt["config"]))
    if odd:
        raise UsageError(f"--resume: the config in {path} lacks or has unknown settings: {', '.join(odd)}")
    try:
        Config(**ckpt["config"])
    except ValueError as e:
        raise UsageError(f"--resume: the config in {path} is not valid ({e})") from None
    return ckpt

def checkpoint_note(out):
    """The truth about what a stopped run leaves behind, for its last message."""
    path = os.path.join(out or "", "checkpoint.pt")
    runs = sorted(glob.glob(os.path.join(glob.escape(out or ""), "**", "checkpoint.pt"), recursive=True))
    if not out or not runs:
        return "no checkpoint was written"
    if path not in runs:
        return f"the last checkpoint of each of its {len(runs)} runs under {out} is kept"
    try:
        epoch = torch.load(path, map_location="cpu", mmap=True, weights_only=True)["epoch"]
    except Exception:  # this is an error path already: say what is there, raise nothing new
        return f"{path} is kept, but it cannot be read"
    return f"the checkpoint of epoch {epoch} in {out} is kept"

def default_warmup(n_parts, steps_per_epoch):
    """The updates one part gets in an epoch when the parts take turns (an epoch's steps / the parts),
    at most 500 (CIFAR-10's in the official code). Known at the start, the same however long the run."""
    return max(1, min(500, steps_per_epoch // n_parts))

def start_run(cfg, data=None, init_state=None, ckpt=None):
    """(run before its first step, (train, test) images): fresh, or restored from ckpt.

    A fresh run seeds everything from cfg.seed, initialises ActNorm on the first INIT_BATCH
    training images (or loads init_state) and fixes its warmup. The checkpoint's weights and
    optimizer states are checked against its config before any data is loaded."""
    device = torch.device(cfg.device)
    model = build_model(cfg)
    run = Run(cfg, model, make_optimizers(model), updates=[0] * len(model.parts))
    if ckpt:
        try:  # its weights and optimizer states must fit its config
            model.load_state_dict(ckpt["model"])
            if not len(ckpt["optimizers"]) == len(ckpt["updates"]) == len(model.parts):
                raise ValueError(f"{len(ckpt['optimizers'])} optimizer states and {len(ckpt['updates'])} "
                                 f"update counts for {len(model.parts)} parts")
            for optimizer, state in zip(run.optimizers, ckpt["optimizers"]):
                optimizer.load_state_dict(state)
            torch.set_rng_state(ckpt["rng"]["cpu"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            detail = next(line.strip() for line in str(e).splitlines()[1:] + [str(e)] if line.strip())
            raise UsageError(f"--resume: the checkpoint does not fit its config ({detail})") from None
        for key in ("updates", "epoch", "seconds", "steps", "history", "owner"):
            setattr(run, key, ckpt[key])
        if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    train_images, test_images = data if data is not None else prepare_data(cfg)
    if len(train_images) < cfg.batch_size:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {len(train_images)} training images")
    if not ckpt:
        if init_state is not None:
            model.load_state_dict(init_state)
        first = preprocess(train_images[:INIT_BATCH].to(device), cfg.n_bits,
                           generator=torch.Generator(device=device).manual_seed(cfg.seed))
        model.initialize(first)
        torch.manual_seed(cfg.seed)  # every mechanism sees the same dequantization noise
        if cfg.warmup is None:
            run.cfg = replace(cfg, warmup=default_warmup(len(cfg.parts), len(train_images) // cfg.batch_size))
    if cfg.ema:
        run.ema = copy.deepcopy(model)
        if ckpt:
            run.ema.load_state_dict(ckpt["ema"])
    return run, (train_images, test_images)

def load_model(out):
    """The model of the run in directory out, as its last checkpoint has it (the averaged weights with --ema)."""
    ckpt = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    model = build_model(replace(Config(**ckpt["config"]), compile=False))
    model.load_state_dict(ckpt["ema"] or ckpt["model"])
    return model

def weights_hash(model):
    """A short hash of every parameter and buffer: equal hashes mean identical weights."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]

# -----------------------------------------------------------------------------
# The poster's experiment: the mechanisms side by side from the same start, and what a step costs.

def mechanism_steps(mode, n_parts):
    """The kinds of step a mechanism takes, read off its schedule (learning_parts) over one turn each."""
    turns = [learning_parts(mode, step, n_parts, n_parts) for step in range(n_parts)]
    return [list(k) for k in dict.fromkeys(map(tuple, turns))]

def measure_step(model, x, phase, learning, repeats=3):
    """What one training step holds, sends and takes, on a copy of model: (activation bytes, boundary
    backward bytes, CUDA peak bytes or None, median seconds of `repeats` steps after the measured one).

    The steps are the loop's: losses(), backward, the learning parts' Adams.
    activation bytes: storage of the tensors autograd saves for backward (parameters excluded; with
    --recompute, what torch.utils.checkpoint keeps: each step's input).
    boundary bytes: gradient that flows backwards into a part's input from the part after it,
    counted by a hook on each part's input that fires only if a gradient really arrives there."""
    model = copy.deepcopy(model)
    optimizers = make_optimizers(model)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, crossing, seconds = {}, [0], []

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def count(grad):
        crossing[0] += grad.numel() * grad.element_size()

    def watch_input(module, args):
        if args[0].requires_grad:
            args[0].register_hook(count)

    cuda, peak = x.device.type == "cuda", None
    for i in range(repeats + 1):  # the first step is measured (and warms up); the others are timed
        hooks = [part.register_forward_pre_hook(watch_input) for part in model.parts[1:]] if i == 0 else []
        if cuda:
            torch.cuda.synchronize(x.device)
            torch.cuda.reset_peak_memory_stats(x.device)
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack if i == 0 else (lambda t: t), lambda t: t):
            step_losses = losses(model, x, phase, learning)
        model.zero_grad(set_to_none=True)
        sum(step_losses).backward()
        for k in learning:
            optimizers[k].step()
        sync(x.device)
        seconds.append(time.perf_counter() - t0)
        if cuda and i == 0:
            peak = torch.cuda.max_memory_allocated(x.device)
        for h in hooks:
            h.remove()
    return sum(saved.values()), crossing[0], peak, statistics.median(seconds[1:] or seconds)

def step_costs(model, x, mode, repeats=3):
    """measure_step for each kind of step a mechanism takes: the largest part's memory and bytes, and
    the mean of the steps' median times (per-part mechanisms: one turn of every part)."""
    costs = [measure_step(model, x, mode, learning, repeats) for learning in mechanism_steps(mode, len(model.parts))]
    peaks = [c[2] for c in costs if c[2] is not None]
    return {"step_seconds": statistics.fmean(c[3] for c in costs), "part_step_seconds": [c[3] for c in costs],
            "activation_bytes": max(c[0] for c in costs), "boundary_backward_bytes": max(c[1] for c in costs),
            "cuda_max_memory_allocated": max(peaks) if peaks else None}

def experiment_run(cfg, data, init_state, owner, log=print):
    """Train the run of the experiment in `owner` that lives in cfg.out, locked while it trains: from
    init_state, or on from its checkpoint where the experiment was stopped (a finished one as it is)."""
    with claim_run_dir(cfg.out, resume=True):
        path = os.path.join(cfg.out, "checkpoint.pt")
        ckpt = load_checkpoint(path) if os.path.exists(path) else None
        if ckpt and ckpt["owner"] != owner:
            raise UsageError(f"{cfg.out} holds a run that is not part of the experiment in {owner}")
        if ckpt:
            saved = Config(**ckpt["config"])
            if ckpt["epoch"] < cfg.epochs + cfg.finetune or (cfg.epochs, cfg.finetune) != (saved.epochs, saved.finetune):
                given = {k: v for k, v in asdict(cfg).items() if v is not None}
                cfg = resume_config(saved, given, ckpt["epoch"], log)
            else:
                cfg = saved
        elif os.listdir(cfg.out) != [".lock"]:
            raise UsageError(f"{cfg.out} holds files but no checkpoint: move them away to run it again")
        run, _ = start_run(cfg, data, init_state, ckpt)
        run.owner = owner
        return train(run, data, log)

def compare(cfg, modes=("full", "alternate"), log=print):
    """Train each mechanism from the same initial weights, data order and seed into cfg.out/<mode>;
    write compare.json/png. full trains epochs + finetune epochs end to end (the same total); every
    other mode trains its `epochs`, then `finetune` epochs end to end. Run again with --resume, it
    continues each run where a stopped comparison left it."""
    shared, data = start_run(replace(cfg, out=None))  # the initialised model every run starts from
    init_state = copy.deepcopy(shared.model.state_dict())
    # What one step of each mechanism holds, sends and takes, on the shared start. This also runs every
    # kind of step once, so no run pays the one-off cost of first-time kernel setup inside its timing.
    probe = preprocess(data[0][:cfg.batch_size].to(cfg.device), cfg.n_bits)
    costs = {mode: step_costs(shared.model, probe, mode) for mode in modes}
    runs = []
    for mode in modes:
        log(f"--- {mode}")
        moved = cfg.finetune if mode == "full" else 0  # full trains the finetuning epochs as its own
        run = experiment_run(replace(cfg, mode=mode, out=os.path.join(cfg.out, mode), epochs=cfg.epochs + moved,
                                     finetune=cfg.finetune - moved), data, init_state, cfg.out, log)
        last = run.history[-1]
        runs.append({"name": mode if mode == "full" or not cfg.finetune else f"{mode}+finetune",
                     "mode": mode, "epochs": run.cfg.epochs, "finetune": run.cfg.finetune,
                     "final_test_bpd": last["test_bpd"], "final_median_bpd": last["test_median_bpd"],
                     "final_dominated": last["test_dominated"], "train_seconds": run.seconds,
                     **costs[mode], "curve": run.history})
    full = runs[modes.index("full")]["curve"]
    target, what = smoothed_final(full, cfg.ema)
    for r in runs:
        r["time_to_target"] = next((m["seconds"] for m in r["curve"] if target and m["test_bpd"] <= target), None)
        same_time = at_time(full, r["train_seconds"])
        r["full_bpd_at_equal_time"] = same_time and not same_time["test_dominated"] and same_time["test_bpd"]
    summary = {"config": asdict(cfg), "target_bpd": target, "target": what, "runs": runs}
    write_results(summary, cfg.out, "compare", plot_compare)
    log(summary_table(summary))
    return summary

def smoothed_final(curve, ema):
    """(target, what it is): a run's final test bits/dim that one lucky or unlucky evaluation cannot move
    much: its averaged weights' (--ema), else the mean of its last three evaluations. None where a
    few images make one of those means: a target that says more about them than about the model."""
    last = curve[-1:] if ema else curve[-3:]
    if any(m["test_dominated"] for m in last):
        return None, "none: a few test images make full's final mean bits/dim (see test_median_bpd)"
    if ema:
        return curve[-1]["test_bpd"], "full's final bits/dim with averaged weights (--ema)"
    return statistics.fmean(m["test_bpd"] for m in last), "the mean of full's last 3 evaluations"

def at_time(curve, seconds):
    """The evaluation a run had reached after `seconds` of training (its last one by then), or None."""
    return next((m for m in reversed(curve) if m["seconds"] <= seconds * (1 + 1e-9)), None)

def write_results(summary, out, name, plot):
    """out/name.json, and out/name.png drawn by plot, each written atomically."""
    write_atomic(os.path.join(out, f"{name}.json"), lambda tmp: open(tmp, "w").write(json.dumps(summary, indent=1)))
    write_atomic(os.path.join(out, f"{name}.png"), lambda tmp: plot(summary, tmp))

def markdown_table(header, rows):
    """A Markdown table from a header and rows of cells (strings)."""
    lines = ["| " + " | ".join(cells) + " |" for cells in [header, *rows]]
    return "\n".join([lines[0], "|---" * len(header) + "|", *lines[1:]])

def summary_table(summary):
    """The comparison as a Markdown table (ratios relative to the full run); a mean that a few test
    images make is marked, and no time or equal-time value is computed from it."""
    full = next(r for r in summary["runs"] if r["mode"] == "full")
    header = ["run", "final test bpd", "median image", "train s", "time / full", "time to full's bpd (s)",
              "full's bpd at equal time", "step ms", "step / full", "activations MB", "boundary grad KB"]
    rows = [[r["name"], f"{r['final_test_bpd']:.3f}" + " (a few images make it)" * r["final_dominated"],
             f"{r['final_median_bpd']:.3f}", f"{r['train_seconds']:.0f}",
             f"{r['train_seconds'] / full['train_seconds']:.2f}",
             "no target" if summary["target_bpd"] is None else
             f"{r['time_to_target']:.0f}" if r["time_to_target"] is not None else "never",
             f"{r['full_bpd_at_equal_time']:.3f}" if r["full_bpd_at_equal_time"] else "-",
             f"{1e3 * r['step_seconds']:.1f}", f"{r['step_seconds'] / full['step_seconds']:.2f}",
             f"{r['activation_bytes'] / 2 ** 20:.1f}", f"{r['boundary_backward_bytes'] / 2 ** 10:.0f}"]
            for r in summary["runs"]]
    return markdown_table(header, rows) + f"\ntarget: {summary['target']}"

def plot_compare(summary, path):
    """Test bits/dim against epoch and against training seconds; dotted lines mark finetuning's start."""
    from matplotlib.figure import Figure  # not pyplot: the caller's backend (a notebook's) is left alone
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    for r in summary["runs"]:
        curve = r["curve"]
        start = next((i for i, m in enumerate(curve) if m["phase"] == "finetune"), None)
        for ax, key in zip(axes, ("epoch", "seconds")):
            line, = ax.plot([m[key] for m in curve], [m["test_bpd"] for m in curve], marker=".",
                            label=r["name"])
            if start is not None:  # a dotted line where finetuning starts
                x0 = curve[start - 1][key] if start else 0
                ax.axvline(x0, color=line.get_color(), linestyle=":", alpha=0.7)
            if summary["target_bpd"] is not None:
                ax.axhline(summary["target_bpd"], color="grey", linewidth=0.8, alpha=0.6)
    axes[0].set(xlabel="epoch", ylabel="test bits/dim", title="per epoch")
    axes[1].set(xlabel="training seconds", title="per second of training (the poster's claim)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")

# -----------------------------------------------------------------------------
# Data parallel under torchrun, for every mechanism. Nothing above knows about processes: train()
# takes the rows of a batch to train on, and this section adds a gradient average from outside.

def torchrun_env():
    """(rank, local rank, number of processes) as torchrun sets them; (0, 0, 1) in a plain run."""
    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env.get("WORLD_SIZE", "1"))

def init_distributed(cfg, local_rank):
    """Join the process group (NCCL on GPUs, gloo on CPU); one GPU per local process."""
    import torch.distributed as dist
    if torch.device(cfg.device).type == "cuda":
        cfg = replace(cfg, device=f"cuda:{local_rank % torch.cuda.device_count()}")
        torch.cuda.set_device(cfg.device)
    dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    return cfg

def average_gradients(optimizer, args=None, kwargs=None):
    """A step pre-hook: the optimizer's gradients, averaged over the processes (one all-reduce)."""
    import torch.distributed as dist
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, avg in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(avg.view_as(g))

def train_data_parallel(cfg, ckpt, rank, world, log):
    """Every process holds the whole model and trains on its rows of each global batch; before a
    part's optimizer steps, its gradients are averaged over the processes. Process 0 writes."""
    import torch.distributed as dist
    if cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} (the global batch) must divide among {world} processes")
    run, data = start_run(cfg, ckpt=ckpt)  # same seed, same init batch: identical replicas
    for optimizer in run.optimizers:
        optimizer.register_step_pre_hook(average_gradients)
    if rank:
        run.cfg = replace(run.cfg, out=None)  # one writer per run directory
    try:
        train(run, data, log, shard=slice(rank, None, world))
    except RuntimeError as e:  # gloo / NCCL: a peer process died
        raise RunStopped(f"process {rank}: another process of the run was lost ({str(e).splitlines()[0]}); "
                         f"{checkpoint_note(cfg.out)}") from None
    hashes = [None] * world
    dist.all_gather_object(hashes, weights_hash(run.model))
    if len(set(hashes)) != 1:
        raise RuntimeError(f"data-parallel replicas diverged: weight hashes {hashes}")
    log(f"data parallel over {world} processes: replicas identical at the end (weight hashes compared)")

# -----------------------------------------------------------------------------
# Command line: the flags are Config's fields. Every command here keeps the same promises: one
# writer per directory, nothing written is lost, anything wrong is one line and a non-zero exit.

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the whole usage too)
        raise UsageError(message)

def parse_parts(text):
    """--parts: step counts like 32,16,16,32, or auto:P (Config checks both)."""
    return text if text.startswith("auto:") else [int(p) for p in text.split(",")]

def parse_rates(text):
    """--lr: one rate, or one per part."""
    return [float(v) for v in text.split(",")]

def parse_modes(text):
    modes = text.split(",")
    if any(m not in MODES for m in modes) or "full" not in modes or len(set(modes)) < len(modes):
        raise argparse.ArgumentTypeError(f"must list 'full' and others of {', '.join(MODES)}, each once; got {text!r}")
    return modes

def make_parser(description="Glow trained in gradient-isolated parts: full, alternate, sequential or "
                            "parallel training, + finetuning, and the poster's comparison."):
    """The flags of Config's fields; a flag not given takes Config's default, or the checkpoint's."""
    p = Parser(description=description)
    for f in fields(Config):
        m = f.metadata
        kind = {"parts": parse_parts, "lr": parse_rates}.get(f.name, m["kind"])
        kwargs = {"action": m["action"]} if m["action"] else {"type": kind, "choices": m["choices"]}
        p.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS,
                       help=f"{m['help']} (default: {f.default})", **kwargs)
    return p

RESUMABLE = ("epochs", "finetune", "lr", "warmup", "data_dir", "device", "num_workers", "out", "compile", "recompute")

def flags(names):
    return ", ".join("--" + name.replace("_", "-") for name in names)

def resume_config(saved, given, done, log):
    """A resumed run's Config: the checkpoint's, with the flags given applied where a resume may
    change them (each one logged), and refused with one line where it may not."""
    changed = {k: v for k, v in given.items() if getattr(replace(saved, **{k: v}), k) != getattr(saved, k)}
    for k, v in changed.items():
        if k not in RESUMABLE:
            raise UsageError(f"{flags([k])} {v}: this run was built with {k} = {getattr(saved, k)}, "
                             f"and a resume cannot change that (it may change {flags(RESUMABLE)})")
    cfg = replace(saved, **changed)
    if cfg.epochs != saved.epochs and (saved.mode == "sequential" or done > min(cfg.epochs, saved.epochs)):
        why = (f"a sequential run sizes each part's turn from --epochs ({saved.epochs} here), so it cannot "
               f"continue exactly to another value" if saved.mode == "sequential" else
               f"the run has already trained {done} epochs, past its {saved.epochs} of {saved.mode}")
        raise UsageError(f"--epochs {cfg.epochs}: {why}; keep --epochs {saved.epochs} (--finetune may change)")
    if cfg.epochs + cfg.finetune <= done:
        raise UsageError(f"the run in {cfg.out} already has {done} epochs ({saved.epochs} + {saved.finetune} "
                         f"finetuning); ask for more with --epochs or --finetune")
    show = lambda v: ",".join(map(str, v)) if isinstance(v, list) else v  # noqa: E731
    for k, v in changed.items():
        log(f"resume: {flags([k])} {show(getattr(cfg, k))} (was {show(getattr(saved, k))})")
    return cfg

def config_from_args(args, log=print):
    """(Config, checkpoint or None) from parsed flags, after every check that needs no data.

    A flag not given takes Config's default, or on --resume the checkpoint's setting. UsageError
    (one line) for anything wrong: flags, flag combinations, the checkpoint, the device."""
    given = {f.name: getattr(args, f.name) for f in fields(Config) if hasattr(args, f.name)}
    compare, resume = getattr(args, "compare", False), getattr(args, "resume", False)
    if getattr(args, "compare_modes", None) and not compare:
        raise UsageError("--compare-modes names the mechanisms of --compare: give --compare too")
    ckpt = None
    try:
        if resume and not compare:  # the checkpoint's config, with the flags given applied one by one
            named = {f.name: given.get(f.name, f.default) for f in fields(Config) if f.name in ("out", "dataset", "mode")}
            for f in fields(Config):
                if f.name in named and f.name in given:
                    check_setting(f, given[f.name])
            out = named["out"] or os.path.join("runs", f"{named['dataset']}-{named['mode']}")
            ckpt = load_checkpoint(os.path.join(out, "checkpoint.pt"))
            if ckpt["owner"]:
                raise UsageError(f"--out {out}: this run is part of the experiment in {ckpt['owner']}; "
                                 f"continue it through that experiment's command")
            cfg = resume_config(Config(**ckpt["config"]), {**given, "out": out}, ckpt["epoch"], log)
        else:
            cfg = Config(**given)
            cfg.out = cfg.out or os.path.join("runs", f"{cfg.dataset}-{'compare' if compare else cfg.mode}")
    except ValueError as e:
        raise UsageError(str(e)) from None
    check_device(cfg.device)
    if cfg.epochs + cfg.finetune == 0 or (compare and cfg.epochs == 0):
        raise UsageError("--compare times each mechanism's own epochs: give --epochs >= 1" if compare else
                         "nothing to train: give --epochs (and --finetune)")
    return cfg, ckpt

def check_device(device):
    """UsageError unless a tensor can be made on `device` here."""
    try:
        if torch.device(device).type not in ("cpu", "cuda", "mps"):
            raise RuntimeError("only cpu, cuda and mps are supported")
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise UsageError(f"--device {device}: not usable here ({str(e).splitlines()[0]})") from None

def claim_run_dir(out, resume=False):
    """Create `out` and lock it for this process: one writer per directory. The lock is the operating
    system's (flock), so it ends with the process however the process ends, kill -9 too. A fresh start
    needs an empty directory: one that holds anything is continued (resume) or refused."""
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, ".lock"), "w")
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create or write it ({e.strerror or e})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UsageError(f"--out {out} is in use by another run; wait for it to end, or choose another --out") \
            from None
    held = sorted(set(os.listdir(out)) - {".lock"})
    if held and not resume:
        lock.close()
        raise UsageError(f"--out {out} already holds {', '.join(held[:3])}{', ...' * (len(held) > 3)}: "
                         f"continue what is there with --resume, or choose another --out")
    return lock  # the lock lasts as long as this file stays open

def claim_experiment(out, plan, resume):
    """claim_run_dir for an experiment, which records its plan (kind, settings) in experiment.json:
    it continues only an experiment with the same plan, and never a directory that holds another."""
    lock = claim_run_dir(out, resume)
    path = os.path.join(out, "experiment.json")
    plan = json.loads(json.dumps(plan))
    old = json.load(open(path)) if os.path.exists(path) else None
    if old is None and os.listdir(out) != [".lock"] or old not in (None, plan):
        lock.close()
        old_cfg, cfg = (old or {}).get("config", {}), plan.get("config", {})
        diff = sorted({k for k in {**plan, **(old or {})} if k != "config" and (old or {}).get(k) != plan.get(k)}
                      | {k for k in {**cfg, **old_cfg} if old_cfg.get(k) != cfg.get(k)})
        raise UsageError(f"--out {out} holds " + ("no experiment to continue" if old is None else
                         f"an experiment whose {', '.join(diff)} differ from these") + "; choose another --out")
    write_atomic(path, lambda tmp: open(tmp, "w").write(json.dumps(plan, indent=1)))
    return lock

def interrupt(signum, frame):  # SIGTERM (what a cluster scheduler sends) is handled like Ctrl-C
    raise KeyboardInterrupt(signum)

def command(prog, work, argv=None):
    """Run work(argv, where) with the promises of every command here, and return its exit code:
    2 and one line for bad input (UsageError); 1 and one line when the run cannot go on (RunStopped,
    a failed write or read of the environment); 130 / 143 on Ctrl-C / SIGTERM. Each last line says
    what is kept in where["out"], the directory work records as soon as it knows it."""
    rank = torchrun_env()[0]
    where = {}
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        work(argv, where)
    except UsageError as e:
        if rank == 0:
            print(f"{prog}: error: {e}", file=sys.stderr)
        else:  # quiet while torchrun stops this process, so that process 0 is the one that says why
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(2)
        return 2
    except (RunStopped, OSError) as e:
        why = e if isinstance(e, RunStopped) else f"{e.strerror or e}: {e.filename}; {checkpoint_note(where.get('out'))}"
        print(f"{prog}: stopped: {why}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        for s in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut this message short
            signal.signal(s, signal.SIG_IGN)
        if rank == 0:
            print(f"{prog}: interrupted ({'SIGTERM' if e.args else 'Ctrl-C'}); {checkpoint_note(where.get('out'))}",
                  file=sys.stderr)
        return 143 if e.args else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if "torch.distributed" in sys.modules and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0

def main(argv=None):
    return command("glow_parts.py", run_main, argv)

def run_main(argv, where):
    """Train a run (or continue it), or compare the mechanisms; data parallel under torchrun."""
    rank, local_rank, world = torchrun_env()
    log = print if rank == 0 else (lambda *a: None)
    p = make_parser()
    g = p.add_argument_group("what to do (default: train)")
    g.add_argument("--resume", action="store_true",
                   help=f"continue the run (or comparison) in --out; it may change only {flags(RESUMABLE)}")
    g.add_argument("--compare", action="store_true",
                   help="train the mechanisms side by side from the same start into --out; write compare.json/png")
    g.add_argument("--compare-modes", type=parse_modes, help="the mechanisms --compare runs (default: full,alternate)")
    args = p.parse_args(argv)
    cfg, ckpt = config_from_args(args, log)
    where["out"] = cfg.out
    if isinstance(getattr(args, "parts", None), str):
        log(f"--parts {args.parts} = {','.join(map(str, cfg.parts))} (equal multiply-adds per part)")
    if args.compare:
        if world > 1:
            raise UsageError("--compare times the mechanisms in one process: run it without torchrun")
        modes = args.compare_modes or ["full", "alternate"]
        with claim_experiment(cfg.out, {"kind": "compare", "modes": modes, "config": asdict(cfg)}, args.resume):
            return compare(cfg, modes, log)
    with claim_run_dir(cfg.out, args.resume) if rank == 0 else open(os.devnull):  # before any data is loaded
        if world > 1:
            return train_data_parallel(init_distributed(cfg, local_rank), ckpt, rank, world, log)
        return train(*start_run(cfg, ckpt=ckpt), log)

if __name__ == "__main__":
    sys.exit(main())
