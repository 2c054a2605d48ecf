"""
glow_parts.py: Glow trained in gradient-isolated parts with a truncated local objective.

In reading order: the layers, Glow cut into parts and the truncated objective, the data, the settings,
one training loop for every mechanism (full, alternate, sequential, parallel, + end-to-end finetuning),
runs that resume exactly, the poster's comparison, data parallel under torchrun, the CLI. The research
beyond it (the sweep over budgets and seeds, the pipeline of parts, benchmarks) is in experiments/.

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
  - The split priors' log-std is bounded to (-5, 5) by 5 tanh(./5) (--prior-bound): unbounded, a prior
    extrapolating to an input outside its training range can make one image's bits/dim explode.
  - The top prior is a free mean / log-std per latent position (the official code: a zero conv over a
    constant); the split prior and coupling use contiguous channel halves (the official code interleaves).
  - Bits/dim is measured with one uniform-noise dequantization sample, as in the paper's tables;
    every evaluation also reports the median image and the images that score worse than noise.
"""
import argparse
import copy
import fcntl
import functools
import glob
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

    def mean_logs(self, h):  # with a bound B (--prior-bound): log std = B tanh(raw / B), within (-B, B)
        mean, logs = self.prior(h).chunk(2, dim=1)
        return mean, self.bound * torch.tanh(logs / self.bound) if self.bound else logs

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
    """The poster's cut: one part per level, the middle level (of an odd number) halved: 32,16,16,32."""
    parts = [n_steps] * n_levels
    if n_levels % 2 == 1 and n_levels > 1 and n_steps > 1:
        parts[n_levels // 2:n_levels // 2 + 1] = [n_steps // 2, n_steps - n_steps // 2]
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
    """--parts auto:P: P contiguous parts whose most expensive one is as cheap as possible (exact: a
    dynamic programme over the last cut)."""
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

def check_flow(parts, n_levels, n_steps, image_size):
    """The parts (step counts, in flow order) as a list of ints if they cut this flow, else ValueError."""
    parts = list(parts)
    if not parts or not all(type(p) is int and p > 0 for p in parts):
        raise ValueError(f"--parts: want a non-empty list of positive integers, got {parts}")
    if sum(parts) != n_levels * n_steps:
        raise ValueError(f"--parts {','.join(map(str, parts))} sum to {sum(parts)}, but the flow has "
                         f"levels * steps = {n_levels} * {n_steps} = {n_levels * n_steps} steps")
    if image_size % 2 ** n_levels:  # each level halves the image
        raise ValueError(f"--image-size {image_size} is not divisible by 2^levels = {2 ** n_levels}; pass "
                         f"--image-size {2 ** n_levels * max(1, round(image_size / 2 ** n_levels))}, say")
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

    def forward(self, h):
        """h_{k-1} -> (h_k, split-off latents, sum of log-dets (B,), sum of log p(z | .) (B,))."""
        zs, logdet, logp = [], 0, 0
        for layer in self.layers:
            if isinstance(layer, Split):
                h, z, lp = layer(h)
                zs, logp = zs + [z], logp + lp
            else:
                h, ld = layer(h)
                logdet = logdet + ld
        return h, zs, logdet, logp

    def reverse(self, h, zs, temperature=1.0):
        """h_k -> h_{k-1}; pops this part's split-off latents (None: sample them) off the end of zs."""
        for layer in reversed(self.layers):
            h = layer.reverse(h, zs.pop(), temperature) if isinstance(layer, Split) else layer.reverse(h)
        return h

class Glow(nn.Module):
    """Multi-scale Glow: per level a squeeze, n_steps flow steps, and (except the last) a split.

    The n_levels * n_steps flow steps form one sequence that `parts` (step counts; default: the
    poster's cut) cuts into contiguous parts. A squeeze goes to the part holding its level's first
    step, a split to the part holding its level's last step, the top prior to the last part: every
    parameter is in exactly one part. Call initialize(x) on a batch before training (ActNorm's init)."""

    def __init__(self, in_channels=3, image_size=32, n_levels=3, n_steps=32, hidden=512, parts=None,
                 n_bits=8, part_prior="standard", prior_bound=5.0):
        super().__init__()
        parts = check_flow(default_parts(n_levels, n_steps) if parts is None else parts, n_levels, n_steps, image_size)
        self.n_bits, self.part_sizes, self.n_splits = n_bits, parts, n_levels - 1
        self.n_dims = in_channels * image_size ** 2  # D
        owner = [k for k, size in enumerate(parts) for _ in range(size)]  # the part of each step
        layers, shapes = [[] for _ in parts], [None] * len(parts)  # each part's layers and output shape
        C, S = in_channels, image_size
        for level in range(n_levels):
            first, last = level * n_steps, (level + 1) * n_steps - 1
            C, S = 4 * C, S // 2
            layers[owner[first]].append(Squeeze())
            for i in range(first, last + 1):
                layers[owner[i]].append(FlowStep(C, hidden))
                shapes[owner[i]] = (C, S, S)
            if level < n_levels - 1:
                layers[owner[last]].append(Split(C, prior_bound))
                C //= 2
                shapes[owner[last]] = (C, S, S)
        self.parts = nn.ModuleList(
            Part(layers[k], GaussianPrior(shapes[k], learned=(k == len(parts) - 1 or part_prior == "learned")))
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
        return self.reverse([None] * self.n_splits + [self.parts[-1].prior.sample(n, temperature)], temperature)

def brute_logdet(fn, x):
    """log|det J| of fn (returning a list of tensors) at one sample x (1, ...), from autograd's full
    Jacobian: the oracle that the tests and the tutorial check every fast log-det against."""
    flat = lambda v: torch.cat([t.flatten() for t in fn(v.view_as(x))])  # noqa: E731
    return torch.linalg.slogdet(torch.autograd.functional.jacobian(flat, x.flatten()))[1]

# -----------------------------------------------------------------------------
# Data: whole datasets as uint8 tensors in memory, dequantized on the fly.

class UsageError(Exception):
    """Bad flags, data, checkpoint or run directory: the command says why in one line, exit code 2."""

NATIVE = {"cifar10": (3, 32), "mnist": (1, 28), "fashion-mnist": (1, 28), "digits": (1, 8)}  # C, size
WHERE = {"cifar10": "cifar-10-batches-py/ (the extracted cifar-10-python.tar.gz)", "mnist": "MNIST/raw/ (the four "
         "unzipped idx files)", "fashion-mnist": "FashionMNIST/raw/ (the four unzipped idx files; Debian's "
         "dataset-fashion-mnist package has them gzipped)"}
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

def idx_problem(path):
    """What is wrong with an idx file (magic 2049 labels / 2051 images, its sizes, the data), or None."""
    with open(path, "rb") as f:
        magic = int.from_bytes(f.read(4), "big")
        dims = [int.from_bytes(f.read(4), "big") for _ in range(magic - 2048 if magic in (2049, 2051) else 0)]
    want, size = 4 + 4 * len(dims) + math.prod(dims), os.path.getsize(path)
    return "is not an idx file" if not dims else None if size == want else \
        f"has {size:,} bytes where its header promises {want:,}"

def load_images(name, data_dir="./data", download=True):
    """(train, test) uint8 tensors (N, C, H, W) of a dataset. digits: scikit-learn's bundled 1797 8x8
    digits (grey levels 0..16, clipped to 16 levels and scaled to 0..255 in steps of 17, so --n-bits 4
    keeps every level), the first 1500 train and the last 297 test. The others come through torchvision."""
    if name == "digits":
        from sklearn.datasets import load_digits
        images = torch.from_numpy(load_digits().images).clamp(max=15).mul(17).to(torch.uint8)[:, None]
        return images[:1500], images[1500:]
    import torchvision
    cls = {"cifar10": torchvision.datasets.CIFAR10, "mnist": torchvision.datasets.MNIST,
           "fashion-mnist": torchvision.datasets.FashionMNIST}[name]
    created = not os.path.exists(data_dir)
    try:
        for path in sorted(glob.glob(os.path.join(data_dir, cls.__name__, "raw", "*-ubyte"))):
            if idx_problem(path):
                raise UsageError(f"{path} {idx_problem(path)}")
        splits = [cls(data_dir, train=train, download=download) for train in (True, False)]
    except Exception as e:  # offline download, missing or corrupt files: torchvision raises many kinds
        if created:
            shutil.rmtree(data_dir, ignore_errors=True)  # leave no half-made tree behind
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"could not load {name} ({why}); put it in {data_dir}/{WHERE[name]}, "
                         f"or try the offline --dataset digits") from None
    data = [torch.as_tensor(split.data) for split in splits]  # NHWC (CIFAR-10) or NHW (MNIST)
    return [d.permute(0, 3, 1, 2).contiguous() if d.ndim == 4 else d[:, None] for d in data]

def resize(images, size):
    """Antialiased bilinear resize of uint8 images to size x size."""
    if images.shape[-2:] == (size, size):
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)

