"""Oracles for glow_parts: round trips, brute-force Jacobians, dense vs LU, gradient isolation, the CLI.

Run: python -m pytest -q -n auto test_glow_parts.py; -m "not slow": the oracles alone, in seconds (conftest.py).
"""
import math
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision.datasets.cifar as cifar
import torchvision.datasets.mnist as mnist

import glow_parts as gp
from conftest import (ROOT, TINY, TINY_SETTINGS, as_flags, loss_and_grads, one_error_line, quiet, read_metrics,
                      tiny_cfg, tiny_glow, tiny_model, tiny_train, torchrun, without_seconds)

SPLITS = [None, [2, 2, 2], [3, 1, 2], [1, 1, 1, 3], [6]]  # per level, mid-level cuts, one part


def trained(model, dtype, steps=5, seed=1):
    """A few Adam steps on structured data, so every coupling and prior is away from its init."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(16, 1, 8, 8, generator=g, dtype=dtype) - 0.5) * torch.linspace(0.2, 1, 8, dtype=dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model.bits_per_dim(model.log_prob(x)).mean().backward()
        opt.step()
    return model


def perturbed(layer, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def brute_logdet(fn, x):
    """log|det J| of fn (returning a list of tensors) at one sample x (1, ...), from autograd's full Jacobian:
    the oracle every fast log-det is checked against."""
    flat = lambda v: torch.cat([t.flatten() for t in fn(v.view_as(x))])  # noqa: E731
    return torch.linalg.slogdet(torch.autograd.functional.jacobian(flat, x.flatten()))[1]


def rel_err(a, b):
    a, b = float(a.detach()), float(b.detach())
    return abs(a - b) / max(abs(b), 1e-12)


def part_weights(model):
    return [[p.detach().clone() for p in part.parameters()] for part in model.parts]


def changed_parts(before, model):
    """For each part: whether any of its parameters differs from `before` (part_weights of the same model)."""
    return [any(not torch.equal(a, b) for a, b in zip(old, part.parameters())) for old, part in
            zip(before, model.parts)]


# --- invertibility and log-determinants


@pytest.mark.parametrize("parts", SPLITS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_reverse_of_forward_is_identity_after_training(parts, dtype, tol):
    model = trained(tiny_glow(parts, dtype), dtype)
    x = torch.rand(8, 1, 8, 8, dtype=dtype) - 0.5
    with torch.no_grad():
        zs, _, _ = model(x)
        assert (model.reverse(zs) - x).abs().max() < tol


@pytest.mark.parametrize("make", [
    lambda: gp.ActNorm(4), lambda: gp.InvConv2dLU(4), lambda: gp.AffineCoupling(4, 6),
    lambda: gp.FlowStep(4, 6), lambda: gp.Squeeze()], ids=["actnorm", "invconv", "coupling", "step", "squeeze"])
def test_each_layer_logdet_equals_bruteforce_jacobian(make):
    torch.manual_seed(0)
    layer = perturbed(make().double())
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    y, logdet = layer(x)
    assert torch.allclose(layer.reverse(y), x, atol=1e-10)
    expected = brute_logdet(lambda v: [layer(v)[0]], x)
    assert rel_err(logdet[0], expected) < 1e-6 or abs(float(logdet[0] - expected)) < 1e-9


@pytest.mark.parametrize("parts", [None, [3, 1, 2]])
def test_whole_model_logdet_equals_bruteforce_jacobian(parts):
    model = trained(tiny_glow(parts, torch.float64), torch.float64)
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64) - 0.5
    _, logdet, _ = model(x)
    expected = brute_logdet(lambda v: model(v)[0], x)  # x -> all latents, a bijection of R^64
    assert rel_err(logdet[0], expected) < 1e-6


def test_lu_conv_equals_dense_conv_with_composed_weight_and_starts_as_a_rotation():
    torch.manual_seed(0)
    W = gp.InvConv2dLU(5).weight()
    assert torch.allclose(W @ W.T, torch.eye(5), atol=1e-5)
    layer = perturbed(gp.InvConv2dLU(6).double())
    W = layer.weight()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    dense = torch.einsum("oc,bchw->bohw", W, x)
    y, logdet = layer(x)
    assert torch.allclose(y, dense, atol=1e-12)
    assert torch.allclose(logdet[0], 25 * torch.linalg.slogdet(W)[1], rtol=1e-10)


# --- ActNorm's data-dependent init


def test_actnorm_init_gives_zero_mean_unit_std_per_channel():
    x = 3 + 5 * torch.randn(64, 4, 6, 6)
    norm = gp.ActNorm(4)
    norm.data_init = True  # what Glow.initialize sets for one forward pass
    y, _ = norm(x)
    assert y.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (y.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-4
    assert bool(norm.initialized)


def test_model_first_batch_initialises_every_actnorm_and_state_dict_round_trip_does_not_reinit():
    model = tiny_glow()
    x = torch.rand(32, 1, 8, 8) - 0.5
    first = model.parts[0].layers[1].actnorm  # the first flow step's ActNorm (after the squeeze)
    model.initialize(x)
    norms = [m for m in model.modules() if isinstance(m, gp.ActNorm)]
    assert all(bool(m.initialized) for m in norms)
    h = gp.Squeeze()(x)[0]
    out, _ = first(h)
    assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reloaded = tiny_glow(seed=1)
    reloaded.load_state_dict(state)
    reloaded.initialize(10 * torch.rand(32, 1, 8, 8))  # a very different batch must not re-initialise
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, state[k]), k


# --- parts and the truncated objective


@pytest.mark.parametrize("parts", [None, [3, 1, 2], [1, 1, 1, 3]])
def test_part_loss_gives_gradients_to_its_part_only(parts):
    model, x = tiny_model(parts)
    inputs = {}
    for k, part in enumerate(model.parts):  # record what reaches each part
        part.register_forward_pre_hook(lambda m, args, k=k: inputs.__setitem__(k, args[0]))
    for k in range(len(model.parts)):
        model.zero_grad(set_to_none=True)
        inputs.clear()
        model.part_loss(x, k).backward()
        assert not inputs[k].requires_grad
        for j, part in enumerate(model.parts):
            grads = [p.grad for p in part.parameters()]
            if j == k:
                assert any(g is not None and g.abs().sum() > 0 for g in grads)
            else:
                assert all(g is None for g in grads), (k, j)


def test_every_parameter_belongs_to_exactly_one_part_and_a_learned_part_prior_starts_as_the_standard_one():
    model = tiny_glow([3, 1, 2], part_prior="learned")
    owned = [id(p) for part in model.parts for p in part.parameters()]
    assert len(owned) == len(set(owned))
    assert set(owned) == {id(p) for p in model.parameters()}
    x = torch.rand(8, 1, 8, 8) - 0.5
    assert torch.allclose(tiny_glow([3, 1, 2]).part_loss(x, 0), model.part_loss(x, 0))


def test_last_part_loss_equals_full_model_bpd_and_every_part_is_a_finite_bpd():
    model = trained(tiny_glow([3, 1, 2], torch.float64), torch.float64)
    x = torch.rand(8, 1, 8, 8, dtype=torch.float64) - 0.5
    full = model.bits_per_dim(model.log_prob(x)).mean()
    losses = [model.part_loss(x, k) for k in range(3)]
    assert torch.allclose(losses[-1], full, rtol=1e-12)
    assert all(torch.isfinite(v) and 0 < v < 20 for v in losses)
    one_pass = [model.bits_per_dim(lp).mean() for lp in model.truncated(x)]
    assert torch.allclose(torch.stack(one_pass), torch.stack(losses), rtol=1e-12)


def test_isolated_sum_of_part_losses_gives_each_part_its_own_gradient():
    model = trained(tiny_glow([3, 1, 2], torch.float64), torch.float64)
    x = torch.rand(8, 1, 8, 8, dtype=torch.float64) - 0.5
    model.zero_grad(set_to_none=True)
    sum(model.bits_per_dim(lp).mean() for lp in model.truncated(x)).backward()
    together = [[p.grad.clone() if p.grad is not None else None for p in part.parameters()] for part in model.parts]
    for k, part in enumerate(model.parts):
        model.zero_grad(set_to_none=True)
        model.part_loss(x, k).backward()
        for p, g in zip(part.parameters(), together[k]):
            assert (p.grad is None and g is None) or torch.allclose(p.grad, g, rtol=1e-10, atol=1e-14)


def test_untrained_bpd_on_uniform_integer_images_is_close_to_n_bits():
    torch.manual_seed(0)
    for n_bits in (3, 8):
        model = gp.Glow(in_channels=3, image_size=8, n_levels=2, n_steps=2, hidden=8, n_bits=n_bits)
        ints = torch.randint(0, 256, (256, 3, 8, 8), dtype=torch.uint8)
        x = gp.preprocess(ints, n_bits)
        model.initialize(x)
        bpd = model.bits_per_dim(model.log_prob(x)).mean().item()
        # ActNorm whitens uniform noise; a Gaussian fit to a uniform costs log2(sqrt(2 pi e / 12)) = 0.25 bits
        assert abs(bpd - (n_bits + 0.25)) < 0.1, (n_bits, bpd)


def test_sample_is_finite_with_the_right_shape_and_temperature_zero_is_the_mean_image():
    model = trained(tiny_glow([3, 1, 2]), torch.float32)
    s = model.sample(5, temperature=0.7)
    assert s.shape == (5, 1, 8, 8) and torch.isfinite(s).all()
    a, b = model.sample(2, temperature=0.0), model.sample(2, temperature=0.0)
    assert torch.equal(a, b) and torch.equal(a[0], a[1])


def test_default_model_is_the_cifar10_glow_cut_as_the_poster_in_the_library_and_the_cli():
    with torch.device("meta"):  # shapes only: the claim is the structure, not 44 M random weights
        model = gp.Glow()
    assert model.part_sizes == [32, 16, 16, 32] == gp.Config().parts
    assert sum(isinstance(l, gp.FlowStep) for p in model.parts for l in p.layers) == 96
    assert gp.Config().prior_bound == 5.0 and all(m.bound == 5.0 for m in model.modules() if isinstance(m, gp.Split))
    assert gp.default_parts(2, 8) == [8, 8] and gp.default_parts(3, 5) == [5, 2, 3, 5]


# --- speed: torch.compile changes neither values nor gradients


@pytest.mark.slow  # inductor compiles in worker processes, for a minute on a CPU
def test_a_compiled_model_gives_the_eager_loss_and_gradients_and_stays_invertible():
    model = trained(tiny_glow([3, 3]), torch.float32)
    x = torch.rand(8, 1, 8, 8) - 0.5
    eager_loss, eager = loss_and_grads(model, x)
    for part in model.parts:
        part.compile(dynamic=False)  # as build_model does with --compile
    loss, compiled = loss_and_grads(model, x)
    assert torch.allclose(loss, eager_loss, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(compiled, eager))
    with torch.no_grad():
        zs, _, _ = model(x)
        assert (model.reverse(zs) - x).abs().max() < 1e-4
    assert set(model.state_dict()) == set(tiny_glow([3, 3]).state_dict())  # checkpoints keep their keys


# --- the split prior far outside its training range, and what the evaluation reports

Z = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))  # the latent a Split(4) scores


def out_of_range(split):
    """The Split(4), its prior made to predict log std = -h (a zero conv set by hand): the linear map a trained
    prior is, which gives a very negative log std to an h larger than the ones it was fitted on."""
    with torch.no_grad():
        split.prior.conv.weight.zero_()
        for c in range(2):  # log std of channel c of z = -h_c at the same pixel (centre tap)
            split.prior.conv.weight[2 + c, c, 1, 1] = -1.0
    return split


def split_logp(split, h):
    """log p(Z | h) under the split's prior, h the same at every pixel."""
    return split(torch.cat([torch.full_like(Z, h), Z], 1))[2].item()


