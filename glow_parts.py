"""
glow_parts.py: Glow trained in gradient-isolated parts with a truncated local objective.

One file holds everything, in reading order: the flow's layers, Glow cut into parts and the truncated
objective, the data, one training loop for every mechanism (full, alternate, sequential, parallel,
+ end-to-end finetuning), the side-by-side experiment, the distributed variants, the CLI.

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
  - Bits/dim is measured with one uniform-noise dequantization sample, as in the paper's tables.
"""
import argparse
import copy
import fcntl
import functools
import glob
import hashlib
import io
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

def gaussian_log_prob(z, mean, logs):
    """log N(z; mean, exp(logs)^2), summed over all but the batch dimension -> (B,)."""
    lp = -0.5 * (math.log(2 * math.pi) + 2 * logs + (z - mean) ** 2 * torch.exp(-2 * logs))
    return lp.flatten(1).sum(1)

class Split(nn.Module):
    """Factor out half the channels as a latent z, scored by a learned prior N(z; mean(h), std(h)).

    Not a bijection of one tensor, so its contract is its own:
    forward(x) -> (h, z, log p(z | h)); reverse(h, z) -> x, sampling z when it is None."""

    def __init__(self, channels):
        super().__init__()
        self.prior = ZeroConv2d(channels // 2, channels)  # h -> (mean, log std) of z; N(0, I) at init

    def forward(self, x):
        h, z = x.chunk(2, dim=1)
        mean, logs = self.prior(h).chunk(2, dim=1)
        return h, z, gaussian_log_prob(z, mean, logs)

    def reverse(self, h, z=None, temperature=1.0):
        if z is None:
            mean, logs = self.prior(h).chunk(2, dim=1)
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

def bits_per_dim(log_prob, x, n_bits):
    """Discrete NLL in bits per dimension from the continuous log-density log p(x) (nats, (B,)).

    x: the batch of images (or just D, the dimensions of one image).
    Pixels are integers in n_bins = 2^n_bits bins of width 1/n_bins on [-0.5, 0.5]; with uniform
    dequantization log P(bin) >= log p(x) - D * log(n_bins), so the bits/dim are
    (-log p(x) + D log n_bins) / (D ln 2) = -log p(x) / (D ln 2) + n_bits."""
    D = x if isinstance(x, int) else x[0].numel()
    return -log_prob / (D * math.log(2)) + n_bits

def default_parts(n_levels, n_steps):
    """The poster's cut: one part per level, the middle level (of an odd number) halved.

    For Glow's 3 levels x 32 steps that is 32,16,16,32; for 2 levels, one part per level."""
    parts = [n_steps] * n_levels
    if n_levels % 2 == 1 and n_levels > 1 and n_steps > 1:
        mid = n_levels // 2
        parts[mid:mid + 1] = [n_steps // 2, n_steps - n_steps // 2]
    return parts

def check_parts(parts, n_levels, n_steps):
    """A parts spec (step counts per part, in flow order) as a list of ints, or ValueError."""
    parts = list(parts)
    if not parts or not all(type(p) is int and p > 0 for p in parts):
        raise ValueError(f"parts must be a non-empty list of positive integers, got {parts}")
    if sum(parts) != n_levels * n_steps:
        raise ValueError(f"parts {parts} sum to {sum(parts)}, but the flow has "
                         f"n_levels * n_steps = {n_levels} * {n_steps} = {n_levels * n_steps} steps")
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
                 n_bits=8, part_prior="standard"):
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
                layers[owner[first + n_steps - 1]].append(Split(C))
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

    def run_parts(self, h, start, stop):
        """Parts start..stop-1 end to end: (h, split-off zs, sum of log-dets, sum of split log-priors)."""
        zs, logdet, logp = [], h.new_zeros(h.shape[0]), h.new_zeros(h.shape[0])
        for part in self.parts[start:stop]:
            h, z, ld, lp = part(h)
            zs += z
            logdet, logp = logdet + ld, logp + lp
        return h, zs, logdet, logp

    def forward(self, x):
        """x (B, C, H, W), preprocessed -> (zs, logdet): latents (split-off first, final last), (B,)."""
        h, zs, logdet, _ = self.run_parts(x, 0, len(self.parts))
        return zs + [h], logdet

    def log_prob(self, x):
        """log p(x) of the whole flow in nats, (B,), end to end: gradients reach every part."""
        h, logdet, logp = x, x.new_zeros(x.shape[0]), x.new_zeros(x.shape[0])
        for part in self.parts:
            h, _, ld, lp = part(h)
            logdet, logp = logdet + ld, logp + lp
        return logdet + logp + self.parts[-1].prior.log_prob(h)

    def truncated(self, x, parts=None, carry=None):
        """The flows truncated after each part k in `parts` (ascending; default all), in one pass.

        Returns ([log p_k(x) in nats, (B,), for k in parts], carry after the last of them), where a
        carry (h_k, const) is what part k+1 needs: its input and the constant terms of parts <= k.
        Each log p_k(x) reaches only part k's parameters, so -log p_k(x) is part k's truncated
        objective L_k. Parts before parts[0] run on x under no_grad (their terms are constants);
        parts after parts[-1] do not run. A pipeline process passes the carry it received instead of x."""
        parts = list(range(len(self.parts))) if parts is None else list(parts)
        if carry is None:
            with torch.no_grad():  # no graph for parts whose terms are constants for every learner
                h, _, logdet, logp = self.run_parts(x, 0, parts[0])
            carry = (h, logdet + logp)
        log_probs = []
        for k in range(parts[0], parts[-1] + 1):
            h, const = isolate(*carry)
            h, _, logdet, logp = self.parts[k](h)
            if k in parts:
                log_probs.append(const + logdet + logp + self.parts[k].prior.log_prob(h))
            carry = (h, const + (logdet + logp))
        return log_probs, carry

    def part_loss(self, x, k):
        """L_k: bits/dim (batch mean) of the flow truncated after part k; only part k gets gradients."""
        (log_prob,), _ = self.truncated(x, [k])
        return bits_per_dim(log_prob, x, self.n_bits).mean()

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

# -----------------------------------------------------------------------------
# Data: whole datasets as uint8 tensors in memory, dequantized on the fly.

class UsageError(Exception):
    """Bad flags, data or environment: reported as one line on stderr, exit code 2."""

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
    try:
        splits = [cls(data_dir, train=train, download=download) for train in (True, False)]
    except Exception as e:  # offline download, missing or corrupt files: torchvision raises many kinds
        if created:
            shutil.rmtree(data_dir, ignore_errors=True)  # leave no half-made tree behind
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        for path in sorted(glob.glob(os.path.join(data_dir, cls.__name__, "raw", "*-ubyte"))):
            with open(path, "rb") as fh:  # an idx file starts with 2049 (labels) or 2051 (images)
                if int.from_bytes(fh.read(4), "big") not in (2049, 2051):
                    why = f"{path} is not an idx file"
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
    run (and of the pipeline) sees the same noisy test set."""
    generator = torch.Generator(device=device).manual_seed(0)
    for i in range(0, len(images), batch_size):
        yield preprocess(images[i:i + batch_size].to(device), n_bits, generator=generator)

# -----------------------------------------------------------------------------
# Training: one loop for every mechanism; a schedule says which parts learn on each step.

MODES = ("full", "alternate", "sequential", "parallel")
END_TO_END = ("full", "finetune")  # the phases that backpropagate the whole flow's bits/dim

def number(low, high=None, kind=int):
    """An argparse type: an int in [low, high], or a finite float in (low, high)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"want {kind.__name__}, got {text!r}") from None
        top = math.inf if high is None else high
        if not (low <= value <= top if kind is int else low < value < top):  # nan fails too
            bounds = f"[{low}, {top}]" if kind is int else f"({low}, {top})"
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {text}")
        return value
    return parse

