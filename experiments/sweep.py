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
from common import (check_output, claim_experiment, experiment_run, gp, lab_config, largest_rise, markdown_table,
                    no_torchrun, plan_of, read_curve, read_timing, runs_note, write_results)


def branch(trunk_out, out, epoch):
    """Make out a run that continues the trunk's checkpoint (a copy of the trunk at its epoch); its metrics
    are written from the checkpoint when it resumes."""
    if len(read_curve(trunk_out)) != epoch:
        raise gp.UsageError(f"{trunk_out} has trained past epoch {epoch}: a split with {epoch} alternate "
                            f"epochs needs a new --out")
    gp.write_atomic(os.path.join(out, "checkpoint.pt"), open(os.path.join(trunk_out, "checkpoint.pt"), "rb").read())


def sweep(cfg, splits, seeds, timings=(), jobs=1, margin=stats.MARGIN, log=print):
    """Train (or continue) every run of the sweep into cfg.out, `jobs` seeds at a time; write sweep.json,
    sweep.png and sweep-scores.npz (the per-image scores every statistic is computed from)."""
    work = [(cfg, splits, seed, timings) for seed in seeds]
    if jobs > 1:  # each seed in a process of its own (spawned: a fresh torch), the experiment's locks held here
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(jobs, quiet_worker, (os.getpid(),)) as pool:
            done = pool.map(seed_runs, work, chunksize=1)
    else:
        done = [seed_runs(w, log) for w in work]
    seeds_data, arrays = [d for d, _ in done], {k: v for _, a in done for k, v in a.items()}
    summary = summarize(cfg, seeds, splits, seeds_data, arrays, timings, margin)
    write_results(summary, cfg.out, "sweep", plot_sweep)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    gp.write_atomic(os.path.join(cfg.out, "sweep-scores.npz"), buffer.getvalue())
    log(sweep_table(summary))
    return summary


def quiet_worker(sweep_pid):
    """A seed's process: Ctrl-C goes to the sweep, which ends its processes (SIGTERM: at once; every file is
    written atomically), and it ends with the sweep, a kill -9 included, instead of training on alone."""
    import ctypes
    import signal
    import threading

    from tqdm import tqdm
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tqdm.set_lock(threading.RLock())  # not a process-shared lock, which a process ended by SIGTERM would leak
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux): SIGTERM when the sweep ends
    if os.getppid() != sweep_pid:  # it ended before that
        os.kill(os.getpid(), signal.SIGTERM)


def full_stages(splits, timings):
    """The epochs at which full training is evaluated on the whole test split: every budget, and each split's
    equal-time epoch on each timing file (a day's medians)."""
    budgets = {A + F for A, F in splits}
    equal = {stats.equal_time_epoch(A, F, stats.quiet_costs(t)) for A, F in splits for t in timings}
    return sorted(budgets | {E for E in equal if 1 <= E < max(budgets)})


