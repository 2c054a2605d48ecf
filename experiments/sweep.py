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
import copy
import json
import os
import shutil
import statistics
import sys
from dataclasses import asdict, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import glow_parts as gp  # noqa: E402


def experiment_run(cfg, data, init_state, owner, log=print):
    """Train the sweep's run in cfg.out, locked while it trains: from init_state, or on from its checkpoint
    where the sweep was stopped (with more epochs where the sweep grew; a finished one as it is)."""
    with gp.claim_run_dir(cfg.out, resume=True):
        path = os.path.join(cfg.out, "checkpoint.pt")
        ckpt = gp.load_checkpoint(path) if os.path.exists(path) else None
        if ckpt and ckpt["owner"] != owner:
            raise gp.UsageError(f"{cfg.out} holds a run that is not part of the sweep in {owner}")
        if not ckpt and os.listdir(cfg.out) != [".lock"]:
            raise gp.UsageError(f"{cfg.out} holds files but no checkpoint: move them away to run it again")
        if ckpt:
            saved = gp.Config(**ckpt["config"])
            done = ckpt["epoch"] >= cfg.epochs + cfg.finetune and (cfg.epochs, cfg.finetune) == (saved.epochs,
                                                                                                 saved.finetune)
            cfg = saved if done else gp.resume_config(saved, {k: v for k, v in asdict(cfg).items() if v is not None},
                                                      ckpt["epoch"], log)
        run, _ = gp.start_run(cfg, data, init_state, ckpt)
        run.owner = owner
        return gp.train(run, data, log)


def claim_sweep(out, plan):
    """Lock out for the sweep and record its plan in sweep-plan.json: the same command continues a
    stopped sweep (and may add seeds, budgets and splits); another plan, or another kind of directory,
    is refused."""
    lock = gp.claim_run_dir(out, resume=True)
    path = os.path.join(out, "sweep-plan.json")
    old = json.load(open(path)) if os.path.exists(path) else None
    if old is None and os.listdir(out) != [".lock"] or old not in (None, plan):
        lock.close()
        diff = sorted(k for k in {**plan["config"], **(old or {}).get("config", {})}
                      if (old or {}).get("config", {}).get(k) != plan["config"].get(k))
        raise gp.UsageError(f"--out {out} holds " + ("something other than a sweep" if old is None else
                            f"a sweep whose {', '.join(diff)} differ from these") + "; choose another --out")
    gp.write_atomic(path, lambda tmp: open(tmp, "w").write(json.dumps(plan, indent=1)))
    return lock


def branch(trunk_out, out, epoch):
    """A new run directory that continues the trunk's checkpoint (a copy of the trunk at its epoch)."""
    if len(read_curve(trunk_out)) != epoch:
        raise gp.UsageError(f"{trunk_out} has trained past epoch {epoch}: a split with {epoch} alternate "
                            f"epochs needs a new --out")
    with gp.claim_run_dir(out):
        for name in ("metrics.jsonl", "checkpoint.pt"):  # the checkpoint last: it makes the directory a run
            gp.write_atomic(os.path.join(out, name), lambda tmp: shutil.copyfile(os.path.join(trunk_out, name), tmp))


