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
import math
import numbers

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

    Pixels are integers in n_bins = 2^n_bits bins of width 1/n_bins on [-0.5, 0.5]; with uniform
    dequantization log P(bin) >= log p(x) - D * log(n_bins), so the bits/dim are
    (-log p(x) + D log n_bins) / (D ln 2) = -log p(x) / (D ln 2) + n_bits."""
    D = x[0].numel()
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
        for part in self.parts[start:stop]:
            h, z, ld, lp = part(h)
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
        part = self.parts[k]
        h, _, ld, lp = part(isolate(h))
        log_prob = logdet + logp + ld + lp + part.prior.log_prob(h)
        return bits_per_dim(log_prob, x, self.n_bits).mean()

    def truncated_log_probs(self, x):
        """[log p_k(x) for every part k] in nats, (B,) each, in one pass with every boundary isolated.

        Summing their losses and calling backward trains every part on its own objective at once;
        under no_grad it evaluates every truncated flow for the cost of one forward pass."""
        self._ensure_initialized(x)
        out, const, h = [], 0, x
        for part in self.parts:
            h, _, ld, lp = part(isolate(h))
            out.append(const + ld + lp + part.prior.log_prob(h))
            const = const + (ld + lp).detach()  # constants for every later part
        return out


# -----------------------------------------------------------------------------
# Data: uint8 images in memory, dequantized on the fly.


def preprocess(x, n_bits, noise=True, generator=None):
    """uint8 images (B, C, H, W) -> floats in [-0.5, 0.5), the scale the flow models.

    Keep the top n_bits of each pixel, map the n_bins = 2^n_bits integers to bins of width 1/n_bins
    on [-0.5, 0.5], and add uniform noise in [0, 1/n_bins) (dequantization): a density on this scale
    then bounds the probability of the discrete image, and bits_per_dim adds the D log n_bins."""
    n_bins = 2 ** n_bits
    x = torch.div(x, 2 ** (8 - n_bits), rounding_mode="floor").float() / n_bins - 0.5
    if noise:
        x = x + torch.rand(x.shape, generator=generator, device=x.device) / n_bins
    return x


def postprocess(x):
    """The flow's scale back to [0, 1] for saving images."""
    return (x + 0.5).clamp(0, 1)
