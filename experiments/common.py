"""
experiments/common.py: what the experiments share and the reference does not need: the runs of an
experiment (its lock over all of them, its plan, what a stopped one keeps; a single-run script's
continuation), the checks of every output path and input file, result files and tables.
"""
import argparse
import contextlib
import glob
import json
import os
import sys
from dataclasses import asdict, replace

import stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import glow_parts as gp  # noqa: E402

PLACE = ("out", "data_dir", "device", "compile")  # where and how a run runs, not what it computes


def lab_config(args, name, log=print):
    """Config from an experiment's parsed flags, checked as glow_parts.py checks them; --out defaults to
    runs/<dataset>-<name>."""
    if not hasattr(args, "out"):
        args.out = os.path.join("runs", f"{getattr(args, 'dataset', 'cifar10')}-{name}")
    return gp.config_from_args(args, log)[0]


def runs_note(out):
    """What a stopped experiment leaves in out, for gp.command's last line (as where["note"])."""
    runs = glob.glob(os.path.join(glob.escape(out), "**", "checkpoint.pt"), recursive=True) if out else []
    return f"the last checkpoint of each of its {len(runs)} runs under {out} is kept" if runs else \
        "no checkpoint was written"


def claim_experiment(out, plan, run_dirs):
    """Lock out and every run directory of the experiment for as long as it runs (an ExitStack: one writer
    for all of them; a single-run script gives none: out is its run), and record its plan in out/plan.json.
    The same command continues a stopped experiment (a plan may add seeds, budgets or splits where its
    caller allows); another plan is refused. A run directory must hold a checkpoint, or nothing."""
    stack = contextlib.ExitStack()
    with contextlib.ExitStack() as undo:
        undo.enter_context(stack)
        stack.enter_context(gp.claim_run_dir(out, resume=True))
        path = os.path.join(out, "plan.json")
        old = json.load(open(path)) if os.path.exists(path) else None
        held = [n for n in os.listdir(out) if n not in (".lock", "plan.json") and not n.endswith(".tmp")]
        if old is None and set(held) - {os.path.relpath(d, out).split(os.sep)[0] for d in run_dirs}:
            raise gp.UsageError(f"--out {out} holds {', '.join(sorted(held)[:3])}, which no experiment wrote; "
                                f"choose another --out")
        if old is not None and old != plan:
            flat = [{**p["config"], **{k: v for k, v in p.items() if k != "config"}} for p in (old, plan)]
            diff = sorted(k for k in {**flat[0], **flat[1]} if flat[0].get(k) != flat[1].get(k))
            raise gp.UsageError(f"--out {out} holds an experiment whose {', '.join(diff)} differ from these; "
                                f"choose another --out")
        for d in run_dirs:
            stack.enter_context(gp.claim_run_dir(d, os.path.exists(os.path.join(d, "checkpoint.pt")),
                                                 hint="move them away, or choose another --out"))
        gp.write_atomic(path, json.dumps(plan, indent=1).encode())
        undo.pop_all()
    return stack


def plan_of(cfg, **more):
    """What makes an experiment's results: its settings but where it runs, and `more`."""
    # a setting added later and left unset leaves an experiment's plan as it was
    config = {k: v for k, v in asdict(cfg).items() if k not in PLACE and v is not None}
    return json.loads(json.dumps({"config": config, **more}))


def start_or_continue(cfg, data=None, log=print):
    """(run, data): the run in cfg.out (claimed) from its seed's start (the same for every mechanism), or on
    from its checkpoint where it was stopped (with more epochs where it grew; a finished one as it is)."""
    path = os.path.join(cfg.out, "checkpoint.pt")
    ckpt = gp.load_checkpoint(path) if os.path.exists(path) else None
    if ckpt and ckpt["epoch"] > cfg.epochs + cfg.finetune:
        raise gp.UsageError(f"{cfg.out}: its run has {ckpt['epoch']} epochs, more than the {cfg.epochs + cfg.finetune} "
                            f"this experiment plans (it was continued alone): move it away, or choose another --out")
    if ckpt:
        saved = gp.Config(**ckpt["config"])
        given = {k: v for k, v in asdict(cfg).items() if v is not None}
        done = ckpt["epoch"] >= cfg.epochs + cfg.finetune and (cfg.epochs, cfg.finetune) == (saved.epochs,
                                                                                             saved.finetune)
        cfg = replace(saved, out=cfg.out) if done else gp.resume_config(ckpt, given, log)
    return gp.start_run(cfg, data, ckpt)


