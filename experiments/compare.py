"""
experiments/compare.py: the poster's comparison. The mechanisms side by side from the same start: the same
initial weights, data order and noise seed, every epoch evaluated with the same dequantization noise.

    python experiments/compare.py --modes full,alternate,sequential --dataset fashion-mnist --image-size 16 \
        --subset 8000 --levels 3 --steps 4 --hidden 64 --parts 4,2,2,4 --warmup 100 --epochs 10 --finetune 5 \
        --out runs/fashion16

full trains epochs + finetune epochs end to end (the same total); every other mechanism trains its
`epochs`, then `finetune` epochs end to end. Each run is a run directory, out/<mode>, locked with out for
as long as the comparison runs; a stopped comparison is continued by the same command. Beside the bits/dim:
what one step of each mechanism costs (time, the activations it keeps, the gradient bytes that cross a part
boundary), the time each run took to reach full training's final bits/dim, and where full training was
after as much time. Results: out/compare.json, compare.png and a table.
"""
import os
import statistics
import sys
from dataclasses import asdict, replace

from benchmark import step_costs
from common import (claim_experiment, experiment_run, gp, lab_config, markdown_table, no_torchrun, parse_modes,
                    plan_of, runs_note, write_results)


def compare(cfg, modes=("full", "alternate"), log=print):
    """Train (or continue) each mechanism from the same initial weights, data order and seed into
    cfg.out/<mode>; write compare.json/png and return the summary."""
    shared, data = gp.start_run(replace(cfg, out=None))  # the initialised model every run starts from
    # What one step of each mechanism holds and sends, on the shared start. This also runs every kind of
    # step once, so no run pays the one-off cost of first-time kernel setup inside its timing.
    probe = gp.preprocess(data[0][:cfg.batch_size].to(cfg.device), cfg.n_bits)
    costs, runs = {mode: step_costs(shared.model, probe, mode) for mode in modes}, []
    for mode in modes:
        log(f"--- {mode}")
        moved = cfg.finetune if mode == "full" else 0  # full trains the finetuning epochs as its own
        run = experiment_run(replace(cfg, mode=mode, out=os.path.join(cfg.out, mode), epochs=cfg.epochs + moved,
                                     finetune=cfg.finetune - moved), data, log)
        last, mechanism = run.history[-1], run.history[run.cfg.epochs - 1]  # the end, and the mechanism's
        runs.append({"name": mode if mode == "full" or not cfg.finetune else f"{mode}+finetune", "mode": mode,
                     "epochs": run.cfg.epochs, "finetune": run.cfg.finetune, "final_test_bpd": last["test_bpd"],
                     "final_median_bpd": last["test_median_bpd"], "final_few_images": few_images(last),
                     "train_seconds": run.seconds, "step_seconds": mechanism["seconds"] / mechanism["steps"],
                     **costs[mode], "curve": run.history})
    full = runs[modes.index("full")]["curve"]
    target, what = smoothed_final(full, cfg.ema)
    for r in runs:
        r["time_to_target"] = time_to(r["curve"], target)
        same_time = at_time(full, r["train_seconds"])
        r["full_bpd_at_equal_time"] = same_time["test_bpd"] if same_time and not few_images(same_time) else None
    summary = {"config": asdict(cfg), "target_bpd": target, "target": what, "runs": runs}
    write_results(summary, cfg.out, "compare", plot_compare)
    log(summary_table(summary))
    return summary


def few_images(m):
    """True where the images worse than noise add more than gp.FEW bits/dim to an evaluation's mean."""
    return m["test_outlier_share"] > gp.FEW


def at_time(curve, seconds):
    """The evaluation a run had reached after `seconds` of training (its last one by then), or None."""
    return next((m for m in reversed(curve) if m["seconds"] <= seconds * (1 + 1e-9)), None)


def smoothed_final(curve, ema):
    """(target, what it is): full's final test bits/dim, which one lucky or unlucky evaluation cannot move
    much: its averaged weights' (--ema), else the mean of its last three evaluations. None where a few
    images make one of those means: such a target says more about them than about the model."""
    last = curve[-1:] if ema else curve[-3:]
    if any(few_images(m) for m in last):
        return None, "none: a few test images make full's final mean bits/dim (see its test_median_bpd)"
    return statistics.fmean(m["test_bpd"] for m in last), ("full's final bits/dim with averaged weights (--ema)"
                                                             if ema else "the mean of full's last 3 evaluations")


def time_to(curve, target):
    """The training seconds of the first evaluation at or below target, or None (never; no target)."""
    return next((m["seconds"] for m in curve if target is not None and m["test_bpd"] <= target), None)


def summary_table(summary):
    """The comparison as a Markdown table (ratios to full's); no time comes from a mean that a few images make."""
    full = next(r for r in summary["runs"] if r["mode"] == "full")
    header = ["run", "final test bpd", "median image", "train s", "time / full", "time to full's bpd (s)",
              "full's bpd at equal time", "step ms", "step / full", "activations MB", "boundary grad KB"]
    return markdown_table(header, [
        [r["name"], f"{r['final_test_bpd']:.3f}" + " (a few images make it)" * r["final_few_images"],
         f"{r['final_median_bpd']:.3f}", f"{r['train_seconds']:.0f}",
         f"{r['train_seconds'] / full['train_seconds']:.2f}", "no target" if summary["target_bpd"] is None else
         f"{r['time_to_target']:.0f}" if r["time_to_target"] is not None else "never",
         "-" if r["full_bpd_at_equal_time"] is None else f"{r['full_bpd_at_equal_time']:.3f}",
         f"{1e3 * r['step_seconds']:.1f}", f"{r['step_seconds'] / full['step_seconds']:.2f}",
         f"{r['activation_bytes'] / 2 ** 20:.1f}", f"{r['boundary_backward_bytes'] / 2 ** 10:.0f}"]
        for r in summary["runs"]]) + f"\ntarget: {summary['target']}"


def plot_compare(summary, file):
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
    fig.savefig(file, dpi=120, format="png")


def run_compare(argv, where):
    p = gp.make_parser("The mechanisms side by side from the same start.", without=("mode",))
    p.add_argument("--modes", type=parse_modes, default=["full", "alternate"],
                   help="the mechanisms, full among them (default: full,alternate)")
    args = p.parse_args(argv)
    if "full" not in args.modes:
        raise gp.UsageError("--modes: the comparison measures against full training: list full")
    no_torchrun("the comparison times the mechanisms")
    modes = args.modes
    cfg = lab_config(args, "compare")
    where["out"], where["note"] = cfg.out, runs_note
    if cfg.epochs == 0:
        raise gp.UsageError("the comparison times each mechanism's own epochs: give --epochs >= 1")
    dirs = [os.path.join(cfg.out, mode) for mode in modes]
    with claim_experiment(cfg.out, plan_of(cfg, modes=modes), dirs):  # the same command continues it
        return compare(cfg, modes)


if __name__ == "__main__":
    sys.exit(gp.command("compare.py", run_compare))
