"""
experiments/spike.py: what happens in the steps before a spike of the test bits/dim.

Trains a run exactly as glow_parts.py does (the same loop, gp.train), with a hook on each part's Adam
that records, at every step: the learning part, its loss, its gradient norm by kind of layer, the size
of its update, and Adam's second moments. After every epoch it records the state of every part's
layers: ActNorm log-scales, the coupling networks' output scales, the split priors' predicted log-std
on a fixed batch, and the 1x1 convolutions' condition numbers. It writes steps.jsonl and layers.jsonl
beside the run's own files, and prints what changed before the largest rise of the test bits/dim above
its best so far (with --ema, of the raw weights').

    python experiments/spike.py --dataset fashion-mnist --image-size 16 --subset 8000 --levels 3 --steps 4 \
        --hidden 64 --parts 4,2,2,4 --warmup 100 --ema 0.995 --mode alternate --epochs 60 --out runs/spike

--beta2 B sets Adam's second-moment decay of every part (the reference keeps torch's 0.999): a shorter
memory lets the second moment follow a runaway gradient sooner, which tests the explanation of the spike.
"""
import json
import os
import sys

import torch

from common import claim_experiment, gp, lab_config, largest_rise, plan_of, start_or_continue

KINDS = {"actnorm": "ActNorm", "invconv": "1x1 conv", "conv3": "coupling output", "coupling": "coupling net",
         "prior": "priors"}  # the first key in a parameter's name names its kind


def kind(name):
    return next(label for key, label in KINDS.items() if key in name or key == "prior")


def watch(run, steps):
    """Hooks on every part's Adam that append one record per step to `steps`."""
    def before(k):
        def hook(optimizer, args, kwargs):
            named = [(n, p) for n, p in run.model.parts[k].named_parameters() if p.grad is not None]
            norms = {}
            for n, p in named:
                norms[kind(n)] = norms.get(kind(n), 0.0) + p.grad.detach().pow(2).sum().item()
            steps.append({"step": run.steps, "epoch": run.epoch + 1, "part": k,
                          "grad_norm": {g: v ** 0.5 for g, v in norms.items()},
                          "before": [p.detach().clone() for _, p in named]})
        return hook

    def after(k):
        def hook(optimizer, args, kwargs):
            record = steps[-1]
            named = [p for p in run.model.parts[k].parameters() if p.grad is not None]
            record["update_norm"] = sum((p.detach() - b).pow(2).sum().item() for p, b in
                                        zip(named, record.pop("before"))) ** 0.5
            second = [optimizer.state[p]["exp_avg_sq"] for p in named if p in optimizer.state]
            record["adam_v_max"] = max(v.max().item() for v in second)
            record["adam_v_mean"] = sum(v.sum().item() for v in second) / sum(v.numel() for v in second)
        return hook

    for k, optimizer in enumerate(run.optimizers):
        optimizer.register_step_pre_hook(before(k))
        optimizer.register_step_post_hook(after(k))


@torch.no_grad()
def layer_state(model, x):
    """Per part: the extreme ActNorm log-scales, coupling output scales exp(3 logs), split log-std on x,
    and the largest condition number of a 1x1 convolution's weight."""
    state, h = [], x
    for part in model.parts:
        s = {"actnorm_logs": [], "coupling_scale": [], "split_logs": [], "invconv_cond": []}
        for layer in part.layers:
            if isinstance(layer, gp.FlowStep):
                s["actnorm_logs"] += [layer.actnorm.logs.min().item(), layer.actnorm.logs.max().item()]
                s["coupling_scale"].append(torch.exp(3 * layer.coupling.conv3.logs).max().item())
                sv = torch.linalg.svdvals(layer.invconv.weight())
                s["invconv_cond"].append((sv.max() / sv.min()).item())
            if isinstance(layer, gp.Split):
                logs = layer.mean_logs(h.chunk(2, dim=1)[0])[1]
                s["split_logs"] += [logs.min().item(), logs.max().item()]
                h, _, _ = layer(h)
            else:
                h, _ = layer(h)
        state.append({k: [min(v), max(v)] if k != "invconv_cond" and v else max(v, default=None)
                      for k, v in s.items()})
    return state