def gaussian_logp(logs):
    """log N(Z; 0, exp(logs)^2), summed."""
    return float((-0.5 * (math.log(2 * math.pi) + 2 * logs + Z ** 2 * math.exp(-2 * logs))).sum())


def test_a_split_prior_explodes_for_an_input_outside_its_range_and_the_bound_caps_it():
    def logp(bound, h):  # log p(Z | h) of a prior that predicts log std = -h at every pixel; bound 0: none
        return split_logp(out_of_range(gp.Split(4, bound)), h)
    assert logp(0.0, 2.0) == pytest.approx(gaussian_logp(-2.0)) and logp(0.0, 7.0) == pytest.approx(gaussian_logp(-7.0))
    assert logp(0.0, 7.0) < 1000 * logp(0.0, 2.0) < 0  # from h = 2 to h = 7: e^10 times the squared error
    assert logp(3.0, 7.0) == pytest.approx(gaussian_logp(3 * math.tanh(-7 / 3)))  # bounded: log std > -3
    assert logp(3.0, 7.0) > gaussian_logp(-3.0) and logp(3.0, 0.1) == pytest.approx(gaussian_logp(-0.1), rel=1e-3)


def evaluate_given(scores):
    """evaluate() of a stand-in model that gives the images it is shown, in order, the given bits/dim."""
    given = iter(scores)
    model = SimpleNamespace(n_bits=8, truncated=lambda x: [torch.stack([next(given) for _ in x])],
                            bits_per_dim=lambda log_prob: log_prob)
    return gp.evaluate(model, torch.zeros(len(scores), 1, 1, 1, dtype=torch.uint8), 64, torch.device("cpu"))


def test_evaluate_reports_the_median_the_images_worse_than_noise_and_what_they_add_to_the_mean():
    scores = 3.5 + 0.1 * torch.randn(1000, generator=torch.Generator().manual_seed(0))
    healthy = evaluate_given(scores)
    assert healthy["test_outliers"] == 0 and healthy["test_outlier_share"] == 0.0
    assert healthy["test_median_bpd"] == pytest.approx(scores.median().item())
    assert torch.equal(healthy["per_image"], scores)  # each image's bits/dim, in order
    spiked = scores.clone()
    spiked[[719, 2, 500]] = torch.tensor([1.6e4, 1.8e3, 50.0])  # two images far off, one a little
    m = evaluate_given(spiked)
    assert m["test_outliers"] == 3 and torch.nonzero(m["per_image"] > 8)[:, 0].tolist() == [2, 500, 719]
    rest = spiked[spiked <= 8].double().mean().item()  # the mean without the three
    assert m["test_outlier_share"] == pytest.approx(spiked.double().mean().item() - rest)
    assert m["test_outlier_share"] > 17 > gp.FEW and abs(m["test_median_bpd"] - 3.5) < 0.01
    few = scores.clone()
    few[:3] = 9.0  # three images just above noise: they add about (9 - 3.5) * 3 / 1000 = 0.0165 < gp.FEW
    assert evaluate_given(few)["test_outlier_share"] == pytest.approx(
        (9 - few[3:].double().mean().item()) * 3 / 1000, rel=1e-6)
    worst = torch.full((100,), 9.5)  # every image worse than noise: the mean minus n_bits
    assert evaluate_given(worst)["test_outlier_share"] == pytest.approx(1.5)


