"""
experiments/sweep.py: the poster's question at several budgets, over seeds.

For each seed and budget N (epochs): full training for N epochs against alternate 2N/3 + finetuning
N/3, and any other split A + F of a budget (--splits). Per seed, full trains once, in stages to each
budget (with a fixed warmup and a constant rate, its first N epochs are the full run of budget N,
and a resume is exact). Alternate trains once per seed too; where it reaches A epochs, a copy of it
(checkpoint, Adam state and RNG) branches off and finetunes for F epochs, exactly as a separate
alternate A + finetune F run.

Every run is an ordinary run directory, out/seed<S>/full, out/seed<S>/alternate and
out/seed<S>/alternate<A>+finetune<F>: a stopped sweep loses at most an epoch, and the same command
continues it (and may add seeds, budgets or larger splits). With --test-subset N every epoch is
evaluated on the first N test images (the curves, the rises, the gap at equal time), and the end of
every stage on the whole test split (the gaps). Results: out/sweep.json, sweep.png, a table.

    python experiments/sweep.py --budgets 30,60,90 --splits 75+15,45+45 --seeds 0,1,2 --ema 0.995 \
        --dataset fashion-mnist --image-size 16 --subset 8000 --levels 3 --steps 4 --hidden 64 \
        --parts 4,2,2,4 --warmup 100 --test-subset 2000 --out runs/fashion16-sweep
"""
import argparse
import io
import json
import os
import sys
from dataclasses import asdict, replace

import numpy as np

import stats
from common import (claim_experiment, experiment_run, gp, lab_config, largest_rise, markdown_table, plan_of,
                    read_curve, runs_note, write_results)


def branch(trunk_out, out, epoch):
    """Make out a run that continues the trunk's checkpoint (a copy of the trunk at its epoch); its metrics
    are written from the checkpoint when it resumes."""
    if len(read_curve(trunk_out)) != epoch:
        raise gp.UsageError(f"{trunk_out} has trained past epoch {epoch}: a split with {epoch} alternate "
                            f"epochs needs a new --out")
    gp.write_atomic(os.path.join(out, "checkpoint.pt"), open(os.path.join(trunk_out, "checkpoint.pt"), "rb").read())


def sweep(cfg, splits, seeds, timing=None, log=print):
    """Train (or continue) every run of the sweep into cfg.out; write sweep.json, sweep.png and
    sweep-scores.npz (the per-image scores every statistic is computed from)."""
    budgets, seeds_data, arrays = sorted({A + F for A, F in splits}), [], {}
    key = "raw_test_bpd" if cfg.ema else "test_bpd"  # spikes are measured on the raw weights
    train, whole = gp.prepare_data(replace(cfg, test_subset=None))  # the same images for every seed, loaded once
    data, whole = (train, whole[:cfg.test_subset]), whole if cfg.test_subset else None
    for seed in seeds:
        root, scfg = os.path.join(cfg.out, f"seed{seed}"), replace(cfg, seed=seed)  # every run: the same start

        def run(name, **kw):
            """Train the run (or continue it) to its end: (its curve, its evaluation there with every image's
            score). With --test-subset the curve's evaluations use the first N test images, and the end is
            evaluated on the whole test split (kept in whole-test.json: a rerun neither trains nor evaluates)."""
            c = replace(scfg, **kw, out=os.path.join(root, name))
            end, path = c.epochs + c.finetune, os.path.join(c.out, "whole-test.json")
            ends = json.load(open(path)) if os.path.exists(path) else {}
            curve = read_curve(c.out)
            if len(curve) < end or whole is not None and str(end) not in ends:
                log(f"--- seed {seed}: {name}, to epoch {end}")
                r = experiment_run(c, data, log)
                curve = r.history
                if whole is not None:
                    test = gp.evaluate_run(r, whole)
                    ends[str(end)] = {**test, "per_image": test["per_image"].tolist()}
                    gp.write_atomic(path, json.dumps(ends).encode())
            return curve[:end], ends[str(end)] if whole is not None else {**curve[end - 1], "per_image": scores(
                c.out)[end - 1].tolist()}

        full = {N: run("full", mode="full", epochs=N, finetune=0) for N in budgets}  # in stages (resumes are exact)
        trunk, tuned = {}, {}
        for A in sorted({A for A, _ in splits}):
            trunk[A] = run("alternate", mode="alternate", epochs=A, finetune=0)
            for F in sorted(F for a, F in splits if a == A):
                name = f"alternate{A}+finetune{F}"
                if not os.path.exists(os.path.join(root, name, "checkpoint.pt")):
                    branch(os.path.join(root, "alternate"), os.path.join(root, name), A)
                tuned[A, F] = run(name, mode="alternate", epochs=A, finetune=F)
                arrays[f"seed{seed}/{A}+{F}"] = np.asarray(tuned[A, F][1]["per_image"], dtype=np.float32)
                arrays[f"seed{seed}/{A}+{F}/subset"] = scores(os.path.join(root, name))[-1].numpy()
        for N in budgets:
            arrays[f"seed{seed}/full{N}"] = np.asarray(full[N][1]["per_image"], dtype=np.float32)
        full_scores = scores(os.path.join(root, "full"))
        for E in sorted({E for A, F in splits for E in stats.equal_time_window(A, F, timing)} if timing else ()):
            if 1 <= E <= len(full_scores):  # a later E is full's last epoch (time_statistics)
                arrays[f"seed{seed}/full/subset{E}"] = full_scores[E - 1].numpy()
        full_curve, trunk_curve = full[max(budgets)][0], trunk[max(trunk)][0]
        seeds_data.append({"seed": seed, "full_curve": full_curve, "alternate_curve": trunk_curve,
                           "full_largest_rise": largest_rise(full_curve, key),
                           "alternate_largest_rise": largest_rise(trunk_curve, key),
                           "splits": {f"{A}+{F}": {"curve": curve, "end": {k: v for k, v in point.items() if k !=
                                                                            "per_image"},
                                                   "full_end": {k: v for k, v in full[A + F][1].items() if k !=
                                                                "per_image"}}
                                      for (A, F), (curve, point) in tuned.items()}})
    summary = summarize(cfg, seeds, splits, seeds_data, arrays, timing)
    write_results(summary, cfg.out, "sweep", plot_sweep)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    gp.write_atomic(os.path.join(cfg.out, "sweep-scores.npz"), buffer.getvalue())
    log(sweep_table(summary))
    return summary


