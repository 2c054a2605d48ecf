"""
experiments/timing.py: what an epoch of each phase costs, measured quietly: one process, interleaved
(full, alternate, finetune, evaluation, full, alternate, ...), after one untimed round.

    OMP_NUM_THREADS=1 python experiments/timing.py --dataset fashion-mnist --image-size 16 --subset 8000 \
        --levels 3 --steps 4 --hidden 64 --parts 4,2,2,4 --warmup 100 --ema 0.995 --test-subset 2000 \
        --repeats 7 --out runs/fashion16-timing.json

Each phase's epoch is one epoch of the training loop (gp.train) on its own run, and its cost is the
training time that loop counts (run.seconds: the steps with their data, backward, Adam and averaging;
evaluation excluded). The evaluation's cost is one gp.evaluate_run on the test images the runs use
(with --ema: the averaged and the raw weights). Run it on a quiet machine: nothing else running.
"""
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, replace

import torch

from common import check_output, gp, lab_config, read_timing
from stats import PHASES


def timing(cfg, repeats, log=print):
    """{phase: [seconds of each timed epoch]}, the phases interleaved, after one untimed round."""
    data = gp.prepare_data(cfg)
    runs = {phase: gp.start_run(replace(cfg, mode="full" if phase == "full" else "alternate", epochs=0, finetune=0,
                                        out=None), data)[0] for phase in PHASES[:3]}
    seconds = {phase: [] for phase in PHASES}
    for r in range(repeats + 1):
        for phase, run in runs.items():
            before, n = run.seconds, run.epoch + 1
            run.cfg = replace(run.cfg, epochs=0, finetune=n) if phase == "finetune" else replace(run.cfg, epochs=n)
            gp.train(run, data, log=lambda *a: None)
            seconds[phase].append(run.seconds - before)
        t0 = time.perf_counter()
        gp.evaluate_run(runs["full"], data[1])
        seconds["evaluation"].append(time.perf_counter() - t0)
        log(f"round {r}" + " (untimed)" * (r == 0) + ": " + ", ".join(f"{p} {s[-1]:.2f} s" for p, s in seconds.items()))
    return {phase: s[1:] for phase, s in seconds.items()}


def describe(values):
    return {"median": statistics.median(values), "mean": statistics.fmean(values), "sd": statistics.stdev(values),
            "min": min(values), "max": max(values)}


def run_timing(argv, where):
    p = gp.make_parser("Quiet timing of an epoch of each phase (full, alternate, finetune) and of an evaluation.",
                       without=("mode", "epochs", "finetune", "out"))
    p.add_argument("--repeats", type=int, default=7, help="timed rounds, after one untimed (default: 7)")
    p.add_argument("--out", required=True, help="the JSON file to write")
    args = p.parse_args(argv)
    repeats, path = args.repeats, args.out
    if repeats < 2:
        raise gp.UsageError(f"--repeats: want at least 2 (a spread), got {repeats}")
    del args.out
    check_output(path, read_timing)  # before the minutes of measuring
    cfg = lab_config(args, "timing")
    where["note"] = lambda out: f"{path} was not written"
    seconds = timing(cfg, repeats)
    result = {"config": asdict(replace(cfg, out=None)), "threads": torch.get_num_threads(), "repeats": repeats,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "date": datetime.date.today().isoformat(), "epoch_seconds": seconds,
              "summary": {phase: describe(s) for phase, s in seconds.items()}}
    gp.write_atomic(path, json.dumps(result, indent=1).encode())
    for phase, d in result["summary"].items():
        print(f"{phase:10s} median {d['median']:.3f} s, sd {d['sd']:.3f} [{d['min']:.3f}, {d['max']:.3f}]")


if __name__ == "__main__":
    sys.exit(gp.command("timing.py", run_timing))
