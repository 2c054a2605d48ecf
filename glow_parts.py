"""
glow_parts.py: Glow trained in gradient-isolated parts with a truncated local objective; one training loop
for every mechanism (full, alternate, sequential, parallel; then finetuning end to end).

Quickstart (CPU, offline, about a minute; scikit-learn's bundled 8x8 digits):
    python glow_parts.py --dataset digits --levels 2 --steps 8 --hidden 64 --warmup 50 \
        --mode alternate --epochs 10 --finetune 5
The poster's experiment (CIFAR-10, a GPU): python glow_parts.py --mode alternate --epochs 60 --finetune 30

Papers: Kingma & Dhariwal, "Glow", NeurIPS 2018; Dinh et al., "Real NVP", ICLR 2017; local objectives:
Loewe et al., NeurIPS 2019, Belilovsky et al., ICML 2020. The parts and the objective follow the poster.

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

What differs from the paper (and the official code): Adam with linear warmup, then a constant rate (or
a cosine decay, --decay); Polyak averaging only with --ema; zero-padded convolutions; the split priors'
log-std bounded to (-5, 5) (--prior-bound); a free top prior; contiguous channel halves; no classes.
"""
import argparse
import copy
import fcntl
import io
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

if __name__ == "__main__":  # Ctrl-C while torch loads ends the command at once (as SIGTERM): nothing written
    signal.signal(signal.SIGINT, signal.SIG_DFL)
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
        self.register_buffer("initialized", torch.tensor(False))  # a buffer: a reloaded model keeps its init
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
        L = torch.tril(self.L, -1) + torch.eye(self.L.shape[0], device=self.L.device, dtype=self.L.dtype)
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
    """Factor out half the channels as a latent z: x -> (h, z, log N(z; mean(h), std(h))), a learned prior."""
    def __init__(self, channels, bound=0.0):
        super().__init__()
        self.prior = ZeroConv2d(channels // 2, channels)  # h -> (mean, log std) of z; N(0, I) at init
        self.bound = bound

    def mean_logs(self, h):  # a bound B > 0 (--prior-bound): log std = B tanh(raw / B), in (-B, B); 0: none
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
        for name in ("mean", "logs"):  # a fixed prior's zeros are not saved: they never change
            if learned:
                self.register_parameter(name, nn.Parameter(torch.zeros(1, *shape)))
            else:
                self.register_buffer(name, torch.zeros(1, *shape), persistent=False)

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

def check_flow(parts, n_levels, n_steps, image_size, name=lambda setting: flags([setting])):
    """The parts (step counts; None: the poster's cut) as a list if they cut this flow; else a UsageError."""
    parts = default_parts(n_levels, n_steps) if parts is None else list(parts)
    size = 2 ** n_levels  # each level halves the image
    if sum(parts) != n_levels * n_steps:
        raise UsageError(f"{name('parts')} {','.join(map(str, parts))} sum to {sum(parts)}, but the flow has "
                         f"levels * steps = {n_levels} * {n_steps} = {n_levels * n_steps} steps")
    if image_size % size:
        raise UsageError(f"{name('image_size')} {image_size} is not divisible by 2^levels = {size}; try "
                         f"{size * max(1, round(image_size / size))}")
    return parts

def check_arguments(**arguments):
    """Glow's arguments, each checked as the setting it is; a UsageError names the argument."""
    settings = {f.name: f for f in fields(Config)}  # in_channels: checked within hidden's range
    settings.update(in_channels=settings["hidden"], n_levels=settings["levels"], n_steps=settings["steps"])
    for name, value in arguments.items():
        if value is not None or name != "parts":  # parts None: the poster's cut
            check_setting(settings[name], list(value) if type(value) is tuple else value, name)

def isolate(h, const):
    """Where two parts meet: the ONE place gradient isolation happens. h is part k's input h_{k-1}; const,
    the earlier parts' log-dets and split log-priors. h.detach(): no gradient crosses a part boundary, part
    k's loss reaches no part before it. const.detach(): constants for part k, in L_k's value, in no gradient.
    For cost alone, Glow.truncated keeps no graph before the first learning part, runs none after the last."""
    return h.detach(), const.detach()

class Part(nn.Module):
    """A contiguous run of flow steps (+ the squeezes and splits they own), and a prior for its output."""
    def __init__(self, layers, prior):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.prior = prior  # p_k(h_k) of the truncated flow; the model's top prior for the last part

    def forward(self, h):
        """h_{k-1} -> (h_k, split-off latents, sum of log-dets (B,), sum of log p(z | .) (B,))."""
        zs = []
        logdet = logp = 0
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
    """Multi-scale Glow: per level a squeeze, n_steps flow steps and (but the last) a split, the steps cut
    into contiguous parts; each parameter is in exactly one. Call initialize(x) on a batch before training."""
    def __init__(self, in_channels=3, image_size=32, n_levels=3, n_steps=32, hidden=512, parts=None,
                 n_bits=8, part_prior="standard", prior_bound=5.0):
        super().__init__()
        check_arguments(in_channels=in_channels, image_size=image_size, n_levels=n_levels, n_steps=n_steps,
                        hidden=hidden, parts=parts, n_bits=n_bits, part_prior=part_prior,
                        prior_bound=prior_bound)
        self.part_sizes = parts = check_flow(parts, n_levels, n_steps, image_size, name=str)
        self.n_bits = n_bits
        self.n_splits = n_levels - 1
        self.n_dims = in_channels * image_size ** 2  # D
        owner = [k for k, size in enumerate(parts) for _ in range(size)]  # the part of each step
        layers, shapes = [[] for _ in parts], [None] * len(parts)  # each part's layers and output shape
        C, S = in_channels, image_size
        for level in range(n_levels):
            first, last = level * n_steps, (level + 1) * n_steps - 1
            C, S = 4 * C, S // 2
            layers[owner[first]].append(Squeeze())  # to the part of the level's first step; a split: its last
            for i in range(first, last + 1):
                layers[owner[i]].append(FlowStep(C, hidden))
                shapes[owner[i]] = (C, S, S)
            if level < n_levels - 1:
                layers[owner[last]].append(Split(C, prior_bound))
                C //= 2
                shapes[owner[last]] = (C, S, S)
        learned = [k == len(parts) - 1 or part_prior == "learned" for k in range(len(parts))]  # top: always
        self.parts = nn.ModuleList(map(Part, layers, map(GaussianPrior, shapes, learned)))

    @torch.no_grad()
    def initialize(self, x):
        """ActNorm's data init on batch x, in flow order (each sees normalised inputs); loaded ones kept."""
        for m in (m for m in self.modules() if isinstance(m, ActNorm)):
            m.data_init = not m.initialized
        self(x)

    def forward(self, x):
        """x (B, C, H, W) -> (latents, split-off first; log|det| (B,); their log-density (B,)), end to end."""
        zs = []
        logdet = logpz = x.new_zeros(x.shape[0])
        for part in self.parts:
            x, z, ld, lp = part(x)
            zs += z
            logdet, logpz = logdet + ld, logpz + lp
        return zs + [x], logdet, logpz + self.parts[-1].prior.log_prob(x)

    def log_prob(self, x):
        """log p(x) of the whole flow in nats, (B,)."""
        _, logdet, logpz = self(x)
        return logdet + logpz

    def truncated(self, x, parts=None, start=0, const=None):
        """[log p_k(x) in nats, (B,)] of the flows truncated after each part k in `parts` (ascending; default
        all), in one pass: each reaches only part k's parameters, so -log p_k(x) is part k's objective L_k. x
        may also be the input of part `start`, with const the terms of the parts before it (a pipeline)."""
        parts = list(range(start, len(self.parts))) if parts is None else list(parts)
        h, log_probs = x, []
        const = x.new_zeros(x.shape[0]) if const is None else const
        for k in range(start, parts[-1] + 1):
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
        """Discrete NLL in bits/dim from the continuous log p(x) (nats, (B,)). Pixels are integers in n_bins =
        2^n_bits bins of width 1/n_bins on [-0.5, 0.5]; uniform dequantization gives log P(bin) >= log p(x) -
        D log(n_bins), so bits/dim = (-log p(x) + D log n_bins) / (D ln 2) = -log p(x) / (D ln 2) + n_bits."""
        return -log_prob / (self.n_dims * math.log(2)) + self.n_bits

    def reverse(self, zs, temperature=1.0):
        """Exact inverse of forward; a None among the split-off latents is sampled at `temperature`."""
        *zs, h = zs  # a new list: the parts pop their latents off it
        for part in reversed(self.parts):
            h = part.reverse(h, zs, temperature)
        return h

    @torch.no_grad()
    def sample(self, n, temperature=0.7):
        """n images in the preprocessed [-0.5, 0.5] scale; temperature 0 gives the mean image."""
        z = self.parts[-1].prior.sample(n, temperature)
        return self.reverse([None] * self.n_splits + [z], temperature)

# -----------------------------------------------------------------------------
# Data: whole datasets as uint8 tensors in memory, dequantized on the fly.

DATASETS = {  # channels, size, training and test images (what a loaded dataset must hold), where files go
    "cifar10": (3, 32, 50000, 10000, "cifar-10-batches-py/ (the extracted cifar-10-python.tar.gz)"),
    "mnist": (1, 28, 60000, 10000, "MNIST/raw/ (the four unzipped idx files)"),
    "fashion-mnist": (1, 28, 60000, 10000, "FashionMNIST/raw/ (the four unzipped idx files)"),
    "digits": (1, 8, 1500, 297, "")}
INIT_BATCH = 256  # images for ActNorm's data-dependent init (the official code's n_batch_init)

def preprocess(x, n_bits, noise=True, generator=None):
    """uint8 images -> floats in [-0.5, 0.5): each pixel's top n_bits, plus uniform noise within its bin."""
    n_bins = 2 ** n_bits
    x = torch.div(x, 2 ** (8 - n_bits), rounding_mode="floor").float() / n_bins - 0.5
    if noise:
        x = x + torch.rand(x.shape, generator=generator, device=x.device) / n_bins
    return x.contiguous(memory_format=torch.channels_last)  # faster convolutions, measured on CPU

def load_images(name, root="./data", download=True):
    """(train, test) uint8 images (N, C, H, W), checked against DATASETS; all but digits via torchvision."""
    C, S, n_train, n_test, where = DATASETS[name]
    if name == "digits":
        from sklearn.datasets import load_digits
        images = torch.from_numpy(load_digits().images).clamp(max=15).mul(17).to(torch.uint8)[:, None]
        data = [images[:n_train], images[n_train:]]  # 1500 and 297 of the 1797
    else:
        import torchvision
        cls = {"cifar10": torchvision.datasets.CIFAR10, "mnist": torchvision.datasets.MNIST,
               "fashion-mnist": torchvision.datasets.FashionMNIST}[name]
        made = [d for d in (f"{root}/{cls.__name__}/raw", f"{root}/{cls.__name__}", root)
                if not os.path.isdir(d)]  # what a failed load takes away again
        try:
            data = [torch.as_tensor(cls(root, train=t, download=download).data) for t in (True, False)]
        except Exception as e:  # offline download, missing or corrupt files: torchvision raises many kinds
            for d in made:
                shutil.rmtree(d, ignore_errors=True)  # leave no half-made tree behind
            bad = damaged_file(cls, root)
            why = f"{bad} is missing or damaged" if bad else f"{type(e).__name__}: {e}".splitlines()[0]
            raise UsageError(f"could not load {name} ({why}); put it in {root}/{where}, or try the "
                             f"offline --dataset digits") from None
        data = [d.permute(0, 3, 1, 2).contiguous() if d.ndim == 4 else d[:, None] for d in data]  # NHWC/NHW
    for split, images, n in (("training", data[0], n_train), ("test", data[1], n_test)):
        if tuple(images.shape) != (n, C, S, S):
            raise UsageError(f"{name}'s {split} split in {root} holds {len(images)} images of "
                             f"{'x'.join(map(str, images.shape[1:]))}, not {n} of {C}x{S}x{S}: another file?")
    return data

def damaged_file(cls, root):
    """The first file of a torchvision dataset in root that is missing or does not read whole, or None."""
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor
    from torchvision.datasets.utils import check_integrity
    if hasattr(cls, "train_list"):  # CIFAR-10: pickled batches with known checksums
        files = [(os.path.join(root, cls.base_folder, f), md5) for f, md5 in cls.train_list + cls.test_list]
        return next((path for path, md5 in files if not check_integrity(path, md5)), None)
    for url, _ in cls.resources:  # MNIST, Fashion-MNIST: the four unzipped idx files
        path = os.path.join(root, cls.__name__, "raw", os.path.basename(url).removesuffix(".gz"))
        try:
            read_sn3_pascalvincent_tensor(path)  # its header, and a size that agrees with it
        except Exception:
            return path

def resize(images, size):
    if images.shape[-2:] == (size, size):
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)