def batches(images, batch_size, seed, epoch):
    """An epoch's shuffled batches; the order depends on (seed, epoch) only: a resumed run sees the same."""
    from torch.utils.data import DataLoader, TensorDataset
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + epoch))
    return DataLoader(TensorDataset(images), batch_size, sampler=order.tolist(), drop_last=True)

def eval_batches(images, batch_size, n_bits, device):
    """The test batches, with noise from a fixed generator: every evaluation sees the same noisy test set."""
    generator = torch.Generator(device=device).manual_seed(0)
    for i in range(0, len(images), batch_size):
        yield preprocess(images[i:i + batch_size].to(device), n_bits, generator=generator)

# -----------------------------------------------------------------------------
# The settings of a run. Each is a command-line flag, and every Config is checked here wherever it
# comes from (flags, a checkpoint, code): a bad value is a ValueError naming its flag.

MODES = ("full", "alternate", "sequential", "parallel")
END_TO_END = ("full", "finetune")  # the phases that backpropagate the whole flow's bits/dim

def setting(default, help, kind, low=None, high=None, choices=None, action=None, many=False):
    """A Config field and its check: the kind of its value (of each item, where `many` allows a list),
    its range (closed for ints, open for floats) or choices; `action`: argparse's, for on/off flags."""
    return field(default=default, metadata=dict(help=help, kind=kind, low=low, high=high, choices=choices,
                                                action=action, many=many))

def check_setting(f, value):
    """ValueError naming the flag unless value is a valid setting for Config field f."""
    m, name, kind = f.metadata, "--" + f.name.replace("_", "-"), f.metadata["kind"]
    if isinstance(value, list) and not (m["many"] and value):
        raise ValueError(f"{name}: want one {kind.__name__}" + " or a list" * m["many"] + f", got {value!r}")
    for v in value if isinstance(value, list) else [value]:
        low, high = m["low"], math.inf if m["high"] is None else m["high"]
        if not isinstance(v, (int, float) if kind is float else kind) or isinstance(v, bool) != (kind is bool):
            raise ValueError(f"{name}: want {kind.__name__}, got {v!r}")
        if low is not None and not (low <= v <= high if kind is int else low < v < high):  # nan fails too
            raise ValueError(f"{name}: must be in " + (f"[{low}, {high}]" if kind is int else f"({low}, {high})")
                             + f", got {v}")
        if kind is str and (not v or m["choices"] and v not in m["choices"]):
            raise ValueError(f"{name}: want {'one of ' + ', '.join(m['choices']) if m['choices'] else 'a value'}, "
                             f"got {v!r}")