def seed_runs(work, log=None):
    """Train (or continue) one seed's runs: full training in stages (with a fixed warmup and a constant rate,
    its first N epochs are the full run of budget N, and a resume is exact), one alternate trunk, and a
    branch at each A that finetunes F epochs. Returns (the seed's curves, its per-image score arrays)."""
    cfg, splits, seed, timings = work
    log = log or (lambda line: print(f"[seed {seed}] {line}", flush=True))
    key = "raw_test_bpd" if cfg.ema else "test_bpd"  # spikes are measured on the raw weights
    train, whole = gp.prepare_data(replace(cfg, test_subset=None))  # the subset's images are the first ones
    data, whole = (train, whole[:cfg.test_subset]), whole if cfg.test_subset else None
    root, scfg, arrays = os.path.join(cfg.out, f"seed{seed}"), replace(cfg, seed=seed), {}

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

    one = {"decay": sum(cfg.decay)} if isinstance(cfg.decay, list) else {}  # full: one cosine over the budget
    full = {N: run("full", mode="full", epochs=N, finetune=0, **one) for N in full_stages(splits, timings)}
    trunk, tuned = {}, {}
    for A in sorted({A for A, _ in splits}):
        trunk[A] = run("alternate", mode="alternate", epochs=A, finetune=0)
        for F in sorted(F for a, F in splits if a == A):
            name = f"alternate{A}+finetune{F}"
            if not os.path.exists(os.path.join(root, name, "checkpoint.pt")):
                branch(os.path.join(root, "alternate"), os.path.join(root, name), A)
            tuned[A, F] = run(name, mode="alternate", epochs=A, finetune=F)
            arrays[f"seed{seed}/{A}+{F}"] = np.asarray(tuned[A, F][1]["per_image"], dtype=np.float32)
    for N, (_, point) in full.items():
        arrays[f"seed{seed}/full{N}"] = np.asarray(point["per_image"], dtype=np.float32)
    full_curve, trunk_curve = full[max(full)][0], trunk[max(trunk)][0]
    strip = lambda point: {k: v for k, v in point.items() if k != "per_image"}  # noqa: E731
    return {"seed": seed, "full_curve": full_curve, "alternate_curve": trunk_curve,
            "full_largest_rise": largest_rise(full_curve, key),
            "alternate_largest_rise": largest_rise(trunk_curve, key),
            "splits": {f"{A}+{F}": {"curve": curve, "end": strip(point), "full_end": strip(full[A + F][1])}
                       for (A, F), (curve, point) in tuned.items()}}, arrays


def scores(out):
    """The per-image test scores of every epoch of the run in out, as its checkpoint keeps them."""
    return gp.load_checkpoint(os.path.join(out, "checkpoint.pt"))["scores"]  # checked whole, as a resume checks it


def gaps(arrays, seeds, name, against):
    """Per seed, the paired per-image differences (float64) of run `name` minus run `against`."""
    return [arrays[f"seed{s}/{name}"].astype(np.float64) - arrays[f"seed{s}/{against}"] for s in seeds]


def verdicts(diffs, margin):
    """The per-seed robust gaps (trimmed means of diffs), their mean, and the pre-registered test."""
    trimmed = [float(stats.trimmed_mean(d)) for d in diffs]
    return {"gap_robust": float(np.mean(trimmed)), "gap_robust_per_seed": trimmed, "test": stats.tost(trimmed, margin),
            "t_test": stats.paired_t(trimmed)}


def summarize(cfg, seeds, splits, seeds_data, arrays, timings=(), margin=stats.MARGIN):
    """Every statistic of the sweep, from the per-image scores in arrays (sweep-scores.npz reloads them)
    and the curves: per split, at equal epochs and at equal time (the first timing's medians), the paired
    gaps and the pre-registered test; per timing file (a day), the time ratios."""
    by_split = []
    for A, F in splits:
        N = A + F
        diffs = gaps(arrays, seeds, f"{A}+{F}", f"full{N}")
        ends, fulls = ([arrays[f"seed{s}/{k}"] for s in seeds] for k in (f"{A}+{F}", f"full{N}"))
        row = {"budget": N, "alternate_epochs": A, "finetune_epochs": F, "seeds": seeds, **verdicts(diffs, margin),
               "gap_mean": float(np.mean([d.mean() for d in diffs])),
               "gap_mean_per_seed": [float(d.mean()) for d in diffs],
               "gap_mean_ci": stats.t_interval([d.mean() for d in diffs]),
               "gap_median_image": float(np.mean([np.median(a) - np.median(f) for a, f in zip(ends, fulls)])),
               "full_bpd": [float(f.mean()) for f in fulls], "bpd": [float(a.mean()) for a in ends],
               "outlier_share": {name: [d["splits"][f"{A}+{F}"][end]["test_outlier_share"] for d in seeds_data]
                                 for name, end in (("alternate", "end"), ("full", "full_end"))},  # evaluate's
               "gap_raw_weights": [d["splits"][f"{A}+{F}"]["end"]["raw_test_bpd"] - d["splits"][f"{A}+{F}"]["full_end"][
                   "raw_test_bpd"] for d in seeds_data] if cfg.ema else None,
               "time": [time_statistics(A, F, t) for t in timings]}
        if timings:
            row["equal_time"] = equal_time(A, F, seeds, arrays, timings, margin)
        by_split.append(row)
    return {"config": {**asdict(cfg), "seed": None}, "seeds": seeds, "splits": splits, "trim": stats.TRIM,
            "margin": margin, "timing": [{k: t[k] for k in ("date", "machine", "threads", "summary")} for t in timings],
            "per_seed": seeds_data, "by_split": by_split}