def batches(images, batch_size, seed, epoch):
    """An epoch's shuffled batches; the order depends on (seed, epoch) only: a resumed run sees the same."""
    from torch.utils.data import DataLoader, TensorDataset
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + epoch))
    return DataLoader(TensorDataset(images), batch_size, sampler=order.tolist(), drop_last=True)

# -----------------------------------------------------------------------------
# The settings of a run: each is a flag, checked wherever it comes from (flags, a checkpoint, code).

class UsageError(ValueError):
    """Bad flags, arguments, data, checkpoint or run directory: one line (the command: exit code 2)."""

class RunStopped(Exception):
    """The run cannot go on (a non-finite loss, a lost process): the command says why in one line, exit 1."""

MODES = ("full", "alternate", "sequential", "parallel")
END_TO_END = ("full", "finetune")  # the phases that backpropagate the whole flow's bits/dim
F32 = torch.finfo(torch.float32)

def flags(names):
    return ", ".join("--" + name.replace("_", "-") for name in names)

def setting(default, help, kind, low=None, high=None, choices=None, many=False, zero=None):
    """A Config field: kind (of each item if `many`), range (ints closed, floats open), and what 0 means."""
    help += f"; 0: {zero}" if zero else ""
    return field(default=default, metadata=dict(help=help, kind=kind, low=low, high=high, choices=choices,
                                                many=many, zero=zero))

