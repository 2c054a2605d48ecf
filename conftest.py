"""What test_glow_parts.py and experiments/test_experiments.py share: the tiny run, the tiny model, its gradients,
the one-line error, torchrun; and the `slow` marker.

    python -m pytest -q -m "not slow" test_glow_parts.py experiments/   # the oracles: the inner loop
    python -m pytest -q -n auto test_glow_parts.py experiments/          # everything, as CI runs it
"""
import json
import os
import subprocess
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread a process: pytest -n's workers and the processes they start
import torch  # noqa: E402  (share the cores instead of fighting over them; read when torch loads)

import glow_parts as gp

ROOT = os.path.dirname(os.path.abspath(__file__))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains more than a few steps, spawns processes or runs the notebook")


def as_flags(settings):
    """The command line that gives these Config settings (a None leaves its flag out)."""
    text = lambda v: format(v, "g") if isinstance(v, float) else str(v)  # noqa: E731
    flags = []
    for name, v in settings.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(v, bool):
            flags.append(flag if v else f"--no-{flag[2:]}")
        elif v is not None:
            flags += [flag, ",".join(map(text, v)) if isinstance(v, list) else text(v)]
    return flags


TINY_SETTINGS = dict(dataset="digits", levels=2, steps=2, hidden=16, subset=512, batch_size=32, warmup=10, lr=2e-3)
TINY = as_flags(TINY_SETTINGS)  # 16 steps an epoch, a few seconds on a CPU


def quiet(*args):
    pass


def tiny_cfg(**overrides):
    return gp.Config(**{**TINY_SETTINGS, **overrides})


def tiny_train(cfg):
    return gp.train(*gp.start_run(cfg), log=quiet)


def tiny_glow(parts=None, dtype=torch.float32, part_prior="standard", seed=0):
    torch.manual_seed(seed)
    return gp.Glow(in_channels=1, image_size=8, n_levels=3, n_steps=2, hidden=8, parts=parts,
                   part_prior=part_prior).to(dtype)


def tiny_model(parts=None):
    """A tiny Glow, initialised on the batch of 8 images it returns with it."""
    model = tiny_glow(parts)
    x = torch.rand(8, 1, 8, 8) - 0.5
    model.initialize(x)
    return model, x


def loss_and_grads(model, x):
    """The end-to-end bits/dim plus part 2's truncated loss, and every gradient they give."""
    model.zero_grad(set_to_none=True)
    loss = model.bits_per_dim(model.log_prob(x)).mean() + model.part_loss(x, 1)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_seconds(curve):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in curve]


def one_error_line(capsys, prog="glow_parts.py", kind="error"):
    """What the command wrote to stderr: one line, `prog: kind: ...`, no traceback."""
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: {kind}:") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def torchrun(nproc, script, args, timeout=600, popen=False):
    """script (a path from the repository root) under torchrun, one thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script,
               *args]
    if popen:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env=env)
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