# --- training mechanisms, data, checkpoints, the CLI


@pytest.mark.slow
@pytest.mark.parametrize("mode", gp.MODES)
def test_each_mechanism_lowers_test_bpd_on_digits(mode):
    run, data = gp.start_run(tiny_cfg(mode=mode, epochs=3))
    initial = gp.evaluate(run.model, data[1], 64, torch.device("cpu"))["test_bpd"]  # every mode starts here
    history = gp.train(run, data, log=quiet).history
    assert history[-1]["test_bpd"] < initial - 0.1
    parts = history[-1]["train_part_losses"]  # the parts' own losses; sequential's last epoch is part 2's turn
    assert parts is None if mode == "full" else [v is not None for v in parts] == [mode != "sequential", True]


def test_schedule_alternate_round_robin_and_sequential_in_order():
    assert [gp.learning_parts("alternate", s, 12, 3) for s in range(5)] == [[0], [1], [2], [0], [1]]
    assert [gp.learning_parts("alternate", s, 12, 3, every=2) for s in range(5)] == [[0], [0], [1], [1], [2]]
    assert [gp.learning_parts("sequential", s, 12, 3)[0] for s in range(12)] == [0] * 4 + [1] * 4 + [2] * 4
    assert gp.learning_parts("parallel", 7, 12, 3) == gp.learning_parts("finetune", 0, 1, 3) == [0, 1, 2]


@pytest.mark.parametrize("phase,learning", [("alternate", [0]), ("alternate", [1]), ("sequential", [2]),
                                            ("parallel", [0, 1, 2]), ("full", [0, 1, 2])])
def test_a_step_changes_only_the_learning_parts_parameters(phase, learning):
    run, (images, _) = gp.start_run(tiny_cfg(parts=[1, 1, 2]))
    x = gp.preprocess(images[:32], run.cfg.n_bits)
    sum(gp.losses(run.model, x, "full", [0, 1, 2])).backward()  # a step of every part first: each Adam has moments
    gp.step_parts(run, [0, 1, 2])
    before = part_weights(run.model)
    run.model.zero_grad(set_to_none=True)
    sum(gp.losses(run.model, x, phase, learning)).backward()  # the step of `phase`, as train takes it
    learns = [k in learning for k in range(3)]
    assert [any(p.grad is not None for p in part.parameters()) for part in run.model.parts] == learns
    gp.step_parts(run, learning)
    assert changed_parts(before, run.model) == learns
    assert run.updates == [1 + (k in learning) for k in range(3)]


def test_clip_scales_each_learning_parts_gradient_to_the_norm_given_and_no_other():
    run, (images, _) = gp.start_run(tiny_cfg(clip=1e-3))
    x = gp.preprocess(images[:32], 4)
    sum(gp.losses(run.model, x, "alternate", [1])).backward()  # part 2's truncated loss: its gradient only
    norm = lambda part: torch.cat([p.grad.flatten() for p in part.parameters() if p.grad is not None]).norm()  # noqa
    before = norm(run.model.parts[1])
    gp.step_parts(run, [1])
    assert before > 1e-2 and norm(run.model.parts[1]).item() == pytest.approx(1e-3, rel=1e-4)
    assert all(p.grad is None for p in run.model.parts[0].parameters()) and run.updates == [0, 1]


def test_finetune_phase_follows_the_mode_and_trains_every_part():
    run, data = gp.start_run(tiny_cfg(mode="sequential", epochs=2, subset=64, test_subset=32))  # 2 steps an epoch
    gp.train(run, data, log=quiet)  # the mode's epochs: part 1, then part 2; part 1 is unchanged in epoch 2
    before = part_weights(run.model)
    run.cfg = replace(run.cfg, finetune=1)  # as --resume --finetune 1 does
    gp.train(run, data, log=quiet)
    assert [m["phase"] for m in run.history] == ["sequential", "sequential", "finetune"]
    assert run.history[0]["train_part_losses"][0] is not None  # part 1's turn
    assert run.history[2]["train_part_losses"] is None  # end to end: no part learns alone
    assert changed_parts(before, run.model) == [True, True]  # every part learns while finetuning


@pytest.mark.slow
def test_cli_run_writes_metrics_checkpoint_and_samples(tmp_path):
    out = tmp_path / "run"
    assert gp.main(TINY + ["--mode", "alternate", "--epochs", "2", "--finetune", "1", "--out", str(out)]) == 0
    metrics = read_metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert {"epoch", "phase", "train_bpd", "test_bpd", "part_losses", "seconds", "steps", "test_median_bpd",
                "test_outliers", "test_outlier_share"} <= m.keys()
        assert len(m["part_losses"]) == 2 and m["part_losses"][-1] == m["test_bpd"]
    assert (out / "samples_003.png").stat().st_size > 1000 and (out / "checkpoint.pt").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []
    scores = torch.load(out / "checkpoint.pt", weights_only=True)["scores"]  # every test image, every epoch
    assert len(scores) == 3 and scores[-1].shape == (297,)
    assert scores[-1].double().mean().item() == pytest.approx(metrics[-1]["test_bpd"], rel=1e-6)


def adam_rates(cfg):
    """The rate each part's Adam steps with, step by step, over a run of cfg."""
    run, data = gp.start_run(cfg)
    rates = [[] for _ in run.optimizers]
    for k, optimizer in enumerate(run.optimizers):
        optimizer.register_step_pre_hook(lambda o, args, kwargs, k=k: rates[k].append(o.param_groups[0]["lr"]))
    gp.train(run, data, log=quiet)
    return rates


def test_decay_lowers_every_rate_along_a_cosine_to_zero_at_its_epoch_or_restarts_it_for_finetuning():
    rates = adam_rates(tiny_cfg(mode="full", epochs=2, warmup=1, decay=2, subset=64, test_subset=32))  # 2 an epoch
    assert rates[0] == rates[1] == pytest.approx([2e-3 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)])
    rates = adam_rates(tiny_cfg(mode="alternate", epochs=1, finetune=1, warmup=1, decay=[1, 1], subset=64,
                                test_subset=32))  # alternate: part 1, then part 2; finetuning: both, twice
    assert rates[0] == pytest.approx([2e-3, 2e-3, 1e-3]) and rates[1] == pytest.approx([1e-3, 2e-3, 1e-3])
    assert tiny_cfg(decay=[7]).decay == 7  # one value: one cosine over the run, as before
    with pytest.raises(ValueError, match="--decay"):
        tiny_cfg(decay=[1, 2, 3])