def parse_parts(text):
    """--parts: step counts like 32,16,16,32, or auto:P (P parts of equal multiply-adds)."""
    try:
        return f"auto:{int(text[5:])}" if text.startswith("auto:") else [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want step counts like 32,16,16,32 or auto:P, got {text!r}") \
            from None

def parse_rates(text):
    return [number(0.0, kind=float)(v) for v in text.split(",")]

def setting(default, help, **argparse_kwargs):
    """A Config field that is also the command-line flag --its-name."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})

@dataclass
class Config:
    """A run's settings, each one a command-line flag; checkpoints store the whole Config."""
    mode: str = setting("alternate", "training mechanism (under torchrun, parallel runs one part per "
                        "process; the others run data parallel)", choices=MODES)
    epochs: int = setting(60, "epochs of the mechanism", type=number(0))
    finetune: int = setting(0, "end-to-end epochs after the mechanism's epochs", type=number(0))
    dataset: str = setting("cifar10", "the images", choices=DATASETS)
    data_dir: str = setting("./data", "torchvision datasets are read from / downloaded to here")
    image_size: int | None = setting(None, "resize to this size; None: native", type=number(1, 1024))
    n_bits: int | None = setting(None, "bits per pixel kept; None: 8, or 4 for digits", type=number(1, 8))
    subset: int | None = setting(None, "train on the first N training images; None: all", type=number(1))
    levels: int = setting(3, "L, levels of the multi-scale flow", type=number(1))
    steps: int = setting(32, "K, flow steps per level", type=number(1))
    hidden: int = setting(512, "channels of the coupling networks", type=number(1))
    parts: list | str | None = setting(None, "steps per part, or auto:P (P parts of equal compute); None: "
                                       "the poster's cut, a part per level, the middle halved (32,16,16,32)",
                                       type=parse_parts)
    part_prior: str = setting("standard", "prior on an intermediate part's output: N(0, I) or a learned "
                              "diagonal Gaussian", choices=("standard", "learned"))
    batch_size: int = setting(64, "images per step (the global batch under torchrun)", type=number(1))
    lr: float = setting(1e-3, "Adam learning rate of every part", type=number(0.0, kind=float))
    part_lr: list | None = setting(None, "one rate per part instead, e.g. 1e-3,2e-3,2e-3,1e-3",
                                   type=parse_rates)
    warmup: int | None = setting(None, "linear warmup, in each part's own updates; None: a tenth of each "
                                 "part's updates in the run, at most 500", type=number(1))
    alternate_every: int = setting(1, "steps per turn in alternate mode", type=number(1))
    compile: bool | None = setting(None, "torch.compile every part; None: on a GPU (it pays at once), not on "
                                   "a CPU (it takes minutes)", action=argparse.BooleanOptionalAction)
    recompute: bool = setting(False, "memory-saving gradients: keep each flow step's input only and run it "
                              "again in backward (torch.utils.checkpoint)", action="store_true")
    ema: float | None = setting(None, "Polyak averaging: decay of the weights' moving average, which "
                                "evaluates, samples, is saved; None: off", type=number(0.0, 1.0, float))
    seed: int = setting(0, "weights, data order and noise all follow from it", type=number(0, 2 ** 32 - 1))
    device: str | None = setting(None, "cpu, cuda, cuda:1, mps; None: cuda if there is one")
    num_workers: int = setting(0, "DataLoader worker processes", type=number(0))
    out: str | None = setting(None, "run directory; None: runs/<dataset>-<mode> (or -compare, -sweep)")

    def __post_init__(self):  # the settings whose default depends on others
        channels, native = NATIVE[self.dataset]
        self.image_size = self.image_size or native
        self.n_bits = self.n_bits or (4 if self.dataset == "digits" else 8)
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.compile = self.device.startswith("cuda") if self.compile is None else self.compile
        if self.parts is None:
            self.parts = default_parts(self.levels, self.steps)
        elif isinstance(self.parts, str):  # auto:P
            macs = step_macs(channels, self.image_size, self.levels, self.steps, self.hidden)
            self.parts = balanced_parts(int(self.parts[5:]), macs)

@dataclass
class Run:
    """A run between steps: everything its checkpoint holds, and this process's step times."""
    cfg: Config
    model: Glow
    optimizers: list  # one Adam per part
    updates: list  # each part's own number of updates: its warmup counts these
    epoch: int = 0
    seconds: float = 0.0  # training time so far, evaluation excluded
    steps: int = 0
    history: list = field(default_factory=list)  # one metrics dict per finished epoch
    ema: Glow | None = None  # the moving average of the weights (--ema)
    step_seconds: dict = field(default_factory=dict)  # {learning parts: [s, ...]}, not checkpointed

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

def warmed_up(lr, updates, warmup):
    """Linear warmup over a part's own first `warmup` updates."""
    return lr * min(1.0, (updates + 1) / warmup)

def make_optimizers(model):
    """One Adam per part: a part keeps its moments and step count while it waits for its turn."""
    device = next(model.parameters()).device
    fused = device.type in ("cpu", "cuda")  # one kernel for all of a part's parameters
    return [torch.optim.Adam(part.parameters(), fused=fused) for part in model.parts]

class NonFiniteLoss(Exception):
    """A step produced a non-finite loss: the run stops, the last good checkpoint stays."""

def train(run, data, log=print, shard=slice(None)):
    """Train run.cfg's mechanism, then its finetuning, from run's epoch to epochs + finetune.

    Every mechanism is this one loop; they differ only in which parts learn on a step and in the
    loss that step backpropagates. `shard`: the rows of each batch this process trains on (all of
    them, except under data parallel). Returns run; writes into run.cfg.out when it is set."""
    from tqdm import tqdm
    cfg, model, optimizers = run.cfg, run.model, run.optimizers
    device, n_parts = torch.device(cfg.device), len(model.parts)
    lrs, warmup = cfg.part_lr or [cfg.lr] * n_parts, cfg.warmup
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
            t_step = time.perf_counter()
            x = preprocess(batch.to(device, non_blocking=True), cfg.n_bits)[shard]
            learning = learning_parts(phase, first_step + i, phase_steps, n_parts, cfg.alternate_every)
            if phase in END_TO_END:  # full, finetune: the whole flow's bits/dim, one gradient for all
                losses = [bits_per_dim(model.log_prob(x), x, cfg.n_bits).mean()]
            else:  # each learning part's own truncated loss L_k (parallel: every part's, summed)
                log_probs, _ = model.truncated(x, learning)
                losses = [bits_per_dim(log_prob, x, cfg.n_bits).mean() for log_prob in log_probs]
            values = [loss.item() for loss in losses]
            owners = [n_parts - 1] if phase in END_TO_END else learning  # the part each value belongs to
            if not all(math.isfinite(v) for v in values):
                k = first_nonfinite_part(model, x, owners, values)
                raise NonFiniteLoss(f"non-finite loss in part {k} of {n_parts} at epoch {epoch} ({phase}), "
                                    f"step {i}; {checkpoint_note(cfg.out)}")
            model.zero_grad(set_to_none=True)
            sum(losses).backward()
            for k in learning:  # only the learning parts step, each at its own warmed-up rate
                for group in optimizers[k].param_groups:
                    group["lr"] = warmed_up(lrs[k], run.updates[k], warmup)
                optimizers[k].step()
                run.updates[k] += 1
            if run.ema:  # Polyak averaging; the decay grows from 0.1 so the average starts near the weights
                with torch.no_grad():
                    decay = min(cfg.ema, (1 + run.steps) / (10 + run.steps))
                    torch._foreach_lerp_(averages, params, 1 - decay)
            run.steps += 1
            for k, v in zip(owners, values):
                loss_sums[k], loss_counts[k] = loss_sums[k] + v, loss_counts[k] + 1
            if phase != "finetune":
                sync(device)
                run.step_seconds.setdefault(tuple(learning), []).append(time.perf_counter() - t_step)
        sync(device)
        run.seconds += time.perf_counter() - t_epoch
        test_bpd, part_bpd = evaluate(run.ema or model, test_images, cfg.batch_size, device)
        raw_bpd = evaluate(model, test_images, cfg.batch_size, device)[0] if run.ema else None
        train_parts = [s / c if c else None for s, c in zip(loss_sums, loss_counts)]
        finish_epoch(run, epoch, phase, train_parts, test_bpd, part_bpd, log, raw_bpd)
    return run

@torch.no_grad()
def first_nonfinite_part(model, x, owners, values):
    """The first part (1-based) whose truncated loss on x is not finite: where a failure starts, even
    when a later part's loss is the one that showed it; else the first part whose value was."""
    log_probs, _ = model.truncated(x)
    bad = [k for k, lp in enumerate(log_probs) if not torch.isfinite(lp).all()]
    bad += [k for k, v in zip(owners, values) if not math.isfinite(v)]
    return bad[0] + 1

@torch.no_grad()
def evaluate(model, images, batch_size, device):
    """(full-model bits/dim, [bits/dim of the flow truncated after each part]) over all of `images`,
    with the same dequantization noise at every evaluation (eval_batches)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(len(model.parts), dtype=torch.float64, device=device)
    for x in eval_batches(images, batch_size, model.n_bits, device):
        log_probs, _ = model.truncated(x)
        totals += torch.stack([bits_per_dim(lp, x, model.n_bits).double().sum() for lp in log_probs])
    model.train(was_training)
    part_bpd = (totals / len(images)).tolist()
    return part_bpd[-1], part_bpd

def sync(device):
    """Wait for the device, so that a clock read afterwards times work that has really finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

def finish_epoch(run, epoch, phase, train_parts, test_bpd, part_bpd, log, raw_bpd=None):
    """Record and print the epoch's metrics; write samples, checkpoint and metrics.jsonl.

    With --ema, test_bpd and part_bpd are the averaged weights' and raw_bpd the raw weights'."""
    if not math.isfinite(test_bpd):
        k = next(k for k, v in enumerate(part_bpd) if not math.isfinite(v))
        raise NonFiniteLoss(f"non-finite test bits/dim in part {k + 1} of {len(part_bpd)} at epoch {epoch} "
                            f"({phase}); {checkpoint_note(run.cfg.out)}")
    run.epoch = epoch
    metrics = {"epoch": epoch, "phase": phase,
               "train_bpd": train_parts[-1],  # mean over the epoch's steps that ran the whole flow
               "test_bpd": test_bpd, "part_losses": part_bpd,
               "train_part_losses": None if phase in END_TO_END else train_parts,
               "seconds": run.seconds, "steps": run.steps}
    if raw_bpd is not None:
        metrics["raw_test_bpd"] = raw_bpd
    run.history.append(metrics)
    train_txt = f"{train_parts[-1]:.3f}" if train_parts[-1] is not None else "  -  "
    log(f"epoch {epoch:3d} | {phase:10s} | train {train_txt} | test {test_bpd:.3f} | parts "
        + " ".join(f"{v:.3f}" for v in part_bpd) + f" | {run.seconds:7.1f} s"
        + (f" | raw weights {raw_bpd:.3f}" if raw_bpd is not None else ""))
    out = run.cfg.out
    if out:
        from torchvision.utils import save_image
        os.makedirs(out, exist_ok=True)
        samples = postprocess((run.ema or run.model).sample(64, temperature=0.7)).float().cpu()
        samples = F.interpolate(samples, scale_factor=max(1, 64 // samples.shape[-1]))  # big enough to see
        save_image(samples, os.path.join(out, f"samples_{epoch:03d}.png"), nrow=8, padding=4)
        save_checkpoint(run, os.path.join(out, "checkpoint.pt"))

        def write_metrics(path):  # after the checkpoint: it never holds an epoch a resume would redo
            with open(path, "w") as f:
                f.writelines(json.dumps(m) + "\n" for m in run.history)
        write_atomic(os.path.join(out, "metrics.jsonl"), write_metrics)

# --- runs: build, checkpoint, resume

def build_model(cfg):
    torch.manual_seed(cfg.seed)
    model = Glow(NATIVE[cfg.dataset][0], cfg.image_size, cfg.levels, cfg.steps, cfg.hidden, cfg.parts,
                 cfg.n_bits, cfg.part_prior).to(cfg.device, memory_format=torch.channels_last)
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
    if cfg.subset:
        train_images = train_images[:cfg.subset]
    return resize(train_images, cfg.image_size), resize(test_images, cfg.image_size)

def write_atomic(path, write):
    """write(temporary path), then rename it onto path: a reader (or a resume) sees the old file or
    the new one, never half of one, and a failed write leaves no temporary file behind."""
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def save_checkpoint(run, path):
    """Everything a resume needs: the config, weights, every part's Adam, counters, RNG, metrics."""
    device = torch.device(run.cfg.device)
    rng = {"cpu": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    state = {"config": asdict(run.cfg), "model": run.model.state_dict(),
             "optimizers": [o.state_dict() for o in run.optimizers], "updates": run.updates,
             "epoch": run.epoch, "seconds": run.seconds, "steps": run.steps, "history": run.history,
             "rng": rng, "ema": run.ema.state_dict() if run.ema else None}
    write_atomic(path, lambda tmp: torch.save(state, tmp))

def load_checkpoint(path):
    """The checkpoint at path, its keys and config checked (start_run checks the weights): UsageError."""
    if not os.path.isfile(path):
        raise UsageError(f"--resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--resume: checkpoint {path} is corrupt or unreadable ({type(e).__name__})") \
            from None
    keys = ("config", "model", "optimizers", "updates", "epoch", "seconds", "steps", "history", "rng", "ema")
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UsageError(f"--resume: checkpoint {path} lacks {', '.join(missing)}")
    odd = sorted({f.name for f in fields(Config)} ^ set(ckpt["config"]))
    if odd:
        raise UsageError(f"--resume: the config in {path} lacks or has unknown settings: {', '.join(odd)}")
    return ckpt

def checkpoint_note(out):
    """The truth about what a stopped run leaves behind, for its last message."""
    path = os.path.join(out or "", "checkpoint.pt")
    if not out or not os.path.isfile(path):
        return "no checkpoint was written"
    try:
        epoch = torch.load(path, map_location="cpu", mmap=True, weights_only=True)["epoch"]
    except Exception:  # this is an error path already: say what is there, raise nothing new
        return f"{path} is kept, but it cannot be read"
    return f"the checkpoint of epoch {epoch} in {out} is kept"

def default_warmup(cfg, steps_per_epoch):
    """A tenth of the updates each part gets when the parts take turns, at most 500 (CIFAR-10's)."""
    steps = (cfg.epochs + cfg.finetune) * steps_per_epoch
    return max(1, min(500, steps // len(cfg.parts) // 10))

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
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            detail = next(line.strip() for line in str(e).splitlines()[1:] + [str(e)] if line.strip())
            raise UsageError(f"--resume: the checkpoint does not fit its config ({detail})") from None
        for key in ("updates", "epoch", "seconds", "steps", "history"):
            setattr(run, key, ckpt[key])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    train_images, test_images = data if data is not None else prepare_data(cfg)
    if len(train_images) < cfg.batch_size:
        raise UsageError(f"batch size {cfg.batch_size} is larger than the {len(train_images)} "
                         f"training images")
    if not ckpt:
        if init_state is not None:
            model.load_state_dict(init_state)
        first = preprocess(train_images[:INIT_BATCH].to(device), cfg.n_bits,
                           generator=torch.Generator(device=device).manual_seed(cfg.seed))
        model.initialize(first)
        torch.manual_seed(cfg.seed)  # every mechanism sees the same dequantization noise
        if cfg.warmup is None:
            run.cfg = replace(cfg, warmup=default_warmup(cfg, len(train_images) // cfg.batch_size))
    if cfg.ema:
        run.ema = copy.deepcopy(model)
        if ckpt:
            run.ema.load_state_dict(ckpt["ema"])
    return run, (train_images, test_images)

def weights_hash(model):
    """A short hash of every parameter and buffer: equal hashes mean identical weights."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]

# -----------------------------------------------------------------------------
# Experiment: the mechanisms side by side from the same start; what one step costs.

def mechanism_steps(mode, n_parts):
    """The kinds of step a mechanism takes, read off its schedule (learning_parts) over one turn each."""
    turns = [learning_parts(mode, step, n_parts, n_parts) for step in range(n_parts)]
    return [list(k) for k in dict.fromkeys(map(tuple, turns))]

def measure_step(model, x, mode, learning):
    """What one step holds and sends: (activation bytes, boundary backward bytes, CUDA peak bytes).

    activation bytes: storage of the tensors autograd saves for backward (parameters excluded; with
    --recompute, what torch.utils.checkpoint keeps: each step's input).
    boundary bytes: gradient that flows backwards into a part's input from the part after it,
    counted by a hook on each part's input that fires only if a gradient really arrives there."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, crossing = {}, [0]

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

    hooks = [part.register_forward_pre_hook(watch_input) for part in model.parts[1:]]
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if mode in END_TO_END:  # the same two losses as train()'s loop
            loss = bits_per_dim(model.log_prob(x), x, model.n_bits).mean()
        else:
            loss = sum(bits_per_dim(lp, x, model.n_bits).mean() for lp in model.truncated(x, learning)[0])
    loss.backward()
    peak = torch.cuda.max_memory_allocated(x.device) if cuda else None
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    return sum(saved.values()), crossing[0], peak

def step_costs(model, x, mode):
    """measure_step for the steps a mechanism takes; for per-part mechanisms the largest part's."""
    costs = [measure_step(model, x, mode, learning) for learning in mechanism_steps(mode, len(model.parts))]
    peaks = [c[2] for c in costs if c[2] is not None]
    return {"activation_bytes": max(c[0] for c in costs), "boundary_backward_bytes": max(c[1] for c in costs),
            "cuda_max_memory_allocated": max(peaks) if peaks else None}

def compare(cfg, modes=("full", "alternate"), log=print):
    """Train each mechanism from the same initial weights, data order and seed; write compare.json/png.

    full trains epochs + finetune epochs end to end (the same total); every other mode trains its
    `epochs`, then `finetune` epochs end to end."""
    shared, data = start_run(replace(cfg, out=None))  # the initialised model every run starts from
    init_state = copy.deepcopy(shared.model.state_dict())
    # What one step of each mechanism holds and sends, on the shared start. This also runs every kind
    # of step once, so no run pays the one-off cost of first-time kernel setup inside its timing.
    probe = preprocess(data[0][:cfg.batch_size].to(cfg.device), cfg.n_bits)
    costs = {mode: step_costs(shared.model, probe, mode) for mode in modes}
    runs = []
    for mode in modes:
        log(f"--- {mode}")
        moved = cfg.finetune if mode == "full" else 0  # full trains the finetuning epochs as its own
        run_cfg = replace(cfg, mode=mode, out=os.path.join(cfg.out, mode), epochs=cfg.epochs + moved,
                          finetune=cfg.finetune - moved)
        run, _ = start_run(run_cfg, data, init_state)
        start_hash = weights_hash(run.model)
        train(run, data, log)
        runs.append({"name": mode if mode == "full" or not cfg.finetune else f"{mode}+finetune",
                     "mode": mode, "epochs": run.cfg.epochs, "finetune": run.cfg.finetune,
                     "final_test_bpd": run.history[-1]["test_bpd"], "train_seconds": run.seconds,
                     "step_seconds": statistics.fmean(map(statistics.median, run.step_seconds.values())),
                     **costs[mode], "start_hash": start_hash, "curve": run.history})
    full = runs[modes.index("full")]["curve"]
    target, what = smoothed_final(full, cfg.ema)
    for r in runs:
        r["time_to_target"] = next((m["seconds"] for m in r["curve"] if m["test_bpd"] <= target), None)
        r["full_bpd_at_equal_time"] = bpd_at(full, r["train_seconds"])
    summary = {"config": asdict(cfg), "target_bpd": target, "target": what, "runs": runs}
    write_results(summary, cfg.out, "compare", plot_compare)
    log(summary_table(summary))
    return summary

def smoothed_final(curve, ema):
    """A run's final test bits/dim as a target that one lucky or unlucky evaluation cannot move much:
    its averaged weights' (--ema), else the mean of its last three evaluations."""
    if ema:
        return curve[-1]["test_bpd"], "full's final bits/dim with averaged weights (--ema)"
    return statistics.fmean(m["test_bpd"] for m in curve[-3:]), "the mean of full's last 3 evaluations"

def bpd_at(curve, seconds):
    """The test bits/dim a run had reached after `seconds` of training (its last evaluation by then)."""
    return next((m["test_bpd"] for m in reversed(curve) if m["seconds"] <= seconds * (1 + 1e-9)), None)

def write_results(summary, out, name, plot):
    """out/name.json, and out/name.png drawn by plot."""
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot(summary, os.path.join(out, f"{name}.png"))

def sweep(cfg, budgets, log=print):
    """The poster's question at several budgets N (epochs): alternate 2N/3 + finetune N/3 against full N.

    Full trains once, for the largest budget: with a fixed warmup and a constant rate, its first N
    epochs are the full run of budget N. Alternate trains once, to 2/3 of the largest budget; at each
    2N/3 a copy of it branches off and finetunes for N/3 epochs. Each finetuning epoch M is also set
    against full training from scratch after M epochs (a head start?) and against full training at
    the same wall time. Writes sweep.json and sweep.png into cfg.out."""
    shared, data = start_run(replace(cfg, out=None))  # the start every run shares
    init_state = copy.deepcopy(shared.model.state_dict())
    cfg = replace(cfg, warmup=cfg.warmup or default_warmup(replace(cfg, epochs=budgets[-1], finetune=0),
                                                           len(data[0]) // cfg.batch_size))
    full, _ = start_run(replace(cfg, mode="full", epochs=budgets[-1], finetune=0,
                                out=os.path.join(cfg.out, "full")), data, init_state)
    log("--- full")
    full = train(full, data, log).history
    trunk, _ = start_run(replace(cfg, mode="alternate", epochs=0, finetune=0,
                                 out=os.path.join(cfg.out, "alternate")), data, init_state)
    results = []
    for N in budgets:
        log(f"--- alternate to epoch {2 * N // 3}, then finetuning for {N // 3}")
        trunk.cfg = replace(trunk.cfg, epochs=2 * N // 3)
        train(trunk, data, log)
        branch = copy.deepcopy(trunk)
        branch.cfg = replace(trunk.cfg, finetune=N // 3, out=os.path.join(cfg.out, f"finetune-{N}"))
        with torch.random.fork_rng(devices=[cfg.device] if cfg.device.startswith("cuda") else []):
            curve = train(branch, data, log).history  # the trunk goes on as if the branch had never run
        tuned, end = curve[2 * N // 3:], full[N - 1]
        r = {"budget": N, "full_bpd": end["test_bpd"], "full_seconds": end["seconds"],
             "alternate_finetune_bpd": tuned[-1]["test_bpd"],
             "alternate_finetune_seconds": tuned[-1]["seconds"],
             "alternate_bpd": curve[2 * N // 3 - 1]["test_bpd"],
             "head_start": [{"finetune_epochs": M + 1, "seconds": m["seconds"], "bpd": m["test_bpd"],
                             "full_after_same_epochs": full[M]["test_bpd"],
                             "full_at_same_seconds": bpd_at(full, m["seconds"])}
                            for M, m in enumerate(tuned)],
             "curve": curve}
        r["gap"] = r["alternate_finetune_bpd"] - r["full_bpd"]
        r["time_ratio"] = r["alternate_finetune_seconds"] / r["full_seconds"]
        if "raw_test_bpd" in end:  # with --ema, the raw weights' too
            r["gap_raw_weights"] = tuned[-1]["raw_test_bpd"] - end["raw_test_bpd"]
        results.append(r)
    summary = {"config": asdict(cfg), "budgets": results, "full_curve": full,
               "alternate_curve": trunk.history}
    write_results(summary, cfg.out, "sweep", plot_sweep)
    log(sweep_table(summary))
    return summary

def sweep_table(summary):
    """The sweep as a Markdown table: per budget the gap, the time, and where finetuning from the
    alternate weights overtakes full training after as many epochs, and at equal training time."""
    raw = "gap_raw_weights" in summary["budgets"][0]
    header = ["budget N", "full, N epochs", "alternate 2N/3 + finetune N/3", "gap"] \
        + ["gap, raw weights"] * raw + ["time / full", "full at equal time",
                                        "finetuning ahead of full's first M epochs from M =",
                                        "ahead of full at equal time from M ="]
    rows = []
    for b in summary["budgets"]:
        h = b["head_start"]
        ahead = next((m["finetune_epochs"] for m in h if m["bpd"] < m["full_after_same_epochs"]), "never")
        pays = next((m["finetune_epochs"] for m in h
                     if m["bpd"] < (m["full_at_same_seconds"] or math.inf)), "never")
        rows.append([str(b["budget"]), f"{b['full_bpd']:.3f}", f"{b['alternate_finetune_bpd']:.3f}",
                     f"{b['gap']:+.3f}"] + [f"{b['gap_raw_weights']:+.3f}"] * raw
                    + [f"{b['time_ratio']:.2f}", f"{bpd_at(summary['full_curve'], h[-1]['seconds']):.3f}",
                       str(ahead), str(pays)])
    return markdown_table(header, rows)

def plot_sweep(summary, path):
    """The gap and the wall-time ratio against the budget, and every curve against training time."""
    from matplotlib.figure import Figure
    budgets, fig = summary["budgets"], Figure(figsize=(15, 4))
    gap, ratio, curves = fig.subplots(1, 3)
    N = [b["budget"] for b in budgets]
    gap.plot(N, [b["gap"] for b in budgets], marker="o")
    gap.axhline(0, color="grey", linewidth=0.8)
    gap.set(xlabel="budget N (epochs)", ylabel="test bits/dim: alternate+finetune - full",
            title="the gap (alternate 2N/3 + finetune N/3 vs full N)")
    ratio.plot(N, [b["time_ratio"] for b in budgets], marker="o")
    ratio.axhline(0.7, color="grey", linewidth=0.8, linestyle=":")
    ratio.set(xlabel="budget N (epochs)", ylabel="training time / full's",
              title="the time (0.7 = a 30 % saving)")
    for name, style in (("full", "k-"), ("alternate", "k:")):
        curve = summary[f"{name}_curve"]
        curves.plot([m["seconds"] for m in curve], [m["test_bpd"] for m in curve], style, label=name)
    for b in budgets:
        h = b["head_start"]
        curves.plot([m["seconds"] for m in h], [m["bpd"] for m in h], marker=".",
                    label=f"finetuning, N = {b['budget']}")
    curves.set(xlabel="training seconds", ylabel="test bits/dim",
               title="finetuning from alternate vs full, in time")
    curves.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)

def benchmark(cfg, modes, repeats=5, log=print):
    """Median step time, activation memory and boundary bytes of each mechanism at the configured
    model size, on random images: no data needed, so it runs at CIFAR-10 size on any machine.

    The steps timed are train()'s own, repeats + 1 per kind of step (the first is a warm-up), at a
    tiny learning rate so the weights stay where they started. Per-part mechanisms report the mean
    of the parts' medians (one turn each)."""
    channels, S = NATIVE[cfg.dataset][0], cfg.image_size
    rows = []
    for mode in modes:
        n_kinds = len(mechanism_steps(mode, len(cfg.parts)))
        images = torch.randint(0, 256, (cfg.batch_size * (repeats + 1) * n_kinds, channels, S, S),
                               dtype=torch.uint8, generator=torch.Generator().manual_seed(cfg.seed))
        data = (images, images[:cfg.batch_size])
        run, _ = start_run(replace(cfg, mode=mode, epochs=1, finetune=0, lr=1e-6, part_lr=None, warmup=1,
                                   out=None), data)
        train(run, data, log=lambda *a: None)
        medians = [statistics.median(times[1:]) for times in run.step_seconds.values()]
        probe = preprocess(images[:cfg.batch_size].to(cfg.device), cfg.n_bits)
        rows.append({"mode": mode, "step_seconds": statistics.fmean(medians), "part_step_seconds": medians,
                     **step_costs(run.model, probe, mode)})
    full = rows[modes.index("full")] if "full" in modes else rows[0]
    table = markdown_table(
        ["mechanism", "step s", "step / full", "per-part step s", "activations MB", "CUDA peak MB",
         "boundary grad KB"],
        [[r["mode"], f"{r['step_seconds']:.3f}", f"{r['step_seconds'] / full['step_seconds']:.2f}",
          " ".join(f"{t:.3f}" for t in r["part_step_seconds"]), f"{r['activation_bytes'] / 2 ** 20:.1f}",
          f"{r['cuda_max_memory_allocated'] / 2 ** 20:.0f}" if r["cuda_max_memory_allocated"] else "-",
          f"{r['boundary_backward_bytes'] / 2 ** 10:.0f}"] for r in rows])
    log(f"benchmark: {cfg.levels} levels x {cfg.steps} steps, hidden {cfg.hidden}, parts {cfg.parts}, "
        f"batch {cfg.batch_size} of {channels}x{S}x{S} on {cfg.device}\n{table}")
    return rows

def markdown_table(header, rows):
    """A Markdown table from a header and rows of cells (strings)."""
    lines = ["| " + " | ".join(cells) + " |" for cells in [header, *rows]]
    return "\n".join([lines[0], "|---" * len(header) + "|", *lines[1:]])

def summary_table(summary):
    """The comparison as a Markdown table (ratios relative to the full run)."""
    full = next(r for r in summary["runs"] if r["mode"] == "full")
    header = ["run", "final test bpd", "train s", "time / full", "time to full's bpd (s)",
              "full's bpd at equal time", "step ms", "step / full", "activations MB", "boundary grad KB"]
    rows = [[r["name"], f"{r['final_test_bpd']:.3f}", f"{r['train_seconds']:.0f}",
             f"{r['train_seconds'] / full['train_seconds']:.2f}",
             f"{r['time_to_target']:.0f}" if r["time_to_target"] is not None else "never",
             f"{r['full_bpd_at_equal_time']:.3f}" if r["full_bpd_at_equal_time"] is not None else "-",
             f"{1e3 * r['step_seconds']:.1f}",
             f"{r['step_seconds'] / full['step_seconds']:.2f}", f"{r['activation_bytes'] / 2 ** 20:.1f}",
             f"{r['boundary_backward_bytes'] / 2 ** 10:.0f}"] for r in summary["runs"]]
    return markdown_table(header, rows)

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
            ax.axhline(summary["target_bpd"], color="grey", linewidth=0.8, alpha=0.6)
    axes[0].set(xlabel="epoch", ylabel="test bits/dim", title="per epoch")
    axes[1].set(xlabel="training seconds", title="per second of training (the poster's claim)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)

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
    """Cut the steps into n_parts contiguous parts whose most expensive part is as cheap as possible
    (exact: a dynamic programme over the last cut)."""
    if not 1 <= n_parts <= len(macs):
        raise ValueError(f"auto:{n_parts} needs between 1 and {len(macs)} parts (one per flow step at most)")
    prefix = [0, *itertools.accumulate(macs)]

    @functools.cache
    def best(i, p):  # (the cheapest largest part, its sizes) when the first i steps form p parts
        if p == 1:
            return prefix[i], [i]
        cost, j = min((max(best(j, p - 1)[0], prefix[i] - prefix[j]), j) for j in range(p - 1, i))
        return cost, best(j, p - 1)[1] + [i - j]
    return best(len(macs), n_parts)[1]

# -----------------------------------------------------------------------------
# Distributed, under torchrun: data parallel for every mechanism, and the pipeline of parts.
# Nothing above knows about processes; train() takes the rows of a batch to train on, and this
# section adds the rest from outside (a gradient average before each part's optimizer steps).

def torchrun_env():
    """(rank, local rank, number of processes) as torchrun sets them; (0, 0, 1) in a plain run."""
    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env.get("WORLD_SIZE", "1"))

def check_torchrun(cfg, args, world):
    """Flag combinations that cannot run on `world` processes: UsageError."""
    if args.compare or args.benchmark or args.sweep:
        raise UsageError("--compare, --sweep and --benchmark time mechanisms in one process; "
                         "run them without torchrun")
    if cfg.mode == "parallel" and world != len(cfg.parts):
        raise UsageError(f"the pipeline runs one part per process: {len(cfg.parts)} parts but "
                         f"{world} processes; use --nproc_per_node {len(cfg.parts)}")
    if cfg.mode == "parallel" and cfg.ema:
        raise UsageError("the pipeline keeps no moving average of the weights: run --ema without torchrun")
    if cfg.mode == "parallel" and cfg.finetune:
        raise UsageError("the pipeline never sends gradients back, so it cannot finetune end to end; "
                         "resume its checkpoint without torchrun with --mode parallel --finetune N")
    if cfg.mode != "parallel" and cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} (the global batch) must divide among "
                         f"{world} processes")

def init_distributed(cfg, local_rank):
    """Join the process group (NCCL on GPUs, gloo on CPU); one GPU per local process."""
    import torch.distributed as dist
    if torch.device(cfg.device).type == "cuda":
        cfg = replace(cfg, device=f"cuda:{local_rank % torch.cuda.device_count()}")
        torch.cuda.set_device(cfg.device)
    dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    return cfg

def train_data_parallel(cfg, ckpt, rank, world, log):
    """Every process holds the whole model and trains on its rows of each global batch; before a
    part's optimizer steps, its gradients are averaged over the processes. Process 0 writes."""
    import torch.distributed as dist

    def average_gradients(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])  # one all-reduce per part and step
        dist.all_reduce(flat)
        flat /= world
        for g, avg in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(avg.view_as(g))

    run, data = start_run(cfg, ckpt=ckpt)  # same seed, same init batch: identical replicas
    for optimizer in run.optimizers:
        optimizer.register_step_pre_hook(average_gradients)
    if rank:
        run.cfg = replace(run.cfg, out=None)  # one writer per run directory
    train(run, data, log, shard=slice(rank, None, world))
    hashes = [None] * world
    dist.all_gather_object(hashes, weights_hash(run.model))
    if len(set(hashes)) != 1:
        raise RuntimeError(f"data-parallel replicas diverged: weight hashes {hashes}")
    log(f"data parallel over {world} processes: replicas identical at the end (weight hashes compared)")

def train_pipeline(cfg, ckpt, rank, world, log):
    """--mode parallel under torchrun: process k owns part k and trains it on its truncated objective.

    Process 0 reads the data. Each process receives the carry (h_{k-1}, the earlier parts' constant
    terms) from process k-1, takes its step, and sends its detached carry to process k+1 before its
    own backward pass. Sends go forward only, so while process k works on batch t, process k-1 is
    already on batch t+1. Every process holds the whole model (same seed, same init), but only its
    own part ever learns; at the end of an epoch process 0 gathers the parts, evaluates the model
    and writes one checkpoint, in the single-process format."""
    import torch.distributed as dist
    run, (train_images, test_images) = start_run(cfg, ckpt=ckpt)
    cfg, model, device, B = run.cfg, run.model, torch.device(run.cfg.device), run.cfg.batch_size
    optimizer, lr = run.optimizers[rank], (cfg.part_lr or [cfg.lr] * world)[rank]
    # bytes [sent forward, sent backward, received from before, received from after], at every transfer
    traffic = torch.zeros(4, dtype=torch.float64, device=device)
    pending = []  # the sends in flight: their buffers stay alive until they are received

    def wait_for_sends():
        for request in pending:
            request.wait()
        pending.clear()

    def count(t, peer, sent):
        direction = (0 if peer > rank else 1) if sent else (2 if peer < rank else 3)
        traffic[direction] += t.numel() * t.element_size()

    def receive(batch):
        """Process 0 starts from a batch of images (no earlier terms); the others receive a carry."""
        if rank == 0:
            return preprocess(batch.to(device), cfg.n_bits), torch.zeros(B, device=device)
        h = torch.empty(B, *model.parts[rank - 1].prior.mean.shape[1:], device=device)
        const = torch.empty(B, device=device)
        for t in (h, const):
            dist.recv(t, rank - 1)
            count(t, rank - 1, sent=False)
        return h.contiguous(memory_format=torch.channels_last), const

    model.train()
    for epoch in range(run.epoch + 1, cfg.epochs + 1):
        loss_sum = torch.zeros(world, dtype=torch.float64, device=device)
        n_bad = torch.zeros(world, device=device)
        traffic.zero_()
        dist.barrier()
        t0 = time.perf_counter()
        steps = len(train_images) // B
        loader = [(None,)] * steps if rank else batches(train_images, B, cfg.seed, epoch, cfg.num_workers)
        for batch, in loader:
            (log_prob,), carry = model.truncated(None, [rank], receive(batch))
            wait_for_sends()  # the previous batch's sends, before this batch's go out
            for t in carry if rank + 1 < world else []:  # forward only; nothing ever comes back
                t = t.detach().contiguous()
                count(t, rank + 1, sent=True)
                pending.append(dist.isend(t, rank + 1))
            loss = bits_per_dim(log_prob, model.n_dims, model.n_bits).mean()
            if not torch.isfinite(loss):  # stop together at the epoch's end, not alone in the middle
                n_bad[rank] += 1
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = warmed_up(lr, run.updates[rank], cfg.warmup)
            optimizer.step()
            run.updates[rank] += 1
            loss_sum[rank] += loss.item()
        wait_for_sends()
        dist.barrier()
        run.seconds += time.perf_counter() - t0
        run.steps += steps
        for t in (loss_sum, n_bad, traffic):
            dist.all_reduce(t)
        if n_bad.sum() > 0:
            raise NonFiniteLoss(f"non-finite loss in part {int(torch.nonzero(n_bad)[0]) + 1} of {world} "
                                f"at epoch {epoch} (pipeline); {checkpoint_note(cfg.out)}")
        # process 0 gathers every part (weights, Adam state, update count) into one checkpoint
        mine = io.BytesIO()
        torch.save({"part": model.parts[rank].state_dict(), "optimizer": optimizer.state_dict(),
                    "updates": run.updates[rank]}, mine)
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(mine.getvalue(), gathered, dst=0)
        if rank == 0:
            for k, theirs in enumerate(gathered):
                theirs = torch.load(io.BytesIO(theirs), map_location=device, weights_only=True)
                model.parts[k].load_state_dict(theirs["part"])
                run.optimizers[k].load_state_dict(theirs["optimizer"])
                run.updates[k] = theirs["updates"]
            test_bpd, part_bpd = evaluate(model, test_images, B, device)
            finish_epoch(run, epoch, cfg.mode, (loss_sum / steps).tolist(), test_bpd, part_bpd, log)
            log(f"          pipeline: {int(traffic[0]):,} bytes sent forward between parts this epoch, "
                f"{int(traffic[1])} backward; received {int(traffic[2]):,} from earlier parts, "
                f"{int(traffic[3])} from later ones")
        dist.barrier()
    return run

# -----------------------------------------------------------------------------
# Command line

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the whole usage too)
        raise UsageError(message)

def parse_budgets(text):
    budgets = sorted(number(3)(v) for v in text.split(","))
    if any(N % 3 for N in budgets):
        raise argparse.ArgumentTypeError(f"budgets must be multiples of 3 (alternate 2N/3 + finetune N/3), "
                                         f"got {text}")
    return budgets

def parse_modes(text):
    modes = text.split(",")
    if any(m not in MODES for m in modes) or "full" not in modes:
        raise argparse.ArgumentTypeError(f"must list 'full' and only {', '.join(MODES)}; got {text!r}")
    return modes

def make_parser():
    p = Parser(description="Glow trained in gradient-isolated parts: full, alternate, sequential or "
                           "parallel training, + finetuning, and the poster's comparison.")
    for f in fields(Config):  # no argparse defaults: a flag not given takes Config's, or the checkpoint's
        kwargs = {**f.metadata, "help": f"{f.metadata['help']} (default: {f.default})"}
        p.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS, **kwargs)
    g = p.add_argument_group("what to do (default: train)").add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help=f"continue the run in --out; it may change only {flags(RESUMABLE)}")
    g.add_argument("--compare", action="store_true",
                   help="train the mechanisms side by side from the same start into --out; "
                        "write compare.json/png")
    g.add_argument("--sweep", type=parse_budgets, metavar="N,N,...",
                   help="the budget sweep into --out: full N epochs against alternate 2N/3 + finetune N/3, "
                        "for each budget N (multiples of 3); writes sweep.json/png")
    g.add_argument("--benchmark", action="store_true",
                   help="time one step of each --compare-modes mechanism at this model size on random images")
    p.add_argument("--compare-modes", type=parse_modes, default="full,alternate",
                   help="mechanisms --compare (or --benchmark) runs (default: full,alternate)")
    return p

RESUMABLE = ("epochs", "finetune", "lr", "part_lr", "warmup", "data_dir", "device", "num_workers", "out",
             "compile", "recompute")

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
        raise UsageError(f"--epochs {cfg.epochs}: {why}; keep --epochs {saved.epochs} "
                         f"(--finetune may change)")
    if cfg.epochs + cfg.finetune <= done:
        raise UsageError(f"the run in {cfg.out} already has {done} epochs ({saved.epochs} + {saved.finetune} "
                         f"finetuning); ask for more with --epochs or --finetune")
    for k, v in changed.items():
        log(f"resume: {flags([k])} {v} (was {getattr(saved, k)})")
    return cfg

def config_from_args(args, log=print):
    """(Config, checkpoint or None) from parsed flags, after every check that needs no data.

    A flag not given takes Config's default, or on --resume the checkpoint's setting. UsageError
    (one line) for anything wrong: flags, flag combinations, the checkpoint, the run directory."""
    given = {f.name: getattr(args, f.name) for f in fields(Config) if hasattr(args, f.name)}
    ckpt = None
    try:
        cfg = Config(**given)
        what = "compare" if args.compare else "sweep" if args.sweep else cfg.mode
        cfg.out = cfg.out or os.path.join("runs", f"{cfg.dataset}-{what}")
        if args.resume:
            ckpt = load_checkpoint(os.path.join(cfg.out, "checkpoint.pt"))
            cfg = resume_config(Config(**ckpt["config"]), {**given, "out": cfg.out}, ckpt["epoch"], log)
        check_parts(cfg.parts, cfg.levels, cfg.steps)
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--parts: {e}" if "part" in str(e) else f"bad setting: {e}") from None
    if cfg.image_size % 2 ** cfg.levels:
        fit = 2 ** cfg.levels * max(1, round(cfg.image_size / 2 ** cfg.levels))
        raise UsageError(f"image size {cfg.image_size} is not divisible by 2^levels = {2 ** cfg.levels}; "
                         f"pass --image-size {fit}, say")
    if cfg.part_lr and len(cfg.part_lr) != len(cfg.parts):
        raise UsageError(f"--part-lr gives {len(cfg.part_lr)} rates for {len(cfg.parts)} parts")
    try:
        if torch.device(cfg.device).type not in ("cpu", "cuda", "mps"):
            raise RuntimeError("only cpu, cuda and mps are supported")
        torch.empty(0, device=cfg.device)
    except (RuntimeError, AssertionError) as e:
        raise UsageError(f"--device {cfg.device}: not usable here ({str(e).splitlines()[0]})") from None
    if args.benchmark:
        return cfg, None
    if not args.sweep and (cfg.epochs + cfg.finetune == 0 or (args.compare and cfg.epochs == 0)):
        raise UsageError("nothing to train: give --epochs (and --finetune)" if not args.compare else
                         "--compare times each mechanism's own epochs: give --epochs >= 1")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError(f"--out {cfg.out} is a file, not a directory")
    if not args.resume and os.path.exists(os.path.join(cfg.out, "checkpoint.pt")):
        raise UsageError(f"--out {cfg.out} already holds a run: pass --resume to continue it, "
                         f"or choose another --out")
    held = [f for f in os.listdir(cfg.out) if f in ("compare.json", "sweep.json")
            or os.path.exists(os.path.join(cfg.out, f, "checkpoint.pt"))] if os.path.isdir(cfg.out) else []
    if (args.compare or args.sweep) and held:
        raise UsageError(f"--out {cfg.out} already holds a comparison ({held[0]}); choose another --out")
    return cfg, ckpt

def claim_run_dir(out):
    """Create `out` and lock it for this process: one writer per run directory. The lock is the
    operating system's (flock), so it ends with the process however the process ends, kill -9 too."""
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, ".lock"), "w")
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create or write it ({e.strerror or e})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UsageError(f"--out {out} is in use by another run; wait for it to end, "
                         f"or choose another --out") from None
    return lock  # the lock lasts as long as this file stays open

def interrupt(signum, frame):  # SIGTERM (what a cluster scheduler sends) is handled like Ctrl-C
    raise KeyboardInterrupt(signum)

def main(argv=None):
    rank, local_rank, world = torchrun_env()
    log = print if rank == 0 else (lambda *a: None)
    lock, args, cfg = None, None, None
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        args = make_parser().parse_args(argv)
        cfg, ckpt = config_from_args(args, log)
        if isinstance(getattr(args, "parts", None), str):
            log(f"--parts {args.parts} = {','.join(map(str, cfg.parts))} (equal multiply-adds per part)")
        if world > 1:
            check_torchrun(cfg, args, world)
        if rank == 0 and not args.benchmark:
            lock = claim_run_dir(cfg.out)  # before any data is loaded
        if world > 1:
            cfg = init_distributed(cfg, local_rank)
            distributed = train_pipeline if cfg.mode == "parallel" else train_data_parallel
            distributed(cfg, ckpt, rank, world, log)
        elif args.benchmark:
            benchmark(cfg, args.compare_modes)
        elif args.compare:
            compare(cfg, args.compare_modes)
        elif args.sweep:
            sweep(cfg, args.sweep)
        else:
            train(*start_run(cfg, ckpt=ckpt), log)
    except UsageError as e:  # every process finds the same ones; process 0 reports them
        if rank == 0:
            print(f"glow_parts.py: error: {e}", file=sys.stderr)
        else:
            time.sleep(2)  # so that torchrun does not stop process 0 before it has said why
        return 2
    except NonFiniteLoss as e:
        print(f"glow_parts.py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        kept = checkpoint_note(cfg.out) if cfg and not args.benchmark else "nothing was written"
        if cfg and (args.compare or args.sweep):
            kept = f"each run's last checkpoint is kept under {cfg.out}"
        print(f"glow_parts.py: interrupted ({'SIGTERM' if e.args else 'Ctrl-C'}); {kept}", file=sys.stderr)
        return 143 if e.args else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if lock:
            lock.close()
        if "torch.distributed" in sys.modules and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0

if __name__ == "__main__":
    sys.exit(main())