@dataclass
class Config:
    """A run's settings, each one a command-line flag; checkpoints store the whole Config."""
    mode: str = setting("alternate", "training mechanism", str, choices=MODES)
    epochs: int = setting(60, "epochs of the mechanism", int, 0)
    finetune: int = setting(0, "end-to-end epochs after the mechanism's epochs", int, 0)
    dataset: str = setting("cifar10", "the images", str, choices=tuple(NATIVE))
    data_dir: str = setting("./data", "torchvision datasets are read from / downloaded to here", str)
    image_size: int | None = setting(None, "resize to this size; None: native", int, 1, 1024)
    n_bits: int | None = setting(None, "bits per pixel kept; None: 8, or 4 for digits", int, 1, 8)
    subset: int | None = setting(None, "train on the first N training images; None: all", int, 1)
    test_subset: int | None = setting(None, "evaluate on the first N test images; None: all", int, 1)
    levels: int = setting(3, "L, levels of the multi-scale flow", int, 1, 10)
    steps: int = setting(32, "K, flow steps per level", int, 1)
    hidden: int = setting(512, "channels of the coupling networks", int, 1)
    parts: list | str | None = setting(None, "steps per part, or auto:P (equal compute); None: the poster's cut",
                                       int, 1, many=True)
    part_prior: str = setting("standard", "prior on a part's output h_k: N(0, I), or a learned diagonal Gaussian",
                              str, choices=("standard", "learned"))
    prior_bound: float = setting(5.0, "bound the split priors' log-std to (-B, B) by B tanh(./B); 0: unbounded, "
                                 "as in the paper", float)
    batch_size: int = setting(64, "images per step (the global batch under torchrun)", int, 1)
    lr: float | list = setting(1e-3, "Adam's rate, or one per part (1e-3,2e-3,2e-3,1e-3)", float, 0.0, many=True)
    warmup: int | None = setting(None, "linear warmup over each part's first N updates; None: an epoch's steps "
                                 "/ the parts, at most 500", int, 1)
    alternate_every: int = setting(1, "steps per turn in alternate mode", int, 1)
    clip: float | None = setting(None, "clip each learning part's gradient to this norm; None: no clipping", float, 0.0)
    compile: bool | None = setting(None, "torch.compile every part; None: on a GPU (it pays at once), not on a "
                                   "CPU (it takes minutes)", bool, action=argparse.BooleanOptionalAction)
    ema: float | None = setting(None, "Polyak averaging: the decay of the weights' moving average, which "
                                "evaluates, samples, is saved; None: off", float, 0.0, 1.0)
    seed: int = setting(0, "weights, data order and noise all follow from it", int, 0, 2 ** 32 - 1)
    device: str | None = setting(None, "cpu, cuda, cuda:1, mps; None: cuda if there is one", str)
    out: str | None = setting(None, "run directory; None: runs/<dataset>-<mode> (or -compare)", str)

    def __post_init__(self):
        """Check every setting (ValueError naming its flag); fill the defaults that depend on others."""
        auto = self.parts if isinstance(self.parts, str) else None  # auto:P, P parts of equal multiply-adds
        for f in fields(self):
            if (getattr(self, f.name) is not None or f.default is not None) and not (f.name == "parts" and auto):
                check_setting(f, getattr(self, f.name))
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
        self.parts = check_flow(self.parts or default_parts(self.levels, self.steps), self.levels, self.steps,
                                self.image_size)
        if not 0 <= self.prior_bound < math.inf:  # nan fails too
            raise ValueError(f"--prior-bound: must be 0 (unbounded) or positive and finite, got {self.prior_bound}")
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
    owner: str | None = None  # the directory of the comparison or sweep the run belongs to