def scores(out):
    """The per-image test scores of every epoch of the run in out, as its checkpoint keeps them."""
    return gp.torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", mmap=True, weights_only=True)["scores"]


def summarize(cfg, seeds, splits, seeds_data, arrays, timing):
    """Every statistic of the sweep, from the per-image scores in arrays (sweep-scores.npz reloads them)
    and the curves: per split, the paired gaps with their intervals, the margin and the verdict, the time
    ratio on the quiet cost axis and the paired gap at equal time."""
    by_split = []
    for A, F in splits:
        N, ends = A + F, [arrays[f"seed{s}/{A}+{F}"] for s in seeds]
        fulls = [arrays[f"seed{s}/full{N}"] for s in seeds]
        diffs = [a.astype(np.float64) - f for a, f in zip(ends, fulls)]
        trimmed = [float(stats.trimmed_mean(d)) for d in diffs]
        margin = float(np.std([stats.trimmed_mean(f.astype(np.float64)) for f in fulls], ddof=1)) \
            if len(seeds) > 1 else None
        robust_ci = stats.nested_bootstrap([len(d) for d in diffs], lambda s, i, _: stats.trimmed_mean(diffs[s][i]))
        row = {"budget": N, "alternate_epochs": A, "finetune_epochs": F, "seeds": seeds,
               "gap_robust": float(np.mean(trimmed)), "gap_robust_ci": robust_ci, "gap_robust_per_seed": trimmed,
               "gap_robust_t_test": stats.paired_t(trimmed), "margin": margin,
               "verdict": stats.verdict(robust_ci, margin) if margin is not None else None,
               "gap_mean": float(np.mean([d.mean() for d in diffs])),
               "gap_mean_per_seed": [float(d.mean()) for d in diffs],
               "gap_mean_ci": stats.nested_bootstrap([len(d) for d in diffs], lambda s, i, _: diffs[s][i].mean()),
               "gap_median_image": float(np.mean([np.median(a) - np.median(f) for a, f in zip(ends, fulls)])),
               "full_bpd": [float(f.mean()) for f in fulls], "bpd": [float(a.mean()) for a in ends],
               "outlier_share": {"alternate": [stats.outlier_share(a, cfg.n_bits) for a in ends],
                                 "full": [stats.outlier_share(f, cfg.n_bits) for f in fulls]},
               "gap_raw_weights": [d["splits"][f"{A}+{F}"]["end"]["raw_test_bpd"] - d["splits"][f"{A}+{F}"]["full_end"][
                   "raw_test_bpd"] for d in seeds_data] if cfg.ema else None}
        if timing:
            row.update(time_statistics(A, F, seeds, arrays, timing, max(a + f for a, f in splits)))
        by_split.append(row)
    return {"config": {**asdict(cfg), "seed": None}, "seeds": seeds, "splits": splits, "trim": stats.TRIM,
            "margin_rule": stats.MARGIN_RULE,
            "timing": timing and {"date": timing["date"], "machine": timing["machine"], "threads": timing["threads"],
                                  "summary": timing["summary"]},
            "per_seed": seeds_data, "by_split": by_split}