def check_setting(f, value, name=None):
    """UsageError naming the flag (or `name`) unless value suits Config field f; a float must fit float32."""
    m, kind = f.metadata, f.metadata["kind"]
    name = name or flags([f.name])
    if isinstance(value, list) and not (m["many"] and value):
        raise UsageError(f"{name}: want one {kind.__name__}" + " or a list" * m["many"] + f", got {value!r}")
    low, high = m["low"], math.inf if m["high"] is None else m["high"]
    accepted = (int, float) if kind is float else kind  # 1 is a float too
    for v in value if isinstance(value, list) else [value]:
        if not isinstance(v, accepted) or isinstance(v, bool) != (kind is bool):
            raise UsageError(f"{name}: want {kind.__name__}, got {v!r}")
        if kind is float and v == 0 and m["zero"]:
            continue
        if kind is float and not F32.tiny <= abs(v) <= F32.max:  # nan fails too
            raise UsageError(f"{name}: {v} is not a number that float32 holds")
        if low is not None and not (low <= v <= high if kind is int else low < v < high):
            interval = f"[{low}, {high}]" if kind is int else f"({low}, {high})"
            raise UsageError(f"{name}: must be in {interval}, got {v}")
        if kind is str and (not v or m["choices"] and v not in m["choices"]):
            raise UsageError(f"{name}: want {' or '.join(m['choices'] or ['a value'])}, got {v!r}")