def learning_parts(phase, step, phase_steps, n_parts, every=1):
    """The parts that learn on `step` of a phase. full / finetune / parallel: every part. alternate: one at a time,
    round-robin, `every` steps a turn. sequential: the phase's steps divided among the parts in order (greedy)."""
    if phase == "alternate":
        return [(step // every) % n_parts]
    if phase == "sequential":
        return [min(step * n_parts // phase_steps, n_parts - 1)]
    return list(range(n_parts))

def make_optimizers(model):
    """One Adam per part: a part keeps its moments and step count while it waits for its turn."""
    fused = next(model.parameters()).device.type in ("cpu", "cuda")  # one kernel for all of a part's parameters
    return [torch.optim.Adam(part.parameters(), fused=fused) for part in model.parts]

def losses(model, x, phase, learning):
    """What a step of `phase` backpropagates. full and finetune: the whole flow's bits/dim, one gradient
    for every part. The others: each learning part's truncated loss L_k, which reaches only part k."""
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
        if run.cfg.clip:  # the part's gradient, scaled down to norm `clip` if it is longer
            torch.nn.utils.clip_grad_norm_(run.model.parts[k].parameters(), run.cfg.clip)
        run.optimizers[k].step()
        run.updates[k] += 1

class RunStopped(Exception):
    """The run cannot go on (a non-finite loss, a lost process): its message says which checkpoint is kept."""

def train(run, data, log=print, shard=slice(None)):
    """Train run.cfg's mechanism, then its finetuning, from run's epoch to epochs + finetune: every
    mechanism is this one loop, and they differ only in which parts learn on a step and in the loss it
    backpropagates. `shard`: the rows of each batch this process trains on (under data parallel)."""
    from tqdm import tqdm
    cfg, model, train_images, test_images = run.cfg, run.model, *data
    device, n_parts, steps_per_epoch = torch.device(cfg.device), len(model.parts), len(train_images) // cfg.batch_size
    params, averages = list(model.parameters()), list(run.ema.parameters()) if run.ema else None
    model.train()
    for epoch in range(run.epoch + 1, cfg.epochs + cfg.finetune + 1):
        phase, past = (cfg.mode, epoch - 1) if epoch <= cfg.epochs else ("finetune", epoch - 1 - cfg.epochs)
        phase_steps = (cfg.epochs if epoch <= cfg.epochs else cfg.finetune) * steps_per_epoch
        loss_sums, loss_counts = [0.0] * n_parts, [0] * n_parts
        sync(device)
        t_epoch = time.perf_counter()
        loader = batches(train_images, cfg.batch_size, cfg.seed, epoch)
        for i, (batch,) in enumerate(tqdm(loader, desc=f"epoch {epoch} {phase}", leave=False, disable=None)):
            x = preprocess(batch.to(device, non_blocking=True), cfg.n_bits)[shard]
            learning = learning_parts(phase, past * steps_per_epoch + i, phase_steps, n_parts, cfg.alternate_every)
            step_losses = losses(model, x, phase, learning)
            values = [loss.item() for loss in step_losses]
            owners = [n_parts - 1] if phase in END_TO_END else learning  # the part each value belongs to
            if not all(math.isfinite(v) for v in values):
                raise RunStopped(f"non-finite loss in part {first_nonfinite_part(model, x, owners, values)} of "
                                 f"{n_parts} at epoch {epoch} ({phase}), step {i}; {checkpoint_note(cfg.out)}")
            model.zero_grad(set_to_none=True)
            sum(step_losses).backward()
            step_parts(run, learning)  # only the learning parts step
            if run.ema:  # Polyak averaging; the decay grows from 0.1 so the average starts near the weights
                with torch.no_grad():
                    torch._foreach_lerp_(averages, params, 1 - min(cfg.ema, (1 + run.steps) / (10 + run.steps)))
            run.steps += 1
            for k, v in zip(owners, values):
                loss_sums[k], loss_counts[k] = loss_sums[k] + v, loss_counts[k] + 1
        sync(device)
        run.seconds += time.perf_counter() - t_epoch
        train_parts = [s / c if c else None for s, c in zip(loss_sums, loss_counts)]
        finish_epoch(run, epoch, phase, train_parts, evaluate_run(run, test_images), log)
    return run

@torch.no_grad()
def first_nonfinite_part(model, x, owners, values):
    """The first part (1-based) whose truncated loss on x is not finite: where a failure starts, even
    when a later part's loss is the one that showed it; else the first part whose value was."""
    bad = [k for k, lp in enumerate(model.truncated(x)) if not torch.isfinite(lp).all()]
    return (bad + [k for k, v in zip(owners, values) if not math.isfinite(v)])[0] + 1

@torch.no_grad()
def evaluate(model, images, batch_size, device):
    """The test metrics, with the same dequantization noise every time: the mean bits/dim of the model
    (test_bpd, the paper's metric) and of the flow truncated after each part (part_losses), and what the
    mean rests on: the median image, the images that score worse than uniform noise on the cube (above
    n_bits: how many, the first 20), and whether the mean lies above the 99th percentile of the images'
    scores, which only the worst 1 % can do (test_dominated: a few images make the mean)."""
    was_training, per_image = model.training, []
    model.eval()
    totals = torch.zeros(len(model.parts), dtype=torch.float64, device=device)
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

def evaluate_run(run, images):
    """evaluate() of the run's model: with --ema, of the averaged weights, and raw_test_bpd of the raw."""
    device = torch.device(run.cfg.device)
    score = lambda model: evaluate(model, images, run.cfg.batch_size, device)  # noqa: E731
    return {**score(run.ema), "raw_test_bpd": score(run.model)["test_bpd"]} if run.ema else score(run.model)

def sync(device):
    """Wait for the device, so that a clock read afterwards times work that has really finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

def finish_epoch(run, epoch, phase, train_parts, test, log):
    """Record and print the epoch's metrics (test: evaluate_run()'s); write samples, checkpoint and
    metrics.jsonl."""
    if not math.isfinite(test["test_bpd"]):
        k = next(k for k, v in enumerate(test["part_losses"]) if not math.isfinite(v))
        raise RunStopped(f"non-finite test bits/dim in part {k + 1} of {len(test['part_losses'])} at epoch {epoch} "
                         f"({phase}); {checkpoint_note(run.cfg.out)}")
    run.epoch = epoch
    run.history.append({"epoch": epoch, "phase": phase, "train_bpd": train_parts[-1], **test,
                        "train_part_losses": None if phase in END_TO_END else train_parts, "seconds": run.seconds,
                        "steps": run.steps})
    log(f"epoch {epoch:3d} | {phase:10s} | train " + (f"{train_parts[-1]:.3f}" if train_parts[-1] else "  -  ")
        + f" | test {test['test_bpd']:.3f} | parts " + " ".join(f"{v:.3f}" for v in test["part_losses"])
        + f" | {run.seconds:7.1f} s" + (f" | raw weights {test['raw_test_bpd']:.3f}" if run.ema else "")
        + (f" | a few images make the mean: median {test['test_median_bpd']:.3f}, {test['test_outliers']} "
           f"above {run.model.n_bits}" if test["test_dominated"] else ""))
    if run.cfg.out:
        from torchvision.utils import save_image
        samples = ((run.ema or run.model).sample(64, temperature=0.7) + 0.5).clamp(0, 1).float().cpu()
        samples = F.interpolate(samples, scale_factor=max(1, 64 // samples.shape[-1]))  # big enough to see
        write_atomic(os.path.join(run.cfg.out, f"samples_{epoch:03d}.png"),
                     lambda tmp: save_image(samples, tmp, format="png", nrow=8, padding=4))
        save_checkpoint(run, os.path.join(run.cfg.out, "checkpoint.pt"))
        # after the checkpoint: the metrics never hold an epoch that a resume would train again
        write_atomic(os.path.join(run.cfg.out, "metrics.jsonl"),
                     lambda tmp: open(tmp, "w").writelines(json.dumps(m) + "\n" for m in run.history))

# -----------------------------------------------------------------------------
# Runs: build, checkpoint (atomic, checked whole), resume exactly.

def build_model(cfg):
    torch.manual_seed(cfg.seed)
    model = Glow(NATIVE[cfg.dataset][0], cfg.image_size, cfg.levels, cfg.steps, cfg.hidden, cfg.parts,
                 cfg.n_bits, cfg.part_prior, cfg.prior_bound).to(cfg.device, memory_format=torch.channels_last)
    if cfg.compile:  # a graph per part, grad mode and batch size; static shapes; reverse and sample stay eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(model.parts))
        for part in model.parts:
            part.compile(dynamic=False)
    return model

def prepare_data(cfg):
    """(train, test) uint8 images of the dataset named in cfg, subset and resized."""
    train_images, test_images = load_images(cfg.dataset, cfg.data_dir)
    for flag, n, images, split in (("subset", cfg.subset, train_images, "training"),
                                   ("test-subset", cfg.test_subset, test_images, "test")):
        if (n or 0) > len(images):
            raise UsageError(f"--{flag} {n}: {cfg.dataset} has only {len(images)} {split} images")
    return (resize(train_images[:cfg.subset], cfg.image_size),
            resize(test_images[:cfg.test_subset], cfg.image_size))

def write_atomic(path, write):
    """write(temporary path), then rename it onto path: a reader (or a resume) sees the old file or the
    new one, never half of one, and a failed write leaves no temporary file behind."""
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.isfile(tmp):
            os.remove(tmp)

CHECKPOINT = {"config": dict, "model": dict, "optimizers": list, "updates": list, "epoch": int, "seconds": float,
              "steps": int, "history": list, "rng": dict, "ema": (dict, type(None)), "owner": (str, type(None))}

def save_checkpoint(run, path):
    """Everything a resume needs: the config, weights, every part's Adam, counters, RNG, metrics."""
    cuda = torch.device(run.cfg.device).type == "cuda"
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(run.cfg.device) if cuda else None}
    write_atomic(path, lambda tmp: torch.save({
        "config": asdict(run.cfg), "model": run.model.state_dict(), "optimizers": [o.state_dict() for o in
        run.optimizers], "updates": run.updates, "epoch": run.epoch, "seconds": run.seconds, "steps": run.steps,
        "history": run.history, "rng": rng, "ema": run.ema.state_dict() if run.ema else None, "owner": run.owner}, tmp))

def load_checkpoint(path):
    """The checkpoint at path, with its fields, their types and its config checked (start_run checks
    the weights against the config): UsageError naming what is wrong."""
    if not os.path.isfile(path):
        raise UsageError(f"--resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--resume: checkpoint {path} is corrupt or unreadable ({type(e).__name__})") from None
    wrong = [k for k, kind in CHECKPOINT.items() if not isinstance(ckpt, dict) or not isinstance(ckpt.get(k), kind)]
    wrong += [k for k, kind in (("updates", int), ("history", dict)) if k not in wrong
              and not all(isinstance(v, kind) for v in ckpt[k])]
    wrong += ["rng"] if "rng" not in wrong and not isinstance(ckpt["rng"].get("cpu"), torch.ByteTensor) else []
    if wrong:
        raise UsageError(f"--resume: checkpoint {path} lacks or has a malformed {', '.join(wrong)}")
    odd = sorted({f.name for f in fields(Config)} ^ set(ckpt["config"]))
    try:
        if odd:
            raise ValueError(f"it lacks or has unknown settings: {', '.join(odd)}")
        Config(**ckpt["config"])
    except ValueError as e:
        raise UsageError(f"--resume: the config in {path} is not valid ({e})") from None
    return ckpt

def checkpoint_note(out):
    """The truth about what a stopped run (or comparison, or sweep) leaves in out, for its last message."""
    path = os.path.join(out or "", "checkpoint.pt")
    runs = glob.glob(os.path.join(glob.escape(out or ""), "**", "checkpoint.pt"), recursive=True)
    if not out or not runs:
        return "no checkpoint was written"
    if path not in runs:
        return f"the last checkpoint of each of its {len(runs)} runs under {out} is kept"
    try:
        return f"the checkpoint of epoch {torch.load(path, mmap=True, weights_only=True)['epoch']} in {out} is kept"
    except Exception:  # this is an error path already: say what is there, raise nothing new
        return f"{path} is kept, but it cannot be read"

def default_warmup(n_parts, steps_per_epoch):
    """The updates a part gets in an epoch when the parts take turns (an epoch's steps / the parts), at
    most 500 (CIFAR-10's in the official code): known at the start, the same however long the run."""
    return max(1, min(500, steps_per_epoch // n_parts))

def start_run(cfg, data=None, init_state=None, ckpt=None):
    """(run before its first step, (train, test) images): fresh, or restored from ckpt. A fresh run seeds
    everything from cfg.seed, initialises ActNorm on the first INIT_BATCH training images (or loads
    init_state) and fixes its warmup; a checkpoint is checked against its config before data loads."""
    model = build_model(cfg)
    run = Run(cfg, model, make_optimizers(model), updates=[0] * len(model.parts))
    if ckpt:
        try:
            model.load_state_dict(ckpt["model"])
            if not len(ckpt["optimizers"]) == len(ckpt["updates"]) == len(model.parts):
                raise ValueError(f"{len(ckpt['optimizers'])} optimizer states and {len(ckpt['updates'])} "
                                 f"update counts for {len(model.parts)} parts")
            for optimizer, state in zip(run.optimizers, ckpt["optimizers"]):
                optimizer.load_state_dict(state)
            if cfg.ema:
                run.ema = copy.deepcopy(model)
                run.ema.load_state_dict(ckpt["ema"])
            torch.set_rng_state(ckpt["rng"]["cpu"])
            if torch.device(cfg.device).type == "cuda" and ckpt["rng"]["cuda"] is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], cfg.device)
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
            detail = next(line.strip() for line in str(e).splitlines()[1:] + [str(e)] if line.strip())
            raise UsageError(f"--resume: the checkpoint does not fit its config ({detail})") from None
        for key in ("updates", "epoch", "seconds", "steps", "history", "owner"):
            setattr(run, key, ckpt[key])
    train_images, test_images = data if data is not None else prepare_data(cfg)
    if len(train_images) < cfg.batch_size:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {len(train_images)} training images")
    if not ckpt:
        if init_state is not None:
            model.load_state_dict(init_state)
        model.initialize(preprocess(train_images[:INIT_BATCH].to(cfg.device), cfg.n_bits,
                                    generator=torch.Generator(device=cfg.device).manual_seed(cfg.seed)))
        torch.manual_seed(cfg.seed)  # every mechanism sees the same dequantization noise
        run.cfg = replace(cfg, warmup=cfg.warmup or default_warmup(len(cfg.parts), len(train_images) // cfg.batch_size))
        run.ema = copy.deepcopy(model) if cfg.ema else None
    return run, (train_images, test_images)

def load_model(out):
    """The model of the run in directory out, as its last checkpoint has it (with --ema, the average)."""
    ckpt = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    model = build_model(replace(Config(**ckpt["config"]), compile=False))
    model.load_state_dict(ckpt["ema"] or ckpt["model"])
    return model

# -----------------------------------------------------------------------------
# The poster's experiment: the mechanisms side by side from the same start, and what a step costs.

def measure_step(model, x, phase, learning):
    """What one training step (losses(), backward) holds and sends: (activation bytes, boundary backward
    bytes, CUDA peak bytes or None). Activation bytes: the storage of the tensors autograd saves for
    backward, parameters excluded. Boundary bytes: the gradient that flows back into a part's input from
    the part after it, counted by a hook on each part's input that fires only if a gradient arrives."""
    param_ptrs, saved, crossing = {p.untyped_storage().data_ptr() for p in model.parameters()}, {}, [0]

    def pack(t):
        if t.untyped_storage().data_ptr() not in param_ptrs:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def watch_input(module, args):
        if args[0].requires_grad:
            args[0].register_hook(lambda grad: crossing.__setitem__(0, crossing[0] + grad.nbytes))

    hooks, cuda = [part.register_forward_pre_hook(watch_input) for part in model.parts[1:]], x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step_losses = losses(model, x, phase, learning)
    sum(step_losses).backward()
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    return sum(saved.values()), crossing[0], torch.cuda.max_memory_allocated(x.device) if cuda else None

def mechanism_steps(mode, n_parts):
    """The kinds of step a mechanism takes, read off its schedule (learning_parts) over one turn of each part."""
    return [list(k) for k in dict.fromkeys(tuple(learning_parts(mode, s, n_parts, n_parts)) for s in range(n_parts))]

def step_costs(model, x, mode):
    """measure_step for each kind of step the mechanism takes (one turn of its schedule): the largest."""
    costs = [measure_step(model, x, mode, learning) for learning in mechanism_steps(mode, len(model.parts))]
    return {"activation_bytes": max(c[0] for c in costs), "boundary_backward_bytes": max(c[1] for c in costs),
            "cuda_max_memory_allocated": None if costs[0][2] is None else max(c[2] for c in costs)}

def compare(cfg, modes=("full", "alternate"), log=print):
    """Train each mechanism from the same initial weights, data order and seed into cfg.out/<mode>; write
    compare.json/png. full trains epochs + finetune epochs end to end (the same total); every other mode
    trains its `epochs`, then `finetune` epochs end to end."""
    shared, data = start_run(replace(cfg, out=None))  # the initialised model every run starts from
    init_state = copy.deepcopy(shared.model.state_dict())
    # What one step of each mechanism holds and sends, on the shared start. This also runs every kind of
    # step once, so no run pays the one-off cost of first-time kernel setup inside its timing.
    probe = preprocess(data[0][:cfg.batch_size].to(cfg.device), cfg.n_bits)
    costs, runs = {mode: step_costs(shared.model, probe, mode) for mode in modes}, []
    for mode in modes:
        log(f"--- {mode}")
        moved = cfg.finetune if mode == "full" else 0  # full trains the finetuning epochs as its own
        run_cfg = replace(cfg, mode=mode, out=os.path.join(cfg.out, mode), epochs=cfg.epochs + moved,
                          finetune=cfg.finetune - moved)
        with claim_run_dir(run_cfg.out):  # a run of its own, which only this comparison writes
            run, _ = start_run(run_cfg, data, init_state)
            run.owner = cfg.out
            train(run, data, log)
        last, mechanism = run.history[-1], run.history[run.cfg.epochs - 1]  # the end, and the mechanism's
        runs.append({"name": mode if mode == "full" or not cfg.finetune else f"{mode}+finetune", "mode": mode,
                     "epochs": run.cfg.epochs, "finetune": run.cfg.finetune, "final_test_bpd": last["test_bpd"],
                     "final_median_bpd": last["test_median_bpd"], "final_dominated": last["test_dominated"],
                     "train_seconds": run.seconds, "step_seconds": mechanism["seconds"] / mechanism["steps"],
                     **costs[mode], "curve": run.history})
    full = runs[modes.index("full")]["curve"]
    target, what = smoothed_final(full, cfg.ema)
    for r in runs:
        r["time_to_target"] = next((m["seconds"] for m in r["curve"] if target and m["test_bpd"] <= target), None)
        same_time = at_time(full, r["train_seconds"])
        r["full_bpd_at_equal_time"] = same_time["test_bpd"] if same_time and not same_time["test_dominated"] else None
    summary = {"config": asdict(cfg), "target_bpd": target, "target": what, "runs": runs}
    write_results(summary, cfg.out, "compare", plot_compare)
    log(summary_table(summary))
    return summary

def smoothed_final(curve, ema):
    """(target, what it is): full's final test bits/dim, which one lucky or unlucky evaluation cannot move
    much: its averaged weights' (--ema), else the mean of its last three evaluations. None where a few
    images make one of those means: such a target says more about them than about the model."""
    last = curve[-1:] if ema else curve[-3:]
    if any(m["test_dominated"] for m in last):
        return None, "none: a few test images make full's final mean bits/dim (see its test_median_bpd)"
    return statistics.fmean(m["test_bpd"] for m in last), ("full's final bits/dim with averaged weights (--ema)"
                                                             if ema else "the mean of full's last 3 evaluations")

def at_time(curve, seconds):
    """The evaluation a run had reached after `seconds` of training (its last one by then), or None."""
    return next((m for m in reversed(curve) if m["seconds"] <= seconds * (1 + 1e-9)), None)

def write_results(summary, out, name, plot):
    """out/name.json, and out/name.png drawn by plot, each written atomically."""
    write_atomic(os.path.join(out, f"{name}.json"), lambda tmp: open(tmp, "w").write(json.dumps(summary, indent=1)))
    write_atomic(os.path.join(out, f"{name}.png"), lambda tmp: plot(summary, tmp))

def markdown_table(header, rows):
    lines = ["| " + " | ".join(cells) + " |" for cells in [header, *rows]]
    return "\n".join([lines[0], "|---" * len(header) + "|", *lines[1:]])

def summary_table(summary):
    """The comparison as a Markdown table (ratios to full's); no time comes from a mean that a few images make."""
    full = next(r for r in summary["runs"] if r["mode"] == "full")
    header = ["run", "final test bpd", "median image", "train s", "time / full", "time to full's bpd (s)",
              "full's bpd at equal time", "step ms", "step / full", "activations MB", "boundary grad KB"]
    return markdown_table(header, [
        [r["name"], f"{r['final_test_bpd']:.3f}" + " (a few images make it)" * r["final_dominated"],
         f"{r['final_median_bpd']:.3f}", f"{r['train_seconds']:.0f}",
         f"{r['train_seconds'] / full['train_seconds']:.2f}", "no target" if summary["target_bpd"] is None else
         f"{r['time_to_target']:.0f}" if r["time_to_target"] is not None else "never",
         f"{r['full_bpd_at_equal_time']:.3f}" if r["full_bpd_at_equal_time"] else "-", f"{1e3 * r['step_seconds']:.1f}",
         f"{r['step_seconds'] / full['step_seconds']:.2f}", f"{r['activation_bytes'] / 2 ** 20:.1f}",
         f"{r['boundary_backward_bytes'] / 2 ** 10:.0f}"] for r in summary["runs"]]) + f"\ntarget: {summary['target']}"

def plot_compare(summary, path):
    """Test bits/dim against epoch and against training seconds; dotted lines mark finetuning's start."""
    from matplotlib.figure import Figure  # not pyplot: the caller's backend (a notebook's) is left alone
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    for r in summary["runs"]:
        curve, start = r["curve"], r["epochs"] if r["finetune"] else None
        for ax, key in zip(axes, ("epoch", "seconds")):
            line, = ax.plot([m[key] for m in curve], [m["test_bpd"] for m in curve], marker=".", label=r["name"])
            if start:
                ax.axvline(curve[start - 1][key], color=line.get_color(), linestyle=":", alpha=0.7)
            if summary["target_bpd"] is not None:
                ax.axhline(summary["target_bpd"], color="grey", linewidth=0.8, alpha=0.6)
    axes[0].set(xlabel="epoch", ylabel="test bits/dim", title="per epoch")
    axes[1].set(xlabel="training seconds", title="per second of training (the poster's claim)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")

# -----------------------------------------------------------------------------
# Data parallel under torchrun, for every mechanism. Nothing above knows about processes: train()
# takes the rows of a batch to train on, and this section averages the gradients from outside.

def torchrun_env():
    """(rank, local rank, number of processes) as torchrun sets them; (0, 0, 1) in a plain run."""
    return tuple(int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))

def average_gradients(optimizer, args=None, kwargs=None):
    """An optimizer step pre-hook: its gradients, averaged over the processes (one all-reduce)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    for g, avg in zip(grads, (flat / torch.distributed.get_world_size()).split([g.numel() for g in grads])):
        g.copy_(avg.view_as(g))

def init_distributed(cfg, local_rank):
    """Join the process group (NCCL on GPUs, one GPU per local process; gloo on CPU): cfg on its device."""
    if torch.device(cfg.device).type == "cuda":
        cfg = replace(cfg, device=f"cuda:{local_rank % torch.cuda.device_count()}")
        torch.cuda.set_device(cfg.device)
    torch.distributed.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    return cfg

def train_data_parallel(cfg, ckpt, rank, local_rank, world, log):
    """Every process holds the whole model (the same seed, the same init) and trains on its rows of each
    global batch; before a part's optimizer steps, its gradients are averaged. Process 0 writes."""
    if cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} (the global batch) must divide among {world} processes")
    run, data = start_run(init_distributed(cfg, local_rank), ckpt=ckpt)
    for optimizer in run.optimizers:
        optimizer.register_step_pre_hook(average_gradients)
    run.cfg = replace(run.cfg, out=run.cfg.out if rank == 0 else None)  # one writer per run directory
    try:
        train(run, data, log, shard=slice(rank, None, world))
    except RuntimeError as e:  # gloo or NCCL: a peer process died
        raise RunStopped(f"process {rank}: another process of the run was lost ({str(e).splitlines()[0]}); "
                         f"{checkpoint_note(cfg.out)}") from None

# -----------------------------------------------------------------------------
# Command line: the flags are Config's fields. Every command here keeps the same promises: one
# writer per directory, nothing written is lost, anything wrong is one line and a non-zero exit.

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the whole usage too)
        raise UsageError(message)

def parse_parts(text):  # --parts 32,16,16,32 or auto:P (Config checks both)
    return text if text.startswith("auto:") else [int(p) for p in text.split(",")]

def parse_rates(text):  # --lr 1e-3, or one rate per part
    return [float(v) for v in text.split(",")]

def parse_modes(text):
    modes = text.split(",")
    if any(m not in MODES for m in modes) or "full" not in modes or len(set(modes)) < len(modes):
        raise argparse.ArgumentTypeError(f"must list 'full' and others of {', '.join(MODES)}, each once; got {text!r}")
    return modes

def make_parser(description="Glow trained in gradient-isolated parts: full, alternate, sequential or parallel "
                            "training, + finetuning, and the poster's comparison."):
    """The flags of Config's fields; a flag not given takes Config's default, or the checkpoint's."""
    p = Parser(description=description)
    for f in fields(Config):
        m = f.metadata
        kwargs = {"action": m["action"]} if m["action"] else {
            "type": {"parts": parse_parts, "lr": parse_rates}.get(f.name, m["kind"]), "choices": m["choices"]}
        p.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS,
                       help=f"{m['help']} (default: {f.default})", **kwargs)
    return p

