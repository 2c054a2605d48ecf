"""Tests of the experiments: the comparison, the sweep over seeds, the benchmark, the pipeline of parts,
the spike recorder, quiet timing, and the statistics.

Run from the repository root: python -m pytest -q -n auto test_glow_parts.py experiments/ (-m "not slow": without what
trains, spawns processes or runs the notebook). The helpers they share with test_glow_parts.py are in conftest.py.
"""
import hashlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
import benchmark  # noqa: E402
import common  # noqa: E402
import compare  # noqa: E402
import pipeline  # noqa: E402
import spike  # noqa: E402
import spikes  # noqa: E402
import stats  # noqa: E402
import sweep  # noqa: E402
import timing  # noqa: E402
from common import gp  # noqa: E402
from conftest import ROOT, TINY, loss_and_grads, one_error_line, tiny_model, torchrun, without_seconds  # noqa: E402


# --- the comparison


def weights_hash(model):
    """A short hash of every parameter and buffer: equal hashes mean identical weights."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode() + value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.slow
def test_compare_starts_every_run_from_the_same_weights_and_reports_every_field(tmp_path, monkeypatch):
    starts, real = {}, gp.train  # each mode's weights as its run starts training
    monkeypatch.setattr(gp, "train", lambda run, *a, **k: starts.setdefault(run.cfg.mode, weights_hash(run.model))
                        and real(run, *a, **k))
    out = tmp_path / "cmp"
    assert gp.command("compare.py", compare.run_compare, TINY + ["--modes", "full,alternate,sequential", "--epochs",
                                                                 "2", "--finetune", "1", "--out", str(out)]) == 0
    assert set(starts) == {"full", "alternate", "sequential"} and len(set(starts.values())) == 1
    summary = json.loads((out / "compare.json").read_text())
    assert (out / "compare.png").stat().st_size > 10_000
    runs = {r["mode"]: r for r in summary["runs"]}
    assert set(runs) == {"full", "alternate", "sequential"}
    for r in runs.values():
        assert len(r["curve"]) == 3 and r["step_seconds"] > 0
        assert r["curve"] == sweep.read_curve(out / r["mode"])  # each run is an ordinary run directory
    assert [m["phase"] for m in runs["alternate"]["curve"]] == ["alternate", "alternate", "finetune"]
    assert [m["phase"] for m in runs["full"]["curve"]] == ["full"] * 3
    assert runs["alternate"]["activation_bytes"] < runs["full"]["activation_bytes"]
    assert runs["alternate"]["boundary_backward_bytes"] == 0 == runs["sequential"]["boundary_backward_bytes"]
    # full: the gradient of the one boundary activation, (32, 2, 4, 4) float32 after level 1
    assert runs["full"]["boundary_backward_bytes"] == 32 * 2 * 4 * 4 * 4


def test_the_targets_and_equal_time_lookups_give_the_known_answers_of_given_curves():
    curve = [{"test_bpd": b, "seconds": s, "test_outlier_share": f} for b, s, f in
             ((5.0, 1.0, 0.0), (4.0, 2.0, 0.0), (900.0, 3.0, 800.0), (3.9, 4.0, 0.0))]
    assert compare.smoothed_final(curve, None)[0] is None  # a few images make the third evaluation: no target
    assert compare.smoothed_final(curve[:2], None)[0] == 4.5 and compare.smoothed_final(curve, 0.9)[0] == 3.9
    assert compare.time_to(curve, 4.5) == 2.0 and compare.time_to(curve, 3.95) == 4.0
    assert compare.time_to(curve, 3.0) is None and compare.time_to(curve, None) is None
    assert compare.at_time(curve, 3.5)["seconds"] == 3.0 and compare.at_time(curve, 0.5) is None
    assert compare.at_time(curve, 4.0)["test_bpd"] == 3.9  # at the same time: its last evaluation by then


@pytest.mark.slow
def test_a_comparison_holds_every_run_it_writes_and_the_same_command_continues_it_after_kill_9(tmp_path, capsys):
    args = TINY + ["--modes", "full,alternate", "--epochs", "3", "--finetune", "1"]
    assert gp.command("compare.py", compare.run_compare, args + ["--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "experiments/compare.py", *args, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (out / "full" / "metrics.jsonl").exists() and proc.poll() is None:
        time.sleep(0.02)
    assert gp.main(TINY + ["--epochs", "1", "--out", str(out / "alternate")]) == 2  # its lock covers its runs
    assert f"--out {out / 'alternate'}" in one_error_line(capsys)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert gp.command("compare.py", compare.run_compare, args + ["--out", str(out)]) == 0
    straight, resumed = (json.loads((d / "compare.json").read_text())["runs"] for d in (tmp_path / "straight", out))
    assert [without_seconds(r["curve"]) for r in resumed] == [without_seconds(r["curve"]) for r in straight]
    assert gp.command("compare.py", compare.run_compare, args + ["--hidden", "8", "--out", str(out)]) == 2
    err = one_error_line(capsys, "compare.py")
    assert str(out) in err and "hidden" in err.replace(str(out), ""), err  # the directory, and the setting


@pytest.mark.parametrize("args,named", [
    (["--modes", "alternate,sequential"], "--modes"), (["--modes", "full,alternate,full"], "--modes"),
    (["--epochs", "0", "--finetune", "1"], "--epochs"), (["--mode", "full"], "--mode")])
def test_the_comparison_refuses_what_it_cannot_do_with_one_line(args, named, tmp_path, capsys):
    assert gp.command("compare.py", compare.run_compare, TINY + args + ["--out", str(tmp_path / "c")]) == 2
    assert named in one_error_line(capsys, "compare.py")


def test_measure_step_counts_boundary_bytes_at_a_mid_level_cut():
    model, x = tiny_model([3, 1, 2])
    act, crossing, _ = benchmark.measure_step(model, x, "full", [0, 1, 2])
    # boundaries: after part 0 (mid level 1: 8 channels at 2x2), after part 1 (split: 4 channels at 2x2)
    assert crossing == 8 * (8 * 2 * 2 + 4 * 2 * 2) * 4
    assert all(benchmark.measure_step(model, x, "alternate", [k])[1] == 0 for k in range(3))
    assert all(benchmark.measure_step(model, x, "alternate", [k])[0] < act for k in range(3))
    assert benchmark.measure_step(model, x, "parallel", [0, 1, 2])[1] == 0


# --- the sweep over seeds


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--ema", "0.9", "--test-subset", "100"]], ids=["raw", "ema-test-subset-timing"])
def test_sweep_branches_equal_separate_runs_for_every_seed_and_its_statistics_reload_from_its_files(
        extra, tmp_path, capsys):
    flags, whole, timed = TINY + extra, gp.prepare_data(gp.Config(dataset="digits"))[1], []
    if extra:  # with the phases' costs: the equal-time statistics too
        costs = tmp_path / "timing.json"
        assert gp.command("timing.py", timing.run_timing, TINY + ["--repeats", "2", "--out", str(costs)]) == 0
        timed = ["--timing", str(costs)]
    assert gp.command("sweep.py", sweep.run_sweep, flags + ["--budgets", "3,6", "--splits", "3+3", "--seeds", "0,1",
                                                           "--out", str(tmp_path / "sweep")] + timed) == 0
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    arrays = dict(np.load(tmp_path / "sweep" / "sweep-scores.npz"))
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 10_000
    assert [(b["alternate_epochs"], b["finetune_epochs"]) for b in summary["by_split"]] == [(2, 1), (3, 3), (4, 2)]
    for i, seed in enumerate((0, 1)):  # each branch is the run alternate A + finetune F; full's prefix is full N
        seed_flags = flags + ["--seed", str(seed)]
        assert gp.main(seed_flags + ["--mode", "alternate", "--epochs", "3", "--finetune", "3",
                                     "--out", str(tmp_path / f"alone{seed}")]) == 0
        assert gp.main(seed_flags + ["--mode", "full", "--epochs", "6", "--out", str(tmp_path / f"full{seed}")]) == 0
        split = summary["per_seed"][i]["splits"]["3+3"]
        alone = sweep.read_curve(tmp_path / f"alone{seed}")
        assert without_seconds(split["curve"][3:]) == without_seconds(alone[3:])
        for name, key, end in ((f"alone{seed}", f"seed{seed}/3+3", split["end"]),
                               (f"full{seed}", f"seed{seed}/full6", split["full_end"])):
            test = gp.evaluate(common.load_model(tmp_path / name), whole, 32, torch.device("cpu"))
            assert end["test_bpd"] == test["test_bpd"] and np.array_equal(arrays[key], test["per_image"].numpy())
        if "--test-subset" in flags:  # the curves evaluate the first 100 test images, the ends all 297
            model = common.load_model(tmp_path / f"alone{seed}")
            assert alone[-1]["test_bpd"] == gp.evaluate(model, whole[:100], 32, torch.device("cpu"))["test_bpd"]
            assert arrays[f"seed{seed}/3+3"].shape == (297,)
    six = next(b for b in summary["by_split"] if (b["alternate_epochs"], b["finetune_epochs"]) == (4, 2))
    gaps = [float((arrays[f"seed{s}/4+2"].astype(np.float64) - arrays[f"seed{s}/full6"]).mean()) for s in (0, 1)]
    assert six["gap_mean_per_seed"] == pytest.approx(gaps) and six["gap_mean"] == pytest.approx(sum(gaps) / 2)
    assert (six["gap_raw_weights"] is None) == (not extra)
    if not extra:
        return
    # every statistic, recomputed from the result files alone
    days, prefix = [json.loads(costs.read_text())], str(tmp_path / "sweep" / "sweep")
    again = sweep.rescore([prefix], days, summary["margin"])
    assert json.loads(json.dumps(again["by_split"])) == summary["by_split"]
    for seed in (1, 0):  # the same sweep as two batches of one seed each, merged
        one = {**json.load(open(prefix + ".json")), "seeds": [seed]}
        one["per_seed"] = [d for d in one["per_seed"] if d["seed"] == seed]
        (tmp_path / f"seed{seed}.json").write_text(json.dumps(one))
        np.savez(tmp_path / f"seed{seed}-scores.npz", **{k: v for k, v in arrays.items() if k.startswith(f"seed{seed}/")})
    batches = [str(tmp_path / "seed1"), str(tmp_path / "seed0")]
    assert json.loads(json.dumps(sweep.rescore(batches, days, summary["margin"])["by_split"])) == summary["by_split"]
    with pytest.raises(gp.UsageError, match="seed1"):  # a seed twice
        sweep.rescore([prefix, batches[0]], days, summary["margin"])
    b = summary["by_split"][0]
    assert {"gap_robust", "test", "gap_mean", "gap_mean_ci", "time", "equal_time", "outlier_share"} <= set(b)
    assert b["test"]["ci95"][0] <= b["gap_robust"] <= b["test"]["ci95"][1]
    first = arrays[f"seed0/{b['alternate_epochs']}+{b['finetune_epochs']}"] - arrays["seed0/full3"]
    assert b["gap_robust_per_seed"][0] == pytest.approx(float(stats.trimmed_mean(first.astype(float))))
    E = b["equal_time"][0]["epoch"]  # full training was evaluated on the whole split at its equal-time epoch
    assert b["equal_time"][0]["images"] == "whole test split" and f"seed1/full{E}" in arrays
    capsys.readouterr()
    figure, foreign = tmp_path / "verdicts.png", tmp_path / "foreign.png"
    foreign.write_bytes(b"\x89PNG not ours")
    results = ["--results", str(tmp_path / "sweep" / "sweep"), "--timing", str(costs)]
    for _ in range(2):  # drawn, then drawn again over its own figure
        assert gp.command("sweep.py", sweep.run_sweep, results + ["--figure", str(figure)]) == 0
        assert f"| {b['gap_robust']:+.3f} |" in capsys.readouterr().out
        assert figure.read_bytes().startswith(b"\x89PNG") and sweep.FIGURE_TAG.encode() in figure.read_bytes()
    assert gp.command("sweep.py", sweep.run_sweep, results + ["--figure", str(foreign)]) == 2  # not its file
    assert foreign.read_bytes() == b"\x89PNG not ours" and "--figure" in capsys.readouterr().err
    assert gp.command("sweep.py", sweep.run_sweep, ["--splits", "1+1", "--figure", str(figure)]) == 2  # no results


@pytest.mark.slow
def test_a_sweep_killed_at_any_point_continues_with_the_same_command_and_loses_nothing(tmp_path):
    args = TINY + ["--budgets", "3,6", "--seeds", "0,1", "--test-subset", "100"]
    assert gp.command("sweep.py", sweep.run_sweep, args + ["--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "killed"
    for n_checkpoints, how in ((1, signal.SIGKILL), (4, signal.SIGTERM)):  # stopped twice; the third command finishes
        proc = subprocess.Popen([sys.executable, "experiments/sweep.py", *args, "--jobs", "2", "--out", str(out)],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while len(list(out.glob("seed*/*/metrics.jsonl"))) < n_checkpoints and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(how)
        assert proc.wait() == (-signal.SIGKILL if how == signal.SIGKILL else 143)
    err = proc.stderr.read()  # one line (its seeds' processes add none), naming the signal and where runs are kept
    assert err.startswith("sweep.py: interrupted (SIGTERM)") and err.count("\n") == 1 and str(out) in err, err
    for leftover in ("plan.json.tmp", "seed1/alternate4+finetune2/checkpoint.pt.tmp"):  # killed amid a copy or a plan
        (out / leftover).parent.mkdir(parents=True, exist_ok=True)
        (out / leftover).write_text("half")
    os.chdir(tmp_path)  # the same sweep, its --out now relative: the same sweep
    assert gp.command("sweep.py", sweep.run_sweep, args + ["--out", "killed"]) == 0
    straight, resumed = (json.loads((d / "sweep.json").read_text()) for d in (tmp_path / "straight", out))
    for a, b in zip(straight["per_seed"], resumed["per_seed"]):
        assert without_seconds(a["full_curve"]) == without_seconds(b["full_curve"])
        assert {k: without_seconds(v["curve"]) for k, v in a["splits"].items()} == \
            {k: without_seconds(v["curve"]) for k, v in b["splits"].items()}
    assert [b["gap_robust"] for b in straight["by_split"]] == [b["gap_robust"] for b in resumed["by_split"]]


@pytest.mark.slow
def test_a_sweep_refuses_another_plan_a_plain_run_inside_it_and_bad_splits(tmp_path, capsys):
    out = str(tmp_path / "sweep")
    assert gp.command("sweep.py", sweep.run_sweep, TINY + ["--budgets", "3", "--out", out]) == 0
    capsys.readouterr()
    for flags, named in (("--budgets 3 --hidden 8", out), ("--budgets 4", "--budgets"), ("--splits 2", "--splits"),
                         ("--splits 0+3", "--splits"), ("", "--budgets"), ("--budgets 3 --seeds -1", "--seeds"),
                         ("--budgets 3,6 --decay 6", "--decay"), ("--budgets 3 --epochs 3", "--epochs")):
        assert gp.command("sweep.py", sweep.run_sweep, TINY + flags.split() + ["--out", out]) == 2, flags
        assert named in one_error_line(capsys, "sweep.py"), flags
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("x")
    assert gp.command("sweep.py", sweep.run_sweep, TINY + ["--budgets", "3", "--out", str(tmp_path / "other")]) == 2
    err = one_error_line(capsys, "sweep.py")
    assert "mine.txt" in err and str(tmp_path / "other") in err, err


# --- the benchmark and its cost model


def test_benchmark_reports_every_mechanism_with_the_cost_model_without_data(capsys):
    shape = ["--dataset", "digits", "--levels", "2", "--steps", "2", "--hidden", "16", "--batch-size", "32"]
    assert gp.command("benchmark.py", benchmark.run_benchmark, shape + ["--modes", "full,alternate,parallel",
                                                                        "--repeats", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in rows[1:]] == ["full", "alternate", "parallel"]
    assert gp.command("benchmark.py", benchmark.run_benchmark, TINY) == 2  # training flags shape no step: unknown
    result = {r["mode"]: r for r in benchmark.benchmark(gp.Config(**{
        "dataset": "digits", "levels": 2, "steps": 2, "hidden": 16, "batch_size": 32}),
        ["full", "alternate"], repeats=1, log=lambda *a: None)}
    assert result["alternate"]["activation_bytes"] < result["full"]["activation_bytes"]
    assert len(result["alternate"]["part_step_seconds"]) == 2 and result["alternate"]["step_seconds"] > 0
    assert result["alternate"]["boundary_backward_bytes"] == 0 < result["full"]["boundary_backward_bytes"]
    # the cost model: part k's step costs (earlier parts' share + 3 x its own) / 3 of a full step
    cfg = gp.Config(dataset="digits", levels=2, steps=2, hidden=16)
    macs = benchmark.step_macs(1, 8, 2, 2, 16)
    f0 = sum(macs[:2]) / sum(macs)
    assert benchmark.predicted_step(cfg, [0]) == pytest.approx(f0)
    assert benchmark.predicted_step(cfg, [1]) == pytest.approx((f0 + 3 * (1 - f0)) / 3)
    assert benchmark.predicted_step(cfg, [0, 1]) == pytest.approx(1.0)


def test_balanced_parts_are_the_exact_cheapest_cut_and_the_benchmark_prints_it(capsys):
    macs = benchmark.step_macs(3, 32, 3, 32, 512)
    for P in (1, 2, 3, 4, 7):
        parts = benchmark.balanced_parts(P, macs)
        assert len(parts) == P and all(p > 0 for p in parts) and sum(parts) == 96
    cost = lambda parts: max(sum(macs[sum(parts[:k]):sum(parts[:k + 1])]) for k in range(len(parts)))  # noqa: E731
    assert cost(benchmark.balanced_parts(3, macs)) < 0.6 * cost([32, 32, 32])
    # exact: no other cut into 3 parts has a cheaper largest part (brute force over all cuts)
    best = min(cost([a, b, 96 - a - b]) for a in range(1, 95) for b in range(1, 96 - a))
    assert cost(benchmark.balanced_parts(3, macs)) == best
    assert benchmark.balanced_parts(4, macs) == [11, 11, 15, 59]
    shape = ["--dataset", "digits", "--levels", "2", "--steps", "2", "--hidden", "16", "--batch-size", "32"]
    assert gp.command("benchmark.py", benchmark.run_benchmark, shape + ["--balanced", "3", "--repeats", "1"]) == 0
    assert "--balanced 3: --parts 1,1,2" in capsys.readouterr().out
    assert gp.command("benchmark.py", benchmark.run_benchmark, shape + ["--balanced", "5"]) == 2


def test_recompute_gives_the_plain_gradients_and_saves_far_fewer_activations():
    model, x = tiny_model([3, 1, 2])
    plain_loss, plain = loss_and_grads(model, x)
    plain_bytes = benchmark.measure_step(model, x, "full", [0, 1, 2])[0]
    recomputed = benchmark.recompute(model)
    loss, again = loss_and_grads(recomputed, x)
    assert torch.equal(loss, plain_loss) and len(again) == len(plain)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(again, plain))
    inputs = {}  # what recomputation must still keep: every flow step's input (its storage)

    def note(module, args):
        inputs[args[0].untyped_storage().data_ptr()] = args[0].untyped_storage().nbytes()
    for m in recomputed.modules():
        if isinstance(m, gp.FlowStep):
            m.register_forward_pre_hook(note)
    kept = benchmark.measure_step(recomputed, x, "full", [0, 1, 2])[0]
    assert sum(inputs.values()) <= kept < plain_bytes / 2
    with torch.no_grad():
        zs, _, _ = recomputed(x)
        assert (recomputed.reverse(zs) - x).abs().max() < 1e-4


# --- the pipeline of parts


@pytest.mark.slow
def test_pipeline_on_two_processes_sends_nothing_back_and_its_checkpoint_reloads_in_one_process(tmp_path):
    out = tmp_path / "pipe"
    proc = torchrun(2, "experiments/pipeline.py", TINY + ["--epochs", "2", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # counted at every send: per step, part 1's output h_1 (2 x 4 x 4 after the first split) and the
    # constant terms, float32, for 32 images, 16 steps an epoch; and nothing towards earlier parts
    per_epoch = 16 * 32 * (2 * 4 * 4 + 1) * 4  # (sent forward, backward; received from earlier, from later parts)
    counted = [[int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", line.split("pipeline:")[1])]
               for line in proc.stdout.splitlines() if "pipeline:" in line]
    assert counted == [[per_epoch, 0, per_epoch, 0]] * 2, proc.stdout  # each of the two epochs
    m = sweep.read_curve(out)
    assert [e["epoch"] for e in m] == [1, 2] and m[1]["test_bpd"] < m[0]["test_bpd"]
    model = common.load_model(out)
    cfg = gp.Config(**torch.load(out / "checkpoint.pt", weights_only=True)["config"])
    e = gp.evaluate(model, gp.prepare_data(cfg)[1], cfg.batch_size, torch.device("cpu"))
    assert abs(e["test_bpd"] - m[-1]["test_bpd"]) < 1e-5 and abs(e["part_losses"][0] - m[-1]["part_losses"][0]) < 1e-5
    # one process continues the pipeline's run from its checkpoint, Adam state included
    assert gp.main(TINY + ["--mode", "parallel", "--epochs", "3", "--out", str(out), "--resume"]) == 0
    # the same math in one process gives the same numbers, up to float rounding (1 vs 2 threads, memory
    # layouts) that Adam amplifies on near-zero gradients: about 1e-3 bits/dim after 32 steps
    run, data = gp.start_run(replace(cfg, out=None, epochs=2))
    single = gp.train(run, data, log=lambda *a: None).history
    assert abs(single[-1]["test_bpd"] - m[1]["test_bpd"]) < 5e-3


@pytest.mark.parametrize("args,named", [(["--parts", "1,1,2"], "--nproc_per_node"), (["--finetune", "1"], "--finetune"),
                                        (["--ema", "0.9"], "--ema")])
def test_the_pipeline_refuses_what_it_cannot_do_with_one_line(args, named, tmp_path, capsys, monkeypatch):
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "test"}.items():
        monkeypatch.setenv(k, v)
    argv = TINY + ["--epochs", "1", "--out", str(tmp_path)] + args
    assert gp.command("pipeline.py", pipeline.run_pipeline, argv) == 2
    assert named in one_error_line(capsys, "pipeline.py")


# --- the spike recorder, quiet timing


@pytest.mark.slow
def test_spike_records_every_step_of_the_schedule_and_finds_the_largest_rise(tmp_path, capsys):
    out = tmp_path / "spike"
    assert gp.command("spike.py", spike.run_spike, TINY + ["--mode", "alternate", "--epochs", "2", "--beta2", "0.99",
                                                           "--out", str(out)]) == 0
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["part"] for s in steps] == [i % 2 for i in range(2 * 16)]  # alternate: parts 1, 2, 1, 2, ...
    assert all(s["update_norm"] > 0 and s["adam_v_max"] > 0 and s["grad_norm"]["ActNorm"] > 0 for s in steps)
    assert len((out / "layers.jsonl").read_text().splitlines()) == 2 and sweep.read_curve(out)[-1]["epoch"] == 2
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(g["betas"] == (0.9, 0.99) for o in ckpt["optimizers"] for g in o["param_groups"])
    curve = [{"epoch": e, "bpd": b} for e, b in enumerate([5.0, 4.0, 4.5, 3.0, 3.9, 3.2], 1)]
    assert spike.largest_rise(curve, "bpd") == (5, pytest.approx(0.9))  # 3.9 above the best so far, 3.0
    capsys.readouterr()
    assert gp.command("spike.py", spike.run_spike, TINY + ["--epochs", "1", "--out", str(out)]) == 2
    err = one_error_line(capsys, "spike.py")
    assert f"--out {out}" in err and "--resume" not in err, err  # it advises only what it can do


def test_spikes_counts_only_late_rises_above_the_threshold_against_the_best_so_far(tmp_path, capsys):
    def run(name, rises):  # a falling raw curve, plus a bump of `rise` at each given epoch
        raw = [5.0 - 0.01 * e + rises.get(e, 0.0) for e in range(1, 41)]
        path = tmp_path / name
        path.mkdir()
        (path / "metrics.jsonl").write_text("".join(json.dumps({  # the mean and the median image alike
            "epoch": e, "raw_test_bpd": v, "test_bpd": v - 0.1, "raw_test_median_bpd": v, "test_median_bpd": v - 0.1})
            + "\n" for e, v in enumerate(raw, 1)))
        return str(path)
    plain = [run("a0", {5: 3.0}), run("a1", {30: 1.5}), run("a2", {25: 0.8})]  # early, late spike, small
    other = [run("b0", {}), run("b1", {35: 0.5}), run("b2", {21: 2.0})]
    out = tmp_path / "out"
    argv = ["--epochs", "40", "--out", str(out), "plain:" + ",".join(plain), "other:" + ",".join(other)]
    assert gp.command("spikes.py", spikes.run_spikes, argv) == 0
    result = json.loads((out / "spikes.json").read_text())["conditions"]
    assert [r["spike"] for r in result["plain"]] == [False, True, False]
    assert [r["spike"] for r in result["other"]] == [False, False, True]
    late = result["plain"][1]
    assert late["epoch"] == 30 and late["largest_late_rise"] == pytest.approx(1.5 - 0.01)  # above epoch 29's value
    assert result["plain"][0]["largest_rise_anywhere"] == [5, pytest.approx(3.0 - 0.01)]
    assert result["plain"][1]["bpd_at_end"] == pytest.approx(5.0 - 0.4 - 0.1)
    assert "| plain | 1 of 3 |" in capsys.readouterr().out
    tested = json.loads((out / "spikes.json").read_text())["counts_test"]["other"]  # 1 of 3 against 1 of 3
    assert tested == {"fisher_p": 1.0, "power_against_none": pytest.approx(stats.fisher_power(3, 1 / 3, 0.0))}
    assert gp.command("spikes.py", spikes.run_spikes, ["--epochs", "50", "--out", str(out), "p:" + plain[0]]) == 2
    err = one_error_line(capsys, "spikes.py")
    assert "--epochs" in err and plain[0] in err, err  # the run that is too short
    assert gp.command("spikes.py", spikes.run_spikes, ["--out", str(out), "p:" + plain[0], "q:" + ",".join(other)]) == 2
    one_error_line(capsys, "spikes.py")  # two conditions of 1 and 3 runs


@pytest.mark.slow
def test_timing_interleaves_the_phases_and_times_what_the_loop_counts(tmp_path):
    path = tmp_path / "timing.json"
    assert gp.command("timing.py", timing.run_timing, TINY + ["--repeats", "2", "--out", str(path)]) == 0
    result = json.loads(path.read_text())
    assert set(result["epoch_seconds"]) == {"full", "alternate", "finetune", "evaluation"}
    assert all(len(s) == 2 and min(s) > 0 for s in result["epoch_seconds"].values())
    for phase, s in result["epoch_seconds"].items():  # the summary is of the repeats measured, no others
        summary = result["summary"][phase]
        assert [summary["median"], summary["min"], summary["max"]] == [statistics.median(s), min(s), max(s)]


# --- the statistics, on given data with known answers


def test_the_robust_gap_is_a_trimmed_mean_that_a_few_images_cannot_move():
    x = [*range(1, 11), 1000.0]  # eleven values: int(0.1 * 11) = 1 cut at each end leaves 2..10
    assert stats.trimmed_mean(x, cut=0.1) == pytest.approx(6.0)
    assert stats.trimmed_mean(list(range(100)), cut=0.01) == pytest.approx(49.5)  # symmetric: the mean


def test_the_t_interval_and_the_equivalence_test_give_hand_computed_answers():
    t975, t95 = 4.302652729749464, 2.919985580355516  # Student's t, 2 degrees of freedom
    se = 1 / 3 ** 0.5  # [1, 2, 3]: mean 2, sd 1
    assert stats.t_interval([1.0, 2.0, 3.0]) == pytest.approx([2 - t975 * se, 2 + t975 * se])
    assert stats.t_interval([1.0, 2.0, 3.0], 0.90) == pytest.approx([2 - t95 * se, 2 + t95 * se])
    assert stats.t_interval([0.5]) is None and stats.tost([0.5]) is None
    near = [0.001, 0.003, 0.002, 0.004, 0.0]  # mean 0.002: its 90 % interval ends at 0.0035, its 95 % at 0.0040
    assert stats.tost(near, 0.02)["verdict"] == "equivalent" and stats.tost(near, 0.02)["excludes_zero"]
    assert stats.tost(near, 0.003)["verdict"] == "inconclusive"
    assert stats.tost([v + 0.05 for v in near], 0.02)["verdict"] == "worse"
    assert stats.tost([-v - 0.05 for v in near], 0.02)["verdict"] == "better"
    wide = [-0.05, 0.05, -0.04, 0.04]  # centred on 0, but too spread to show equivalence within 0.02
    assert stats.tost(wide, 0.02) | {"ci90": None, "ci95": None} == {
        "verdict": "inconclusive", "ci90": None, "ci95": None, "margin": 0.02, "excludes_zero": False}


def test_the_coverage_simulation_finds_the_t_interval_nominal_and_a_bootstrap_over_three_seeds_short():
    assert 0.93 <= stats.coverage(stats.t_interval, 3, reps=2000) <= 0.97
    assert 0.72 <= stats.coverage(stats.seed_bootstrap, 3, reps=2000) <= 0.80  # 1 in 27 draws repeats one seed
    assert stats.coverage(lambda v: [-1e9, 1e9], 3, reps=10) == 1.0
    assert stats.coverage(lambda v: [1, 2], 3, reps=10) == 0


def test_fishers_test_and_its_power_over_six_seeds_give_hand_computed_answers():
    assert stats.fisher_p(6, 0, 6) == pytest.approx(2 / 924)  # the two most extreme of C(12, 6) tables
    assert stats.fisher_p(3, 3, 6) == 1.0
    assert stats.fisher_power(6, 1.0, 0.0) == 1.0  # 6 of 6 against 0 of 6, always
    # from every run spiking to one in six: 6 vs 0 or 1 decides (p = 0.002, 0.015), 6 vs 2 does not (0.061)
    assert stats.fisher_p(6, 2, 6) > 0.05 > stats.fisher_p(6, 1, 6)
    assert stats.fisher_power(6, 1.0, 1 / 6) == pytest.approx((5 / 6) ** 6 + 6 * (1 / 6) * (5 / 6) ** 5)
    assert stats.fisher_power(6, 0.5, 0.5) < 0.05  # no difference: rejected less often than alpha


def test_the_t_test_over_seeds_and_the_cost_axis_give_hand_computed_answers():
    t = stats.paired_t([1.0, 2.0, 3.0])  # t = 2 / (1 / sqrt 3); df 2: p = 1 - t / sqrt(2 + t^2)
    assert t["t"] == pytest.approx(2 * 3 ** 0.5) and t["df"] == 2
    assert t["p"] == pytest.approx(1 - 2 * 3 ** 0.5 / (2 + 12) ** 0.5)
    assert stats.paired_t([0.5]) is None and stats.paired_t([1.0, 1.0]) is None
    costs = {"full": 6.0, "alternate": 3.0, "finetune": 6.0}
    assert stats.time_ratio(60, 30, 90, costs) == pytest.approx(2 / 3)
    assert stats.equal_time_epoch(60, 30, costs) == 60 and stats.equal_time_epoch(60, 30, {**costs, "full": 6.1}) == 59
    timing = {"epoch_seconds": {"full": [5.0, 7.0], "alternate": [2.0, 4.0], "finetune": [6.0, 6.0],
                                "evaluation": [1.0, 1.0]}}
    assert stats.time_range(60, 30, 90, timing) == pytest.approx([300 / 630, 420 / 450])
    assert stats.time_range(60, 30, 90, timing, True) == pytest.approx([(180 + 210) / 720, (300 + 210) / 540])


# --- every script keeps the reference's promises: checked inputs and outputs, the same command continues


def test_timing_refuses_an_output_path_it_cannot_use_before_it_measures_and_writes_over_nothing(tmp_path, capsys):
    run = tmp_path / "run"  # a run's checkpoint: timing.py must not write over it
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"a run's checkpoint")
    before = (run / "checkpoint.pt").read_bytes()
    for out in (run / "checkpoint.pt", tmp_path / "no" / "t.json", tmp_path):
        assert gp.command("timing.py", timing.run_timing, TINY + ["--out", str(out)]) == 2
        assert str(out) in one_error_line(capsys, "timing.py")
    assert (run / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("content", ["not json", "{}", "[1, 2]", '{"epoch_seconds": {"full": [1.0]}, "summary": {}, '
                                     '"date": "d", "machine": "m", "threads": 1}'])
def test_a_sweep_refuses_a_timing_file_that_is_not_one_in_one_line(content, tmp_path, capsys):
    bad = tmp_path / "timing.json"
    bad.write_text(content)
    argv = TINY + ["--splits", "1+1", "--timing", str(bad), "--out", str(tmp_path / "sweep")]
    assert gp.command("sweep.py", sweep.run_sweep, argv) == 2
    assert str(bad) in one_error_line(capsys, "sweep.py") and not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("flags,named", [(["--epochs", "0"], "--epochs"), (["--after", "0"], "--after"),
                                         (["--epochs", "-1"], "--epochs"),
                                         (["--epochs", "5", "--after", "5"], "--after")])
def test_spikes_refuses_epochs_it_cannot_read_in_one_line(flags, named, tmp_path, capsys):
    assert gp.command("spikes.py", spikes.run_spikes, flags + ["--out", str(tmp_path / "o"), f"a:{tmp_path}"]) == 2
    assert named in one_error_line(capsys, "spikes.py")


def test_spikes_writes_over_no_file_it_did_not_make(tmp_path, capsys):
    mine = tmp_path / "notes"
    mine.write_text("keep")
    assert gp.command("spikes.py", spikes.run_spikes, ["--out", str(mine), f"a:{tmp_path}"]) == 2
    assert str(mine) in one_error_line(capsys, "spikes.py") and mine.read_text() == "keep"


@pytest.mark.slow
def test_spike_killed_mid_run_is_continued_by_its_same_command_with_every_record(tmp_path):
    args = TINY + ["--ema", "0.9", "--mode", "alternate", "--epochs", "3"]
    assert gp.command("spike.py", spike.run_spike, args + ["--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "experiments/spike.py", *args, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(3000):  # until its first checkpoint is written (its records may be ahead of it)
        if (out / "checkpoint.pt").exists() or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert gp.command("spike.py", spike.run_spike, args + ["--out", str(out)]) == 0
    for name in ("steps.jsonl", "layers.jsonl"):
        assert (out / name).read_text() == (tmp_path / "straight" / name).read_text(), name
    assert without_seconds(common.read_curve(out)) == without_seconds(common.read_curve(tmp_path / "straight"))
    assert gp.command("spike.py", spike.run_spike, args + ["--beta2", "0.99", "--out", str(out)]) == 2  # another plan


@pytest.mark.slow
def test_a_comparison_whose_run_was_continued_alone_says_so_and_its_advice_works(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = TINY + ["--epochs", "1", "--finetune", "1", "--out", str(out)]
    assert gp.command("compare.py", compare.run_compare, argv) == 0
    assert gp.main(TINY + ["--mode", "alternate", "--epochs", "1", "--finetune", "2", "--out", str(out / "alternate"),
                           "--resume"]) == 0  # the sub-run grown alone
    capsys.readouterr()
    assert gp.command("compare.py", compare.run_compare, argv) == 2
    assert str(out / "alternate") in one_error_line(capsys, "compare.py")
    (out / "alternate").rename(tmp_path / "grown")  # the advice: move it away
    assert gp.command("compare.py", compare.run_compare, argv) == 0


@pytest.mark.slow
def test_the_pipeline_refuses_a_run_it_cannot_continue_and_its_advice_works(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert gp.main(TINY + ["--mode", "parallel", "--epochs", "1", "--finetune", "1", "--out", out]) == 0
    capsys.readouterr()
    assert gp.command("pipeline.py", pipeline.run_pipeline, ["--resume", "--epochs", "4", "--out", out]) == 2
    line = one_error_line(capsys, "pipeline.py")
    assert "glow_parts.py --resume" in line and "--finetune" not in line
    assert gp.main(["--resume", "--finetune", "2", "--out", out]) == 0  # the advice: glow_parts.py --resume