def time_statistics(A, F, seeds, arrays, timing, last):
    """The time ratio on the quiet cost axis (training only, and with each epoch's evaluation), each with a
    95 % interval over the timing repeats; and the paired robust gap at equal time (the first test images
    the curves use), whose interval resamples the timing too."""
    rng, N = np.random.default_rng(0), A + F
    out = {}
    for name, evaluation in (("time_ratio", False), ("time_ratio_with_evaluation", True)):
        draws = [stats.time_ratio(A, F, N, stats.resample_costs(timing, evaluation, rng)) for _ in range(stats.N_BOOT)]
        out[name] = stats.time_ratio(A, F, N, stats.quiet_costs(timing, evaluation))
        out[name + "_ci"] = [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]
    if min(stats.equal_time_window(A, F, timing)) < 1:  # full training had not finished an epoch by then
        return out
    E = min(stats.equal_time_epoch(A, F, stats.quiet_costs(timing)), last)
    ends = [arrays[f"seed{s}/{A}+{F}/subset"].astype(np.float64) for s in seeds]

    def gap(s, images, costs):  # full training stops at the largest budget: its last evaluation then
        e = min(stats.equal_time_epoch(A, F, costs) if costs else E, last)
        return stats.trimmed_mean(ends[s][images] - arrays[f"seed{seeds[s]}/full/subset{e}"][images])
    out["equal_time_epoch"] = E
    out["gap_equal_time_robust"] = float(np.mean([gap(s, np.arange(len(ends[s])), None) for s in range(len(seeds))]))
    out["gap_equal_time_robust_ci"] = stats.nested_bootstrap(
        [len(e) for e in ends], gap, extra=lambda r: stats.resample_costs(timing, False, r))
    return out


def sweep_table(summary):
    """The sweep as Markdown tables: per split, the verdict and every gap with its interval (mean over seeds
    [95 % interval]); per seed, the largest rise of each curve (with --ema, the raw weights')."""
    def ci(value, interval, fmt="{:+.3f}"):
        return "-" if value is None else f"{fmt.format(value)} [{fmt.format(interval[0])}, {fmt.format(interval[1])}]"
    rows = [[str(b["budget"]), f"{b['alternate_epochs']} + {b['finetune_epochs']}",
             ci(b["gap_robust"], b["gap_robust_ci"]), "-" if b["margin"] is None else f"{b['margin']:.3f}",
             b["verdict"] or "-", ci(b["gap_mean"], b["gap_mean_ci"]), f"{b['gap_median_image']:+.3f}",
             ci(b.get("time_ratio"), b.get("time_ratio_ci"), "{:.3f}"),
             ci(b.get("time_ratio_with_evaluation"), b.get("time_ratio_with_evaluation_ci"), "{:.3f}"),
             ci(b.get("gap_equal_time_robust"), b.get("gap_equal_time_robust_ci")),
             f"{max(b['outlier_share']['alternate']):.3f} / {max(b['outlier_share']['full']):.3f}"]
            for b in summary["by_split"]]
    rise = lambda r: "none" if r[0] is None else f"+{r[1]:.3f} (epoch {r[0]})"  # noqa: E731
    seeds = [[str(s["seed"]), rise(s["full_largest_rise"]), rise(s["alternate_largest_rise"])]
             for s in summary["per_seed"]]
    return markdown_table(["budget N", "alternate + finetune", "robust gap", "margin", "verdict", "mean gap",
                           "median-image gap", "time / full", "time / full, with evaluation", "robust gap at equal "
                           "time", "largest outlier share: alternate / full"], rows) + "\n\n" + markdown_table(
        ["seed", "full: largest rise above its best so far", "alternate: largest rise"], seeds)