def time_statistics(A, F, timing):
    """A day's time ratio on the quiet cost axis, training only and with each epoch's evaluation: the medians'
    ratio and its range over the repeats."""
    N = A + F
    ratio = lambda evaluation: stats.time_ratio(A, F, N, stats.quiet_costs(timing, evaluation))  # noqa: E731
    return {"date": timing["date"], "ratio": ratio(False), "ratio_with_evaluation": ratio(True),
            "range": stats.time_range(A, F, N, timing),
            "range_with_evaluation": stats.time_range(A, F, N, timing, True)}


def equal_time(A, F, seeds, arrays, timings, margin):
    """The paired gap against full training at its equal-time epoch under each timing file (the first decides),
    on the whole test split where the sweep evaluated it there (else the first test images, as the earlier
    sweeps did: then the subset arrays)."""
    out = []
    for t in timings:
        E = stats.equal_time_epoch(A, F, stats.quiet_costs(t))
        whole = all(f"seed{s}/full{E}" in arrays for s in seeds)
        if not whole and not all(f"seed{s}/full/subset{E}" in arrays for s in seeds):
            out.append({"date": t["date"], "epoch": E, "images": None})
            continue
        diffs = (gaps(arrays, seeds, f"{A}+{F}", f"full{E}") if whole else
                 gaps(arrays, seeds, f"{A}+{F}/subset", f"full/subset{E}"))
        out.append({"date": t["date"], "epoch": E, "images": "whole test split" if whole else
                    f"first {len(diffs[0])} test images", **verdicts(diffs, margin)})
    return out