def experiment_run(cfg, data, log=print):
    """Train (or continue) the experiment's run in cfg.out, claimed by claim_experiment."""
    run, data = start_or_continue(cfg, data, log)
    return gp.train(run, data, log)


def check_output(path, read, flag="--out"):
    """Before any work: path can be written, and is no directory nor a file that read(path), the script's
    own reader, refuses (a script writes over no file it did not make)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise gp.UsageError(f"{flag} {path}: " + ("is a directory" if os.path.isdir(path) else
                                                  f"no directory {folder} to write it in"))
    if os.path.exists(path):
        try:
            read(path, flag)
        except gp.UsageError:
            raise gp.UsageError(f"{flag} {path}: a file this script did not write is there; choose another "
                                f"{flag}") from None


def read_json(path, flag, what, keys):
    """A lab file checked before use: JSON holding `keys`; else a UsageError naming the file and the script
    that writes it."""
    try:
        data = json.load(open(path))
        if isinstance(data, dict) and all(k in data for k in keys):
            return data
    except OSError as e:
        raise gp.UsageError(f"{flag} {path}: cannot read it ({e.strerror})") from None
    except ValueError:
        pass
    raise gp.UsageError(f"{flag} {path}: not {what}")


def read_timing(path, flag="--timing"):
    """A timing file (experiments/timing.py's JSON), checked: every phase timed at least twice, in seconds."""
    what = "a timing file (experiments/timing.py writes one)"
    t = read_json(path, flag, what, ("epoch_seconds", "summary", "date", "machine", "threads"))
    try:
        ok = all(len(t["epoch_seconds"][p]) >= 2 and min(t["epoch_seconds"][p]) > 0 and t["summary"][p]["median"] > 0
                 for p in stats.PHASES)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise gp.UsageError(f"{flag} {path}: not {what}")
    return t


def largest_rise(curve, key):
    """(epoch, rise) of the largest rise of curve[key] above its best so far: how far a spike set a run back."""
    best, top = float("inf"), (None, 0.0)
    for m in curve:
        if m[key] - best > top[1]:
            top = (m["epoch"], m[key] - best)
        best = min(best, m[key])
    return top


def read_curve(out):
    path = os.path.join(out, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def load_model(out):
    """The model of the run in directory out, as its last checkpoint has it (with --ema, the average)."""
    ckpt = gp.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    model = gp.build_model(replace(gp.Config(**ckpt["config"]), compile=False, device="cpu"))
    model.load_state_dict(ckpt["ema"] or ckpt["model"])
    return model


def write_results(summary, out, name, plot):
    """out/name.json, and out/name.png drawn by plot(summary, file), each written atomically."""
    import io
    gp.write_atomic(os.path.join(out, f"{name}.json"), json.dumps(summary, indent=1).encode())
    buffer = io.BytesIO()
    plot(summary, buffer)
    gp.write_atomic(os.path.join(out, f"{name}.png"), buffer.getvalue())


def no_torchrun(what):
    """Refuse to run under torchrun: the experiment times or trains `what` in one process."""
    if gp.torchrun_env()[2] > 1:
        raise gp.UsageError(f"{what} in one process: run it without torchrun")


def parse_modes(text):
    """full,alternate[,...]: mechanisms of glow_parts.MODES, each once."""
    modes = text.split(",")
    if any(m not in gp.MODES for m in modes) or len(set(modes)) < len(modes):
        raise argparse.ArgumentTypeError(f"want some of {', '.join(gp.MODES)}, each once; got {text!r}")
    return modes


def markdown_table(header, rows):
    lines = ["| " + " | ".join(cells) + " |" for cells in [header, *rows]]
    return "\n".join([lines[0], "|---" * len(header) + "|", *lines[1:]])
