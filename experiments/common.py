"""
experiments/common.py: what the experiments share and the reference does not need. The runs of an
experiment (its lock over all of them, its plan, what a stopped one keeps), what a training
step holds and sends, result files, tables and the equal-time lookups.
"""
import contextlib
import glob
import json
import os
import statistics
import sys
from dataclasses import asdict, replace

import torch

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
    for all of them), and record its plan in out/plan.json. The same command continues a stopped
    experiment (a plan may add seeds, budgets or splits where its caller allows); another plan is refused.
    A run directory must hold a checkpoint, or nothing."""
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


def experiment_run(cfg, data, log=print):
    """Train the experiment's run in cfg.out (claimed by claim_experiment): from its seed's start (the same
    for every mechanism), or on from its checkpoint where the experiment was stopped (with more epochs where
    it grew; a finished one as it is)."""
    path = os.path.join(cfg.out, "checkpoint.pt")
    ckpt = gp.load_checkpoint(path) if os.path.exists(path) else None
    if ckpt:
        saved = gp.Config(**ckpt["config"])
        given = {k: v for k, v in asdict(cfg).items() if v is not None}
        done = ckpt["epoch"] >= cfg.epochs + cfg.finetune and (cfg.epochs, cfg.finetune) == (saved.epochs,
                                                                                             saved.finetune)
        cfg = replace(saved, out=cfg.out) if done else gp.resume_config(ckpt, given, log)
    run, _ = gp.start_run(cfg, data, ckpt)
    return gp.train(run, data, log)


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


def write_results(summary, out, name, plot):
    """out/name.json, and out/name.png drawn by plot(summary, file), each written atomically."""
    import io
    gp.write_atomic(os.path.join(out, f"{name}.json"), json.dumps(summary, indent=1).encode())
    buffer = io.BytesIO()
    plot(summary, buffer)
    gp.write_atomic(os.path.join(out, f"{name}.png"), buffer.getvalue())


def markdown_table(header, rows):
    lines = ["| " + " | ".join(cells) + " |" for cells in [header, *rows]]
    return "\n".join([lines[0], "|---" * len(header) + "|", *lines[1:]])


# --- what a training step holds and sends


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