def plot_sweep(summary, file):
    """The robust gap against the budget (per seed thin, the mean with its interval thick), the splits of
    the largest budget, and each seed's full and alternate curves (where the spikes show)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(16, 4.5))
    gaps, splits, curves = fig.subplots(1, 3)
    by = summary["by_split"]
    main = [b for b in by if 3 * b["alternate_epochs"] == 2 * b["budget"]]  # the 2N/3 + N/3 splits
    for i, seed in enumerate(summary["seeds"]):
        gaps.plot([b["budget"] for b in main], [b["gap_robust_per_seed"][i] for b in main], color="grey",
                  linewidth=0.8, marker=".")
    gaps.errorbar([b["budget"] for b in main], [b["gap_robust"] for b in main], fmt="k-o", linewidth=2,
                  yerr=[[b["gap_robust"] - b["gap_robust_ci"][0] for b in main],
                        [b["gap_robust_ci"][1] - b["gap_robust"] for b in main]], label="mean, 95 % interval")
    gaps.axhline(0, color="grey", linewidth=0.6)
    gaps.set(xlabel="budget N (epochs)", ylabel="robust paired gap (bits/dim)",
             title="alternate 2N/3 + finetune N/3 - full N")
    gaps.legend()
    top = max(b["budget"] for b in by)
    last = sorted((b for b in by if b["budget"] == top), key=lambda b: b["alternate_epochs"])
    for i, seed in enumerate(summary["seeds"]):
        splits.plot([b["alternate_epochs"] for b in last], [b["bpd"][i] for b in last], color="grey", linewidth=0.8,
                    marker=".")
    splits.plot([b["alternate_epochs"] for b in last], [np.mean(b["bpd"]) for b in last], "k-o", linewidth=2)
    splits.axhline(np.mean(last[0]["full_bpd"]), color="C3", linestyle="--", label=f"full, {top} epochs")
    splits.set(xlabel=f"alternate epochs of {top} (the rest finetunes)", ylabel="test bits/dim",
               title=f"splits of {top} epochs")
    splits.legend()
    for i, s in enumerate(summary["per_seed"]):
        for name, style in (("full", "-"), ("alternate", ":")):
            c = s[f"{name}_curve"]
            curves.plot([m["epoch"] for m in c], [m["test_bpd"] for m in c], style, color=f"C{i}", linewidth=1,
                        label=f"seed {s['seed']}, {name}")
    curves.set(xlabel="epoch", ylabel="test bits/dim", title="full and alternate, per seed")
    curves.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(file, dpi=110, format="png")


def parse_splits(text):
    """75+15,45+45: alternate epochs (at least 1) + finetuning epochs."""
    splits = [tuple(int(v) for v in s.split("+")) for s in text.split(",")]
    if any(len(s) != 2 or s[0] < 1 or s[1] < 0 for s in splits):
        raise argparse.ArgumentTypeError(f"want splits A+F (A >= 1 alternate epochs, F >= 0), got {text!r}")
    return splits


def parse_seeds(text):
    seeds = [int(v) for v in text.split(",")]
    if any(not 0 <= s < 2 ** 32 for s in seeds):
        raise argparse.ArgumentTypeError(f"seeds are in [0, 2^32), got {text!r}")
    return seeds


def parse_budgets(text):
    """30,60,90: the splits 2N/3 + N/3 of each budget N (a multiple of 3)."""
    budgets = [int(v) for v in text.split(",")]
    if any(N < 3 or N % 3 for N in budgets):
        raise argparse.ArgumentTypeError(f"budgets must be multiples of 3 (alternate 2N/3 + finetune N/3), got {text}")
    return [(2 * N // 3, N // 3) for N in budgets]


def run_sweep(argv, where):
    p = gp.make_parser("The budget sweep over seeds: full N epochs against alternate A + finetune F.",
                       without=("mode", "epochs", "finetune", "seed"))
    p.add_argument("--budgets", type=parse_budgets, default=[], help="budgets N (multiples of 3): 2N/3 + N/3 each")
    p.add_argument("--splits", type=parse_splits, default=[], help="more splits A+F, e.g. 75+15,45+45")
    p.add_argument("--seeds", type=parse_seeds, default=[0], help="seeds, each with its own weights, data order and "
                                                                 "noise (default: 0)")
    p.add_argument("--timing", help="quiet epoch costs (experiments/timing.py's JSON): the time ratios and the gap "
                                    "at equal time are computed on them")
    args = p.parse_args(argv)
    if gp.torchrun_env()[2] > 1:
        raise gp.UsageError("the sweep times its runs in one process: run it without torchrun")
    splits, seeds, timing = sorted(set(args.budgets + args.splits)), sorted(set(args.seeds)), args.timing
    if timing and not os.path.isfile(timing):
        raise gp.UsageError(f"--timing {timing}: no such file (experiments/timing.py writes it)")
    if not splits:
        raise gp.UsageError("give --budgets and/or --splits")
    cfg = replace(lab_config(args, "sweep"), epochs=1, finetune=0)
    where["out"], where["note"] = cfg.out, runs_note
    budgets = sorted({A + F for A, F in splits})
    if cfg.decay and budgets != [cfg.decay]:
        raise gp.UsageError(f"--decay {cfg.decay} ends every rate at epoch {cfg.decay}: give that one budget, "
                            f"not {','.join(map(str, budgets))}")
    dirs = [os.path.join(cfg.out, f"seed{s}", name) for s in seeds for name in
            ["full", "alternate", *(f"alternate{A}+finetune{F}" for A, F in splits)]]
    with claim_experiment(cfg.out, plan_of(replace(cfg, seed=0)), dirs):  # seeds, budgets and splits may grow
        return sweep(cfg, splits, seeds, timing and json.load(open(timing)))


if __name__ == "__main__":
    sys.exit(gp.command("sweep.py", run_sweep))