RESUMABLE = ("epochs", "finetune", "lr", "warmup", "clip", "data_dir", "device", "out", "compile")

def flags(names):
    return ", ".join("--" + name.replace("_", "-") for name in names)

def resume_config(saved, given, done, log):
    """A resumed run's Config: the checkpoint's, with the flags given applied where a resume may change
    them (each one logged), and refused with one line where it may not."""
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
    for k in changed:
        log(f"resume: {flags([k])} {show(getattr(cfg, k))} (was {show(getattr(saved, k))})")
    return cfg

def config_from_args(args, log=print):
    """(Config, checkpoint or None) from parsed flags, after every check that needs no data: UsageError (one
    line) for anything wrong. A flag not given takes Config's default, or on --resume the checkpoint's."""
    given = {f.name: getattr(args, f.name) for f in fields(Config) if hasattr(args, f.name)}
    compare, resume = getattr(args, "compare", False), getattr(args, "resume", False)
    if getattr(args, "compare_modes", None) and not compare:
        raise UsageError("--compare-modes names the mechanisms of --compare: give --compare too")
    if resume and compare:
        raise UsageError("a comparison is not continued: run it again into a new --out")
    try:
        if resume:  # the checkpoint's config, with the flags given applied one by one
            where = {f.name: given.get(f.name, f.default) for f in fields(Config) if f.name in ("out", "dataset",
                                                                                                "mode")}
            for f in [f for f in fields(Config) if f.name in where and f.name in given]:
                check_setting(f, given[f.name])
            out = where["out"] or os.path.join("runs", f"{where['dataset']}-{where['mode']}")
            ckpt = load_checkpoint(os.path.join(out, "checkpoint.pt"))
            if ckpt["owner"]:
                raise UsageError(f"--out {out}: this run belongs to the comparison or sweep in {ckpt['owner']}; "
                                 f"continue it only through that command")
            cfg = resume_config(Config(**ckpt["config"]), {**given, "out": out}, ckpt["epoch"], log)
        else:
            cfg, ckpt = Config(**given), None
            cfg.out = cfg.out or os.path.join("runs", f"{cfg.dataset}-{'compare' if compare else cfg.mode}")
        if torch.device(cfg.device).type not in ("cpu", "cuda", "mps"):
            raise RuntimeError("only cpu, cuda and mps are supported")
        torch.empty(0, device=cfg.device)  # the device exists here
    except ValueError as e:
        raise UsageError(str(e)) from None
    except (RuntimeError, AssertionError) as e:
        raise UsageError(f"--device {cfg.device}: not usable here ({str(e).splitlines()[0]})") from None
    uses = {"mode": not compare, "alternate_every": cfg.mode == "alternate" or compare,
            "part_prior": len(cfg.parts) > 1, "prior_bound": cfg.levels > 1}
    unused = [k for k, used in uses.items() if k in given and not used]
    if unused:  # a flag that this run would accept and ignore
        raise UsageError(f"{flags(unused)}: this run has no use for it (--compare trains --compare-modes; "
                         f"--alternate-every is for --mode alternate; the priors need two parts, two levels)")
    if cfg.epochs + cfg.finetune == 0 or (compare and cfg.epochs == 0):
        raise UsageError("--compare times each mechanism's own epochs: give --epochs >= 1" if compare else
                         "nothing to train: give --epochs (and --finetune)")
    return cfg, ckpt