def read_curve(out):
    path = os.path.join(out, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def largest_rise(curve, key):
    """(epoch, rise) of the largest rise of curve[key] above its best so far: how far a spike set a run back."""
    best, top = float("inf"), (None, 0.0)
    for m in curve:
        if m[key] - best > top[1]:
            top = (m["epoch"], m[key] - best)
        best = min(best, m[key])
    return top


def sweep(cfg, splits, seeds, log=print):
    """Train (or continue) every run of the sweep into cfg.out; write sweep.json and sweep.png."""
    budgets, rows, per_seed = sorted({A + F for A, F in splits}), [], []
    key = "raw_test_bpd" if cfg.ema else "test_bpd"  # spikes are measured on the raw weights
    data = gp.prepare_data(cfg)  # the same images for every seed, loaded once
    whole = gp.prepare_data(replace(cfg, test_subset=None))[1] if cfg.test_subset else None
    for seed in seeds:
        root = os.path.join(cfg.out, f"seed{seed}")
        shared, _ = gp.start_run(replace(cfg, seed=seed, out=None), data)  # the start every run of the seed shares
        init, scfg = copy.deepcopy(shared.model.state_dict()), shared.cfg  # its warmup is fixed now

        def run(name, **kw):
            """Train the run (or continue it) to its end: (its curve, its evaluation there). With
            --test-subset the curve's evaluations use the first N test images, and the end is evaluated
            on the whole test split (kept in whole-test.json: a rerun neither trains nor evaluates it)."""
            c = replace(scfg, **kw, out=os.path.join(root, name))
            end, path = c.epochs + c.finetune, os.path.join(c.out, "whole-test.json")
            ends = json.load(open(path)) if os.path.exists(path) else {}
            curve = read_curve(c.out)
            if len(curve) < end or whole is not None and str(end) not in ends:
                log(f"--- seed {seed}: {name}, to epoch {end}")
                r = experiment_run(c, data, init, cfg.out, log)
                curve = r.history
                if whole is not None:
                    ends[str(end)] = gp.evaluate_run(r, whole)
                    gp.write_atomic(path, lambda tmp: open(tmp, "w").write(json.dumps(ends, indent=1)))
            return curve[:end], ends[str(end)] if whole is not None else curve[end - 1]

        full = {N: run("full", mode="full", epochs=N, finetune=0) for N in budgets}  # in stages (resumes are exact)
        trunk, tuned = {}, {}
        for A in sorted({A for A, _ in splits}):
            trunk[A] = run("alternate", mode="alternate", epochs=A, finetune=0)
            for F in sorted(F for a, F in splits if a == A):
                name = f"alternate{A}+finetune{F}"
                if not os.path.exists(os.path.join(root, name, "checkpoint.pt")):
                    branch(os.path.join(root, "alternate"), os.path.join(root, name), A)
                tuned[A, F] = run(name, mode="alternate", epochs=A, finetune=F)
        full_curve, trunk_curve = full[max(budgets)][0], trunk[max(trunk)][0]
        trained = full_curve[-1]["seconds"] + trunk_curve[-1]["seconds"] + sum(  # each epoch once: the cost
            c[-1]["seconds"] - c[A - 1]["seconds"] for (A, F), (c, _) in tuned.items() if F)
        per_seed.append({"seed": seed, "seconds_trained": trained, "full_curve": full_curve,
                         "alternate_curve": trunk_curve, "full_largest_rise": largest_rise(full_curve, key),
                         "alternate_largest_rise": largest_rise(trunk_curve, key)})
        for (A, F), (curve, point) in sorted(tuned.items()):
            end, same_time = full[A + F][1], gp.at_time(full_curve, curve[-1]["seconds"])
            rows.append({"seed": seed, "budget": A + F, "alternate_epochs": A, "finetune_epochs": F,
                         "full_bpd": end["test_bpd"], "bpd": point["test_bpd"],
                         "gap": point["test_bpd"] - end["test_bpd"],
                         "gap_median_image": point["test_median_bpd"] - end["test_median_bpd"],
                         "gap_raw_weights": point["raw_test_bpd"] - end["raw_test_bpd"] if cfg.ema else None,
                         "alternate_bpd": trunk[A][1]["test_bpd"], "seconds": curve[-1]["seconds"],
                         "time_ratio": curve[-1]["seconds"] / full_curve[A + F - 1]["seconds"],
                         "gap_at_equal_time": curve[-1]["test_bpd"] - same_time["test_bpd"] if same_time else None,
                         "dominated": any(m and m["test_dominated"] for m in (end, point, curve[-1], same_time)),
                         "finetune_curve": curve[A:]})
    summary = {"config": {**asdict(cfg), "seed": None}, "seeds": seeds, "splits": splits,
               "runs": rows, "per_seed": per_seed, "by_split": aggregate(rows)}
    gp.write_results(summary, cfg.out, "sweep", plot_sweep)
    log(sweep_table(summary))
    return summary


def spread(values):
    """{mean, sd (0 for one value), min, max} of the values that are not None; None if there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def aggregate(rows):
    """Per split A + F, each measure over the seeds whose means no few test images make."""
    out = []
    for A, F in sorted({(r["alternate_epochs"], r["finetune_epochs"]) for r in rows}, key=lambda s: (sum(s), s)):
        mine = [r for r in rows if (r["alternate_epochs"], r["finetune_epochs"]) == (A, F)]
        fair = [r for r in mine if not r["dominated"]]
        out.append({"budget": A + F, "alternate_epochs": A, "finetune_epochs": F, "seeds": len(mine),
                    "dominated_seeds": [r["seed"] for r in mine if r["dominated"]],
                    **{k: spread([r[k] for r in fair]) for k in ("full_bpd", "bpd", "gap", "gap_median_image",
                                                                "gap_raw_weights", "time_ratio", "gap_at_equal_time")},
                    "gap_signs": sorted({(r["gap"] > 0) - (r["gap"] < 0) for r in fair})})
    return out


def sweep_table(summary):
    """The sweep as Markdown tables: per split, each measure's mean ± sd [min, max] over the seeds; per seed,
    the largest rise of each curve (with --ema, the raw weights') and the seconds of training it took."""
    def cell(s, signed=False):
        fmt = "{:+.3f}" if signed else "{:.3f}"
        return "-" if s is None else f"{fmt.format(s['mean'])} ± {s['sd']:.3f} [{fmt.format(s['min'])}, {fmt.format(s['max'])}]"
    header = ["budget N", "alternate + finetune", "seeds", "full, N epochs", "alternate + finetune bpd", "gap",
              "gap, median image", "gap, raw weights", "time / full", "gap at equal time", "gap's sign"]
    rows = [[str(b["budget"]), f"{b['alternate_epochs']} + {b['finetune_epochs']}",
             f"{b['seeds'] - len(b['dominated_seeds'])}" + (f" (+{len(b['dominated_seeds'])} where a few images make "
                                                             f"the mean)" if b["dominated_seeds"] else ""),
             cell(b["full_bpd"]), cell(b["bpd"]), cell(b["gap"], True), cell(b["gap_median_image"], True),
             cell(b["gap_raw_weights"], True),
             cell(b["time_ratio"]), cell(b["gap_at_equal_time"], True),
             "flips between seeds" if len(b["gap_signs"]) > 1 else {1: "+", -1: "-", 0: "0"}.get(
                 (b["gap_signs"] or [0])[0])] for b in summary["by_split"]]
    rise = lambda r: "none" if r[0] is None else f"+{r[1]:.3f} (epoch {r[0]})"  # noqa: E731
    seeds = [[str(s["seed"]), rise(s["full_largest_rise"]), rise(s["alternate_largest_rise"]),
              f"{s['seconds_trained']:.0f}"] for s in summary["per_seed"]]
    return gp.markdown_table(header, rows) + "\n\n" + gp.markdown_table(
        ["seed", "full: largest rise above its best so far", "alternate: largest rise", "seconds trained"], seeds)


def plot_sweep(summary, path):
    """The gap against the budget (a thin line per seed, the mean thick), the splits of the largest
    budget, and each seed's full and alternate curves (where the spikes show)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(16, 4.5))
    gaps, splits, curves = fig.subplots(1, 3)
    rows, by = summary["runs"], summary["by_split"]
    main = [b for b in by if 3 * b["alternate_epochs"] == 2 * b["budget"]]  # the 2N/3 + N/3 splits
    for seed in summary["seeds"]:
        mine = [r for r in rows if r["seed"] == seed and 3 * r["alternate_epochs"] == 2 * r["budget"]]
        gaps.plot([r["budget"] for r in mine], [r["gap"] for r in mine], color="grey", linewidth=0.8, marker=".")
    gaps.plot([b["budget"] for b in main], [b["gap"]["mean"] if b["gap"] else None for b in main], "k-o",
              linewidth=2, label="mean over seeds")
    gaps.axhline(0, color="grey", linewidth=0.6)
    gaps.set(xlabel="budget N (epochs)", ylabel="test bpd: alternate 2N/3 + finetune N/3 - full N",
             title="the gap, per seed and mean")
    gaps.legend()
    top = max(b["budget"] for b in by)
    last = [b for b in by if b["budget"] == top]
    for seed in summary["seeds"]:
        mine = sorted((r for r in rows if r["seed"] == seed and r["budget"] == top), key=lambda r: r["alternate_epochs"])
        splits.plot([r["alternate_epochs"] for r in mine], [r["bpd"] for r in mine], color="grey", linewidth=0.8,
                    marker=".")
    splits.plot([b["alternate_epochs"] for b in last], [b["bpd"]["mean"] if b["bpd"] else None for b in last], "k-o",
                linewidth=2)
    splits.set(xlabel=f"alternate epochs of {top} (the rest finetunes)", ylabel="test bpd", title=f"splits of {top} epochs")
    for i, s in enumerate(summary["per_seed"]):
        for name, style in (("full", "-"), ("alternate", ":")):
            c = s[f"{name}_curve"]
            curves.plot([m["epoch"] for m in c], [m["test_bpd"] for m in c], style, color=f"C{i}", linewidth=1,
                        label=f"seed {s['seed']}, {name}")
    curves.set(xlabel="epoch", ylabel="test bpd", title="full and alternate, per seed")
    curves.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")


def parse_splits(text):
    """75+15,45+45: alternate epochs + finetuning epochs."""
    return [tuple(int(v) for v in s.split("+", 1)) for s in text.split(",")]


def parse_seeds(text):
    return [int(v) for v in text.split(",")]


def parse_budgets(text):
    """30,60,90: the splits 2N/3 + N/3 of each budget N (a multiple of 3)."""
    budgets = [int(v) for v in text.split(",")]
    if any(N < 3 or N % 3 for N in budgets):
        raise argparse.ArgumentTypeError(f"budgets must be multiples of 3 (alternate 2N/3 + finetune N/3), got {text}")
    return [(2 * N // 3, N // 3) for N in budgets]


def run_sweep(argv, where):
    p = gp.make_parser("The budget sweep over seeds: full N epochs against alternate A + finetune F.")
    p.add_argument("--budgets", type=parse_budgets, default=[], help="budgets N (multiples of 3): 2N/3 + N/3 each")
    p.add_argument("--splits", type=parse_splits, default=[], help="more splits A+F, e.g. 75+15,45+45")
    p.add_argument("--seeds", type=parse_seeds, default=[0], help="seeds, each with its own weights, data order and "
                                                                 "noise (default: 0)")
    args = p.parse_args(argv)
    fixed = [name for name in ("mode", "epochs", "finetune", "seed") if hasattr(args, name)]
    if fixed or gp.torchrun_env()[2] > 1:
        raise gp.UsageError(f"{gp.flags(fixed)}: the sweep sets each run's mode and epochs, and --seeds its seeds"
                            if fixed else "the sweep times its runs in one process: run it without torchrun")
    splits, seeds, default_out = sorted(set(args.budgets + args.splits)), sorted(set(args.seeds)), not hasattr(args, "out")
    if not splits or any(A < 1 or F < 0 for A, F in splits):
        raise gp.UsageError("give --budgets and/or --splits, each with at least one alternate epoch")
    for name in ("budgets", "splits", "seeds"):
        delattr(args, name)
    cfg, _ = gp.config_from_args(args)  # every flag checked as glow_parts.py checks it
    try:
        for seed in seeds:
            replace(cfg, seed=seed)  # each seed checked like --seed
    except ValueError as e:
        raise gp.UsageError(str(e).replace("--seed", "--seeds")) from None
    cfg = replace(cfg, epochs=1, finetune=0, out=os.path.join("runs", f"{cfg.dataset}-sweep") if default_out else cfg.out)
    where["out"] = cfg.out
    plan = json.loads(json.dumps({"config": asdict(replace(cfg, seed=0))}))  # seeds, budgets and splits may grow
    with claim_sweep(cfg.out, plan):  # the same command continues a stopped sweep
        return sweep(cfg, splits, seeds)


if __name__ == "__main__":
    sys.exit(gp.command("sweep.py", run_sweep))
