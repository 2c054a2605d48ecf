"""
glow_parts.py: Glow trained in gradient-isolated parts with a truncated local objective.

One file holds everything: the Glow flow, the parts and their objective, the data, the
training mechanisms (full, alternate, sequential, + finetuning), the experiment and the CLI.

Quickstart (CPU, offline, about a minute; scikit-learn's bundled 8x8 digits):
    python glow_parts.py --dataset digits --levels 2 --steps 8 --hidden 64 \
        --mode alternate --epochs 10 --finetune 5
The poster's experiment (CIFAR-10, needs a GPU):
    python glow_parts.py --mode alternate --epochs 60 --finetune 30

Papers
  Glow:  Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", NeurIPS 2018.
  Flows: Dinh et al., "Density estimation using Real NVP", ICLR 2017 (multi-scale, affine coupling).
  Local objectives: Loewe et al., "Putting an End to End-to-End", NeurIPS 2019; Belilovsky et al.,
  "Decoupled Greedy Learning of CNNs", ICML 2020. The parts/truncated objective follow the poster
  this project reproduces.

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
  - Adam with linear warmup and a constant rate; no Polyak averaging, no class conditioning.
  - Zero-padded convolutions (the official code adds an "edge" channel instead).
  - The learned top prior is a free mean / log-std per latent position (the official code runs a
    zero-initialised conv over a constant; same family at init, fewer weights).
  - The split prior and coupling use contiguous channel halves (the official code interleaves).
  - Bits/dim is measured with one uniform-noise dequantization sample, as in the paper's tables.
"""
import argparse
import copy
import hashlib
import json
import math
import numbers
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Invertible layers. One contract: forward(x) -> (y, logdet of shape (B,)), reverse(y) -> x.