def grad_norm(step):
    """A step's gradient norm: of the whole part's gradient (what --clip bounds), from the norms by kind."""
    return sum(v * v for v in step["grad_norm"].values()) ** 0.5


def report(run, steps, layers, log=print):
    key = "raw_test_bpd" if run.cfg.ema else "test_bpd"
    epoch, rise = largest_rise(run.history, key)
    if epoch is None:
        return log("no rise of the test bits/dim above its best so far")
    log(f"largest rise: epoch {epoch}, {key} +{rise:.3f} above its best so far")
    for m in run.history[max(0, epoch - 4):epoch + 2]:
        log(f"  epoch {m['epoch']:3d}: {key} {m[key]:.3f}, parts " + " ".join(f"{v:.3f}" for v in m["part_losses"])
            + ", train parts " + " ".join("-" if v is None else f"{v:.3f}" for v in m["train_part_losses"] or []))
    for e in range(max(1, epoch - 3), epoch + 1):
        mine = [s for s in steps if s["epoch"] == e]
        for k in range(len(run.model.parts)):
            part = [s for s in mine if s["part"] == k]
            if part:
                worst = max(part, key=grad_norm)
                log(f"  epoch {e} part {k + 1}: max grad norm {grad_norm(worst):.3g} "
                    f"(step {worst['step']}: " + ", ".join(f"{g} {v:.3g}" for g, v in worst["grad_norm"].items())
                    + f"), max update {max(s['update_norm'] for s in part):.3g}, "
                    f"Adam v max {max(s['adam_v_max'] for s in part):.3g}")
    for e in range(max(1, epoch - 3), epoch + 1):
        log(f"  layers after epoch {e}: " + json.dumps(layers[e - 1]["parts"]))


def records(path, epoch):
    """The records of epochs 1..epoch in a jsonl file (none where it is missing): those the checkpoint holds."""
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    return [r for r in rows if r["epoch"] <= epoch]


def run_spike(argv, where):
    p = gp.make_parser("A run with every step's gradients, updates and Adam state recorded, to explain a spike.")
    p.add_argument("--beta2", type=float, default=0.999, help="Adam's second-moment decay, every part (default: "
                                                               "0.999, as in glow_parts.py)")
    args = p.parse_args(argv)
    beta2 = args.beta2
    if not 0 < beta2 < 1:
        raise gp.UsageError(f"--beta2: must be in (0, 1), got {beta2}")
    cfg = lab_config(args, "spike")
    where["out"] = cfg.out
    plan = plan_of(cfg, beta2=beta2)
    for grows in ("epochs", "finetune"):  # a continuation may train longer
        del plan["config"][grows]
    with claim_experiment(cfg.out, plan, []):  # a stopped one: the same command continues it
        run, data = start_or_continue(cfg)
        for optimizer in run.optimizers if not run.epoch else []:  # a resumed Adam keeps its own
            for group in optimizer.param_groups:
                group["betas"] = (group["betas"][0], beta2)
        probe = gp.preprocess(data[1][:256].to(cfg.device), cfg.n_bits,
                              generator=torch.Generator(device=cfg.device).manual_seed(0))
        steps, layers = (records(os.path.join(cfg.out, name), run.epoch) for name in ("steps.jsonl", "layers.jsonl"))
        watch(run, steps)

        def log(line):
            print(line)
            if len(layers) < len(run.history):  # an epoch has ended: record its layers, write both records
                layers.append({"epoch": run.epoch, "parts": layer_state(run.model, probe)})
                for name, rows in (("steps.jsonl", steps), ("layers.jsonl", layers)):
                    gp.write_atomic(os.path.join(cfg.out, name), "".join(json.dumps(r) + "\n" for r in rows).encode())
        gp.train(run, data, log)
        report(run, steps, layers)


if __name__ == "__main__":
    sys.exit(gp.command("spike.py", run_spike))