def sweep_table(summary):
    """The sweep as Markdown tables: per split, the pre-registered test at equal epochs and at equal time, the
    other gaps and each day's time ratio; per seed, the largest rise of each curve (with --ema, the raw
    weights')."""
    def interval(ci):
        return "-" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"

    def decided(v):
        if v.get("test") is None:
            return ["-", "-", "-"]
        t = v["test"]
        return [f"{v['gap_robust']:+.3f}", f"{interval(t['ci90'])} / {interval(t['ci95'])}",
                t["verdict"] + " (95 % excludes 0)" * (t["excludes_zero"] and t["verdict"] != "worse")]
    rows = []
    for b in summary["by_split"]:
        at_time = b.get("equal_time", [{}])[0]
        at_time_cells = decided(at_time) if at_time.get("images") else ["-", "-", "-"]
        days = "; ".join(f"{t['ratio']:.3f} / {t['ratio_with_evaluation']:.3f} ({t['date']})" for t in b["time"])
        rows.append([str(b["budget"]), f"{b['alternate_epochs']} + {b['finetune_epochs']}", *decided(b),
                     f"{at_time['epoch']}" if at_time else "-", *at_time_cells,
                     f"{b['gap_mean']:+.3f} {interval(b['gap_mean_ci'])}", f"{b['gap_median_image']:+.3f}", days or "-",
                     f"{max(b['outlier_share']['alternate']):.3f} / {max(b['outlier_share']['full']):.3f}"])
    n, margin = len(summary["seeds"]), summary["margin"]
    rise = lambda r: "none" if r[0] is None else f"+{r[1]:.3f} (epoch {r[0]})"  # noqa: E731
    seeds = [[str(s["seed"]), rise(s["full_largest_rise"]), rise(s["alternate_largest_rise"])]
             for s in summary["per_seed"]]
    return markdown_table(["budget N", "alternate + finetune", "robust gap, equal epochs", "90 % / 95 % t interval",
                           f"verdict (margin {margin}, {n} seeds)", "equal-time epoch", "robust gap, equal time",
                           "90 % / 95 % t interval", "verdict", "mean gap [95 %]", "median-image gap",
                           "time / full: training / with evaluation (day)",
                           "largest outlier share: alternate / full"], rows) + "\n\n" + markdown_table(
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
    ci = [b["test"]["ci95"] if b["test"] else [b["gap_robust"]] * 2 for b in main]
    gaps.errorbar([b["budget"] for b in main], [b["gap_robust"] for b in main], fmt="k-o", linewidth=2,
                  yerr=[[b["gap_robust"] - c[0] for b, c in zip(main, ci)], [c[1] - b["gap_robust"] for b, c in
                                                                              zip(main, ci)]],
                  label="mean, 95 % t interval")
    for sign in (-1, 1):
        gaps.axhline(sign * summary["margin"], color="C2", linestyle="--", linewidth=0.8,
                     label="the margin" if sign > 0 else None)
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


FIGURE_TAG = "experiments/sweep.py --figure"  # in the PNG's metadata: a file this script may write over


def plot_verdicts(summary, file):
    """The test, drawn: for each split at equal epochs and at equal time, every seed's robust gap (dots), their
    mean with its 90 % (thick) and 95 % (thin) t intervals, the margin's band and the verdict."""
    from matplotlib.figure import Figure
    rows = [(f"{b['alternate_epochs']} + {b['finetune_epochs']}, equal epochs", b) for b in summary["by_split"]]
    rows += [(f"{b['alternate_epochs']} + {b['finetune_epochs']}, equal time (full: {e['epoch']})", e)
             for b in summary["by_split"] for e in b.get("equal_time", [])[:1] if e.get("test")]
    fig = Figure(figsize=(8, 1.6 + 0.55 * len(rows)))
    ax = fig.subplots()
    margin = summary["margin"]
    ax.axvspan(-margin, margin, color="C2", alpha=0.2, label=f"the margin, ±{margin}")
    ax.axvline(0, color="grey", linewidth=0.6)
    for y, (label, r) in enumerate(rows):
        ax.plot(r["gap_robust_per_seed"], [y - 0.2] * len(r["gap_robust_per_seed"]), "o", color="grey",
                markersize=3, label="a seed" if y == 0 else None)
        ax.plot(r["test"]["ci95"], [y, y], "k-", linewidth=1, label="95 % t interval" if y == 0 else None)
        ax.plot(r["test"]["ci90"], [y, y], "k-", linewidth=4, label="90 %" if y == 0 else None)
        ax.plot(r["gap_robust"], y, "wd", markeredgecolor="k", label="mean" if y == 0 else None)
        ax.text(1.02, y, r["test"]["verdict"], transform=ax.get_yaxis_transform(), va="center")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.set_ylim(len(rows) - 0.5, -0.7)
    ax.set(xlabel="robust paired gap, alternate A + finetune F minus full (bits/dim)",
           title=f"{len(summary['seeds'])} seeds: is alternate + finetune within the margin of full training?")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(file, dpi=110, format="png", metadata={"Software": FIGURE_TAG})


def read_figure(path, flag):
    """A figure this script drew (its tag in the PNG's metadata); else a UsageError."""
    if FIGURE_TAG.encode() not in open(path, "rb").read(4096):
        raise gp.UsageError(f"{flag} {path}: not a figure of sweep.py --results")


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
    p.add_argument("--timing", type=lambda t: t.split(","), default=[],
                   help="quiet epoch costs, one file a day (experiments/timing.py's JSON): the time ratios on each, "
                        "the gap at equal time on the first")
    p.add_argument("--margin", type=float, default=stats.MARGIN, help="the practical margin of the equivalence test "
                                                                      f"(default: {stats.MARGIN}, pre-registered)")
    p.add_argument("--jobs", type=int, default=1, help="seeds trained at a time, each in its own process (give each "
                                                       "one thread: OMP_NUM_THREADS=1)")
    p.add_argument("--results", type=lambda t: t.split(","),
                   help="recompute every statistic from a sweep's result files PREFIX.json and PREFIX-scores.npz, "
                        "or from several sweeps' (PREFIX,PREFIX: other seeds, same settings); nothing trains")
    p.add_argument("--figure", help="with --results: draw the test (each split's seeds, intervals, margin) to this PNG")
    args = p.parse_args(argv)
    no_torchrun("the sweep trains its runs")
    if not 0 < args.margin < 1 or args.jobs < 1:
        raise gp.UsageError(f"want --margin in (0, 1) and --jobs at least 1, got {args.margin} and {args.jobs}")
    timings = [read_timing(t) for t in args.timing]
    if args.figure and not args.results:
        raise gp.UsageError("--figure draws the result files of --results (a sweep draws out/sweep.png)")
    if args.figure:
        check_output(args.figure, read_figure, "--figure")
    if args.results:
        summary = rescore(args.results, timings, args.margin)
        if args.figure:
            png = io.BytesIO()
            plot_verdicts(summary, png)
            gp.write_atomic(args.figure, png.getvalue())
        return print(sweep_table(summary))
    splits, seeds = sorted(set(args.budgets + args.splits)), sorted(set(args.seeds))
    if not splits:
        raise gp.UsageError("give --budgets and/or --splits")
    cfg = replace(lab_config(args, "sweep"), epochs=1, finetune=0)
    where["out"], where["note"] = cfg.out, runs_note
    budgets = sorted({A + F for A, F in splits})
    phases = cfg.decay if isinstance(cfg.decay, list) else None  # a cosine per phase: one split, A,F
    if cfg.decay and (budgets != [cfg.decay] if not phases else splits != [tuple(phases)]):
        raise gp.UsageError(f"--decay {cfg.decay}: give the one budget it ends at (--decay N), or the one split "
                            f"A+F it gives a cosine per phase (--decay A,F); got {splits}")
    dirs = [os.path.join(cfg.out, f"seed{s}", name) for s in seeds for name in
            ["full", "alternate", *(f"alternate{A}+finetune{F}" for A, F in splits)]]
    with claim_experiment(cfg.out, plan_of(replace(cfg, seed=0)), dirs):  # seeds, budgets and splits may grow
        return sweep(cfg, splits, seeds, timings, args.jobs, args.margin)


def rescore(prefixes, timings, margin):
    """The summary recomputed from the result files (PREFIX.json, PREFIX-scores.npz) of a sweep, or of sweeps of
    the same settings over different seeds (a sweep run in batches), as if one sweep had trained every seed."""
    olds, arrays = [], {}
    for prefix in prefixes:
        try:
            olds.append(json.load(open(prefix + ".json")))
            arrays.update(np.load(prefix + "-scores.npz"))
            settings = ({**olds[-1]["config"], "out": None}, olds[-1]["splits"], olds[-1]["trim"])
        except OSError as e:
            raise gp.UsageError(f"--results {prefix}: cannot read {e.filename} ({e.strerror})") from None
        except (ValueError, KeyError, TypeError) as e:
            raise gp.UsageError(f"--results {prefix}: not a sweep's result files ({type(e).__name__})") from None
        if len(olds) == 1:
            first = settings
        elif settings != first or set(olds[-1]["seeds"]) & {s for old in olds[:-1] for s in old["seeds"]}:
            raise gp.UsageError(f"--results {prefix}: a sweep of other settings than {prefixes[0]}'s, or of a seed "
                                f"it has: want one setting, each seed once")
    try:
        per_seed = sorted((d for old in olds for d in old["per_seed"]), key=lambda d: d["seed"])
        cfg = gp.Config(**{**olds[0]["config"], "seed": 0})
        return summarize(cfg, [d["seed"] for d in per_seed], [tuple(s) for s in olds[0]["splits"]], per_seed, arrays,
                         timings, margin)
    except (ValueError, KeyError, TypeError) as e:
        raise gp.UsageError(f"--results {','.join(prefixes)}: not a sweep's result files ({type(e).__name__}: {e})"
                            ) from None

if __name__ == "__main__":
    sys.exit(gp.command("sweep.py", run_sweep))