class ActNorm(nn.Module):
    """Per-channel affine y = (x + loc) * exp(logs), set from the first batch to give mean 0, std 1."""

    def __init__(self, channels):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        # A buffer, so it travels with the state_dict: a reloaded model never re-initialises.
        self.register_buffer("initialized", torch.tensor(False))
        self.init_pending = False  # set by Glow.initialize for exactly one forward pass

    @torch.no_grad()
    def data_init(self, x):
        self.loc.copy_(-x.mean(dim=(0, 2, 3), keepdim=True))
        self.logs.copy_(-torch.log(x.std(dim=(0, 2, 3), keepdim=True) + 1e-6))
        self.initialized.fill_(True)
        self.init_pending = False

    def forward(self, x):
        if self.init_pending:
            self.data_init(x)
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
        logdet = x.shape[2] * x.shape[3] * self.log_s.sum()  # det of a triangular matrix: O(C), not O(C^3)
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
    """y_a = x_a, y_b = (x_b + shift(x_a)) * sigmoid(raw(x_a) + 2): triangular Jacobian, cheap inverse."""

    def __init__(self, channels, hidden):
        super().__init__()
        self.conv1 = nn.Conv2d(channels // 2, hidden, 3, padding=1, bias=False)
        self.norm1 = ActNorm(hidden)  # ActNorm replaces the bias, as in the official code
        self.conv2 = nn.Conv2d(hidden, hidden, 1, bias=False)
        self.norm2 = ActNorm(hidden)
        self.conv3 = ZeroConv2d(hidden, channels)  # zero at init: shift 0, scale sigmoid(2), y_b ignores x_a

    def shift_scale(self, xa):
        h = F.relu(self.norm1(self.conv1(xa))[0])
        h = F.relu(self.norm2(self.conv2(h))[0])
        shift, raw = self.conv3(h).chunk(2, dim=1)
        return shift, raw + 2.0  # sigmoid(raw + 2) starts near 0.88: a gentle, stable contraction

    def forward(self, x):
        xa, xb = x.chunk(2, dim=1)
        shift, s = self.shift_scale(xa)
        yb = (xb + shift) * torch.sigmoid(s)
        return torch.cat([xa, yb], dim=1), F.logsigmoid(s).flatten(1).sum(1)

    def reverse(self, y):
        ya, yb = y.chunk(2, dim=1)
        shift, s = self.shift_scale(ya)
        return torch.cat([ya, yb / torch.sigmoid(s) - shift], dim=1)


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
    """Diagonal Gaussian over a part's output h: learned (zero-initialised, so N(0, I) at init) or fixed N(0, I)."""

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
        return self.mean + temperature * torch.exp(self.logs) * torch.randn(
            n, *self.mean.shape[1:], device=self.mean.device, dtype=self.mean.dtype)


# -----------------------------------------------------------------------------
# Glow cut into gradient-isolated parts, and the truncated objective.


def check_parts(parts, n_levels, n_steps):
    """Validate a parts spec (step counts per part); None means one part per level."""
    if parts is None:
        return [n_steps] * n_levels
    parts = list(parts)
    if not parts:
        raise ValueError("parts is empty: give at least one step count")
    if not all(isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in parts):
        raise ValueError(f"parts must be integers, got {parts}")
    if any(p <= 0 for p in parts):
        raise ValueError(f"parts must be positive step counts, got {parts}")
    if sum(parts) != n_levels * n_steps:
        raise ValueError(f"parts {list(map(int, parts))} sum to {sum(parts)}, but the flow has "
                         f"n_levels * n_steps = {n_levels} * {n_steps} = {n_levels * n_steps} steps")
    return [int(p) for p in parts]


def bits_per_dim(log_prob, x, n_bits):
    """Discrete NLL in bits per dimension from the continuous log-density log p(x) (nats, (B,)).

    x: the batch of images (or just D, the dimensions of one image).
    Pixels are integers in n_bins = 2^n_bits bins of width 1/n_bins on [-0.5, 0.5]; with uniform
    dequantization log P(bin) >= log p(x) - D * log(n_bins), so the bits/dim are
    (-log p(x) + D log n_bins) / (D ln 2) = -log p(x) / (D ln 2) + n_bits."""
    D = x if isinstance(x, int) else x[0].numel()
    return -log_prob / (D * math.log(2)) + n_bits


def isolate(h):
    """Where two parts meet: the ONE place gradient isolation happens.

    The next part's objective is a function of h only; detaching means its backward pass stops
    here, so no earlier part is trained by a later part's loss, and no gradient ever has to be
    computed, or communicated, upstream of a part boundary."""
    return h.detach()


class Part(nn.Module):
    """A contiguous run of flow steps (+ the squeezes and splits they own), and a prior for its output."""

    def __init__(self, layers, prior):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.prior = prior  # p_k(h_k) of the truncated flow; the model's top prior for the last part
        self.n_splits = sum(isinstance(layer, Split) for layer in layers)

    def forward(self, h):
        """h_{k-1} -> (h_k, split-off latents, sum of log-dets (B,), sum of log p(z | .) (B,))."""
        zs, logdet, logp = [], 0, 0
        for layer in self.layers:
            if isinstance(layer, Split):
                h, z, lp = layer(h)
                zs.append(z)
                logp = logp + lp
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

    The n_levels * n_steps flow steps form one sequence that `parts` (step counts) cuts into
    contiguous parts. A squeeze goes to the part holding its level's first step, a split to the part
    holding its level's last step, the top prior to the last part: every parameter is in one part."""

    def __init__(self, in_channels=3, image_size=32, n_levels=3, n_steps=32, hidden=512, parts=None,
                 n_bits=8, part_prior="standard"):
        super().__init__()
        parts = check_parts(parts, n_levels, n_steps)
        if image_size % 2 ** n_levels:
            raise ValueError(f"image_size {image_size} is not divisible by 2^n_levels = {2 ** n_levels}")
        if part_prior not in ("standard", "learned"):
            raise ValueError(f"part_prior must be 'standard' or 'learned', got {part_prior!r}")
        self.n_bits, self.part_sizes = n_bits, parts
        self.n_dims = in_channels * image_size ** 2  # D
        owner = [k for k, size in enumerate(parts) for _ in range(size)]  # part of each global step
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
        self.n_splits = n_levels - 1
        self.initialized_checked = False
        self.wrappers = None  # DistributedDataParallel wrappers of the parts (a plain list, not in state_dict)

    # --- data-dependent initialisation

    @torch.no_grad()
    def initialize(self, x):
        """ActNorm data init on one batch: each ActNorm not yet initialised sets mean 0, std 1 per channel."""
        pending = [m for m in self.modules() if isinstance(m, ActNorm) and not m.initialized]
        for m in pending:
            m.init_pending = True
        if pending:
            self.run(x, 0, len(self.parts))
        self.initialized_checked = True

    def _ensure_initialized(self, x):
        if not self.initialized_checked:
            self.initialize(x)

    # --- the flow, end to end

    def run(self, h, start, stop):
        """Parts start..stop-1 end to end: (h, split-off zs, sum of log-dets, sum of split log-priors)."""
        zs, logdet, logp = [], 0, 0
        for k in range(start, stop):
            h, z, ld, lp = self.part_call(k, h)
            zs += z
            logdet, logp = logdet + ld, logp + lp
        return h, zs, logdet, logp

    def forward(self, x):
        """x (B, C, H, W), preprocessed -> (zs, logdet): latents (split-off first, final last), log-det (B,)."""
        self._ensure_initialized(x)
        h, zs, logdet, _ = self.run(x, 0, len(self.parts))
        return zs + [h], logdet

    def log_prob(self, x):
        """log p(x) of the full model in nats, (B,)."""
        self._ensure_initialized(x)
        h, _, logdet, logp = self.run(x, 0, len(self.parts))
        return logdet + logp + self.parts[-1].prior.log_prob(h)

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

    # --- the parts' truncated objectives

    def part_loss(self, x, k):
        """Bits/dim (batch mean) of the flow truncated after part k; only part k gets gradients."""
        self._ensure_initialized(x)
        with torch.no_grad():  # the terms of parts before k are constants for part k: no graph kept
            h, _, logdet, logp = self.run(x, 0, k)
        log_prob, _, _ = self.truncated(k, h, logdet + logp)
        return bits_per_dim(log_prob, x, self.n_bits).mean()

    def truncated(self, k, h, const=0):
        """Part k on its isolated input h_{k-1}: (log p_k(x) (B,), h_k, the constants for later parts).

        const carries the earlier parts' log-dets and split log-priors, without grad."""
        part = self.parts[k]
        h, _, logdet, logp = self.part_call(k, isolate(h))
        return const + logdet + logp + part.prior.log_prob(h), h, const + (logdet + logp).detach()

    def truncated_log_probs(self, x):
        """[log p_k(x) for every part k] in nats, (B,) each, in one pass with every boundary isolated.

        Summing their losses and calling backward trains every part on its own objective at once
        (--mode parallel); under no_grad it evaluates every truncated flow for one forward pass."""
        self._ensure_initialized(x)
        out, h, const = [], x, 0
        for k in range(len(self.parts)):
            log_prob, h, const = self.truncated(k, h, const)
            out.append(log_prob)
        return out

    def part_call(self, k, h):
        """Run part k, through its data-parallel wrapper when one is set and gradients are being made."""
        if self.wrappers is not None and torch.is_grad_enabled():
            return self.wrappers[k](h)
        return self.parts[k](h)


# -----------------------------------------------------------------------------
# Data: whole datasets as uint8 tensors in memory, dequantized on the fly.


class UsageError(Exception):
    """Bad flags, data or environment: reported as one line on stderr, exit code 2."""


DATASETS = ("cifar10", "mnist", "fashion-mnist", "digits")
NATIVE = {"cifar10": (3, 32), "mnist": (1, 28), "fashion-mnist": (1, 28), "digits": (1, 8)}  # channels, size
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
    try:
        splits = [cls(data_dir, train=train, download=download) for train in (True, False)]
    except Exception as e:  # offline download, missing or corrupt files: torchvision raises many kinds
        where = {"cifar10": f"{data_dir}/cifar-10-batches-py/ (the extracted cifar-10-python.tar.gz)",
                 "mnist": f"{data_dir}/MNIST/raw/ (the four unzipped idx files)",
                 "fashion-mnist": f"{data_dir}/FashionMNIST/raw/ (the four unzipped idx files; Debian's "
                                  "dataset-fashion-mnist package has them gzipped)"}[name]
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"could not load {name} ({first_line}); put it in {where}, "
                         f"or try the offline --dataset digits") from None
    out = []
    for split in splits:
        data = torch.as_tensor(split.data)
        out.append(data.permute(0, 3, 1, 2).contiguous() if data.ndim == 4 else data[:, None])  # NHWC / NHW
    return out[0], out[1]


