"""
experiments/benchmark.py: what one training step of each mechanism costs at any model size, on
random images (no dataset needed), beside what the cost model predicts.

    python experiments/benchmark.py --modes full,alternate                   # the CIFAR-10 Glow, the poster's parts
    python experiments/benchmark.py --modes full,alternate --balanced 4 --batch-size 8 --device cpu
    python experiments/benchmark.py --modes full,alternate --device cuda --no-compile
    python experiments/benchmark.py --modes full,alternate --batch-size 8 --device cpu --recompute

Per mechanism: the median time of the loop's own step (losses, backward, the learning parts' Adams;
per-part mechanisms: the mean over one turn of every part), the activation memory one step saves for
backward (its largest part's), the CUDA peak, and the gradient bytes that cross a part boundary.

The cost model. A full step costs about 3 forward passes (forward + backward). Part k's step runs
the parts before it forward without grad and itself forward and backward: with f_k part k's share
of the forward multiply-adds (step_macs), its step costs (sum_{j<k} f_j + 3 f_k) / 3 of a full step.
An alternate epoch costs the mean of that over the parts. --balanced P cuts the flow into P parts of
about equal multiply-adds and prints the cut as a --parts value for glow_parts.py.
"""
import functools
import itertools
import statistics
import sys
import time
from dataclasses import replace

import torch
import torch.utils.checkpoint

from common import gp, lab_config, markdown_table, no_torchrun, parse_modes


def mechanism_steps(mode, n_parts):
    """The kinds of step a mechanism takes, read off its schedule (gp.learning_parts) over one turn of each part."""
    return [list(k) for k in dict.fromkeys(tuple(gp.learning_parts(mode, s, n_parts, n_parts))
                                           for s in range(n_parts))]


def measure_step(model, x, phase, learning):
    """What one training step (gp.losses, backward) holds and sends: (activation bytes, boundary backward
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
        step_losses = gp.losses(model, x, phase, learning)
    sum(step_losses).backward()
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    return sum(saved.values()), crossing[0], torch.cuda.max_memory_allocated(x.device) if cuda else None


def step_costs(model, x, mode):
    """measure_step for each kind of step the mechanism takes (one turn of its schedule): the largest."""
    costs = [measure_step(model, x, mode, learning) for learning in mechanism_steps(mode, len(model.parts))]
    return {"activation_bytes": max(c[0] for c in costs), "boundary_backward_bytes": max(c[1] for c in costs),
            "cuda_max_memory_allocated": None if costs[0][2] is None else max(c[2] for c in costs)}


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
    """n_parts contiguous parts whose most expensive one is as cheap as possible (exact: a dynamic
    programme over the last cut)."""
    prefix = [0, *itertools.accumulate(macs)]

    @functools.cache
    def best(i, p):  # (the cheapest largest part, its sizes) when the first i steps form p parts
        if p == 1:
            return prefix[i], [i]
        cost, j = min((max(best(j, p - 1)[0], prefix[i] - prefix[j]), j) for j in range(p - 1, i))
        return cost, best(j, p - 1)[1] + [i - j]
    return best(len(macs), n_parts)[1]


def cfg_macs(cfg):
    return step_macs(gp.DATASETS[cfg.dataset][0], cfg.image_size, cfg.levels, cfg.steps, cfg.hidden)


def predicted_step(cfg, learning):
    """The cost model's step time relative to a full step, for a step where `learning` parts learn."""
    macs = cfg_macs(cfg)
    bounds = [0, *[sum(cfg.parts[:k + 1]) for k in range(len(cfg.parts))]]
    share = [sum(macs[a:b]) / sum(macs) for a, b in zip(bounds, bounds[1:])]
    return (sum(share[:learning[0]]) + 3 * sum(share[k] for k in range(learning[0], learning[-1] + 1))) / 3


