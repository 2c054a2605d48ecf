"""
experiments/benchmark.py: what one training step of each mechanism costs at any model size, on
random images (no dataset needed), beside what the cost model predicts.

    python experiments/benchmark.py --modes full,alternate                   # the CIFAR-10 Glow, the poster's parts
    python experiments/benchmark.py --modes full,alternate --parts auto:4 --batch-size 8 --device cpu
    python experiments/benchmark.py --modes full,alternate --device cuda --no-compile
    python experiments/benchmark.py --modes full,alternate --batch-size 8 --device cpu --recompute

Per mechanism: the median time of the loop's own step (losses, backward, the learning parts' Adams;
per-part mechanisms: the mean over one turn of every part), the activation memory one step saves for
backward (its largest part's), the CUDA peak, and the gradient bytes that cross a part boundary.

The cost model. A full step costs about 3 forward passes (forward + backward). Part k's step runs
the parts before it forward without grad and itself forward and backward: with f_k part k's share
of the forward multiply-adds (glow_parts.step_macs), its step costs (sum_{j<k} f_j + 3 f_k) / 3 of
a full step. An alternate epoch costs the mean of that over the parts.
"""
import argparse
import os
import statistics
import sys
import time
from dataclasses import replace

import torch
import torch.utils.checkpoint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import glow_parts as gp  # noqa: E402


def predicted_step(cfg, learning):
    """The cost model's step time relative to a full step, for a step where `learning` parts learn."""
    macs = gp.step_macs(gp.NATIVE[cfg.dataset][0], cfg.image_size, cfg.levels, cfg.steps, cfg.hidden)
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
    for learning in gp.mechanism_steps(mode, len(run.model.parts)):
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
    channels, S = gp.NATIVE[cfg.dataset][0], cfg.image_size
    images = torch.randint(0, 256, (cfg.batch_size, channels, S, S), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(cfg.seed))
    x = gp.preprocess(images.to(cfg.device), cfg.n_bits)
    rows = []
    for mode in modes:
        run, _ = gp.start_run(replace(cfg, mode=mode, lr=1e-6, warmup=1, out=None), (images, images))
        run.model = recompute(run.model) if recomputed else run.model
        medians, kinds = time_steps(run, x, mode, repeats), gp.mechanism_steps(mode, len(cfg.parts))
        rows.append({"mode": mode, "step_seconds": statistics.fmean(medians), "part_step_seconds": medians,
                     **gp.step_costs(run.model, x, mode),
                     "predicted": statistics.fmean(predicted_step(cfg, k) for k in kinds)})
    full = next((r for r in rows if r["mode"] == "full"), rows[0])
    table = gp.markdown_table(
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


def parse_modes(text):
    modes = text.split(",")
    if any(m not in gp.MODES for m in modes) or len(set(modes)) < len(modes):
        raise argparse.ArgumentTypeError(f"want some of {', '.join(gp.MODES)}, each once; got {text!r}")
    return modes


def run_benchmark(argv, where):
    p = gp.make_parser("Step costs of each mechanism on random images, beside the cost model.")
    p.add_argument("--modes", type=parse_modes, default=["full", "alternate"], help="mechanisms (default: full,alternate)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per kind of step, after one measured step")
    p.add_argument("--recompute", action="store_true", help="memory-saving gradients: each flow step keeps only "
                                                            "its input and runs again in backward")
    args = p.parse_args(argv)
    modes, repeats, recomputed = args.modes, args.repeats, args.recompute
    unused = [n for n in ("mode", "epochs", "finetune", "data_dir", "subset", "test_subset", "lr", "warmup",
                          "alternate_every", "ema", "out") if hasattr(args, n)]
    if unused or repeats < 1 or gp.torchrun_env()[2] > 1:
        raise gp.UsageError(f"{gp.flags(unused)}: the benchmark times steps of the model these flags do not shape; "
                            f"give --modes for the mechanisms" if unused else f"--repeats must be at least 1, got "
                            f"{repeats}" if repeats < 1 else "the benchmark times steps in one process: no torchrun")
    for name in ("modes", "repeats", "recompute"):
        delattr(args, name)
    cfg, _ = gp.config_from_args(args)  # every flag checked as glow_parts.py checks it
    benchmark(cfg, modes, repeats, recomputed=recomputed)


if __name__ == "__main__":
    sys.exit(gp.command("benchmark.py", run_benchmark))