def write_cifar10(root, n_train=20, n_test=10):
    """A tiny CIFAR-10 in torchvision's own on-disk format (pickled batches in cifar-10-batches-py/)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = {}
    for name, n in [*((f"data_batch_{i}", n_train // 5) for i in range(1, 6)), ("test_batch", n_test)]:
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        images[name] = data
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": [0] * n}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    return images


def small_datasets(monkeypatch):
    """The known sizes of the datasets (gp.DATASETS), made those of the small files these tests write."""
    monkeypatch.setitem(gp.DATASETS, "cifar10", (3, 32, 20, 10, gp.DATASETS["cifar10"][4]))
    monkeypatch.setitem(gp.DATASETS, "fashion-mnist", (1, 28, 12, 6, gp.DATASETS["fashion-mnist"][4]))


def test_cifar10_loads_from_torchvision_files_on_disk(tmp_path, monkeypatch):
    small_datasets(monkeypatch)
    images = write_cifar10(tmp_path)
    # torchvision checks the real archive's md5 sums; our tiny files are in its format but not those bytes
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    train, test = gp.load_images("cifar10", str(tmp_path), download=False)
    assert train.shape == (20, 3, 32, 32) and test.shape == (10, 3, 32, 32) and train.dtype == torch.uint8
    first = images["data_batch_1"][0].reshape(3, 32, 32)  # CIFAR stores planes R, G, B
    assert np.array_equal(train[0].numpy(), first)


def write_idx_images(path, images):
    n, h, w = images.shape
    path.write_bytes((2051).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (n, h, w))
                     + images.astype(np.uint8).tobytes())


def write_fashion_mnist(root):
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 6)):
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes((2049).to_bytes(4, "big") + n.to_bytes(4, "big") + bytes(n))
    return raw


def test_fashion_mnist_loads_idx_files_and_resizes(tmp_path, monkeypatch):
    small_datasets(monkeypatch)
    write_fashion_mnist(tmp_path)
    cfg = tiny_cfg(dataset="fashion-mnist", data_dir=str(tmp_path), image_size=16, subset=10, batch_size=4, levels=2)
    train, test = gp.prepare_data(cfg)
    assert train.shape == (10, 1, 16, 16) and test.shape == (6, 1, 16, 16) and train.dtype == torch.uint8
    _, first = gp.prepare_data(replace(cfg, test_subset=4))  # --test-subset: the first N test images
    assert torch.equal(first, test[:4])


def offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(cifar, "download_and_extract_archive", no_network)
    monkeypatch.setattr(mnist, "download_and_extract_archive", no_network)


def test_missing_data_offline_says_where_to_put_files_and_leaves_no_folder_it_made(tmp_path, capsys, monkeypatch):
    offline(monkeypatch)
    (tmp_path / "mine").mkdir()  # the user's own data directory, with something in it
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    for data in ("data", "mine"):
        for dataset, where in (("cifar10", "cifar-10-batches-py"), ("fashion-mnist", "FashionMNIST/raw")):
            code = gp.main(["--dataset", dataset, "--data-dir", str(tmp_path / data), "--levels", "2", "--steps", "2",
                            "--epochs", "1", "--image-size", "16", "--out", str(tmp_path / f"{data}-{dataset}")])
            err = one_error_line(capsys)
            assert code == 2 and f"{tmp_path / data}/{where}" in err and "--dataset digits" in err, err
    assert not (tmp_path / "data").exists()  # the failed load created it, and took it away again
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]  # nothing added, nothing lost


FASHION = ["--dataset", "fashion-mnist", "--image-size", "16", "--levels", "2", "--steps", "2", "--epochs", "1",
           "--batch-size", "4"]


@pytest.mark.parametrize("swap,split", [
    (lambda raw: (raw / "train-images-idx3-ubyte").write_bytes((raw / "t10k-images-idx3-ubyte").read_bytes()),
     "training"),  # the test file in the training's place
    (lambda raw: write_idx_images(raw / "t10k-images-idx3-ubyte", np.zeros((6, 32, 32))), "test")])  # not 28x28
def test_data_that_is_not_what_its_dataset_says_is_refused_in_one_line(swap, split, tmp_path, capsys, monkeypatch):
    small_datasets(monkeypatch)
    swap(write_fashion_mnist(tmp_path))
    assert gp.main(FASHION + ["--data-dir", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    err = one_error_line(capsys)
    assert "fashion-mnist" in err and str(tmp_path) in err and split in err.replace(str(tmp_path), ""), err


DAMAGES = {"wrong magic number": lambda b: b"\x00\x00\x08\x07" + b[4:], "truncated": lambda b: b[:-100],
           "padded": lambda b: b + bytes(7), "empty": lambda b: b"", "missing": None}


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
def test_a_damaged_idx_file_is_one_line_naming_the_dataset_and_the_file(damage, name, tmp_path, capsys, monkeypatch):
    offline(monkeypatch)
    small_datasets(monkeypatch)
    path = write_fashion_mnist(tmp_path) / name
    if DAMAGES[damage]:
        path.write_bytes(DAMAGES[damage](path.read_bytes()))
    else:
        path.unlink()
    code = gp.main(FASHION + ["--data-dir", str(tmp_path), "--out", str(tmp_path / "run")])
    err = one_error_line(capsys)
    assert code == 2 and "fashion-mnist" in err and f"{tmp_path}/FashionMNIST/raw/" in err, err
    assert str(path) in err, err  # the damaged file itself, not only its folder
    assert path.exists() == (damage != "missing")  # the user's files stay where they are


BAD = {  # flags (added to TINY --epochs 1 --out <fresh>); the one line must name the last flag given
    "unknown dataset": "--dataset imagenet", "unknown mode": "--mode greedy", "parts do not sum": "--parts 1,2",
    "parts not integers": "--parts 2,x", "parts not positive": "--parts 4,0", "image size": "--image-size 10",
    "image size huge": "--image-size 1073741824", "negative epochs": "--epochs -1",
    "negative finetune": "--finetune -2", "batch size": "--batch-size 0", "lr zero": "--lr 0", "lr inf": "--lr inf",
    "lr nan": "--lr nan", "lr that float32 makes 0": "--lr 1e-300", "lr count": "--lr 1e-3,1e-3,1e-3",
    "lr negative": "--lr 1e-3,-1", "levels zero": "--levels 0", "levels absurd": "--levels 1000", "steps": "--steps 0",
    "hidden": "--hidden 0", "subset zero": "--subset 0", "subset larger than the data": "--subset 1501",
    "test subset zero": "--test-subset 0", "test subset larger than the data": "--test-subset 298",
    "n bits low": "--n-bits 0", "n bits high": "--n-bits 17", "unknown flag": "--bogus",
    "not a number": "--epochs many",
    "no such device": "--device cuda:7", "not a device": "--device toaster", "empty device": "--device=",
    "a device torch knows but cannot use here": "--device xla", "a device that holds shapes only": "--device meta",
    "empty out": "--out=", "empty data dir": "--data-dir=", "batch larger than data": "--subset 16 --batch-size 32",
    "seed too large": "--seed 99999999999999999999999", "seed negative": "--seed -1",
    "out under /proc": "--out /proc/glow-parts-test/run", "out under a file": "--out /dev/null/run",
    "unknown part prior": "--part-prior wide", "prior bound negative": "--prior-bound -1",
    "prior bound inf": "--prior-bound inf", "prior bound that float32 makes 0": "--prior-bound 1e-300",
    "prior bound that float32 makes inf": "--prior-bound 1e300",
    "decay zero": "--decay 0", "compare is an experiment": "--compare", "hidden absurd": "--hidden 10000000000",
    "ema out of range": "--ema 1", "clip zero": "--clip 0", "a negative number in e notation": "--lr -1e-3",
    "a trailing comma": "--lr 1e-3,", "a trailing comma in a list of ints": "--parts 2,",
    "a model too big for this machine's memory": "--levels 1 --hidden 60000",
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_one_line_and_no_traceback_before_any_data_loads(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gp, "prepare_data", lambda cfg: pytest.fail("data loaded before the check"))
    flags = BAD[case].split()
    out = ["--out", str(tmp_path / "run")] if not any(f.startswith("--out") for f in flags) else []
    assert gp.main(TINY + ["--epochs", "1"] + out + flags) == 2, case
    named = [f.split("=")[0] for f in flags if f.startswith("--")][-1]
    assert named in one_error_line(capsys), case


DOCUMENTED = [  # (setting, a value its help or the README names): each builds, from code as from its flag
    *(("mode", m) for m in gp.MODES), *(("dataset", d) for d in gp.DATASETS), ("part_prior", "standard"),
    ("part_prior", "learned"), ("prior_bound", 0.0), ("prior_bound", 2.5), ("lr", 1e-3), ("lr", [1e-3, 2e-3]),
    ("parts", None), ("parts", [1, 3]), ("ema", None), ("ema", 0.999), ("clip", None), ("clip", 200.0),
    ("decay", None), ("decay", 10), ("decay", [40, 20]), ("compile", True), ("compile", False), ("warmup", None),
    ("image_size", None), ("image_size", 16), ("n_bits", None), ("n_bits", 8), ("subset", None), ("test_subset", 100),
    ("device", "cpu")]


@pytest.mark.parametrize("name,value", DOCUMENTED, ids=[f"{n}={v}" for n, v in DOCUMENTED])
def test_every_documented_value_of_a_setting_builds_the_same_run_from_code_as_from_its_flag(name, value):
    settings = {**TINY_SETTINGS, name: value}
    cfg = gp.Config(**settings)
    assert cfg == gp.Config(**vars(gp.make_parser("flags").parse_args(as_flags(settings))))
    model = gp.build_model(cfg)
    if name == "prior_bound":  # 0: unbounded, the log std follows h however far out; B: within (-B, B)
        split = out_of_range(next(m for m in model.modules() if isinstance(m, gp.Split)))
        logs = value * math.tanh(-7.0 / value) if value else -7.0
        assert split_logp(split, 7.0) == pytest.approx(gaussian_logp(logs))


GLOW = dict(in_channels=1, image_size=8, n_levels=2, n_steps=2, hidden=8)
BAD_DATA = {"one tensor": lambda train, test: train, "three tensors": lambda train, test: (train, test, test),
            "floats": lambda train, test: (train.float(), test), "arrays": lambda train, test: (train.numpy(), test),
            "another size": lambda train, test: (train, test[..., :4, :4]),
            "no channels": lambda train, test: (train[:, 0], test)}
REFUSED = [  # (what is called, the argument it is given, the name its ValueError must say)
    *(("Config", {k: v}, "--" + k.replace("_", "-")) for k, v in (
        ("lr", 0.0), ("lr", [1e-3] * 3), ("lr", "fast"), ("prior_bound", None), ("prior_bound", -1.0),
        ("mode", "greedy"), ("part_prior", "wide"), ("ema", 1.0), ("clip", -1.0), ("decay", 0), ("decay", [4, 2, 1]),
        ("compile", "yes"), *(("parts", p) for p in ([2, 3], [3, 0, 1], [3, -1, 2], [2.5, 1.5], ["2", "2"], [],
                                                    [True, 3])))),
    *(("Glow", {k: v}, k) for k, v in (
        ("in_channels", 0), ("n_levels", 0), ("n_steps", 0), ("hidden", 0), ("parts", [0, 4]), ("parts", "x"),
        ("n_bits", 9), ("part_prior", "wide"), ("prior_bound", -1.0), ("image_size", 7))),
    ("Glow", {"n_levels": 3, "image_size": 12}, "image_size"),  # not divisible by 2^levels
    *((call, bad, "data") for call in ("train", "start_run") for bad in BAD_DATA)]


@pytest.mark.parametrize("call,arg,name", REFUSED, ids=[f"{c}-{a}" for c, a, _ in REFUSED])
def test_the_library_refuses_invalid_arguments_from_code_with_a_value_error_naming_them(call, arg, name):
    cfg = tiny_cfg(epochs=1, subset=32, test_subset=32)  # should a bad argument be taken: a step, not an epoch
    if call in ("train", "start_run"):
        run, data = gp.start_run(cfg)
        bad = BAD_DATA[arg](*data)
    calls = {"Config": lambda: gp.Config(**{**TINY_SETTINGS, **arg}), "Glow": lambda: gp.Glow(**{**GLOW, **arg}),
             "train": lambda: gp.train(run, bad, log=quiet), "start_run": lambda: gp.start_run(cfg, bad)}
    with pytest.raises(ValueError, match=re.escape(name)):
        calls[call]()


@pytest.mark.slow
def test_a_nonfinite_loss_or_evaluation_stops_naming_the_part_that_broke_and_keeps_the_last_checkpoint(
        tmp_path, capsys):
    # part 1 steps first at a huge rate and breaks; part 2's loss, computed on part 1's output, shows it
    assert gp.main(TINY + ["--lr", "1e10,1e-3", "--epochs", "2", "--out", str(tmp_path / "early")]) == 1
    err = one_error_line(capsys, kind="stopped")
    assert "part 1" in err and "epoch 1" in err and not (tmp_path / "early" / "checkpoint.pt").exists(), err
    out = tmp_path / "run"
    assert gp.main(TINY + ["--mode", "alternate", "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    # continued with a rate that breaks part 2 at its first turn of epoch 2; part 1 stays finite
    assert gp.main(["--resume", "--epochs", "3", "--lr", "2e-3,1e10", "--out", str(out)]) == 1
    err = one_error_line(capsys, kind="stopped")
    assert "part 2" in err and "epoch 2" in err and "epoch 1" in err and str(out) in err, err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    # a non-finite evaluation: one training image, so ActNorm's init at the 1x1 top level takes the std of one value
    code = gp.main(["--dataset", "digits", "--levels", "3", "--steps", "1", "--hidden", "8", "--subset", "1",
                    "--batch-size", "1", "--epochs", "2", "--out", str(tmp_path / "one")])
    line = one_error_line(capsys, kind="stopped")
    assert code == 1 and "part" in line and not (tmp_path / "one" / "checkpoint.pt").exists()  # before its checkpoint



# --- runs: one writer per directory, nothing lost, exact resume


@pytest.mark.slow
def test_a_directory_has_one_writer_is_continued_only_by_its_command_and_never_silently_replaced(tmp_path, capsys):
    run, leftovers = tmp_path / "run", tmp_path / "leftovers"
    lock = gp.claim_run_dir(str(run))  # another process holds it (flock: another open file is another owner)
    assert gp.main(TINY + ["--epochs", "1", "--out", str(run)]) == 2
    assert "--out" in one_error_line(capsys)
    lock.close()  # the other writer ends
    assert gp.main(TINY + ["--epochs", "1", "--out", str(run)]) == 0
    leftovers.mkdir()
    (leftovers / "metrics.jsonl").write_text("{}\n")  # files, but no run
    capsys.readouterr()
    refused = {  # flags -> the file the one line names
        f"--epochs 2 --out {run}": "checkpoint.pt",  # a fresh run never replaces one
        f"--epochs 1 --out {leftovers}": "metrics.jsonl",
        f"--epochs 2 --resume --out {leftovers}": f"{leftovers}/checkpoint.pt",  # --resume, and no checkpoint
    }
    for flags, named in refused.items():
        assert gp.main(TINY + flags.split()) == 2, flags
        err = one_error_line(capsys)
        assert named in err and ("--resume" if "--resume" in flags else "--out") in err, flags
        assert ("--resume" in err) == ("--resume" in flags or named == "checkpoint.pt"), flags  # advice that works
    stopped = tmp_path / "stopped"  # a run killed while it wrote its first files: only these are left
    stopped.mkdir()
    for name in (".lock", "checkpoint.pt.tmp", "samples_001.png.tmp"):
        (stopped / name).write_text("half")
    assert gp.main(TINY + ["--epochs", "1", "--out", str(stopped)]) == 0  # the same command starts it again


def glow_main(argv, dies_at=0, counts=None):
    """gp.main(argv) in a process of its own, killed (SIGKILL) at its dies_at-th file operation (an open for
    writing, or a rename); 0: never. counts: a file that receives how many operations it made."""
    made = [0]

    def dies(real, counted):
        def operation(*args, **kwargs):
            if counted(*args, **kwargs):
                made[0] += 1
                if made[0] == dies_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return operation
    gp.open = dies(open, lambda path, mode="r", *args, **kwargs: "w" in mode)
    os.replace = dies(os.replace, lambda *args, **kwargs: True)
    code = gp.main(argv)
    if counts:
        counts.write_text(str(made[0]))  # (a Path: its own open, not glow_parts')
    sys.exit(code)


def glow_process(argv, **kwargs):
    """A started process running glow_main, forked from a server that loaded torch once (not seconds each)."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["test_glow_parts"])
    process = context.Process(target=glow_main, args=(argv,), kwargs=kwargs)
    process.start()
    return process