@dataclass
class Config:
    """A run's settings, each one a command-line flag; checkpoints store the whole Config."""
    mode: str = setting("alternate", "training mechanism", str, choices=MODES)
    epochs: int = setting(60, "epochs of the mechanism", int, 0)
    finetune: int = setting(0, "end-to-end epochs after the mechanism's", int, 0)
    dataset: str = setting("cifar10", "the images", str, choices=tuple(DATASETS))
    data_dir: str = setting("./data", "torchvision datasets are read from / downloaded to here", str)
    image_size: int | None = setting(None, "resize to this size; None: native", int, 1, 1024)
    n_bits: int | None = setting(None, "bits per pixel kept; None: 8, or 4 for digits", int, 1, 8)
    subset: int | None = setting(None, "train on the first N training images; None: all", int, 1)
    test_subset: int | None = setting(None, "evaluate on the first N test images; None: all", int, 1)
    levels: int = setting(3, "L, levels of the multi-scale flow", int, 1, 10)
    steps: int = setting(32, "K, flow steps per level", int, 1, 1024)
    hidden: int = setting(512, "channels of the coupling networks", int, 1, 65536)
    parts: list | None = setting(None, "steps per part, in flow order; None: the poster's", int, 1, many=True)
    part_prior: str = setting("standard", "a part's output prior", str, choices=("standard", "learned"))
    prior_bound: float = setting(5.0, "the split priors' log-std in (-B, B)", float, 0.0, zero="unbounded")
    batch_size: int = setting(64, "images per step (the global batch under torchrun)", int, 1)
    lr: float | list = setting(1e-3, "Adam's rate, or one per part: 1e-3,2e-3,2e-3,1e-3", float, 0, many=True)
    warmup: int | None = setting(None, "linear warmup over a part's first N updates; None: its turns in an "
                                 "epoch, at most 500", int, 1)
    decay: int | list | None = setting(None, "then every rate falls on a half cosine to 0 at epoch N; N,M: "
                                       "one per phase: the mechanism's N, finetuning's M", int, 1, many=True)
    alternate_every: int = setting(1, "steps per turn in alternate mode", int, 1)
    clip: float | None = setting(None, "clip each learning part's gradient to this norm", float, 0.0)
    compile: bool | None = setting(None, "torch.compile each part; None: on a GPU, not a CPU (minutes)", bool)
    ema: float | None = setting(None, "Polyak averaging's decay: the average evaluates", float, 0.0, 1.0)
    seed: int = setting(0, "weights, data order and noise all follow from it", int, 0, 2 ** 32 - 1)
    device: str | None = setting(None, "cpu, cuda, cuda:1, mps; None: cuda if there is one", str)
    out: str | None = setting(None, "run directory; None: runs/<dataset>-<mode>", str)

    def __post_init__(self):
        """Check every setting (None where its type allows it); fill the defaults that depend on others."""
        for f in fields(self):
            if getattr(self, f.name) is not None or type(None) not in getattr(f.type, "__args__", ()):
                check_setting(f, getattr(self, f.name))
        _, native, n_train, n_test, _ = DATASETS[self.dataset]
        n_images = self.subset or n_train  # the training images a run uses (a --subset too large: refused)
        for flag, n, have, split in (("subset", self.subset, n_train, "training"),
                                     ("test-subset", self.test_subset, n_test, "test"),
                                     ("batch-size", self.batch_size, n_images, "training")):
            if (n or 0) > have:
                raise UsageError(f"--{flag} {n} is more than the {have} {split} images of {self.dataset}")
        self.image_size = self.image_size or native
        self.n_bits = self.n_bits or (4 if self.dataset == "digits" else 8)
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.compile = self.device.startswith("cuda") if self.compile is None else self.compile
        self.parts = check_flow(self.parts, self.levels, self.steps, self.image_size)
        self.lr = self.lr if isinstance(self.lr, list) else [self.lr]
        self.lr = self.lr * len(self.parts) if len(self.lr) == 1 else self.lr
        if len(self.lr) != len(self.parts):
            raise UsageError(f"--lr gives {len(self.lr)} rates for {len(self.parts)} parts")
        self.warmup = self.warmup or max(1, min(500, n_images // self.batch_size // len(self.parts)))  # turns
        if isinstance(self.decay, list) and len(self.decay) == 1:  # --decay N: one cosine over the run
            self.decay = self.decay[0]
        if isinstance(self.decay, list) and len(self.decay) != 2:
            raise UsageError(f"--decay: want N, or N,M (a cosine per phase), got {len(self.decay)} values")

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
    scores: list = field(default_factory=list)  # per finished epoch, every test image's bits/dim (float32)
    ema: Glow | None = None  # the moving average of the weights (--ema)

def learning_parts(phase, step, phase_steps, n_parts, every=1):
    """The parts that learn on `step` of a phase. full / finetune / parallel: every part. alternate: one at a
    time, round-robin, `every` steps a turn. sequential: the phase's steps split among the parts in order."""
    if phase == "alternate":
        return [(step // every) % n_parts]
    if phase == "sequential":
        return [min(step * n_parts // phase_steps, n_parts - 1)]
    return list(range(n_parts))

def make_optimizers(model):
    """One Adam per part: a part keeps its moments and step count while it waits for its turn."""
    fused = next(model.parameters()).device.type in ("cpu", "cuda")  # one kernel for a part's parameters
    return [torch.optim.Adam(part.parameters(), fused=fused) for part in model.parts]

def losses(model, x, phase, learning):
    """What a step of `phase` backpropagates. full and finetune: the whole flow's bits/dim, one gradient
    for every part. The others: each learning part's truncated loss L_k, which reaches only part k."""
    if phase in END_TO_END:
        return [model.bits_per_dim(model.log_prob(x)).mean()]
    return [model.bits_per_dim(log_prob).mean() for log_prob in model.truncated(x, learning)]

def step_parts(run, learning, decay=1.0):
    """Step each learning part's Adam: its rate times `decay`, warmed up over its first cfg.warmup updates."""
    for k in learning:
        for group in run.optimizers[k].param_groups:
            group["lr"] = run.cfg.lr[k] * min(1.0, (run.updates[k] + 1) / run.cfg.warmup) * decay
        if run.cfg.clip:  # the part's gradient, scaled down to norm `clip` if it is longer
            torch.nn.utils.clip_grad_norm_(run.model.parts[k].parameters(), run.cfg.clip)
        run.optimizers[k].step()
        run.updates[k] += 1

def train(run, data, log=print, shard=slice(None)):
    """Train run.cfg's mechanism, then its finetuning: every mechanism is this one loop, differing only in
    which parts learn on a step and the loss it backpropagates. `shard`: this process's rows of a batch."""
    from tqdm import tqdm
    cfg, model = run.cfg, run.model
    device = torch.device(cfg.device)
    train_images, test_images = check_data(cfg, data)
    n_parts, epoch_steps = len(model.parts), len(train_images) // cfg.batch_size
    params, averages = list(model.parameters()), list(run.ema.parameters()) if run.ema else None
    for epoch in range(run.epoch + 1, cfg.epochs + cfg.finetune + 1):
        phase = cfg.mode if epoch <= cfg.epochs else "finetune"  # the mechanism, then finetuning
        past = epoch - 1 if phase != "finetune" else epoch - 1 - cfg.epochs  # the phase's epochs done
        length = cfg.epochs if phase != "finetune" else cfg.finetune
        loss_sums, loss_counts = [0.0] * n_parts, [0] * n_parts
        sync(device)
        t_epoch = time.perf_counter()
        loader = batches(train_images, cfg.batch_size, cfg.seed, epoch)
        for i, (batch,) in enumerate(tqdm(loader, desc=f"epoch {epoch} {phase}", leave=False, disable=None)):
            x = preprocess(batch.to(device, non_blocking=True), cfg.n_bits)[shard]
            step = past * epoch_steps + i
            learning = learning_parts(phase, step, length * epoch_steps, n_parts, cfg.alternate_every)
            step_losses = losses(model, x, phase, learning)
            values = [loss.item() for loss in step_losses]
            owners = [n_parts - 1] if phase in END_TO_END else learning  # the part each value belongs to
            if not all(math.isfinite(v) for v in values):  # name the first part that fails: where it starts
                with torch.no_grad():
                    bad = [k for k, lp in enumerate(model.truncated(x)) if not lp.isfinite().all()] + owners
                raise RunStopped(f"non-finite loss in part {bad[0] + 1} of {n_parts} at epoch {epoch} "
                                 f"({phase}), step {i}")
            model.zero_grad(set_to_none=True)
            sum(step_losses).backward()
            if isinstance(cfg.decay, list):  # a half cosine per phase: the mechanism's, then finetuning's
                progress = min(1.0, step / (cfg.decay[phase == "finetune"] * epoch_steps))
            else:  # one half cosine over the whole run, or none
                progress = min(1.0, run.steps / (cfg.decay * epoch_steps)) if cfg.decay else 0.0
            step_parts(run, learning, 0.5 * (1 + math.cos(math.pi * progress)))  # only the learning parts
            if run.ema:  # Polyak averaging; the decay grows from 0.1 so the average starts near the weights
                with torch.no_grad():
                    weight = 1 - min(cfg.ema, (1 + run.steps) / (10 + run.steps))
                    torch._foreach_lerp_(averages, params, weight)
            run.steps += 1
            for k, v in zip(owners, values):
                loss_sums[k], loss_counts[k] = loss_sums[k] + v, loss_counts[k] + 1
        sync(device)
        run.seconds += time.perf_counter() - t_epoch
        train_parts = [s / c if c else None for s, c in zip(loss_sums, loss_counts)]
        finish_epoch(run, epoch, phase, train_parts, evaluate_run(run, test_images), log, shard.step or 1)
    return run

FEW = 0.05  # bits/dim: the images worse than noise "make the mean" where they add more than this to it

@torch.no_grad()
def evaluate(model, images, batch_size, device):
    """The test metrics: mean bits/dim (test_bpd) and each truncated flow's (part_losses); the median image's;
    the images worse than noise (> n_bits): how many, what they add to the mean; every image's (per_image)."""
    scores = []  # each batch's (parts, B) bits/dim; no layer here acts differently in eval mode
    generator = torch.Generator(device=device).manual_seed(0)  # every evaluation: the same noisy test set
    for i in range(0, len(images), batch_size):
        x = preprocess(images[i:i + batch_size].to(device), model.n_bits, generator=generator)
        scores.append(torch.stack([model.bits_per_dim(lp).double() for lp in model.truncated(x)]))
    scores = torch.cat(scores, 1).cpu()  # every image's bits/dim under each truncated flow
    part_bpd, bpd = scores.mean(1).tolist(), scores[-1]
    worse = ~(bpd <= model.n_bits)  # nan counts as worse
    rest = bpd[~worse].mean().item() if (~worse).any() else model.n_bits
    return {"test_bpd": part_bpd[-1], "part_losses": part_bpd, "test_median_bpd": bpd.median().item(),
            "test_outliers": int(worse.sum()), "per_image": bpd.float(),
            "test_outlier_share": part_bpd[-1] - rest if worse.any() else 0.0}

def evaluate_run(run, images):
    """evaluate() of the run's model; with --ema, of the averages, and the raw weights' mean and median."""
    raw = evaluate(run.model, images, run.cfg.batch_size, run.cfg.device)
    return {**evaluate(run.ema, images, run.cfg.batch_size, run.cfg.device), "raw_test_bpd": raw["test_bpd"],
            "raw_test_median_bpd": raw["test_median_bpd"]} if run.ema else raw

def sync(device):
    """Wait for the device, so that a clock read afterwards times work that has really finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

def finish_epoch(run, epoch, phase, train_parts, test, log, processes=1):
    """Record and print the epoch's metrics; write the checkpoint (the run) first, then metrics, samples."""
    bad = [k + 1 for k, v in enumerate(test["part_losses"]) if not math.isfinite(v)]
    if bad or not math.isfinite(test.get("raw_test_bpd", 0.0)):  # stop before this epoch's checkpoint
        where = f"part {bad[0]} of {len(test['part_losses'])}" if bad else "the raw weights"
        raise RunStopped(f"non-finite test bits/dim in {where} at epoch {epoch} ({phase})")
    run.epoch, parts = epoch, None if phase in END_TO_END else train_parts  # parts' own losses: where alone
    run.scores.append(test.pop("per_image"))
    run.history.append({"epoch": epoch, "phase": phase, "train_bpd": train_parts[-1], **test,
                        "train_part_losses": parts, "seconds": run.seconds, "steps": run.steps,
                        "processes": processes})  # train_bpd: process 0's rows of each batch
    log(f"epoch {epoch:3d} | {phase:10s} | train " + (f"{train_parts[-1]:.3f}" if train_parts[-1] else "-")
        + f" | test {test['test_bpd']:.3f} | parts " + " ".join(f"{v:.3f}" for v in test["part_losses"])
        + f" | {run.seconds:7.1f} s" + (f" | raw weights {test['raw_test_bpd']:.3f}" if run.ema else "")
        + (f" | {test['test_outliers']} images worse than noise add {test['test_outlier_share']:.3f} to the "
           f"mean (median image {test['test_median_bpd']:.3f})" if test["test_outlier_share"] > FEW else ""))
    png = sample_grid(run)  # drawn whether or not written: every process takes the same random numbers
    if run.cfg.out:  # the files, in this order, right after each other (the slow work is done)
        save_checkpoint(run)
        write_atomic(os.path.join(run.cfg.out, "metrics.jsonl"), metrics_text(run.history).encode())
        write_atomic(os.path.join(run.cfg.out, f"samples_{run.epoch:03d}.png"), png)

def sample_grid(run):
    """64 samples of the model (with --ema, of the average) as a PNG grid."""
    from torchvision.utils import save_image
    samples = ((run.ema or run.model).sample(64, temperature=0.7) + 0.5).clamp(0, 1).float().cpu()
    png = io.BytesIO()
    samples = F.interpolate(samples, scale_factor=max(1, 64 // samples.shape[-1]))  # big enough to see
    save_image(samples, png, format="png", nrow=8, padding=4)
    return png.getvalue()

# -----------------------------------------------------------------------------
# Runs: build, checkpoint (atomic, checked whole), resume exactly.

def build_model(cfg):
    """cfg's Glow on its device, seeded; refused before anything is allocated where it cannot train."""
    glow = lambda: Glow(in_channels=DATASETS[cfg.dataset][0], image_size=cfg.image_size,  # noqa: E731
                        n_levels=cfg.levels, n_steps=cfg.steps, hidden=cfg.hidden, parts=cfg.parts,
                        n_bits=cfg.n_bits, part_prior=cfg.part_prior, prior_bound=cfg.prior_bound)
    with torch.device("meta"):  # shapes only: weights, gradients, Adam's 2 moments take 16 bytes a parameter
        need = 16 * sum(p.numel() for p in glow().parameters())  # (a GPU: torch's OutOfMemoryError says it)
    if "cuda" not in cfg.device and need > os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"):
        raise UsageError(f"--levels {cfg.levels} --steps {cfg.steps} --hidden {cfg.hidden}: "
                         f"{need / 2 ** 30:,.0f} GiB to train, more than this machine's memory")
    torch.manual_seed(cfg.seed)
    model = glow().to(cfg.device, memory_format=torch.channels_last)
    if cfg.compile:  # a graph per part, grad mode and batch size; static shapes; reverse, sample: eager
        dynamo = torch._dynamo.config  # the limit's name before torch 2.7: cache_size_limit
        limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
        setattr(dynamo, limit, max(getattr(dynamo, limit), 8 * len(model.parts)))
        for part in model.parts:
            part.compile(dynamic=False)
    return model

def prepare_data(cfg):
    """(train, test) uint8 images of the dataset named in cfg, subset and resized."""
    train, test = load_images(cfg.dataset, cfg.data_dir)
    return resize(train[:cfg.subset], cfg.image_size), resize(test[:cfg.test_subset], cfg.image_size)

def check_data(cfg, data):
    """data as train and start_run take it, (train, test) uint8 images of cfg's shape; else a UsageError."""
    shape = (DATASETS[cfg.dataset][0], cfg.image_size, cfg.image_size)
    pair = isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(d) for d in data)
    fit = pair and all(d.dtype == torch.uint8 and d.shape[1:] == shape for d in data)
    if not fit or len(data[0]) < cfg.batch_size or not len(data[1]):  # a batch to train on, an image to test
        raise UsageError(f"data: want (train, test) uint8 tensors of {'x'.join(map(str, shape))} images, at "
                         f"least --batch-size {cfg.batch_size} to train on (prepare_data(cfg) gives them)")
    return data

def write_atomic(path, data):
    """Bytes to path via a temporary file and a rename: a reader sees the old file or the new, never half."""
    try:
        with open(f"{path}.tmp", "wb") as f:
            f.write(data)
        os.replace(f"{path}.tmp", path)
    except OSError as e:  # named: the file being written, not its temporary (a failed write() names none)
        raise OSError(e.errno, e.strerror, path) from None
    finally:  # a failed or interrupted write leaves no temporary
        if os.path.isfile(f"{path}.tmp"):
            os.remove(f"{path}.tmp")

def metrics_text(history):
    return "".join(json.dumps(m) + "\n" for m in history)

CHECKPOINT = {"config": dict, "model": dict, "optimizers": list, "rng": dict, "ema": (dict, type(None)),
              "updates": list, "epoch": int, "seconds": float, "steps": int, "history": list, "scores": list}
RUN_FIELDS = ("updates", "epoch", "seconds", "steps", "history", "scores")  # the Run's own fields it holds

def unsound_values(ckpt):
    """What in a checkpoint no run can go on from: a NaN or an infinity, or Adam settings out of range."""
    tensors = [*ckpt["model"].values(), *(ckpt["ema"] or {}).values(), *ckpt["scores"],
               *(t for o in ckpt["optimizers"] for s in o["state"].values() for t in s.values())]
    if not all(t.isfinite().all() for t in tensors if t.is_floating_point()):
        return "a NaN or an infinite value"
    adam = [g for o in ckpt["optimizers"] for g in o["param_groups"]]
    if not all(0 <= g["betas"][0] < 1 and 0 <= g["betas"][1] < 1 and 0 < g["eps"] < 1 for g in adam):
        return "Adam settings out of range (betas in [0, 1), eps in (0, 1))"

def save_checkpoint(run):
    """Everything a resume needs: the config, weights, every part's Adam, counters, RNG, metrics, scores."""
    cuda = torch.device(run.cfg.device).type == "cuda"
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(run.cfg.device) if cuda else None}
    ckpt = {"config": asdict(run.cfg), "model": run.model.state_dict(), "rng": rng,
            "optimizers": [o.state_dict() for o in run.optimizers], "ema": run.ema and run.ema.state_dict(),
            **{k: getattr(run, k) for k in RUN_FIELDS}}
    unsound = unsound_values(ckpt)
    if unsound:  # never a checkpoint that --resume refuses: the one before it stays
        raise RunStopped(f"the model of epoch {run.epoch} holds {unsound}")
    buffer = io.BytesIO()  # written whole by write_atomic: a full disk is an OSError naming the file
    torch.save(ckpt, buffer)
    write_atomic(os.path.join(run.cfg.out, "checkpoint.pt"), buffer.getbuffer())

def load_checkpoint(path):
    """The checkpoint at path, checked whole before anything is built from it, or a UsageError naming why."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        wrong = [k for k, kind in CHECKPOINT.items() if not isinstance(ckpt.get(k), kind)]
        rng = None if wrong else ckpt["rng"].get("cpu")  # this torch's random state: of its size
        if wrong or not isinstance(rng, torch.ByteTensor) or rng.shape != torch.get_rng_state().shape:
            raise UsageError(f"it lacks or has a malformed {', '.join(wrong or ['rng'])}")
        odd = sorted({f.name for f in fields(Config)} ^ set(ckpt["config"]))
        if odd:
            raise UsageError(f"its config lacks or has unknown settings: {', '.join(odd)}")
        cfg = Config(**ckpt["config"])  # each setting checked, as a flag is
        epoch, steps = ckpt["epoch"], ckpt["steps"]
        last = ckpt["history"][-1] if ckpt["history"] else {"steps": 0, "seconds": 0.0}
        n_test = cfg.test_subset or DATASETS[cfg.dataset][3]  # the images every evaluation scores
        agree = {"epoch": [m["epoch"] for m in ckpt["history"]] == list(range(1, epoch + 1)),
                 "steps": [steps, ckpt["seconds"]] == [last["steps"], last["seconds"]],
                 "updates": all(type(u) is int and 0 <= u <= steps for u in ckpt["updates"])
                 and sum(ckpt["updates"]) >= steps,  # every step updates at least one part
                 "parts": len(ckpt["updates"]) == len(ckpt["optimizers"]) == len(cfg.parts),
                 "scores": len(ckpt["scores"]) == epoch
                 and all(s.dtype == torch.float32 and s.shape == (n_test,) for s in ckpt["scores"])}
        if not all(agree.values()):
            raise UsageError(f"its {', '.join(k for k in agree if not agree[k])} do not agree with its "
                             f"history and config")
        unsound = unsound_values(ckpt)
        if unsound:
            raise UsageError(f"it holds {unsound}")
    except UsageError as e:
        raise UsageError(f"--resume: {path}: {e}") from None
    except Exception as e:  # none there, not a checkpoint, or one that does not hold what it says
        raise UsageError(f"--resume: no sound checkpoint at {path} ({type(e).__name__})") from None
    return ckpt

def start_run(cfg, data=None, ckpt=None):
    """(run before its first step, (train, test) images): fresh, seeded by cfg.seed alone (every mechanism of
    a seed starts from the same weights), or the run in cfg.out restored from its checked checkpoint."""
    model = build_model(cfg)  # (a model that cannot train is refused here, before any data loads)
    run = Run(cfg, model, make_optimizers(model), updates=[0] * len(model.parts))
    run.ema = copy.deepcopy(model) if cfg.ema and ckpt else None  # a fresh run's: after its init, below
    try:  # a checkpoint that does not fit the model its config builds
        for module, key in ((model, "model"), (run.ema, "ema")) if ckpt else ():
            if module is not None:
                module.load_state_dict(ckpt[key])
        for optimizer, state in zip(run.optimizers, ckpt["optimizers"] if ckpt else []):
            optimizer.load_state_dict(state)
            if any(v.shape != p.shape for p, s in optimizer.state.items() for v in s.values() if v.dim()):
                raise ValueError("an Adam moment does not have its parameter's shape")
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        detail = str(e).strip().splitlines()[-1].strip()  # the last line says where
        raise UsageError(f"--resume: the checkpoint does not fit its config ({detail})") from None
    train_images, test_images = check_data(cfg, data if data is not None else prepare_data(cfg))
    if not ckpt:
        model.initialize(preprocess(train_images[:INIT_BATCH].to(cfg.device), cfg.n_bits,
                                    generator=torch.Generator(device=cfg.device).manual_seed(cfg.seed)))
        torch.manual_seed(cfg.seed)  # every mechanism sees the same dequantization noise
        run.ema = copy.deepcopy(model) if cfg.ema else None
        return run, (train_images, test_images)
    for key in RUN_FIELDS:  # its counters, history and scores
        setattr(run, key, ckpt[key])
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if torch.device(cfg.device).type == "cuda" and ckpt["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], cfg.device)
    if cfg.out:  # the metrics and samples of every epoch it holds, also where a stop lost the last
        metrics, text = os.path.join(cfg.out, "metrics.jsonl"), metrics_text(run.history)
        if not text.startswith(open(metrics).read() if os.path.isfile(metrics) else ""):
            raise UsageError(f"--resume: {cfg.out}/checkpoint.pt and metrics.jsonl there hold different runs")
        write_atomic(metrics, text.encode())
        samples = os.path.join(cfg.out, f"samples_{run.epoch:03d}.png")
        if run.epoch and not os.path.exists(samples):
            with torch.random.fork_rng(devices=[cfg.device] if cfg.device.startswith("cuda") else []):
                write_atomic(samples, sample_grid(run))  # the run's own random numbers stay as they were
    return run, (train_images, test_images)

# -----------------------------------------------------------------------------
# Data parallel under torchrun (train_command): train() takes its rows of a batch; these average gradients.

def torchrun_env():
    """(rank, local rank, number of processes) under torchrun; (0, 0, 1) otherwise, whatever else is set."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return 0, 0, 1
    return tuple(int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))

def average_gradients(optimizer, args=None, kwargs=None):
    """An optimizer step pre-hook: its gradients, averaged over the processes (one all-reduce)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    try:
        torch.distributed.all_reduce(flat)
    except RuntimeError as e:  # gloo / NCCL: the connection to a peer is gone
        raise RunStopped(f"a process of the run was lost ({str(e).strip().splitlines()[0][:200]})") from None
    for g, avg in zip(grads, (flat / torch.distributed.get_world_size()).split([g.numel() for g in grads])):
        g.copy_(avg.view_as(g))

def init_distributed(cfg, local_rank):
    """Join the process group (NCCL on GPUs, one GPU per local process; gloo on CPU): cfg on its device."""
    if torch.device(cfg.device).type == "cuda":
        cfg = replace(cfg, device=f"cuda:{local_rank % torch.cuda.device_count()}")
        torch.cuda.set_device(cfg.device)
    torch.distributed.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    return cfg

# -----------------------------------------------------------------------------
# Command line: Config's fields as flags; one writer per directory, nothing lost, any failure one line.

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the whole usage too)
        raise UsageError(message)

def comma_list(kind):
    """A flag's values of `kind`, separated by commas: 1e-3,2e-3 (argparse names a bad one by __name__)."""
    parse = lambda text: [kind(v) for v in text.split(",")]  # noqa: E731
    parse.__name__ = f"comma-separated {kind.__name__}"
    return parse

def make_parser(description, without=()):
    """Config's fields but those `without` as flags; one not given keeps Config's (--resume: the run's)."""
    p = Parser(description=description, allow_abbrev=False)  # --mode is not --modes
    p._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")  # -1e-3: a value, too
    for f in (f for f in fields(Config) if f.name not in without):
        m = f.metadata
        how = ({"action": argparse.BooleanOptionalAction} if m["kind"] is bool else
               {"type": comma_list(m["kind"]) if m["many"] else m["kind"], "choices": m["choices"]})
        p.add_argument(flags([f.name]), default=argparse.SUPPRESS, help=f"{m['help']} (default: {f.default})",
                       **how)
    return p

RESUMABLE = ("epochs", "finetune", "lr", "warmup", "clip", "data_dir", "device", "out", "compile")

def resume_config(ckpt, given, log=print):
    """A resumed run's Config: the checkpoint's, with the flags given that a resume may change (RESUMABLE)."""
    saved, done = Config(**ckpt["config"]), ckpt["epoch"]
    fixed = [k for k in given if k not in RESUMABLE and given[k] != getattr(saved, k)]  # as the user gave it
    if fixed:
        raise UsageError(f"{flags(fixed[:1])}: the run keeps its {fixed[0]} = {getattr(saved, fixed[0])} (a "
                         f"resume may change {flags(RESUMABLE)})")
    cfg = Config(**{**ckpt["config"], **given})
    if cfg.epochs != saved.epochs and (saved.mode == "sequential" or done > min(cfg.epochs, saved.epochs)):
        raise UsageError(f"--epochs {cfg.epochs}: this {saved.mode} run of {saved.epochs} epochs has trained "
                         f"{done} (sequential turns follow --epochs): keep it, change --finetune")
    if cfg.epochs + cfg.finetune < done:
        raise UsageError(f"the run in {cfg.out} already has {done} epochs: ask for at least that many")
    if cfg.epochs + cfg.finetune == done:
        log(f"resume: nothing left to train in {cfg.out}; metrics and samples rewritten from the checkpoint")
    for k in (k for k in given if getattr(cfg, k) != getattr(saved, k)):
        log(f"resume: {flags([k])} {getattr(cfg, k)} (was {getattr(saved, k)})")
    return cfg

def config_from_args(args, log=print, check=None):
    """(Config, checkpoint or None) from parsed flags, checked but for data; check(checkpoint) on --resume."""
    given = {f.name: getattr(args, f.name) for f in fields(Config) if hasattr(args, f.name)}
    given.setdefault("out", f"runs/{given.get('dataset', 'cifar10')}-{given.get('mode', 'alternate')}")
    ckpt = load_checkpoint(f"{given['out']}/checkpoint.pt") if getattr(args, "resume", False) else None
    if ckpt and check:
        check(ckpt)
    cfg = resume_config(ckpt, given, log) if ckpt else Config(**given)
    try:  # the device is here and holds data (meta, say, holds shapes only)
        torch.zeros(1, device=cfg.device).cpu()
    except (RuntimeError, AssertionError, NotImplementedError) as e:
        why = " ".join(str(e).split()).split(". ")[0]  # torch's first sentence, on one line
        raise UsageError(f"--device {cfg.device}: not usable here ({why})") from None
    return cfg, ckpt

def claim_run_dir(out, resume=False, hint=None):
    """Create and lock `out` (in a with block; flock ends with the process, kill -9 too): one writer."""
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, ".lock"), "w")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(f"--out {out} is in use by another run: wait, or choose another --out") from None
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create or write it ({e.strerror or e})") from None
    has = sorted(name for name in os.listdir(out) if name != ".lock" and not name.endswith(".tmp"))
    if has and not resume:
        lock.close()
        there = "continue the run there with --resume, or" if "checkpoint.pt" in has else "it holds no run:"
        hint = hint or f"{there} choose another --out"
        raise UsageError(f"--out {out} already holds {', '.join(has[:3])}{', ...' * (len(has) > 3)}: {hint}")
    return lock

SIGNALS = (signal.SIGINT, signal.SIGTERM)

def interrupt(signum, frame):
    """Ctrl-C and SIGTERM (what a scheduler sends): the first stops the run; no later one cuts that short."""
    for s in SIGNALS:
        signal.signal(s, lambda *args: None)  # not SIG_IGN: a signal already pending would be reported
    raise KeyboardInterrupt(signum)

def checkpoint_note(out):
    """The truth about what a stopped run leaves in out, for its last line."""
    try:
        epoch = torch.load(os.path.join(out, "checkpoint.pt"), mmap=True, weights_only=True)["epoch"]
        return f"the checkpoint of epoch {epoch} in {out} is kept"
    except Exception:  # this is an error path already: say what is there, raise nothing new
        return "no checkpoint was written"

def command(prog, work, argv=None):
    """The one failure handler: work(argv, where), then an exit code and one line. Bad input (UsageError): 2;
    a run that cannot go on (RunStopped; a disk, path or memory failed): 1; Ctrl-C, SIGTERM: 130, 143; the
    line says what is kept in where["out"] (where["note"] or checkpoint_note). A bug: its traceback."""
    rank, _, world = torchrun_env()  # under torchrun, SIGTERM ends a process at once, even while it waits
    handlers = [signal.signal(s, signal.SIG_DFL if world > 1 and s == signal.SIGTERM else interrupt)
                for s in SIGNALS]
    where = {}
    try:
        work(argv, where)
        return 0
    except (UsageError, RunStopped, OSError, MemoryError, torch.OutOfMemoryError, KeyboardInterrupt) as e:
        for s in SIGNALS:  # a second signal must not cut the last line short
            signal.signal(s, lambda *args: None)
        kept = where.get("note", checkpoint_note)(where.get("out"))
        why = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) else e  # OSError: a disk or path failed
        code = (2 if isinstance(e, UsageError) else 1 if not isinstance(e, KeyboardInterrupt) else
                143 if e.args == (signal.SIGTERM,) else 130)
        line = {2: f"error: {e}", 1: f"stopped: {why}; {kept}", 130: f"interrupted (Ctrl-C); {kept}",
                143: f"interrupted (SIGTERM); {kept}"}[code]
        if rank and code == 2:  # bad input under torchrun: process 0 says it, and torchrun then ends this one
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(10)  # still here: process 0 did not refuse it, so this process says it
        print(f"{prog}: {line}", file=sys.stderr)
        return code
    finally:  # a late signal: ignored until the command line exits (its line is said); a caller: its own
        for s, handler in zip(SIGNALS, handlers):
            signal.signal(s, handler if argv is not None else lambda *args: None)
        if "torch.distributed" in sys.modules and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

def train_command(argv, where):
    """Train a run, or continue one (--resume); data parallel under torchrun."""
    p = make_parser("Glow in gradient-isolated parts: full, alternate, sequential or parallel, + finetuning.")
    p.add_argument("--resume", action="store_true", help=f"continue --out's run, changing {flags(RESUMABLE)}")
    args = p.parse_args(argv)
    rank, local_rank, world = torchrun_env()
    log = print if rank == 0 else (lambda *a: None)
    cfg, ckpt = config_from_args(args, log)
    where["out"] = cfg.out
    was = ckpt["history"][-1].get("processes", 1) if ckpt and ckpt["history"] else world
    if was != world:
        log(f"resume: {world} process(es), was {was}: the same batches, summed in another order (rounding)")
    if cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} (the global batch) does not divide among {world}")
    with claim_run_dir(cfg.out, args.resume) if rank == 0 else open(os.devnull):  # before any data loads
        if world > 1:  # every process holds the whole model (the same seed, init, random numbers); 0 writes
            cfg = init_distributed(replace(cfg, out=None if rank else cfg.out), local_rank)
        run, data = start_run(cfg, ckpt=ckpt)
        for optimizer in run.optimizers if world > 1 else []:  # each process trains on its rows of a batch
            optimizer.register_step_pre_hook(average_gradients)
        return train(run, data, log, shard=slice(rank, None, world))

def main(argv=None):
    return command("glow_parts.py", train_command, argv)

if __name__ == "__main__":
    sys.exit(main())