def claim_run_dir(out, resume=False):
    """Create `out` and lock it for this process (in a with block): one writer per directory. The lock is
    the operating system's (flock), so it ends with the process however it ends, kill -9 too. A fresh
    start needs an empty directory: one that holds anything is continued (resume) or refused."""
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, ".lock"), "w")
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create or write it ({e.strerror or e})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UsageError(f"--out {out} is in use by another run; wait for it to end, or choose another --out") from None
    held = sorted(set(os.listdir(out)) - {".lock"})
    if held and not resume:
        lock.close()
        raise UsageError(f"--out {out} already holds {', '.join(held[:3])}{', ...' * (len(held) > 3)}: continue "
                         f"a run there with --resume, or choose another --out")
    return lock

def interrupt(signum, frame):
    """Ctrl-C and SIGTERM (what a cluster scheduler sends): the first stops the run; no later one cuts that short."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *args: None)  # not SIG_IGN: a signal already pending would be reported
    raise KeyboardInterrupt(signum)

def command(prog, work, argv=None):
    """Run work(argv, where) with the promises of every command here; return its exit code: 2 and one line
    for bad input (UsageError); 1 and one line when the run cannot go on (RunStopped, or the disk, a path or
    the memory failed); 130 / 143 on Ctrl-C / SIGTERM. Each last line says what is kept in where["out"],
    which work sets as soon as it knows it."""
    rank, where = torchrun_env()[0], {}
    previous = [signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)]
    try:
        work(argv, where)
        return 0
    except (UsageError, RunStopped, OSError, KeyboardInterrupt, MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e):
            raise  # a bug: its traceback is the report
        for s in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the last line short
            signal.signal(s, lambda *args: None)
        kept, term = checkpoint_note(where.get("out")), e.args[:1] == (signal.SIGTERM,)
        if isinstance(e, (UsageError, RunStopped)):
            code, line = (2, f"error: {e}") if isinstance(e, UsageError) else (1, f"stopped: {e}")
        elif isinstance(e, KeyboardInterrupt):
            code, line = (143, f"interrupted (SIGTERM); {kept}") if term else (130, f"interrupted (Ctrl-C); {kept}")
        else:  # the environment failed: a disk, a path, the memory
            why = f"{e.strerror or e}: {e.filename}" if isinstance(e, OSError) else f"out of memory ({str(e)[:200]})"
            code, line = 1, f"stopped: {why}; {kept}"
        if rank == 0 or code == 1:
            print(f"{prog}: {line}", file=sys.stderr)
        elif code == 2:  # quiet while torchrun stops this process, so that process 0 is the one that says why
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(2)
        return code
    finally:
        for s, handler in zip((signal.SIGINT, signal.SIGTERM), previous):
            signal.signal(s, handler)
        if "torch.distributed" in sys.modules and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

def run_main(argv, where):
    """Train a run, continue it (--resume), or compare the mechanisms; data parallel under torchrun."""
    rank, local_rank, world = torchrun_env()
    log = print if rank == 0 else (lambda *a: None)
    p = make_parser()
    g = p.add_argument_group("what to do (default: train)")
    g.add_argument("--resume", action="store_true", help=f"continue the run in --out; it may change {flags(RESUMABLE)}")
    g.add_argument("--compare", action="store_true", help="train the mechanisms side by side from the same start "
                                                          "into --out; write compare.json/png")
    g.add_argument("--compare-modes", type=parse_modes, help="what --compare trains (default: full,alternate)")
    args = p.parse_args(argv)
    cfg, ckpt = config_from_args(args, log)
    where["out"] = cfg.out
    if isinstance(getattr(args, "parts", None), str):
        log(f"--parts {args.parts} = {','.join(map(str, cfg.parts))} (equal multiply-adds per part)")
    if args.compare and world > 1:
        raise UsageError("--compare times the mechanisms in one process: run it without torchrun")
    with claim_run_dir(cfg.out, args.resume) if rank == 0 else open(os.devnull):  # before any data is loaded
        if args.compare:
            return compare(cfg, args.compare_modes or ["full", "alternate"], log)
        if world > 1:
            return train_data_parallel(cfg, ckpt, rank, local_rank, world, log)
        return train(*start_run(cfg, ckpt=ckpt), log)

def main(argv=None):
    return command("glow_parts.py", run_main, argv)

if __name__ == "__main__":
    sys.exit(main())