def run_dies_at(n, flags, out, counts=None):  # the exit code of a run killed at its n-th file operation
    process = glow_process(flags + ["--out", str(out)], dies_at=n, counts=counts)
    process.join(300)
    return process.exitcode


@pytest.mark.slow
@pytest.mark.parametrize("mode", gp.MODES)
def test_kill_9_then_resume_continues_exactly_like_an_uninterrupted_run(mode, tmp_path):
    flags = TINY + ["--mode", mode, "--epochs", "3", "--finetune", "1"]
    assert gp.main(flags + ["--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "killed"
    process = glow_process(flags + ["--out", str(out)])
    while not (out / "metrics.jsonl").exists() and process.is_alive():  # the first checkpoint
        time.sleep(0.02)
    process.kill()  # SIGKILL
    process.join()
    assert process.exitcode == -signal.SIGKILL, "the run ended before it could be killed"
    assert gp.main(flags + ["--out", str(out), "--resume"]) == 0  # the dead run's lock is gone with it
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(out)
    assert [m["epoch"] for m in resumed] == list(range(1, 5))
    assert [m["part_losses"] for m in resumed] == [m["part_losses"] for m in straight]


@pytest.mark.slow
def test_killed_at_every_file_operation_of_its_saves_a_run_is_continued_as_its_advice_says_and_ends_bit_identical(
        tmp_path, capsys):
    flags = TINY + ["--subset", "64", "--test-subset", "32", "--mode", "alternate", "--epochs", "2", "--ema", "0.9"]
    counts = tmp_path / "operations"  # an uninterrupted run, its file operations counted
    assert run_dies_at(0, flags, tmp_path / "straight", counts) == 0
    operations = int(counts.read_text())
    assert operations >= 2 * 2  # at least a write and a rename of each epoch's checkpoint
    straight, after_the_last = read_metrics(tmp_path / "straight"), []
    for n in range(1, operations + 1):
        out = tmp_path / f"killed-at-{n}"
        assert run_dies_at(n, flags, out) == -signal.SIGKILL, n
        again = []  # no checkpoint: the same command starts it again
        if (out / "checkpoint.pt").exists():  # the same command refuses, and its advice is --resume
            capsys.readouterr()
            assert gp.main(flags + ["--out", str(out)]) == 2 and "--resume" in one_error_line(capsys), n
            if torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2 and len(read_metrics(out)) == 1:
                after_the_last.append(n)  # killed after the last checkpoint, before its metrics and samples
            again = ["--resume"]  # (then nothing is left to train: metrics and samples come from the checkpoint)
        assert gp.main(flags + ["--out", str(out)] + again) == 0, n
        assert without_seconds(read_metrics(out)) == without_seconds(straight), n
        assert (out / "samples_002.png").stat().st_size > 1000
    assert after_the_last  # such a kill was among them


@pytest.mark.slow
@pytest.mark.parametrize("signals,code,name", [([signal.SIGTERM], 143, "SIGTERM"),
                                               ([signal.SIGINT, signal.SIGTERM, signal.SIGINT], 130, "Ctrl-C")])
def test_a_signal_stops_the_run_with_one_line_naming_the_kept_checkpoint_even_when_a_second_follows(
        signals, code, name, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "glow_parts.py", *TINY, "--epochs", "50", "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (out / "metrics.jsonl").exists() and proc.poll() is None:  # its first checkpoint is written
        time.sleep(0.02)
    for s in signals:  # in quick succession
        proc.send_signal(s)
        time.sleep(0.005)
    err = proc.communicate(timeout=60)[1]
    epoch = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    assert proc.returncode == code and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("glow_parts.py: interrupted") and name in err and f"epoch {epoch}" in err, err
    assert str(out) in err, err


@pytest.mark.slow
def test_ctrl_c_while_torch_loads_ends_the_command_at_once_without_a_traceback(tmp_path):
    proc = subprocess.Popen([sys.executable, "glow_parts.py", *TINY, "--epochs", "50", "--out", str(tmp_path / "r")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and "/torch/" not in open(f"/proc/{proc.pid}/maps").read():
        time.sleep(0.01)  # until torch loads: Python has started and run the command's first lines
    while proc.poll() is None:  # Ctrl-C again and again: while torch loads (seconds), then while it trains
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
    err = proc.stderr.read()
    if proc.returncode == -signal.SIGINT:  # ended by the signal itself, as a shell's Ctrl-C: silently
        assert err == "", err
    else:  # or stopped as a run: one line, and nothing was written
        assert proc.returncode == 130 and err.count("\n") == 1 and err.startswith("glow_parts.py: interrupted"), err
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_a_full_disk_or_a_directory_in_a_files_place_is_one_line_and_the_last_checkpoint_stays(tmp_path, capsys):
    out = tmp_path / "run"
    assert gp.main(TINY + ["--epochs", "1", "--out", str(out)]) == 0
    before = (out / "checkpoint.pt").read_bytes()

    def small_disk():  # every file this process writes may hold 20 KB: the checkpoint does not fit
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    proc = subprocess.run([sys.executable, "glow_parts.py", *TINY, "--epochs", "2", "--resume", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, preexec_fn=small_disk, timeout=300)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("glow_parts.py: stopped:") and f"{out}/checkpoint.pt" in proc.stderr, proc.stderr
    assert "epoch 1" in proc.stderr  # the checkpoint kept
    assert (out / "checkpoint.pt").read_bytes() == before and not list(out.glob("*.tmp"))
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").mkdir()  # a path that turned into a directory
    capsys.readouterr()
    assert gp.main(TINY + ["--epochs", "2", "--resume", "--out", str(out)]) == 1
    err = one_error_line(capsys, kind="stopped")
    assert f"{out}/metrics.jsonl" in err and "epoch 1" in err, err


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))  # a real failure: the file may not grow past 1 KB
    try:
        with pytest.raises(OSError) as failed:
            gp.write_atomic(str(path), bytes(5000))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert failed.value.filename == str(path) and failed.value.strerror == "File too large"
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One run of two steps, trained once: each malformed-checkpoint case damages its own copy."""
    out = tmp_path_factory.mktemp("trained") / "run"
    flags = TINY + ["--parts", "1,3", "--subset", "64", "--test-subset", "32", "--epochs", "1", "--out", str(out)]
    assert gp.main(flags) == 0
    return out


MALFORMED = {  # how -> (what it does to the checkpoint, in place; what the line names: PATH, the checkpoint)
    "no rng": (lambda c: c.__delitem__("rng"), "rng"),
    "config does not fit the weights": (lambda c: c["config"].update(hidden=9), "--resume"),
    "optimizers do not fit the parts": (lambda c: c.update(optimizers=c["optimizers"][::-1]), "--resume"),
    "one optimizer too few": (lambda c: c.update(optimizers=c["optimizers"][:1]), "--resume"),
    "a random state of another size": (lambda c: c["rng"].update(cpu=torch.zeros(3, dtype=torch.uint8)), "rng"),
    "scores of fewer images than the test set": (lambda c: c.update(scores=[c["scores"][0][:10]]), "scores"),
    "integer scores": (lambda c: c.update(scores=[c["scores"][0].long()]), "scores"),
    "config lacks a setting": (lambda c: c["config"].__delitem__("warmup"), "warmup"),
    "mode not a mode": (lambda c: c["config"].update(mode="greedy"), "--mode"),
    "negative hidden": (lambda c: c["config"].update(hidden=-3), "--hidden"),
    "steps not a number": (lambda c: c["config"].update(steps="2"), "--steps"),
    "history not a list": (lambda c: c.update(history={"epoch": 1}), "history"),
    "rng not a state": (lambda c: c.update(rng={"cpu": [1, 2, 3]}), "rng"),
    "epoch a float": (lambda c: c.update(epoch=1.0), "epoch"),
    "updates not ints": (lambda c: c.update(updates=["a", "b"]), "updates"),
    "not a dict": (lambda c: None, "PATH"),  # (saved inside a list)
    "negative update counts": (lambda c: c.update(updates=[-8, -8]), "updates"),
    "epoch -5": (lambda c: c.update(epoch=-5), "epoch"),
    "history emptied": (lambda c: c.update(history=[]), "history"),
    "an Adam moment of another shape": (lambda c: c["optimizers"][0]["state"][0].update(
        exp_avg=torch.zeros(c["optimizers"][0]["state"][0]["exp_avg"].numel() + 1)), "--resume"),
    "a NaN weight": (lambda c: next(iter(c["model"].values())).fill_(float("nan")), "PATH"),
    "an infinite Adam moment": (lambda c: c["optimizers"][1]["state"][0]["exp_avg_sq"].fill_(float("inf")), "PATH"),
    "steps that are not its history's": (lambda c: c.update(steps=c["steps"] + 1), "steps"),
    "Adam's betas out of range": (lambda c: c["optimizers"][0]["param_groups"][0].update(betas=(0.9, 1.5)), "Adam"),
}


@pytest.mark.parametrize("how", MALFORMED)
def test_a_malformed_checkpoint_is_refused_with_one_line_naming_what_is_wrong(how, trained_run, tmp_path, capsys):
    (damage, named), out = MALFORMED[how], tmp_path / "run"
    shutil.copytree(trained_run, out)
    path = out / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    damage(ckpt)
    torch.save([ckpt] if how == "not a dict" else ckpt, path)
    assert gp.main(["--out", str(out), "--resume", "--epochs", "2"]) == 2
    err = one_error_line(capsys)
    assert "--resume" in err and (str(path) if named == "PATH" else named) in err, err


@pytest.mark.slow
def test_a_checkpoint_of_another_run_is_refused_and_metrics_behind_the_checkpoint_are_rewritten(tmp_path, capsys):
    for name, seed in (("mine", "0"), ("other", "1")):
        assert gp.main(TINY + ["--epochs", "2", "--seed", seed, "--out", str(tmp_path / name)]) == 0
    mine = (tmp_path / "mine" / "metrics.jsonl").read_text()
    (tmp_path / "mine" / "checkpoint.pt").write_bytes((tmp_path / "other" / "checkpoint.pt").read_bytes())
    capsys.readouterr()
    assert gp.main(["--out", str(tmp_path / "mine"), "--resume", "--epochs", "3"]) == 2
    err = one_error_line(capsys)
    assert "--resume" in err and f"{tmp_path / 'mine'}/checkpoint.pt" in err, err
    assert (tmp_path / "mine" / "metrics.jsonl").read_text() == mine  # nothing of the run was replaced
    other = (tmp_path / "other" / "metrics.jsonl").read_text()
    (tmp_path / "other" / "metrics.jsonl").write_text(other.splitlines(keepends=True)[0])  # behind the checkpoint
    assert gp.main(["--out", str(tmp_path / "other"), "--resume", "--epochs", "3"]) == 0
    assert [m["epoch"] for m in read_metrics(tmp_path / "other")] == [1, 2, 3]


@pytest.mark.slow
def test_resume_applies_and_logs_the_flags_it_may_change_and_refuses_the_others(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert gp.main(TINY + ["--mode", "sequential", "--epochs", "2", "--out", out]) == 0
    capsys.readouterr()
    for flags in ("--hidden 32", "--mode full", "--dataset fashion-mnist", "--epochs 3", "--levels 1"):
        assert gp.main(["--out", out, "--resume", *flags.split()]) == 2
        line = one_error_line(capsys)  # the flag the user gave, not one derived from it (--levels: --parts)
        assert flags.split()[0] in line and "--parts" not in line, flags
    assert gp.main(["--out", out, "--resume", "--finetune", "1", "--lr", "1e-4", "--dataset", "digits"]) == 0
    logged = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resume:")]
    assert any("--lr" in line and "0.0001" in line for line in logged)  # each change, with its new value
    assert any("--finetune" in line for line in logged) and not any("--dataset" in line for line in logged)
    assert gp.main(["--out", out, "--resume", "--finetune", "0"]) == 2  # fewer epochs than the run has
    assert out in one_error_line(capsys)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["config"]["lr"] == [1e-4, 1e-4] and ckpt["config"]["hidden"] == 16
    assert read_metrics(tmp_path / "run")[-1]["steps"] == 3 * 16


@pytest.mark.slow
def test_default_warmup_is_known_from_the_settings_and_a_longer_resume_equals_a_longer_run(tmp_path):
    assert gp.Config().warmup == 50000 // 64 // 4 == 195
    assert gp.Config(dataset="fashion-mnist", image_size=32).warmup == 234
    assert gp.Config(dataset="digits", levels=2, steps=8, batch_size=1).warmup == 500  # at most 500
    assert gp.Config(dataset="digits", levels=2, steps=8, subset=1, batch_size=1).warmup == 1  # at least 1
    flags = TINY[:-4] + ["--epochs", "2"]  # no --warmup, no --lr
    assert gp.main(flags + ["--out", str(tmp_path / "two")]) == 0
    assert gp.main(flags + ["--out", str(tmp_path / "two"), "--resume", "--epochs", "3"]) == 0
    assert gp.main(TINY[:-4] + ["--epochs", "3", "--out", str(tmp_path / "three")]) == 0
    assert read_metrics(tmp_path / "two")[-1]["part_losses"] == read_metrics(tmp_path / "three")[-1]["part_losses"]
    assert torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["config"]["warmup"] == 512 // 32 // 2


@pytest.mark.slow
def test_ema_evaluates_samples_and_checkpoints_the_averaged_weights_and_resumes_exactly(tmp_path):
    assert gp.main(TINY + ["--ema", "1e-12", "--epochs", "1", "--out", str(tmp_path / "none")]) == 0
    m = read_metrics(tmp_path / "none")[0]
    assert m["test_bpd"] == m["raw_test_bpd"]  # decay ~0: the average is the weights themselves
    flags = TINY + ["--ema", "0.9", "--mode", "alternate"]
    assert gp.main(flags + ["--epochs", "3", "--out", str(tmp_path / "straight")]) == 0
    straight = read_metrics(tmp_path / "straight")
    assert all(m["test_bpd"] != m["raw_test_bpd"] for m in straight)
    ckpt = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    assert any(not torch.equal(ckpt["ema"][k], v) for k, v in ckpt["model"].items())
    assert gp.main(flags + ["--epochs", "2", "--out", str(tmp_path / "cut")]) == 0
    assert gp.main(flags + ["--epochs", "3", "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert without_seconds(read_metrics(tmp_path / "cut"))[-1] == without_seconds(straight)[-1]


# --- data parallel under torchrun


def average_on_two_processes(rank, path, results):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)  # process 1's gradient is twice process 0's
    gp.average_gradients(torch.optim.SGD([p], lr=1.0))
    results[rank] = p.grad.tolist()
    dist.destroy_process_group()


@pytest.mark.slow
def test_data_parallel_averages_each_parts_gradients_over_the_processes(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(average_on_two_processes, args=(str(tmp_path / "store"), results), nprocs=2)
    assert results[0] == results[1] == [1.5, 3.0, 4.5]  # the mean; a sum would give 3, 6, 9


@pytest.mark.slow
def test_ddp_on_two_processes_trains_one_run_and_resumed_equals_uninterrupted_bit_for_bit(tmp_path):
    flags = TINY + ["--mode", "alternate", "--ema", "0.9"]
    proc = torchrun(2, "glow_parts.py", flags + ["--epochs", "2", "--out", str(tmp_path / "straight")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("epoch ") == 2 and "Traceback" not in proc.stderr  # process 0 alone logs
    assert torchrun(2, "glow_parts.py", flags + ["--epochs", "1", "--out", str(tmp_path / "cut")]).returncode == 0
    proc = torchrun(2, "glow_parts.py", flags + ["--epochs", "2", "--out", str(tmp_path / "cut"), "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "cut")
    assert without_seconds(resumed) == without_seconds(straight)
    single = tiny_train(tiny_cfg(mode="alternate", epochs=2)).history
    assert [m["steps"] for m in straight[:2]] == [m["steps"] for m in single]  # one global batch a step


@pytest.mark.slow
def test_a_torchrun_usage_error_is_reported_once_as_one_line_and_no_process_waits_for_it(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("x")
    for flags, named in ((["--batch-size", "31", "--out", str(tmp_path / "r")], "--batch-size"),
                         (["--out", str(tmp_path / "taken")], "notes.txt")):  # only process 0 claims
        proc = torchrun(2, "glow_parts.py", TINY + ["--epochs", "1"] + flags, timeout=300)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("glow_parts.py:")]
        assert proc.returncode != 0 and lines == [lines[0]] and named in lines[0], proc.stderr[-2000:]
        # no process waits for a peer until torchrun kills it: torchrun names the SIGKILL it escalates to
        assert "SIGKILL" not in proc.stderr, proc.stderr[-2000:]
        # torchrun itself reports a failed child with its own traceback; none comes from our processes
        assert "glow_parts.py\", line" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr


def workers(parent):
    """{rank: pid} of torchrun's worker processes."""
    found = {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            if int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) == parent:
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                found[int(next(v for v in env if v.startswith(b"RANK="))[5:])] = pid
        except (OSError, ValueError, IndexError, StopIteration):
            pass
    return found


def running(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def data_parallel_run(tmp_path):
    """(torchrun, its run directory, {rank: pid}) of a run on two processes, once it has its first checkpoint."""
    out = tmp_path / "ddp"
    proc = torchrun(2, "glow_parts.py", TINY + ["--epochs", "50", "--out", str(out)], popen=True)
    while not (out / "metrics.jsonl").exists() and proc.poll() is None:
        time.sleep(0.05)
    return proc, out, workers(proc.pid)


@pytest.mark.slow
def test_a_signal_ends_a_process_at_once_while_it_waits_for_its_peer(tmp_path):
    proc, out, ranks = data_parallel_run(tmp_path)
    os.kill(ranks[1], signal.SIGSTOP)  # process 1 stops answering: process 0 waits for it in an all-reduce
    time.sleep(1)
    os.kill(ranks[0], signal.SIGTERM)
    for _ in range(3000):  # until process 0 ends; a guard against a hang (gloo would wait 30 min), no speed claim
        if not running(ranks[0]):
            break
        time.sleep(0.1)
    ended = not running(ranks[0])  # while its peer is still stopped
    os.kill(ranks[1], signal.SIGCONT)
    err = proc.communicate(timeout=120)[1]
    assert ended and proc.returncode != 0, err[-2000:]  # torchrun reports its child's end in its own words
    assert 'glow_parts.py", line' not in err, err[-3000:]  # no traceback from our processes
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] >= 1  # and the checkpoint is whole


@pytest.mark.slow
def test_a_dead_process_under_torchrun_leaves_one_line_from_the_survivor_naming_the_kept_checkpoint(tmp_path):
    proc, out, ranks = data_parallel_run(tmp_path)
    os.kill(ranks[1], signal.SIGKILL)
    err = proc.communicate(timeout=120)[1]
    ours = [line for line in err.splitlines() if line.startswith("glow_parts.py:")]
    assert proc.returncode != 0 and len(ours) == 1 and ours[0].startswith("glow_parts.py: stopped:"), err[-3000:]
    assert str(out) in ours[0] and "glow_parts.py\", line" not in err, err[-3000:]


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "abc"}, {"WORLD_SIZE": "2"}, {"RANK": "1", "LOCAL_RANK": "x"}])
def test_a_stray_torchrun_variable_does_not_make_a_plain_run_a_data_parallel_one(env, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)  # what torchrun's launch sets: the one sign of it
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert gp.main(TINY + ["--epochs", "1", "--subset", "64", "--test-subset", "32", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().err == "" and read_metrics(tmp_path)[-1]["steps"] == 64 // 32


# --- the tutorial


@pytest.mark.slow
def test_tutorial_notebook_executes_top_to_bottom(monkeypatch):
    import nbformat  # here, not at the top: 3 s to import, which the fast loop does not need
    from nbclient import NotebookClient
    monkeypatch.setenv("GLOW_PARTS_QUICK", "1")  # fewer epochs; the same code runs
    nb = nbformat.read(os.path.join(ROOT, "tutorial.ipynb"), as_version=4)
    assert any(cell.cell_type == "code" and "import glow_parts" in cell.source for cell in nb.cells)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    # execute() raises on the first cell that fails; what it stored must show the pictures the notebook draws
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 10
    text = "".join(o.get("text", "") for o in outputs)
    totals = [float(v) for v in re.findall(r"grid integral of p\^\(\d\) under \S+: ([\d.]+)", text)]
    assert len(totals) == 6 and all(abs(t - 1) < 0.01 for t in totals), totals  # each truncated density's
    assert "the same initial weights in every run: True" in text
