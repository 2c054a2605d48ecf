"""
experiments/spikes.py: how often alternate training spikes late, under each condition, over seeds.

    python experiments/spikes.py --epochs 60 --out runs/spikes \
        "plain:runs/fashion16-s180/seed0/alternate,...,runs/spike-seed5" \
        "beta2 0.99:runs/spike-b2-seed0,...,runs/spike-b2-seed5"

Each argument is a condition, "label:run directory,run directory,...", the directories in seed order
(the same order in every condition, so that they pair up). A late spike (the rule of the
pre-registration of 2026-12-03): the raw weights' test bits/dim rises more than --threshold above its
best so far, after epoch --after, within the first --epochs epochs. Per run: its largest such rise and
its epoch, and the test bits/dim (averaged weights) at --epochs; per condition: the spikes counted, and
that score over seeds; between the first condition and each other one: the score's per-seed
differences. Results: out/spikes.json and a table.
"""
import argparse
import json
import os
import statistics
import sys

import stats
from common import check_output, gp, largest_rise, markdown_table, read_curve, read_json


def spikes(conditions, epochs, after, threshold, statistic="median"):
    """{label: [per run: its largest late rise, its epoch, whether it is a spike, bits/dim at `epochs`]}: rises
    of the raw weights' (with --ema) median image, or mean, on the test images every epoch evaluates."""
    result = {}
    for label, dirs in conditions:
        rows = []
        for d in dirs:
            curve = read_curve(d)[:epochs]
            if len(curve) < epochs:
                raise gp.UsageError(f"{d} has {len(curve)} epochs, fewer than --epochs {epochs}")
            name = {"median": "test_median_bpd", "mean": "test_bpd"}[statistic]
            key = "raw_" + name if "raw_test_bpd" in curve[-1] else name
            if key not in curve[-1]:
                raise gp.UsageError(f"{d}: its epochs record no {key} (runs before 2026-12-03 record the mean only: "
                                    f"--statistic mean)")
            best = min(m[key] for m in curve[:after])
            epoch, rise = largest_rise([{"epoch": 0, key: best}] + curve[after:], key)
            rows.append({"run": d, "largest_late_rise": rise, "epoch": epoch, "spike": rise > threshold,
                         "bpd_at_end": curve[-1]["test_bpd"], "largest_rise_anywhere": largest_rise(curve, key)})
        result[label] = rows
    return result


def counts_test(result):
    """Per condition after the first: Fisher's exact p of its spike count against the first's, and the power
    those seeds had against the largest effect of the kind tested (the first's rate of spikes falling to 0)."""
    (first, base), n = next(iter(result.items())), len(next(iter(result.values())))
    a = sum(r["spike"] for r in base)
    return {label: {"fisher_p": stats.fisher_p(a, sum(r["spike"] for r in runs), n),
                    "power_against_none": stats.fisher_power(n, a / n, 0.0)} for label, runs in result.items()
            if label != first}


def table(result):
    labels, tests = list(result), counts_test(result)
    rows = [[label, f"{sum(r['spike'] for r in runs)} of {len(runs)}",
             ", ".join(f"+{r['largest_late_rise']:.2f}" + (f" (ep {r['epoch']})" if r["epoch"] else "") for r in runs),
             f"{statistics.fmean(r['bpd_at_end'] for r in runs):.3f} ± "
             f"{statistics.stdev(r['bpd_at_end'] for r in runs) if len(runs) > 1 else 0:.3f}",
             "-" if label == labels[0] else " ".join(f"{b['bpd_at_end'] - a['bpd_at_end']:+.3f}" for a, b in
                                                     zip(result[labels[0]], runs)),
             "-" if label == labels[0] else f"{tests[label]['fisher_p']:.2f} ({tests[label]['power_against_none']:.2f})"]
            for label, runs in result.items()]
    return markdown_table(["condition", "late spikes", "largest late rise per seed", "bpd at the end (mean ± sd)",
                           f"per seed, minus {labels[0]}", f"Fisher's p against {labels[0]} (power against none)"],
                          rows)


def parse_condition(text):
    label, _, dirs = text.partition(":")
    if not label or not dirs:
        raise argparse.ArgumentTypeError(f"want label:dir,dir,..., got {text!r}")
    return label, dirs.split(",")


def read_spikes(path, flag="--out"):
    return read_json(path, flag, "a spikes.json (experiments/spikes.py writes one)", ("conditions", "threshold"))


def run_spikes(argv, where):
    p = gp.Parser(description="How often alternate training spikes late, per condition, over seeds.",
                  allow_abbrev=False)
    p.add_argument("conditions", nargs="+", type=parse_condition, help="label:dir,dir,... (seed order)")
    p.add_argument("--epochs", type=int, default=60, help="epochs of each run to read (default: 60)")
    p.add_argument("--after", type=int, default=20, help="a late rise comes after this epoch (default: 20)")
    p.add_argument("--threshold", type=float, default=1.0, help="a rise above this is a spike (default: 1.0)")
    p.add_argument("--statistic", choices=("median", "mean"), default="median",
                   help="the median image (robust: fixed before the runs of 2026-12-03) or the mean (default: median)")
    p.add_argument("--out", required=True, help="directory for spikes.json")
    args = p.parse_args(argv)
    if len({len(dirs) for _, dirs in args.conditions}) > 1:
        raise gp.UsageError("every condition needs the same number of runs, in the same seed order")
    if not 1 <= args.after < args.epochs or not args.threshold > 0:
        raise gp.UsageError(f"want 1 <= --after < --epochs and --threshold > 0, got --after {args.after}, "
                            f"--epochs {args.epochs}, --threshold {args.threshold}")
    path = os.path.join(args.out, "spikes.json")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise gp.UsageError(f"--out {args.out}: a file is there; give a directory")
    check_output(path if os.path.isdir(args.out) else args.out, read_spikes)
    result = spikes(args.conditions, args.epochs, args.after, args.threshold, args.statistic)
    where["note"] = lambda out: f"{path} was not written"
    os.makedirs(args.out, exist_ok=True)
    gp.write_atomic(path, json.dumps({"epochs": args.epochs, "after": args.after, "threshold": args.threshold,
                                      "statistic": args.statistic, "conditions": result,
                                      "counts_test": counts_test(result)}, indent=1).encode())
    print(table(result))


if __name__ == "__main__":
    sys.exit(gp.command("spikes.py", run_spikes))
