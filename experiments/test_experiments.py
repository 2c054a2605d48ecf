"""Tests of the experiments: the sweep over seeds, the benchmark, the pipeline of parts.

Run from the repository root: python -m pytest -q test_glow_parts.py experiments/
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import benchmark  # noqa: E402
import glow_parts as gp  # noqa: E402
import pipeline  # noqa: E402
import spike  # noqa: E402
import sweep  # noqa: E402

TINY = ["--dataset", "digits", "--levels", "2", "--steps", "2", "--hidden", "16", "--subset", "512",
        "--batch-size", "32", "--warmup", "10", "--lr", "2e-3"]


def without_seconds(curve):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in curve]


@pytest.mark.parametrize("ema", [[], ["--ema", "0.9"], ["--ema", "0.9", "--test-subset", "100"]],
                         ids=["raw", "ema", "test-subset"])
def test_sweep_branches_equal_separate_runs_for_every_seed(ema, tmp_path):
    flags, whole = TINY + ema, gp.prepare_data(gp.Config(dataset="digits"))[1]
    assert gp.command("sweep.py", sweep.run_sweep, flags + ["--budgets", "3,6", "--splits", "3+3", "--seeds", "0,1",
                                                           "--out", str(tmp_path / "sweep")]) == 0
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 10_000
    assert sorted((r["seed"], r["alternate_epochs"], r["finetune_epochs"]) for r in summary["runs"]) == \
        [(s, A, F) for s in (0, 1) for A, F in ((2, 1), (3, 3), (4, 2))]
    for seed in (0, 1):  # each branch is the separate run alternate A + finetune F; full's prefix is full N
        seed_flags = flags + ["--seed", str(seed)]
        assert gp.main(seed_flags + ["--mode", "alternate", "--epochs", "3", "--finetune", "3",
                                     "--out", str(tmp_path / f"alone{seed}")]) == 0
        assert gp.main(seed_flags + ["--mode", "full", "--epochs", "6", "--out", str(tmp_path / f"full{seed}")]) == 0
        r = next(r for r in summary["runs"] if r["seed"] == seed and r["alternate_epochs"] == 3)
        alone, full = sweep.read_curve(tmp_path / f"alone{seed}"), sweep.read_curve(tmp_path / f"full{seed}")
        if "--test-subset" not in flags:  # the median image's gap, which a few images cannot move
            assert r["gap_median_image"] == alone[-1]["test_median_bpd"] - full[-1]["test_median_bpd"]
        ends = [alone[-1]["test_bpd"], full[-1]["test_bpd"]]
        if "--test-subset" in flags:  # the curves evaluate the first 100 test images, the ends all 297
            for i, (curve, name) in enumerate(((alone, f"alone{seed}"), (full, f"full{seed}"))):
                model = gp.load_model(tmp_path / name)
                assert curve[-1]["test_bpd"] == gp.evaluate(model, whole[:100], 32, torch.device("cpu"))["test_bpd"]
                ends[i] = gp.evaluate(model, whole, 32, torch.device("cpu"))["test_bpd"]
        assert [r["bpd"], r["full_bpd"]] == ends
        assert without_seconds(r["finetune_curve"]) == without_seconds(alone[3:])
        assert r["gap"] == r["bpd"] - r["full_bpd"]
        assert (r["gap_raw_weights"] is None) == (not ema)
    runs = summary["runs"]
    six = next(b for b in summary["by_split"] if (b["alternate_epochs"], b["finetune_epochs"]) == (4, 2))
    gaps = [r["gap"] for r in runs if r["alternate_epochs"] == 4]
    assert six["gap"]["mean"] == pytest.approx(sum(gaps) / 2) and six["gap"]["n"] == 2
    assert six["gap"]["min"] == min(gaps) and six["gap"]["max"] == max(gaps)
    assert "flips" in sweep.sweep_table(summary) or len({g > 0 for g in gaps}) == 1


def test_a_sweep_killed_at_any_point_continues_with_the_same_command_and_loses_nothing(tmp_path):
    args = TINY + ["--budgets", "3,6", "--seeds", "0,1", "--test-subset", "100"]
    assert gp.command("sweep.py", sweep.run_sweep, args + ["--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "killed"
    for n_checkpoints in (1, 4):  # killed twice, at different points; the third command finishes
        proc = subprocess.Popen([sys.executable, "experiments/sweep.py", *args, "--out", str(out)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while len(list(out.glob("seed*/*/metrics.jsonl"))) < n_checkpoints and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    assert gp.command("sweep.py", sweep.run_sweep, args + ["--out", str(out)]) == 0
    straight, resumed = (json.loads((d / "sweep.json").read_text())["runs"] for d in (tmp_path / "straight", out))
    assert [without_seconds(r["finetune_curve"]) for r in resumed] == \
        [without_seconds(r["finetune_curve"]) for r in straight]
    assert [r["full_bpd"] for r in resumed] == [r["full_bpd"] for r in straight]


def test_a_sweep_refuses_another_plan_a_plain_run_inside_it_and_bad_budgets(tmp_path, capsys):
    out = str(tmp_path / "sweep")
    assert gp.command("sweep.py", sweep.run_sweep, TINY + ["--budgets", "3", "--out", out]) == 0
    capsys.readouterr()
    for argv, match in ((TINY + ["--budgets", "3", "--hidden", "8", "--out", out], "whose hidden differ"),
                        (TINY + ["--budgets", "4", "--out", out], "multiples of 3"),
                        (TINY + ["--out", out], "give --budgets"),
                        (TINY + ["--budgets", "3", "--seeds", "-1", "--out", out], "--seed")):
        assert gp.command("sweep.py", sweep.run_sweep, argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("sweep.py: error:") and match in err and err.count("\n") == 1, err
    assert gp.main(TINY + ["--epochs", "1", "--resume", "--out", f"{out}/seed0/full"]) == 2
    assert "belongs to the comparison or sweep" in capsys.readouterr().err


def test_benchmark_reports_every_mechanism_with_the_cost_model_without_data(capsys):
    shape = ["--dataset", "digits", "--levels", "2", "--steps", "2", "--hidden", "16", "--batch-size", "32"]
    assert gp.command("benchmark.py", benchmark.run_benchmark, shape + ["--modes", "full,alternate,parallel",
                                                                        "--repeats", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert gp.command("benchmark.py", benchmark.run_benchmark, TINY) == 2  # training flags shape no step: refused
    assert [line.split("|")[1].strip() for line in rows[1:]] == ["full", "alternate", "parallel"]
    result = {r["mode"]: r for r in benchmark.benchmark(gp.Config(**{
        "dataset": "digits", "levels": 2, "steps": 2, "hidden": 16, "batch_size": 32}),
        ["full", "alternate"], repeats=1, log=lambda *a: None)}
    assert result["alternate"]["activation_bytes"] < result["full"]["activation_bytes"]
    assert len(result["alternate"]["part_step_seconds"]) == 2 and result["alternate"]["step_seconds"] > 0
    assert result["alternate"]["boundary_backward_bytes"] == 0 < result["full"]["boundary_backward_bytes"]
    # the cost model: part k's step costs (earlier parts' share + 3 x its own) / 3 of a full step
    cfg = gp.Config(dataset="digits", levels=2, steps=2, hidden=16)
    macs = gp.step_macs(1, 8, 2, 2, 16)
    f0 = sum(macs[:2]) / sum(macs)
    assert benchmark.predicted_step(cfg, [0]) == pytest.approx(f0)
    assert benchmark.predicted_step(cfg, [1]) == pytest.approx((f0 + 3 * (1 - f0)) / 3)
    assert benchmark.predicted_step(cfg, [0, 1]) == pytest.approx(1.0)


def test_recompute_gives_the_plain_gradients_and_saves_far_fewer_activations():
    torch.manual_seed(0)
    model = gp.Glow(in_channels=1, image_size=8, n_levels=3, n_steps=2, hidden=8, parts=[3, 1, 2])
    x = torch.rand(8, 1, 8, 8) - 0.5
    model.initialize(x)

    def grads(m):
        m.zero_grad(set_to_none=True)
        loss = m.bits_per_dim(m.log_prob(x)).mean() + m.part_loss(x, 1)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]
    plain_loss, plain = grads(model)
    plain_bytes = gp.measure_step(model, x, "full", [0, 1, 2])[0]
    recomputed = benchmark.recompute(model)
    loss, again = grads(recomputed)
    assert torch.equal(loss, plain_loss) and len(again) == len(plain)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(again, plain))
    inputs = {}  # what recomputation must still keep: every flow step's input (its storage)

    def note(module, args):
        inputs[args[0].untyped_storage().data_ptr()] = args[0].untyped_storage().nbytes()
    for m in recomputed.modules():
        if isinstance(m, gp.FlowStep):
            m.register_forward_pre_hook(note)
    kept = gp.measure_step(recomputed, x, "full", [0, 1, 2])[0]
    assert sum(inputs.values()) <= kept < plain_bytes / 2
    with torch.no_grad():
        zs, _, _ = recomputed(x)
        assert (recomputed.reverse(zs) - x).abs().max() < 1e-4


def torchrun(nproc, script, args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           script, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def test_pipeline_on_two_processes_sends_nothing_back_and_its_checkpoint_reloads_in_one_process(tmp_path):
    out = tmp_path / "pipe"
    proc = torchrun(2, "experiments/pipeline.py", TINY + ["--epochs", "2", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # counted at every send: per step, part 1's output h_1 (2 x 4 x 4 after the first split) and the
    # constant terms, float32, for 32 images, 16 steps an epoch; and nothing towards earlier parts
    per_epoch = f"{16 * 32 * (2 * 4 * 4 + 1) * 4:,}"
    assert f"pipeline: {per_epoch} bytes sent forward between parts this epoch, 0 backward; " \
           f"received {per_epoch} from earlier parts, 0 from later ones" in proc.stdout
    m = sweep.read_curve(out)
    assert [e["epoch"] for e in m] == [1, 2] and m[1]["test_bpd"] < m[0]["test_bpd"]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    cfg = gp.Config(**ckpt["config"])
    model = gp.build_model(cfg)
    model.load_state_dict(ckpt["model"])
    _, test = gp.prepare_data(cfg)
    e = gp.evaluate(model, test, cfg.batch_size, torch.device("cpu"))
    assert abs(e["test_bpd"] - m[-1]["test_bpd"]) < 1e-5 and abs(e["part_losses"][0] - m[-1]["part_losses"][0]) < 1e-5
    # one process continues the pipeline's run from its checkpoint, Adam state included
    assert gp.main(TINY + ["--mode", "parallel", "--epochs", "3", "--out", str(out), "--resume"]) == 0
    # the same math in one process gives the same numbers, up to float rounding (1 vs 2 threads, memory
    # layouts) that Adam amplifies on near-zero gradients: about 1e-3 bits/dim after 32 steps
    run, data = gp.start_run(replace_out(cfg, epochs=2))
    single = gp.train(run, data, log=lambda *a: None).history
    assert abs(single[-1]["test_bpd"] - m[1]["test_bpd"]) < 5e-3


def replace_out(cfg, **changes):
    from dataclasses import replace
    return replace(cfg, out=None, **changes)


@pytest.mark.parametrize("args,match", [
    (["--parts", "1,1,2"], "3 parts but 2 processes; use --nproc_per_node 3"),
    (["--finetune", "1"], "--finetune"), (["--ema", "0.9"], "--ema")])
def test_the_pipeline_refuses_what_it_cannot_do_with_one_line(args, match, tmp_path, capsys, monkeypatch):
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    assert gp.command("pipeline.py", pipeline.run_pipeline, TINY + ["--epochs", "1", "--out", str(tmp_path)] + args) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and err.startswith("pipeline.py: error:"), err


def child_of(pid, parent):
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) == parent
    except (OSError, ValueError, IndexError):
        return False


def test_a_dead_process_under_torchrun_leaves_one_line_from_the_survivor_naming_the_kept_checkpoint(tmp_path):
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "glow_parts.py", *TINY, "--epochs", "50", "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (out / "metrics.jsonl").exists() and proc.poll() is None:
        time.sleep(0.05)
    workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and child_of(int(p), proc.pid)]
    rank1 = [p for p in workers if b"\0RANK=1\0" in b"\0" + open(f"/proc/{p}/environ", "rb").read()]
    os.kill(rank1[0], signal.SIGKILL)
    err = proc.communicate(timeout=120)[1]
    ours = [line for line in err.splitlines() if line.startswith("glow_parts.py:")]
    assert proc.returncode != 0 and len(ours) == 1 and "is kept" in ours[0], err[-3000:]
    assert "glow_parts.py\", line" not in err, err[-3000:]


def test_spike_records_every_step_of_the_schedule_and_finds_the_largest_rise(tmp_path, capsys):
    out = tmp_path / "spike"
    assert gp.command("spike.py", spike.run_spike, TINY + ["--mode", "alternate", "--epochs", "2", "--out", str(out)]) == 0
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["part"] for s in steps] == [i % 2 for i in range(2 * 16)]  # alternate: parts 1, 2, 1, 2, ...
    assert all(s["update_norm"] > 0 and s["adam_v_max"] > 0 and s["grad_norm"]["ActNorm"] > 0 for s in steps)
    assert len((out / "layers.jsonl").read_text().splitlines()) == 2 and sweep.read_curve(out)[-1]["epoch"] == 2
    curve = [{"epoch": e, "bpd": b} for e, b in enumerate([5.0, 4.0, 4.5, 3.0, 3.9, 3.2], 1)]
    assert spike.largest_rise(curve, "bpd") == (5, pytest.approx(0.9))  # 3.9 above the best so far, 3.0