class Recomputed(torch.nn.Module):
    """A flow step that keeps only its input for backward and runs again there (torch.utils.checkpoint):
    memory-saving gradients, at the price of a second forward pass of every step."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def forward(self, x):
        if not torch.is_grad_enabled():
            return self.step(x)
        return torch.utils.checkpoint.checkpoint(self.step, x, use_reentrant=False)

    def reverse(self, y):
        return self.step.reverse(y)


def recompute(model):
    """model with every flow step Recomputed."""
    for part in model.parts:
        part.layers = torch.nn.ModuleList(Recomputed(m) if isinstance(m, gp.FlowStep) else m for m in part.layers)
    return model


def time_steps(run, x, mode, repeats):
    """Median seconds of the loop's own step (losses, backward, the learning parts' Adams at a tiny rate)
    for each kind of step the mechanism takes, after one untimed step of each."""
    medians = []
    for learning in mechanism_steps(mode, len(run.model.parts)):
        seconds = []
        for _ in range(repeats + 1):
            gp.sync(x.device)
            t0 = time.perf_counter()
            run.model.zero_grad(set_to_none=True)
            sum(gp.losses(run.model, x, mode, learning)).backward()
            gp.step_parts(run, learning)
            gp.sync(x.device)
            seconds.append(time.perf_counter() - t0)
        medians.append(statistics.median(seconds[1:]))
    return medians


def benchmark(cfg, modes, repeats=5, log=print, recomputed=False):
    """One row per mechanism: measured step costs and the cost model's step ratio."""
    channels, S = gp.DATASETS[cfg.dataset][0], cfg.image_size
    images = torch.randint(0, 256, (cfg.batch_size, channels, S, S), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(cfg.seed))
    x = gp.preprocess(images.to(cfg.device), cfg.n_bits)
    rows = []
    for mode in modes:
        run, _ = gp.start_run(replace(cfg, mode=mode, lr=1e-6, warmup=1, out=None), (images, images))
        run.model = recompute(run.model) if recomputed else run.model
        medians, kinds = time_steps(run, x, mode, repeats), mechanism_steps(mode, len(cfg.parts))
        rows.append({"mode": mode, "step_seconds": statistics.fmean(medians), "part_step_seconds": medians,
                     **step_costs(run.model, x, mode),
                     "predicted": statistics.fmean(predicted_step(cfg, k) for k in kinds)})
    full = next((r for r in rows if r["mode"] == "full"), rows[0])
    table = markdown_table(
        ["mechanism", "step s", "step / full", "cost model", "per-part step s", "activations MB", "CUDA peak MB",
         "boundary grad KB"],
        [[r["mode"], f"{r['step_seconds']:.3f}", f"{r['step_seconds'] / full['step_seconds']:.2f}",
          f"{r['predicted'] / full['predicted']:.2f}", " ".join(f"{t:.3f}" for t in r["part_step_seconds"]),
          f"{r['activation_bytes'] / 2 ** 20:.1f}",
          f"{r['cuda_max_memory_allocated'] / 2 ** 20:.0f}" if r["cuda_max_memory_allocated"] else "-",
          f"{r['boundary_backward_bytes'] / 2 ** 10:.0f}"] for r in rows])
    log(f"benchmark: {cfg.levels} levels x {cfg.steps} steps, hidden {cfg.hidden}, parts {cfg.parts}, "
        f"batch {cfg.batch_size} of {channels}x{S}x{S} on {cfg.device}, {torch.get_num_threads()} threads"
        + ", memory-saving gradients" * recomputed + f"\n{table}")
    return rows


def run_benchmark(argv, where):
    p = gp.make_parser("Step costs of each mechanism on random images, beside the cost model.", without=(
        "mode", "epochs", "finetune", "data_dir", "subset", "test_subset", "lr", "warmup", "decay", "alternate_every",
        "clip", "ema", "out"))
    p.add_argument("--modes", type=parse_modes, default=["full", "alternate"],
                   help="mechanisms (default: full,alternate)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per kind of step, after one measured step")
    p.add_argument("--recompute", action="store_true", help="memory-saving gradients: each flow step keeps only "
                                                            "its input and runs again in backward")
    p.add_argument("--balanced", type=int, help="cut the flow into this many parts of about equal multiply-adds")
    args = p.parse_args(argv)
    modes, repeats = args.modes, args.repeats
    recomputed, balanced = args.recompute, args.balanced
    no_torchrun("the benchmark times steps")
    if repeats < 1:
        raise gp.UsageError(f"--repeats must be at least 1, got {repeats}")
    cfg = lab_config(args, "benchmark")
    if balanced is not None:
        if not 1 <= balanced <= cfg.levels * cfg.steps:
            raise gp.UsageError(f"--balanced {balanced}: want 1 to {cfg.levels * cfg.steps} parts "
                                "(a step each at most)")
        cfg = replace(cfg, parts=balanced_parts(balanced, cfg_macs(cfg)), lr=cfg.lr[0])
        print(f"--balanced {balanced}: --parts {','.join(map(str, cfg.parts))}")
    benchmark(cfg, modes, repeats, recomputed=recomputed)


if __name__ == "__main__":
    sys.exit(gp.command("benchmark.py", run_benchmark))