def resize(images, size):
    """Antialiased bilinear resize of uint8 images to size x size."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def batches(images, batch_size, seed, epoch, num_workers=0, rank=0, world_size=1):
    """Shuffled batches of an epoch; the order depends on (seed, epoch) only, so a resumed run sees the same data."""
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
    sampler = DistributedSampler(TensorDataset(images), num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return DataLoader(TensorDataset(images), batch_size=batch_size, sampler=sampler, drop_last=True,
                      num_workers=num_workers)


# -----------------------------------------------------------------------------
# Training: one loop for every mechanism; a schedule says which parts learn on each step.

MODES = ("full", "alternate", "sequential", "parallel")


def learning_parts(phase, step, phase_steps, n_parts, every=1):
    """The parts that learn on `step` of a phase, or None for end to end (every part, one objective).

    full / finetune: None. alternate: one part at a time, round-robin, `every` steps per turn.
    sequential: the phase's steps divided among the parts in order (greedy, part k alone for its share).
    parallel: every part every step, each on its own objective from its predecessor's detached output."""
    if phase in ("full", "finetune"):
        return None
    if phase == "alternate":
        return [(step // every) % n_parts]
    if phase == "sequential":
        return [min(step * n_parts // phase_steps, n_parts - 1)]
    if phase == "parallel":
        return list(range(n_parts))
    raise ValueError(f"unknown phase {phase!r}")


def step_losses(model, x, learning):
    """The objective(s) of one step: [full bits/dim] end to end, else each learning part's truncated bits/dim.

    One learning part: parts before it run without grad, later parts do not run (the cheap step).
    Several: one pass with isolated boundaries; their sum trains each part on its own objective."""
    if learning is None:
        return bits_per_dim(model.log_prob(x), x, model.n_bits).mean()[None]
    if len(learning) == 1:
        return model.part_loss(x, learning[0])[None]
    log_probs = model.truncated_log_probs(x)
    return torch.stack([bits_per_dim(log_probs[k], x, model.n_bits).mean() for k in learning])


def make_optimizer(model, lrs):
    """One Adam, one parameter group per part. Adam skips parameters without a gradient, so a part
    that is not learning keeps its moments and step count for its next turn: exactly an optimizer
    per part, and a finetuning step is all of them stepping together."""
    groups = [{"params": list(part.parameters()), "lr": lr} for part, lr in zip(model.parts, lrs)]
    device = next(model.parameters()).device
    return torch.optim.Adam(groups, fused=device.type in ("cpu", "cuda"))  # one kernel for all parameters


def warmed_up(lr, updates, warmup):
    """Linear warmup over a part's own first `warmup` updates."""
    return lr * min(1.0, (updates + 1) / warmup)


def train_step(model, optimizer, x, learning, lrs, updates, warmup):
    """One optimisation step of the learning parts (None: all, end to end); returns the loss values.

    Each part warms its learning rate up linearly over its own first `warmup` updates, so a part
    that starts late (sequential) or learns a quarter of the time (alternate) still gets a warmup.
    On a non-finite loss nothing is updated. Under torchrun (data parallel) the values are
    averaged over the processes, so every process takes the same decision."""
    active = range(len(model.parts)) if learning is None else learning
    for k in active:
        optimizer.param_groups[k]["lr"] = warmed_up(lrs[k], updates[k], warmup)
    optimizer.zero_grad(set_to_none=True)  # None, not zero: Adam then skips the parts not learning
    losses = step_losses(model, x, learning)
    values = losses.detach().clone()
    if model.wrappers is not None:
        torch.distributed.all_reduce(values)
        values /= torch.distributed.get_world_size()
    values = values.tolist()
    if all(math.isfinite(v) for v in values):
        losses.sum().backward()
        optimizer.step()
        for k in active:
            updates[k] += 1
    return values


def test_batches(images, batch_size, n_bits, device):
    """The evaluation batches, dequantized with noise from a fixed generator: every evaluation of every
    run (and of the pipeline) sees the same noisy test set."""
    generator = torch.Generator(device=device).manual_seed(0)
    for i in range(0, len(images), batch_size):
        yield preprocess(images[i:i + batch_size].to(device), n_bits, generator=generator)


@torch.no_grad()
def evaluate(model, images, batch_size, device):
    """(full-model bits/dim, [bits/dim of the flow truncated after each part]) over all of `images`.

    The noise is the same at every evaluation (test_batches), so curves are comparable and a resumed
    run reproduces its numbers."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(len(model.parts), dtype=torch.float64, device=device)
    for x in test_batches(images, batch_size, model.n_bits, device):
        totals += torch.stack([bits_per_dim(lp, x, model.n_bits).double().sum() for lp in model.truncated_log_probs(x)])
    model.train(was_training)
    part_bpd = (totals / len(images)).tolist()
    return part_bpd[-1], part_bpd


def first_nonfinite_part(model, x):
    """Which part's truncated objective first goes non-finite on batch x (for the error message)."""
    with torch.no_grad():
        for k, lp in enumerate(model.truncated_log_probs(x)):
            if not torch.isfinite(lp).all():
                return k
    return None


class NonFiniteLoss(Exception):
    """A step produced a non-finite loss: the run stops, the last good checkpoint stays."""


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UsageError(f"--resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(ckpt, dict) and {"model", "optimizer", "config", "epoch"} <= ckpt.keys()
    except Exception as e:
        raise UsageError(f"--resume: checkpoint {path} is corrupt or unreadable ({type(e).__name__})") from None
    return ckpt


def weights_hash(model):
    """A short hash of every parameter and buffer: equal hashes mean identical weights."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def build_model(cfg, in_channels, device):
    torch.manual_seed(cfg["seed"])
    return Glow(in_channels=in_channels, image_size=cfg["image_size"], n_levels=cfg["levels"],
                n_steps=cfg["steps"], hidden=cfg["hidden"], parts=cfg["parts"], n_bits=cfg["n_bits"],
                part_prior=cfg["part_prior"]).to(device, memory_format=torch.channels_last)


def prepare_data(cfg):
    """Load, subset and resize the dataset named in cfg."""
    train, test = load_images(cfg["dataset"], cfg["data_dir"])
    if cfg["subset"]:
        train = train[:cfg["subset"]]
    return resize(train, cfg["image_size"]), resize(test, cfg["image_size"])


def rank_and_world():
    """(rank, number of processes): (0, 1) unless launched by torchrun."""
    import torch.distributed as dist
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def start_run(cfg, data=None, init_state=None, resume=False):
    """Everything a run holds before its first step, fresh or from cfg['out']/checkpoint.pt.

    A resumed run takes its config from the checkpoint, except the epochs to reach and the device."""
    device = torch.device(cfg["device"])
    ckpt = load_checkpoint(os.path.join(cfg["out"], "checkpoint.pt")) if resume else None
    if ckpt:
        cfg = {**ckpt["config"], **{k: cfg[k] for k in ("epochs", "finetune", "device", "num_workers", "out")}}
    train_images, test_images = data if data is not None else prepare_data(cfg)
    if len(train_images) < cfg["batch_size"]:
        raise UsageError(f"batch size {cfg['batch_size']} is larger than the {len(train_images)} training images")
    model = build_model(cfg, train_images.shape[1], device)
    lrs = cfg["part_lr"] or [cfg["lr"]] * len(model.parts)
    run = {"cfg": cfg, "device": device, "model": model, "lrs": lrs, "optimizer": make_optimizer(model, lrs),
           "updates": [0] * len(model.parts),  # each part's own update count drives its own warmup
           "history": [], "epoch": 0, "seconds": 0.0, "steps": 0, "train": train_images, "test": test_images}
    if ckpt:
        model.load_state_dict(ckpt["model"])
        run["optimizer"].load_state_dict(ckpt["optimizer"])
        run.update({k: ckpt[k] for k in ("updates", "epoch", "seconds", "steps", "history")})
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    else:
        if init_state is not None:
            model.load_state_dict(init_state)
        model.initialize(preprocess(train_images[:INIT_BATCH].to(device), cfg["n_bits"],
                                    generator=torch.Generator(device=device).manual_seed(cfg["seed"])))
        torch.manual_seed(cfg["seed"] + rank_and_world()[0])  # the same noise stream for every mechanism
    if cfg.get("out") and rank_and_world()[0] == 0:
        os.makedirs(cfg["out"], exist_ok=True)
        with open(os.path.join(cfg["out"], "metrics.jsonl"), "w") as f:  # exactly the checkpointed epochs
            f.writelines(json.dumps(m) + "\n" for m in run["history"])
    return run


def phase_of(cfg, epoch, steps_per_epoch):
    """(phase, index of the epoch's first step within its phase, steps in the phase) of a 1-based epoch."""
    if epoch <= cfg["epochs"]:
        return cfg["mode"], (epoch - 1) * steps_per_epoch, cfg["epochs"] * steps_per_epoch
    return "finetune", (epoch - 1 - cfg["epochs"]) * steps_per_epoch, cfg["finetune"] * steps_per_epoch


def finish_epoch(run, epoch, phase, train_parts, test_bpd, part_bpd, log):
    """Record and print the epoch's metrics; write samples and the checkpoint (atomically)."""
    n_parts = len(part_bpd)
    if not math.isfinite(test_bpd):
        k = next(k for k, v in enumerate(part_bpd) if not math.isfinite(v))
        raise NonFiniteLoss(f"non-finite test bits/dim in part {k + 1} of {n_parts} at epoch {epoch} ({phase}); "
                            f"the last good checkpoint is kept")
    metrics = {"epoch": epoch, "phase": phase,
               "train_bpd": train_parts[-1],  # mean over the epoch's steps that ran the whole flow
               "test_bpd": test_bpd, "part_losses": part_bpd,
               "train_part_losses": None if phase in ("full", "finetune") else train_parts,
               "seconds": run["seconds"], "steps": run["steps"]}
    run["history"].append(metrics)
    train_txt = f"{train_parts[-1]:.3f}" if train_parts[-1] is not None else "  -  "
    log(f"epoch {epoch:3d} | {phase:10s} | train {train_txt} | test {test_bpd:.3f} | parts "
        + " ".join(f"{v:.3f}" for v in part_bpd) + f" | {run['seconds']:7.1f} s")
    out, model, device = run["cfg"].get("out"), run["model"], run["device"]
    if out:
        from torchvision.utils import save_image
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")
        save_image(postprocess(model.sample(64, temperature=0.7)).float().cpu(),
                   os.path.join(out, f"samples_{epoch:03d}.png"), nrow=8)
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        save_atomic({"model": model.state_dict(), "optimizer": run["optimizer"].state_dict(),
                     "updates": run["updates"], "epoch": epoch, "seconds": run["seconds"], "steps": run["steps"],
                     "history": run["history"], "rng": rng, "config": run["cfg"]}, os.path.join(out, "checkpoint.pt"))


def train(cfg, data=None, init_state=None, log=print, resume=False):
    """Train as cfg says, in one process or data parallel under torchrun (one DDP wrapper per part).

    Returns {'history': per-epoch metrics, 'step_seconds': {learning parts: [seconds, ...]}, 'model', ...};
    writes metrics.jsonl, samples_EEE.png and checkpoint.pt into cfg['out'] when it is set."""
    from tqdm import tqdm
    run = start_run(cfg, data, init_state, resume)
    cfg, model, optimizer, device = run["cfg"], run["model"], run["optimizer"], run["device"]
    n_parts, start_hash = len(model.parts), weights_hash(model)
    rank, world = rank_and_world()
    if world > 1:  # data parallel: each process a slice of every global batch; gradients averaged per part
        from torch.nn.parallel import DistributedDataParallel as DDP
        model.wrappers = [DDP(part, device_ids=[device.index] if device.type == "cuda" else None,
                              broadcast_buffers=False, find_unused_parameters=cfg["part_prior"] == "learned")
                          for part in model.parts]  # construction broadcasts rank 0's (initialised) weights
    steps_per_epoch = len(run["train"]) // cfg["batch_size"]
    step_seconds = {}
    model.train()
    for epoch in range(run["epoch"] + 1, cfg["epochs"] + cfg["finetune"] + 1):
        phase, first_step, phase_steps = phase_of(cfg, epoch, steps_per_epoch)
        part_sums, part_counts = [0.0] * n_parts, [0] * n_parts
        sync(device)
        t0 = time.perf_counter()
        loader = batches(run["train"], cfg["batch_size"] // world, cfg["seed"], epoch, cfg["num_workers"], rank, world)
        for i, (batch,) in enumerate(tqdm(loader, desc=f"epoch {epoch} {phase}", leave=False,
                                          disable=None if rank == 0 else True)):
            ts = time.perf_counter()
            x = preprocess(batch.to(device, non_blocking=True), cfg["n_bits"])
            learning = learning_parts(phase, first_step + i, phase_steps, n_parts, cfg["alternate_every"])
            values = train_step(model, optimizer, x, learning, run["lrs"], run["updates"], cfg["warmup"])
            bad = [k for k, v in zip(learning or [None], values) if not math.isfinite(v)]
            if bad:
                k = bad[0] if bad[0] is not None else first_nonfinite_part(model, x)
                raise NonFiniteLoss(f"non-finite loss in part {k + 1 if k is not None else '?'} of {n_parts} "
                                    f"at epoch {epoch} ({phase}), step {i}; the last good checkpoint is kept")
            run["steps"] += 1
            for k, v in zip(learning or [n_parts - 1], values):  # end to end, the full model is the last part's
                part_sums[k], part_counts[k] = part_sums[k] + v, part_counts[k] + 1
            if phase != "finetune":
                step_seconds.setdefault(str(learning), []).append(time.perf_counter() - ts)
        sync(device)
        run["seconds"] += time.perf_counter() - t0
        if world > 1:
            check_replicas(model)
        if rank == 0:
            test_bpd, part_bpd = evaluate(model, run["test"], cfg["batch_size"], device)
            finish_epoch(run, epoch, phase, [s / c if c else None for s, c in zip(part_sums, part_counts)],
                         test_bpd, part_bpd, log)
        if world > 1:
            torch.distributed.barrier()
    if world > 1:
        log(f"data parallel over {world} processes: replicas identical after every epoch (weight hashes compared)")
    return {"history": run["history"], "step_seconds": step_seconds, "model": model, "config": cfg,
            "start_hash": start_hash}


# -----------------------------------------------------------------------------
# Experiment: the mechanisms side by side from the same start; what one step costs.


def measure_step(model, x, learning):
    """What one training step holds and sends: (activation bytes, boundary backward bytes, CUDA peak bytes).

    activation bytes: storage of the tensors autograd saves for backward (parameters excluded).
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
        loss = step_losses(model, x, learning).sum()
    loss.backward()
    peak = torch.cuda.max_memory_allocated(x.device) if cuda else None
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    return sum(saved.values()), crossing[0], peak


def mechanism_steps(mode, n_parts):
    """The kinds of step a mechanism takes: end to end, every part at once, or each part alone."""
    return {"full": [None], "parallel": [list(range(n_parts))]}.get(mode, [[k] for k in range(n_parts)])


def step_costs(model, x, mode):
    """measure_step for the steps a mechanism takes; for per-part mechanisms the largest part's step."""
    costs = [measure_step(model, x, learning) for learning in mechanism_steps(mode, len(model.parts))]
    peaks = [c[2] for c in costs if c[2] is not None]
    return {"activation_bytes": max(c[0] for c in costs), "boundary_backward_bytes": max(c[1] for c in costs),
            "cuda_max_memory_allocated": max(peaks) if peaks else None}


def compare(cfg, modes=("full", "alternate"), log=print):
    """Train each mechanism from the same initial weights, data order and seed; write compare.json/png.

    full trains epochs + finetune epochs end to end (the same total); every other mode trains its
    `epochs`, then `finetune` epochs end to end."""
    device = torch.device(cfg["device"])
    data = prepare_data(cfg)
    model = build_model(cfg, data[0].shape[1], device)
    x = preprocess(data[0][:INIT_BATCH].to(device), cfg["n_bits"],
                   generator=torch.Generator(device=device).manual_seed(cfg["seed"]))
    model.initialize(x)
    init_state = copy.deepcopy(model.state_dict())
    # What one step of each mechanism holds and sends, on the shared start. This also runs every kind
    # of step once, so no run pays the one-off cost of first-time kernel setup inside its timing.
    probe = preprocess(data[0][:cfg["batch_size"]].to(device), cfg["n_bits"])
    costs = {mode: step_costs(model, probe, mode) for mode in modes}
    runs = []
    for mode in modes:
        log(f"--- {mode}")
        run_cfg = dict(cfg, mode=mode, out=os.path.join(cfg["out"], mode),
                       epochs=cfg["epochs"] + (cfg["finetune"] if mode == "full" else 0),
                       finetune=0 if mode == "full" else cfg["finetune"])
        result = train(run_cfg, data, init_state=init_state, log=log)
        per_learner = [statistics.median(v) for v in result["step_seconds"].values()]
        runs.append({"name": mode if mode == "full" or not cfg["finetune"] else f"{mode}+finetune",
                     "mode": mode, "epochs": run_cfg["epochs"], "finetune": run_cfg["finetune"],
                     "final_test_bpd": result["history"][-1]["test_bpd"],
                     "train_seconds": result["history"][-1]["seconds"],
                     "step_seconds": statistics.fmean(per_learner),
                     **costs[mode],
                     "start_hash": result["start_hash"], "curve": result["history"]})
    target = next((r["final_test_bpd"] for r in runs if r["mode"] == "full"), None)
    for r in runs:
        hit = [m["seconds"] for m in r["curve"] if target is not None and m["test_bpd"] <= target]
        r["time_to_target"] = hit[0] if hit else None
    summary = {"config": cfg, "target_bpd": target, "runs": runs}
    with open(os.path.join(cfg["out"], "compare.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot_compare(summary, os.path.join(cfg["out"], "compare.png"))
    log(summary_table(summary))
    return summary


def benchmark(cfg, modes, repeats=5, log=print):
    """Median step time, activation memory and boundary bytes of each mechanism at the configured
    model size, on random images of the dataset's shape: no data needed, so it runs at CIFAR-10 size
    on any machine. Per-part mechanisms report the mean over the parts' steps (one turn each)."""
    device = torch.device(cfg["device"])
    channels = NATIVE[cfg["dataset"]][0]
    model = build_model(cfg, channels, device)
    images = torch.randint(0, 256, (cfg["batch_size"], channels, cfg["image_size"], cfg["image_size"]),
                           dtype=torch.uint8, generator=torch.Generator().manual_seed(cfg["seed"]))
    x = preprocess(images.to(device), cfg["n_bits"])
    model.initialize(x)
    n = len(model.parts)
    optimizer = make_optimizer(model, [1e-6] * n)  # tiny steps: the weights stay where they started
    rows = []
    for mode in modes:
        medians = []
        for learning in mechanism_steps(mode, n):
            times = []
            for _ in range(repeats + 1):  # the first is a warm-up
                sync(device)
                t0 = time.perf_counter()
                train_step(model, optimizer, x, learning, [1e-6] * n, [1] * n, 1)
                sync(device)
                times.append(time.perf_counter() - t0)
            medians.append(statistics.median(times[1:]))
        rows.append({"mode": mode, "step_seconds": statistics.fmean(medians), "part_step_seconds": medians,
                     **step_costs(model, x, mode)})
    full = next((r for r in rows if r["mode"] == "full"), rows[0])
    lines = [f"benchmark: {cfg['levels']} levels x {cfg['steps']} steps, hidden {cfg['hidden']}, parts {cfg['parts']}, "
             f"batch {cfg['batch_size']} of {channels}x{cfg['image_size']}x{cfg['image_size']} on {device}",
             "| mechanism | step s | step / full | per-part step s | activations MB | CUDA peak MB | boundary grad KB |",
             "|---" * 7 + "|"]
    for r in rows:
        peak = f"{r['cuda_max_memory_allocated'] / 2 ** 20:.0f}" if r["cuda_max_memory_allocated"] else "-"
        lines.append(f"| {r['mode']} | {r['step_seconds']:.3f} | {r['step_seconds'] / full['step_seconds']:.2f} | "
                     + " ".join(f"{t:.3f}" for t in r["part_step_seconds"])
                     + f" | {r['activation_bytes'] / 2 ** 20:.1f} | {peak} | {r['boundary_backward_bytes'] / 2 ** 10:.0f} |")
    log("\n".join(lines))
    return rows


def summary_table(summary):
    """The comparison as a Markdown table (ratios relative to the full run)."""
    full = next((r for r in summary["runs"] if r["mode"] == "full"), summary["runs"][0])
    rows = ["| run | final test bpd | train s | time / full | time to full's bpd (s) | step ms | step / full "
            "| activations MB | boundary grad KB |", "|---" * 9 + "|"]
    for r in summary["runs"]:
        ttt = f"{r['time_to_target']:.0f}" if r["time_to_target"] is not None else "never"
        rows.append(f"| {r['name']} | {r['final_test_bpd']:.3f} | {r['train_seconds']:.0f} | "
                    f"{r['train_seconds'] / full['train_seconds']:.2f} | {ttt} | {1e3 * r['step_seconds']:.1f} | "
                    f"{r['step_seconds'] / full['step_seconds']:.2f} | {r['activation_bytes'] / 2 ** 20:.1f} | "
                    f"{r['boundary_backward_bytes'] / 2 ** 10:.0f} |")
    return "\n".join(rows)


def plot_compare(summary, path):
    """Test bits/dim against epoch and against training seconds; dotted lines mark finetuning's start."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (say, a notebook's) is left alone
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    for r in summary["runs"]:
        curve = r["curve"]
        for ax, key in zip(axes, ("epoch", "seconds")):
            line, = ax.plot([m[key] for m in curve], [m["test_bpd"] for m in curve], marker=".", label=r["name"])
            start = next((m for m in curve if m["phase"] == "finetune"), None)
            if start is not None:
                prev = curve[curve.index(start) - 1] if curve.index(start) else {"epoch": 0, "seconds": 0}
                ax.axvline(prev[key], color=line.get_color(), linestyle=":", alpha=0.7)
    if summary["target_bpd"] is not None:
        for ax in axes:
            ax.axhline(summary["target_bpd"], color="grey", linewidth=0.8, alpha=0.6)
    axes[0].set(xlabel="epoch", ylabel="test bits/dim", title="per epoch")
    axes[1].set(xlabel="training seconds", title="per second of training (the poster's claim)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -----------------------------------------------------------------------------
# Beyond the poster: parts on separate processes, data parallel, compute-balanced cuts.


def step_macs(in_channels, image_size, n_levels, n_steps, hidden):
    """Multiply-adds per image of each flow step's convolutions (a split's prior counts with its level's last step)."""
    macs, C, S = [], in_channels, image_size
    for level in range(n_levels):
        C, S = 4 * C, S // 2
        coupling = 9 * (C // 2) * hidden + hidden * hidden + 9 * hidden * C  # conv3x3, conv1x1, zero conv3x3
        macs += [S * S * (C * C + coupling)] * n_steps  # + the invertible 1x1 conv
        if level < n_levels - 1:
            macs[-1] += S * S * 9 * (C // 2) * C
            C //= 2
    return macs


def balanced_parts(n_parts, macs):
    """Cut the steps into n_parts contiguous parts so the most expensive part is as cheap as possible (exact DP)."""
    n = len(macs)
    if not 1 <= n_parts <= n:
        raise ValueError(f"auto:{n_parts} needs between 1 and {n} parts (one per flow step at most)")
    prefix = [0]
    for m in macs:
        prefix.append(prefix[-1] + m)
    # best[p][i]: the smallest possible largest part when the first i steps form p parts
    best = [[math.inf] * (n + 1) for _ in range(n_parts + 1)]
    cut = [[0] * (n + 1) for _ in range(n_parts + 1)]
    best[0][0] = 0
    for p in range(1, n_parts + 1):
        for i in range(p, n + 1):
            for j in range(p - 1, i):
                cost = max(best[p - 1][j], prefix[i] - prefix[j])
                if cost < best[p][i]:
                    best[p][i], cut[p][i] = cost, j
    sizes, i = [], n
    for p in range(n_parts, 0, -1):
        sizes.append(i - cut[p][i])
        i = cut[p][i]
    return sizes[::-1]


def check_replicas(model):
    """Data parallel: every process must hold the same weights after every epoch; stop loudly if not."""
    import torch.distributed as dist
    hashes = [None] * dist.get_world_size()
    dist.all_gather_object(hashes, weights_hash(model))
    if len(set(hashes)) != 1:
        raise RuntimeError(f"data-parallel replicas diverged: weight hashes {hashes}")


def train_pipeline(cfg, log=print, resume=False):
    """--mode parallel under torchrun: process k owns part k and trains it on its truncated objective.

    Process 0 reads the data. Each process receives h_{k-1} (and the earlier parts' constant terms)
    from process k-1, takes its step, and sends its detached output to process k+1 before its own
    backward pass. Sends go forward only, so while process k works on batch t, process k-1 is
    already on batch t+1. Every process holds the whole model (same seed, same init) and an
    optimizer over all parts, but only its own part ever gets a gradient; at the end of an epoch
    process 0 gathers the parts into one checkpoint, in the single-process format."""
    import torch.distributed as dist
    rank, world = rank_and_world()
    run = start_run(cfg, resume=resume)
    cfg, model, optimizer, device = run["cfg"], run["model"], run["optimizer"], run["device"]
    B, steps_per_epoch = cfg["batch_size"], len(run["train"]) // cfg["batch_size"]
    with torch.no_grad():  # the shape each part receives, from a one-image dry run
        h = preprocess(run["train"][:1].to(device), cfg["n_bits"])
        in_shapes = []
        for k in range(world):
            in_shapes.append(tuple(h.shape[1:]))
            h = model.parts[k](h)[0]
    sent = torch.zeros(2, dtype=torch.float64, device=device)  # bytes sent [forward to k+1, backward to k-1]: no code sends back
    pending = []  # at most one batch in flight: its buffers stay alive until they are received

    def receive(n):
        h = torch.empty(n, *in_shapes[rank], device=device)
        const = torch.empty(n, device=device)
        dist.recv(h, rank - 1)
        dist.recv(const, rank - 1)
        return h.contiguous(memory_format=torch.channels_last), const

    def send(h=None, const=None):
        for request in pending:
            request.wait()
        pending.clear()
        if h is not None and rank < world - 1:
            h, const = h.detach().contiguous(), const.detach().contiguous()
            sent[0] += h.numel() * h.element_size() + const.numel() * const.element_size()
            pending.extend([dist.isend(h, rank + 1), dist.isend(const, rank + 1)])

    def part_input(x_or_size):
        """Process 0 starts from the images x (no earlier terms); the others receive a batch of that size."""
        if rank == 0:
            return x_or_size, torch.zeros(len(x_or_size), device=device)
        return receive(x_or_size)

    model.train()
    for epoch in range(run["epoch"] + 1, cfg["epochs"] + cfg["finetune"] + 1):
        phase = phase_of(cfg, epoch, steps_per_epoch)[0]
        loss_sum, n_bad = torch.zeros(world, dtype=torch.float64, device=device), torch.zeros(world, device=device)
        sent.zero_()
        dist.barrier()
        t0 = time.perf_counter()
        loader = iter(batches(run["train"], B, cfg["seed"], epoch, cfg["num_workers"])) if rank == 0 else None
        for i in range(steps_per_epoch):
            h, const = part_input(preprocess(next(loader)[0].to(device), cfg["n_bits"]) if rank == 0 else B)
            optimizer.param_groups[rank]["lr"] = warmed_up(run["lrs"][rank], run["updates"][rank], cfg["warmup"])
            optimizer.zero_grad(set_to_none=True)
            log_prob, h, const = model.truncated(rank, h, const)
            send(h, const)  # forward only; nothing ever comes back
            loss = bits_per_dim(log_prob, model.n_dims, model.n_bits).mean()
            if torch.isfinite(loss):
                loss.backward()
                optimizer.step()
                run["updates"][rank] += 1
                loss_sum[rank] += loss.item()
            else:
                n_bad[rank] += 1
        send()
        dist.barrier()
        run["seconds"] += time.perf_counter() - t0
        run["steps"] += steps_per_epoch
        # the test bits/dim go through the same pipeline, each process adding its part's terms
        part_sum = torch.zeros(world, dtype=torch.float64, device=device)
        sizes = [len(run["test"][i:i + B]) for i in range(0, len(run["test"]), B)]
        model.eval()
        with torch.no_grad():  # process 0 feeds the same noisy test batches as evaluate()
            for item in test_batches(run["test"], B, cfg["n_bits"], device) if rank == 0 else sizes:
                h, const = part_input(item)
                log_prob, h, const = model.truncated(rank, h, const)
                send(h, const)
                part_sum[rank] += bits_per_dim(log_prob, model.n_dims, model.n_bits).double().sum().item()
        send()
        model.train()
        for t in (loss_sum, n_bad, part_sum, sent):
            dist.all_reduce(t)
        if n_bad.sum() > 0:
            k = int(torch.nonzero(n_bad)[0])
            raise NonFiniteLoss(f"non-finite loss in part {k + 1} of {world} at epoch {epoch} (pipeline); "
                                f"the last good checkpoint is kept")
        # process 0 gathers every part (weights, Adam state, update count) into one checkpoint
        opt_state = optimizer.state_dict()
        mine = {"part": {k: v.cpu() for k, v in model.parts[rank].state_dict().items()},
                "state": {i: {k: v.cpu() for k, v in s.items()} for i, s in opt_state["state"].items()},
                "group": opt_state["param_groups"][rank], "updates": run["updates"][rank]}
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if rank == 0:
            state = optimizer.state_dict()
            for k, theirs in enumerate(gathered):
                model.parts[k].load_state_dict(theirs["part"])
                state["state"].update(theirs["state"])  # only part k's parameters have Adam state there
                state["param_groups"][k] = theirs["group"]
                run["updates"][k] = theirs["updates"]
            optimizer.load_state_dict(state)
            part_bpd = (part_sum / len(run["test"])).tolist()
            finish_epoch(run, epoch, phase, (loss_sum / steps_per_epoch).tolist(), part_bpd[-1], part_bpd, log)
            log(f"          pipeline: {int(sent[0]):,} bytes sent forward between parts this epoch, {int(sent[1])} backward")
        dist.barrier()
    return {"history": run["history"], "sent_forward": int(sent[0]), "sent_backward": int(sent[1])}


# -----------------------------------------------------------------------------
# Command line


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the whole usage too)
        raise UsageError(message)


def parse_parts(text):
    try:
        if text.startswith("auto:"):
            return ("auto", int(text[5:]))
        return [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--parts wants step counts like 32,16,16,32 or auto:P, got {text!r}")


def parse_floats(text):
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated numbers like 1e-3,2e-3, got {text!r}")


def make_parser():
    p = Parser(description="Glow trained in gradient-isolated parts (full, alternate, sequential) "
                           "and the poster's comparison.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", default="alternate",
                   help=f"training mechanism: {', '.join(MODES)} (under torchrun: parallel = one part per "
                        "process, the others data parallel)")
    p.add_argument("--epochs", type=int, default=60, help="epochs of the mechanism")
    p.add_argument("--finetune", type=int, default=0, help="end-to-end epochs after the mechanism's epochs")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", help=f"one of {', '.join(DATASETS)}")
    g.add_argument("--data-dir", default="./data", help="torchvision datasets are read from / downloaded to here")
    g.add_argument("--image-size", type=int, default=None, help="resize images to this size; None keeps the native size")
    g.add_argument("--n-bits", type=int, default=None, help="bits per pixel kept; None: 8, or 4 for digits (its 16 grey levels)")
    g.add_argument("--subset", type=int, default=None, help="use only the first N training images; None: all")
    g = p.add_argument_group("model")
    g.add_argument("--levels", type=int, default=3, help="L, levels of the multi-scale flow")
    g.add_argument("--steps", type=int, default=32, help="K, flow steps per level")
    g.add_argument("--hidden", type=int, default=512, help="channels of the coupling networks")
    g.add_argument("--parts", type=parse_parts, default=None,
                   help="steps per part, e.g. 32,16,16,32, or auto:P for P parts of equal compute; "
                        "None: 32,16,16,32 (the poster's) for 3 levels x 32 steps, else one part per level")
    g.add_argument("--part-prior", default="standard", choices=("standard", "learned"),
                   help="prior on an intermediate part's output: N(0, I), or a learned diagonal Gaussian")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=64, help="images per step (the global batch under torchrun)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of every part")
    g.add_argument("--part-lr", type=parse_floats, default=None, help="one learning rate per part, e.g. 1e-3,2e-3,2e-3,1e-3 (overrides --lr)")
    g.add_argument("--warmup", type=int, default=500, help="linear warmup, in each part's own updates")
    g.add_argument("--alternate-every", type=int, default=1, help="steps per turn in alternate mode")
    g.add_argument("--seed", type=int, default=0, help="weights, data order and noise all follow from it")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, mps")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="run directory; None: runs/<dataset>-<mode> (or -compare)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out up to the requested epochs")
    g = p.add_argument_group("experiment")
    g.add_argument("--compare", action="store_true",
                   help="train the mechanisms side by side from the same start into --out; write compare.json/png")
    g.add_argument("--compare-modes", default="full,alternate", help="mechanisms --compare (or --benchmark) runs")
    g.add_argument("--benchmark", action="store_true",
                   help="time one step of each --compare-modes mechanism at this model size on random images")
    return p


def check_args(args):
    """Every check of the flags that does not need the data: raises UsageError with one clear line."""
    if args.mode not in MODES:
        raise UsageError(f"unknown --mode {args.mode!r}; choose one of {', '.join(MODES)}")
    if args.dataset not in DATASETS:
        raise UsageError(f"unknown --dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    for name in ("epochs", "finetune"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} must be >= 0, got {getattr(args, name)}")
    for name in ("batch_size", "levels", "steps", "hidden", "warmup", "alternate_every", "subset", "image_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0, got {args.num_workers}")
    if not args.lr > 0 or (args.part_lr and not all(lr > 0 for lr in args.part_lr)):
        raise UsageError("learning rates must be positive")
    if args.n_bits is None:
        args.n_bits = 4 if args.dataset == "digits" else 8
    if not 1 <= args.n_bits <= 16:
        raise UsageError(f"--n-bits must be in 1..16, got {args.n_bits}")
    if args.n_bits > 8:
        raise UsageError(f"--n-bits {args.n_bits}: the {args.dataset} images have 8 bits per pixel")
    channels, native = NATIVE[args.dataset]
    args.image_size = args.image_size or native
    if args.image_size % 2 ** args.levels:
        fit = 2 ** args.levels * max(1, round(args.image_size / 2 ** args.levels))
        raise UsageError(f"image size {args.image_size} is not divisible by 2^levels = {2 ** args.levels}; "
                         f"pass --image-size {fit}, say")
    if args.parts is None and (args.levels, args.steps) == (3, 32):
        args.parts = [32, 16, 16, 32]  # the poster's split: the middle level halved
    try:
        if isinstance(args.parts, tuple):  # auto:P
            args.parts = balanced_parts(args.parts[1], step_macs(channels, args.image_size, args.levels,
                                                                 args.steps, args.hidden))
            if os.environ.get("RANK", "0") == "0":
                print(f"--parts auto: {','.join(map(str, args.parts))} (equal convolution multiply-adds per part)")
        args.parts = check_parts(args.parts, args.levels, args.steps)
    except ValueError as e:
        raise UsageError(f"--parts: {e}") from None
    if args.part_lr and len(args.part_lr) != len(args.parts):
        raise UsageError(f"--part-lr gives {len(args.part_lr)} rates for {len(args.parts)} parts")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a device name (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UsageError(f"--device {args.device}: no such CUDA device ({torch.cuda.device_count()} available)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {args.device}: only cpu, cuda and mps are supported")
    if args.compare or args.benchmark:
        args.compare_modes = args.compare_modes.split(",")
        bad = [m for m in args.compare_modes if m not in MODES]
        if bad or "full" not in args.compare_modes:
            raise UsageError(f"--compare-modes must list 'full' and only {', '.join(MODES)}; got {args.compare_modes}")
    args.out = args.out or os.path.join("runs", f"{args.dataset}-{'compare' if args.compare else args.mode}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file, not a directory")
    if args.resume and args.compare:
        raise UsageError("--resume continues one run; rerun --compare into a new --out instead")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # launched by torchrun
        if args.compare:
            raise UsageError("--compare times mechanisms against each other in one process; run it without torchrun")
        if args.mode == "parallel" and world != len(args.parts):
            raise UsageError(f"the pipeline runs one part per process: {len(args.parts)} parts but "
                             f"{world} processes; use --nproc_per_node {len(args.parts)}")
        if args.mode == "parallel" and args.finetune:
            raise UsageError("the pipeline never sends gradients back, so it cannot finetune end to end; "
                             "resume its checkpoint without torchrun with --mode parallel --finetune N")
        if args.mode != "parallel" and args.batch_size % world:
            raise UsageError(f"--batch-size {args.batch_size} (the global batch) must divide among {world} processes")
    if not args.resume and not args.benchmark and os.path.exists(os.path.join(args.out, "checkpoint.pt")):
        raise UsageError(f"--out {args.out} already holds a run: pass --resume to continue it, or choose another --out")
    return args


def config_from_args(args):
    """The run's config (what the checkpoint stores) from parsed flags: everything but what to do."""
    return {k: v for k, v in vars(args).items() if k not in ("resume", "compare", "compare_modes", "benchmark")}


def init_distributed(args):
    """Under torchrun: join the process group (NCCL on GPUs, gloo on CPU); one GPU per local process."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        return
    if torch.device(args.device).type == "cuda":
        args.device = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")


def main(argv=None):
    rank = int(os.environ.get("RANK", "0"))
    log = print if rank == 0 else (lambda *a: None)
    try:
        args = check_args(make_parser().parse_args(argv))
        cfg = config_from_args(args)
        if args.benchmark:
            benchmark(cfg, args.compare_modes)
        elif args.compare:
            os.makedirs(args.out, exist_ok=True)
            compare(cfg, args.compare_modes)
        else:
            init_distributed(args)
            cfg["device"] = args.device
            if args.mode == "parallel" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
                train_pipeline(cfg, log=log, resume=args.resume)
            else:
                train(cfg, log=log, resume=args.resume)
    except UsageError as e:
        if rank == 0:
            print(f"glow_parts.py: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"glow_parts.py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("glow_parts.py: interrupted; the last checkpoint is kept", file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
