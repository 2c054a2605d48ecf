"""Oracles for glow_parts: round trips, brute-force Jacobians, dense vs LU, gradient isolation, the CLI.

Run: python -m pytest -q test_glow_parts.py
"""
import math

import pytest
import torch

import glow_parts as gp

SPLITS = [None, [2, 2, 2], [3, 1, 2], [1, 1, 1, 3], [6]]  # per level, mid-level cuts, one part


def tiny_glow(parts=None, dtype=torch.float32, part_prior="standard", seed=0):
    torch.manual_seed(seed)
    return gp.Glow(in_channels=1, image_size=8, n_levels=3, n_steps=2, hidden=8, parts=parts,
                   part_prior=part_prior).to(dtype)


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


def test_lu_conv_equals_dense_conv_with_composed_weight():
    torch.manual_seed(0)
    layer = perturbed(gp.InvConv2dLU(6).double())
    W = layer.weight()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    dense = torch.einsum("oc,bchw->bohw", W, x)
    y, logdet = layer(x)
    assert torch.allclose(y, dense, atol=1e-12)
    assert torch.allclose(logdet[0], 25 * torch.linalg.slogdet(W)[1], rtol=1e-10)


def test_lu_conv_starts_as_a_rotation():
    torch.manual_seed(0)
    W = gp.InvConv2dLU(5).weight()
    assert torch.allclose(W @ W.T, torch.eye(5), atol=1e-5)


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
    model = tiny_glow(parts)
    x = torch.rand(8, 1, 8, 8) - 0.5
    model.initialize(x)
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


def test_every_parameter_belongs_to_exactly_one_part():
    model = tiny_glow([3, 1, 2], part_prior="learned")
    owned = [id(p) for part in model.parts for p in part.parameters()]
    assert len(owned) == len(set(owned))
    assert set(owned) == {id(p) for p in model.parameters()}


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


def test_learned_part_prior_starts_equal_to_standard():
    x = torch.rand(8, 1, 8, 8) - 0.5
    a, b = tiny_glow([3, 1, 2]), tiny_glow([3, 1, 2], part_prior="learned")
    assert torch.allclose(a.part_loss(x, 0), b.part_loss(x, 0))


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


@pytest.mark.parametrize("parts,match", [
    ([2, 2], "sum to 4"), ([3, 0, 3], r"must be in \[1, inf\], got 0"), ([3, -1, 4], "got -1"),
    ([2.5, 3.5], "want int, got 2.5"), (["3", "3"], "want int"), ([], "want one int or a list"),
    ([True, 3], "want int, got True")])
def test_malformed_parts_are_refused_naming_the_flag(parts, match):
    with pytest.raises(gp.UsageError, match="--parts.*" + match):
        gp.Config(dataset="digits", levels=3, steps=2, parts=parts)


def test_image_size_not_divisible_by_two_to_the_levels_raises():
    with pytest.raises(ValueError, match="divisible"):
        gp.Glow(in_channels=1, image_size=12, n_levels=3, n_steps=2, hidden=8)


def test_default_model_is_the_cifar10_glow_cut_as_the_poster_in_the_library_and_the_cli():
    model = gp.Glow()
    assert model.part_sizes == [32, 16, 16, 32] == gp.Config().parts
    assert sum(isinstance(l, gp.FlowStep) for p in model.parts for l in p.layers) == 96
    assert gp.Config().prior_bound == 5.0 and all(m.bound == 5.0 for m in model.modules() if isinstance(m, gp.Split))
    assert gp.default_parts(2, 8) == [8, 8] and gp.default_parts(3, 5) == [5, 2, 3, 5]


# --- speed: torch.compile changes neither values nor gradients


def grads_of(model, x):
    model.zero_grad(set_to_none=True)
    loss = model.bits_per_dim(model.log_prob(x)).mean() + model.part_loss(x, 1)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_a_compiled_model_gives_the_eager_loss_and_gradients_and_stays_invertible():
    model = trained(tiny_glow([3, 3]), torch.float32)
    x = torch.rand(8, 1, 8, 8) - 0.5
    eager_loss, eager = grads_of(model, x)
    for part in model.parts:
        part.compile(dynamic=False)  # as build_model does with --compile
    loss, compiled = grads_of(model, x)
    assert torch.allclose(loss, eager_loss, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(compiled, eager))
    with torch.no_grad():
        zs, _, _ = model(x)
        assert (model.reverse(zs) - x).abs().max() < 1e-4
    assert set(model.state_dict()) == set(tiny_glow([3, 3]).state_dict())  # checkpoints keep their keys


# --- the split prior far outside its training range, and what the evaluation reports


def out_of_range_split(bound=None):
    """A Split whose prior predicts log std = -h (a zero conv set by hand): the linear map a trained
    prior is, which gives a very negative log std to an h larger than the ones it was fitted on."""
    split = gp.Split(4, bound)
    with torch.no_grad():
        split.prior.conv.weight.zero_()
        for c in range(2):  # log std of channel c of z = -h_c at the same pixel (centre tap)
            split.prior.conv.weight[2 + c, c, 1, 1] = -1.0
    return split


def test_a_split_prior_explodes_for_an_input_outside_its_range_and_the_bound_caps_it():
    z = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))

    def logp(bound, h):  # log p(z | h) of a prior that predicts log std = -h at every pixel
        return out_of_range_split(bound)(torch.cat([torch.full_like(z, h), z], 1))[2].item()

    def exact(logs):  # log N(z; 0, exp(logs)^2), summed
        return float((-0.5 * (math.log(2 * math.pi) + 2 * logs + z ** 2 * math.exp(-2 * logs))).sum())
    assert logp(None, 2.0) == pytest.approx(exact(-2.0)) and logp(None, 7.0) == pytest.approx(exact(-7.0))
    assert logp(None, 7.0) < 1000 * logp(None, 2.0) < 0  # from h = 2 to h = 7: e^10 times the squared error
    assert logp(3.0, 7.0) == pytest.approx(exact(3 * math.tanh(-7 / 3)))  # bounded: log std > -3
    assert logp(3.0, 7.0) > exact(-3.0) and logp(3.0, 0.1) == pytest.approx(exact(-0.1), rel=1e-3)


class GivenScores(torch.nn.Module):
    """A stand-in model for evaluate(): each of its 'images' is its own bits/dim, one number."""
    n_bits, parts = 8, [None]

    def truncated(self, x):
        return [x]

    def bits_per_dim(self, log_prob):
        return log_prob


def test_evaluate_reports_the_median_the_images_worse_than_noise_and_what_they_add_to_the_mean(monkeypatch):
    monkeypatch.setattr(gp, "preprocess", lambda x, n_bits, generator=None: x)  # the scores are the images
    scores = 3.5 + 0.1 * torch.randn(1000, generator=torch.Generator().manual_seed(0))
    healthy = gp.evaluate(GivenScores(), scores, 64, torch.device("cpu"))
    assert healthy["test_outliers"] == 0 and healthy["test_outlier_share"] == 0.0
    assert healthy["test_median_bpd"] == pytest.approx(scores.median().item())
    assert torch.equal(healthy["per_image"], scores)  # each image's bits/dim, in order
    spiked = scores.clone()
    spiked[[719, 2, 500]] = torch.tensor([1.6e4, 1.8e3, 50.0])  # two images far off, one a little
    m = gp.evaluate(GivenScores(), spiked, 64, torch.device("cpu"))
    assert m["test_outliers"] == 3 and torch.nonzero(m["per_image"] > 8)[:, 0].tolist() == [2, 500, 719]
    rest = spiked[spiked <= 8].double().mean().item()  # the mean without the three
    assert m["test_outlier_share"] == pytest.approx(spiked.double().mean().item() - rest)
    assert m["test_outlier_share"] > 17 > gp.FEW and abs(m["test_median_bpd"] - 3.5) < 0.01
    few = scores.clone()
    few[:3] = 9.0  # three images just above noise: they add about (9 - 3.5) * 3 / 1000 = 0.0165 < gp.FEW
    assert gp.evaluate(GivenScores(), few, 64, torch.device("cpu"))["test_outlier_share"] == pytest.approx(
        (9 - few[3:].double().mean().item()) * 3 / 1000, rel=1e-6)
    worst = torch.full((100,), 9.5)  # every image worse than noise: the mean minus n_bits
    assert gp.evaluate(GivenScores(), worst, 64, torch.device("cpu"))["test_outlier_share"] == pytest.approx(1.5)


# --- training mechanisms, data, checkpoints, the CLI

import json  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

TINY = ["--dataset", "digits", "--levels", "2", "--steps", "2", "--hidden", "16", "--subset", "512",
        "--batch-size", "32", "--warmup", "10", "--lr", "2e-3"]


def quiet(*args):
    pass


def tiny_cfg(tmp_path=None, **overrides):
    tiny = dict(dataset="digits", levels=2, steps=2, hidden=16, subset=512, batch_size=32, warmup=10, lr=2e-3)
    return gp.Config(**{**tiny, "out": str(tmp_path) if tmp_path else None, **overrides})


def tiny_train(cfg):
    return gp.train(*gp.start_run(cfg), log=quiet)


def initial_test_bpd(cfg):
    run, (_, test) = gp.start_run(replace(cfg, out=None))  # the initialised model every run starts from
    return gp.evaluate(run.model, test, 64, torch.device(cfg.device))["test_bpd"]


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def one_error_line(capsys, prog="glow_parts.py", kind="error"):
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: {kind}:") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("mode", gp.MODES)
def test_each_mechanism_lowers_test_bpd_on_digits(mode):
    cfg = tiny_cfg(mode=mode, epochs=3)
    history = tiny_train(cfg).history
    assert history[-1]["test_bpd"] < initial_test_bpd(cfg) - 0.1
    parts = history[-1]["train_part_losses"]  # the parts' own losses; sequential's last epoch is part 2's turn
    assert parts is None if mode == "full" else [v is not None for v in parts] == [mode != "sequential", True]


def test_schedule_alternate_round_robin_and_sequential_in_order():
    assert [gp.learning_parts("alternate", s, 12, 3) for s in range(5)] == [[0], [1], [2], [0], [1]]
    assert [gp.learning_parts("alternate", s, 12, 3, every=2) for s in range(5)] == [[0], [0], [1], [1], [2]]
    assert [gp.learning_parts("sequential", s, 12, 3)[0] for s in range(12)] == [0] * 4 + [1] * 4 + [2] * 4
    assert gp.learning_parts("parallel", 7, 12, 3) == gp.learning_parts("finetune", 0, 1, 3) == [0, 1, 2]


@pytest.mark.parametrize("mode,learning", [("alternate", [0]), ("alternate", [1]), ("sequential", [2]),
                                           ("full", [0, 1, 2])])
def test_a_step_changes_only_the_learning_parts_parameters(mode, learning, monkeypatch):
    monkeypatch.setattr(gp, "learning_parts", lambda *args: learning)
    cfg = tiny_cfg(mode=mode, epochs=1, parts=[1, 1, 2], subset=32)
    run, data = gp.start_run(cfg)
    before = [[p.detach().clone() for p in part.parameters()] for part in run.model.parts]
    gp.train(run, data, log=quiet)
    for k, part in enumerate(run.model.parts):
        changed = any(not torch.equal(a, b) for a, b in zip(before[k], part.parameters()))
        assert changed == (k in learning), (k, learning)
    assert run.updates == [1 if k in learning else 0 for k in range(3)]


def test_clip_scales_each_learning_parts_gradient_to_the_norm_given_and_no_other():
    run, (images, _) = gp.start_run(tiny_cfg(clip=1e-3))
    x = gp.preprocess(images[:32], 4)
    sum(gp.losses(run.model, x, "alternate", [1])).backward()  # part 2's truncated loss: its gradient only
    norm = lambda part: torch.cat([p.grad.flatten() for p in part.parameters() if p.grad is not None]).norm()  # noqa
    before = norm(run.model.parts[1])
    gp.step_parts(run, [1])
    assert before > 1e-2 and norm(run.model.parts[1]).item() == pytest.approx(1e-3, rel=1e-4)
    assert all(p.grad is None for p in run.model.parts[0].parameters()) and run.updates == [0, 1]


def test_finetune_phase_follows_the_mode_and_trains_every_part(tmp_path):
    history = tiny_train(tiny_cfg(mode="sequential", epochs=2, finetune=1)).history
    assert [m["phase"] for m in history] == ["sequential", "sequential", "finetune"]
    assert history[0]["train_part_losses"][0] is not None  # part 1's turn
    assert history[2]["train_part_losses"] is None  # end to end: no part learns alone


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


def test_decay_lowers_every_rate_along_a_cosine_to_zero_at_its_epoch(monkeypatch):
    run, data = gp.start_run(tiny_cfg(mode="full", epochs=2, warmup=1, decay=2, subset=64))  # 2 steps an epoch
    rates, real = [], gp.step_parts
    monkeypatch.setattr(gp, "step_parts",
                        lambda run, learning, decay: rates.append(decay) or real(run, learning, decay))
    gp.train(run, data, log=quiet)
    assert rates == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)])
    assert run.optimizers[0].param_groups[0]["lr"] == pytest.approx(2e-3 * rates[-1])


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
    import torchvision.datasets.cifar as cifar
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


def write_idx_labels(path, n):
    path.write_bytes((2049).to_bytes(4, "big") + n.to_bytes(4, "big") + bytes(n))


def write_fashion_mnist(root):
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 6)):
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", n)
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
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.mnist as mnist

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
            assert code == 2 and where in err and "--dataset digits" in err, err
    assert not (tmp_path / "data").exists()  # the failed load created it, and took it away again
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]  # nothing added, nothing lost


@pytest.mark.parametrize("swap,match", [
    (lambda raw: (raw / "train-images-idx3-ubyte").write_bytes((raw / "t10k-images-idx3-ubyte").read_bytes()),
     "training split in .* holds 6 images of 1x28x28, not 12 of 1x28x28"),  # the test file in the training's place
    (lambda raw: write_idx_images(raw / "t10k-images-idx3-ubyte", np.zeros((6, 32, 32))),
     "test split in .* holds 6 images of 1x32x32, not 6 of 1x28x28")])  # another image size: not resized
def test_data_that_is_not_what_its_dataset_says_is_refused_in_one_line(swap, match, tmp_path, capsys, monkeypatch):
    small_datasets(monkeypatch)
    swap(write_fashion_mnist(tmp_path))
    assert gp.main(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--image-size", "16", "--levels", "2",
                    "--steps", "2", "--epochs", "1", "--batch-size", "4", "--out", str(tmp_path / "run")]) == 2
    assert re.search(match, one_error_line(capsys))


@pytest.mark.parametrize("damage", [lambda b: b"\x00\x00\x08\x07" + b[4:], lambda b: b[:-100], lambda b: b + bytes(7)],
                         ids=["wrong magic number", "truncated", "padded"])
def test_a_damaged_idx_file_is_one_line_naming_the_dataset_and_its_folder(damage, tmp_path, capsys, monkeypatch):
    offline(monkeypatch)
    small_datasets(monkeypatch)
    path = write_fashion_mnist(tmp_path) / "train-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    code = gp.main(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--image-size", "16", "--levels", "2",
                    "--steps", "2", "--epochs", "1", "--batch-size", "4", "--out", str(tmp_path / "run")])
    err = one_error_line(capsys)
    assert code == 2 and "could not load fashion-mnist" in err and f"{tmp_path}/FashionMNIST/raw/" in err, err
    assert path.exists()  # the user's files stay where they are


BAD = {  # flags (added to TINY --epochs 1 --out <fresh>) -> what the one line must say
    "unknown dataset": (["--dataset", "imagenet"], "--dataset"),
    "unknown mode": (["--mode", "greedy"], "--mode"),
    "parts do not sum": (["--parts", "1,2"], "sum to 3"),
    "parts not integers": (["--parts", "2,x"], "--parts"),
    "parts not positive": (["--parts", "4,0"], "--parts"),
    "image size": (["--image-size", "10"], "divisible"),
    "image size huge": (["--image-size", "1073741824"], "--image-size"),
    "negative epochs": (["--epochs", "-1"], "--epochs"),
    "negative finetune": (["--finetune", "-2"], "--finetune"),
    "batch size": (["--batch-size", "0"], "--batch-size"),
    "lr zero": (["--lr", "0"], "--lr"),
    "lr inf": (["--lr", "inf"], "--lr"),
    "lr nan": (["--lr", "nan"], "--lr"),
    "lr that float32 makes 0": (["--lr", "1e-300"], "--lr: 1e-300 is not a number that float32 holds"),
    "lr count": (["--lr", "1e-3,1e-3,1e-3"], "3 rates for 2 parts"),
    "lr negative": (["--lr", "1e-3,-1"], "--lr"),
    "levels zero": (["--levels", "0"], "--levels"),
    "levels absurd": (["--levels", "1000"], "--levels"),
    "steps": (["--steps", "0"], "--steps"),
    "hidden": (["--hidden", "0"], "--hidden"),
    "subset zero": (["--subset", "0"], "--subset"),
    "subset larger than the data": (["--subset", "1501"], "--subset 1501 is more than the 1500 training images of digits"),
    "test subset zero": (["--test-subset", "0"], "--test-subset"),
    "test subset larger than the data": (["--test-subset", "298"], "--test-subset 298 is more than the 297 test images of digits"),
    "n bits low": (["--n-bits", "0"], "--n-bits"),
    "n bits high": (["--n-bits", "17"], "--n-bits"),
    "unknown flag": (["--bogus"], "--bogus"),
    "not a number": (["--epochs", "many"], "--epochs"),
    "no such device": (["--device", "cuda:7"], "--device"),
    "not a device": (["--device", "toaster"], "--device"),
    "empty device": (["--device", ""], "--device"),
    "a device torch knows but cannot use here": (["--device", "xla"], "--device xla: not usable here (Could not run"),
    "a device that holds shapes only": (["--device", "meta"], "--device meta: not usable here (Cannot copy out"),
    "empty out": (["--out", ""], "--out"),
    "empty data dir": (["--data-dir", ""], "--data-dir"),
    "batch larger than data": (["--subset", "16", "--batch-size", "32"], "--batch-size 32 is more than the 16 training images"),
    "seed too large": (["--seed", "99999999999999999999999"], "--seed"),
    "seed negative": (["--seed", "-1"], "--seed"),
    "out under /proc": (["--out", "/proc/glow-parts-test/run"], "cannot create"),
    "unknown part prior": (["--part-prior", "wide"], "--part-prior"),
    "prior bound negative": (["--prior-bound", "-1"], "--prior-bound"),
    "prior bound inf": (["--prior-bound", "inf"], "--prior-bound"),
    "prior bound that float32 makes 0": (["--prior-bound", "1e-300"], "--prior-bound: 1e-300 is not"),
    "prior bound that float32 makes inf": (["--prior-bound", "1e300"], "--prior-bound: 1e+300 is not"),
    "decay zero": (["--decay", "0"], "--decay"),
    "compare is an experiment": (["--compare"], "--compare"),
    "hidden absurd": (["--hidden", "10000000000"], "--hidden: must be in [1, 65536]"),
    "ema out of range": (["--ema", "1"], "--ema"),
    "clip zero": (["--clip", "0"], "--clip"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_one_line_and_no_traceback(case, tmp_path, capsys):
    flags, match = BAD[case]
    out = ["--out", str(tmp_path / "run")] if "--out" not in flags else []
    assert gp.main(TINY + ["--epochs", "1"] + out + flags) == 2, case
    assert match in one_error_line(capsys), case


def test_nonfinite_loss_stops_naming_part_and_epoch_and_keeps_last_checkpoint(tmp_path, capsys, monkeypatch):
    real, calls = gp.Glow.truncated, [0]

    def poisoned(model, *args, **kwargs):
        log_probs = real(model, *args, **kwargs)
        if torch.is_grad_enabled():  # a training step, not an evaluation
            calls[0] += 1
            if calls[0] > 512 // 32 + 3:  # epoch 2, fourth step
                log_probs = [lp * float("nan") for lp in log_probs]
        return log_probs
    monkeypatch.setattr(gp.Glow, "truncated", poisoned)
    out = tmp_path / "run"
    assert gp.main(TINY + ["--mode", "alternate", "--epochs", "3", "--out", str(out)]) == 1
    err = one_error_line(capsys, kind="stopped")
    assert "part 2 of 2" in err and "epoch 2" in err and f"the checkpoint of epoch 1 in {out} is kept" in err, err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_nonfinite_loss_names_the_part_that_broke_not_the_one_that_noticed(tmp_path, capsys):
    # part 1 steps first at a huge rate and breaks; part 2's loss, computed on part 1's output, shows it
    assert gp.main(TINY + ["--lr", "1e10,1e-3", "--epochs", "2", "--out", str(tmp_path / "run")]) == 1
    err = one_error_line(capsys, kind="stopped")
    assert "part 1 of 2" in err and "no checkpoint was written" in err, err


# --- runs: one writer per directory, nothing lost, exact resume


def test_a_second_writer_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    lock = gp.claim_run_dir(str(out))  # another process holds it (flock: another open file is another owner)
    assert gp.main(TINY + ["--epochs", "1", "--out", str(out)]) == 2
    assert "in use by another run" in one_error_line(capsys)
    lock.close()  # the other writer ends
    assert gp.main(TINY + ["--epochs", "1", "--out", str(out)]) == 0


def test_out_that_cannot_be_created_is_refused_before_loading_data(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(gp, "prepare_data", lambda cfg: pytest.fail("data loaded before the check"))
    assert gp.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "file" / "run")]) == 2
    assert "cannot create or write it" in one_error_line(capsys)


def test_a_directory_is_continued_only_by_its_command_and_never_silently_replaced(tmp_path, capsys):
    run = tmp_path / "run"
    assert gp.main(TINY + ["--epochs", "1", "--out", str(run)]) == 0
    (tmp_path / "leftovers").mkdir()
    (tmp_path / "leftovers" / "metrics.jsonl").write_text("{}\n")  # files, but no run
    capsys.readouterr()
    refused = {  # flags -> what the one line says
        f"--epochs 2 --out {run}": "already holds checkpoint.pt",  # a fresh run never replaces one
        f"--epochs 1 --out {tmp_path / 'leftovers'}": "already holds metrics.jsonl",
        f"--epochs 2 --resume --out {tmp_path / 'leftovers'}": "no sound checkpoint at",
    }
    for flags, match in refused.items():
        assert gp.main(TINY + flags.split()) == 2, flags
        assert match in one_error_line(capsys), flags
    stopped = tmp_path / "stopped"  # a run killed while it wrote its first files: only these are left
    stopped.mkdir()
    for name in (".lock", "checkpoint.pt.tmp", "samples_001.png.tmp"):
        (stopped / name).write_text("half")
    assert gp.main(TINY + ["--epochs", "1", "--out", str(stopped)]) == 0  # the same command starts it again


@pytest.mark.parametrize("mode", gp.MODES)
def test_kill_9_then_resume_continues_exactly_like_an_uninterrupted_run(mode, tmp_path):
    flags = TINY + ["--mode", mode, "--epochs", "6", "--finetune", "2"]
    assert gp.main(flags + ["--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "glow_parts.py", *flags, "--out", str(out)], cwd=HERE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (out / "metrics.jsonl").exists() and proc.poll() is None:  # the first checkpoint
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert gp.main(flags + ["--out", str(out), "--resume"]) == 0  # the dead run's lock is gone with it
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(out)
    assert [m["epoch"] for m in resumed] == list(range(1, 9))
    assert [m["part_losses"] for m in resumed] == [m["part_losses"] for m in straight]


DIES_AT = """
import os, signal, sys
import glow_parts as gp
n, count = int(sys.argv[1]), [0]
def dies(real, counts):  # the process is killed at file operation n: an open for writing, or a rename
    def operation(*args, **kwargs):
        if counts(*args, **kwargs):
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return operation
gp.open = dies(open, lambda path, mode="r", *args, **kwargs: "w" in mode)
os.replace = dies(os.replace, lambda *args, **kwargs: True)
sys.exit(gp.main(sys.argv[2:]))
"""


def test_killed_at_every_file_operation_of_its_saves_a_run_is_continued_and_ends_bit_identical(tmp_path):
    flags = TINY + ["--mode", "alternate", "--epochs", "2", "--ema", "0.9"]
    assert gp.main(flags + ["--out", str(tmp_path / "straight")]) == 0
    straight = read_metrics(tmp_path / "straight")
    for n in range(1, 9):  # the lock; epoch 1's checkpoint, metrics and samples (open, rename each); epoch 2's
        out = tmp_path / f"killed-at-{n}"
        proc = subprocess.run([sys.executable, "-c", DIES_AT, str(n), *flags, "--out", str(out)], cwd=HERE,
                              capture_output=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, (n, proc.stderr[-2000:])
        again = ["--resume"] if (out / "checkpoint.pt").exists() else []  # else the same command starts it again
        assert gp.main(flags + ["--out", str(out)] + again) == 0, n
        assert [m | {"seconds": 0} for m in read_metrics(out)] == [m | {"seconds": 0} for m in straight], n
        assert (out / "samples_002.png").exists()


def signalled(tmp_path, signals):
    """A run stopped by `signals`, sent in quick succession once it has written its first checkpoint."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "glow_parts.py", *TINY, "--epochs", "50", "--out", str(out)],
                            cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (out / "metrics.jsonl").exists() and proc.poll() is None:
        time.sleep(0.02)
    for s in signals:
        proc.send_signal(s)
        time.sleep(0.005)
    err = proc.communicate(timeout=60)[1]
    return proc.returncode, err, out


@pytest.mark.parametrize("signals,code,name", [([signal.SIGTERM], 143, "SIGTERM"),
                                               ([signal.SIGINT, signal.SIGTERM, signal.SIGINT], 130, "Ctrl-C")])
def test_a_signal_stops_the_run_with_one_line_naming_the_kept_checkpoint_even_when_a_second_follows(
        signals, code, name, tmp_path):
    returncode, err, out = signalled(tmp_path, signals)
    epoch = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    assert returncode == code and "Traceback" not in err and err.count("\n") == 1, err
    assert f"interrupted ({name}); the checkpoint of epoch {epoch} in {out} is kept" in err


def test_ctrl_c_while_torch_loads_ends_the_command_at_once_without_a_traceback(tmp_path):
    proc = subprocess.Popen([sys.executable, "glow_parts.py", *TINY, "--epochs", "50", "--out", str(tmp_path / "r")],
                            cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.2)  # Python itself has started
    while proc.poll() is None:  # Ctrl-C again and again: while torch loads (seconds), then while it trains
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
    err = proc.stderr.read()
    assert (proc.returncode, err) in ((-signal.SIGINT, ""),  # ended by the signal itself, as a shell's Ctrl-C
                                      (130, "glow_parts.py: interrupted (Ctrl-C); no checkpoint was written\n")), err
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_a_full_disk_or_a_directory_in_a_files_place_is_one_line_and_the_last_checkpoint_stays(tmp_path, capsys):
    out = tmp_path / "run"
    assert gp.main(TINY + ["--epochs", "1", "--out", str(out)]) == 0
    before = (out / "checkpoint.pt").read_bytes()

    def small_disk():  # every file this process writes may hold 20 KB: the checkpoint does not fit
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    proc = subprocess.run([sys.executable, "glow_parts.py", *TINY, "--epochs", "2", "--resume", "--out", str(out)],
                          cwd=HERE, capture_output=True, text=True, preexec_fn=small_disk, timeout=300)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr == f"glow_parts.py: stopped: File too large: {out}/checkpoint.pt; the checkpoint of epoch 1 " \
                          f"in {out} is kept\n"
    assert (out / "checkpoint.pt").read_bytes() == before and not list(out.glob("*.tmp"))
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").mkdir()  # a path that turned into a directory
    capsys.readouterr()
    assert gp.main(TINY + ["--epochs", "2", "--resume", "--out", str(out)]) == 1
    err = one_error_line(capsys, kind="stopped")
    assert f"Is a directory: {out}/metrics.jsonl; the checkpoint of epoch 1 in {out} is kept" in err, err


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


def test_a_model_too_big_for_memory_is_refused_in_one_line_before_anything_is_allocated(tmp_path, capsys):
    assert gp.main(TINY + ["--hidden", "60000", "--levels", "1", "--epochs", "1", "--out", str(tmp_path)]) == 2
    assert "GiB to train" in one_error_line(capsys)


def malform(ckpt, how, other=None):
    if how == "no rng":
        del ckpt["rng"]
    elif how == "config does not fit the weights":
        ckpt["config"]["hidden"] = 9
    elif how == "optimizers do not fit the parts":
        ckpt["optimizers"] = ckpt["optimizers"][::-1]
    elif how == "one optimizer too few":
        ckpt["optimizers"] = ckpt["optimizers"][:1]
    elif how == "config lacks a setting":
        del ckpt["config"]["warmup"]
    elif how == "mode not a mode":
        ckpt["config"]["mode"] = "greedy"
    elif how == "negative hidden":
        ckpt["config"]["hidden"] = -3
    elif how == "steps not a number":
        ckpt["config"]["steps"] = "2"
    elif how == "history not a list":
        ckpt["history"] = {"epoch": 1}
    elif how == "rng not a state":
        ckpt["rng"] = {"cpu": [1, 2, 3]}
    elif how == "epoch a float":
        ckpt["epoch"] = 1.0
    elif how == "updates not ints":
        ckpt["updates"] = ["a", "b"]
    elif how == "not a dict":
        ckpt = [ckpt]
    elif how == "negative update counts":
        ckpt["updates"] = [-8, -8]
    elif how == "epoch -5":
        ckpt["epoch"] = -5
    elif how == "history emptied":
        ckpt["history"] = []
    elif how == "an Adam moment of another shape":
        state = ckpt["optimizers"][0]["state"][0]
        state["exp_avg"] = torch.zeros(state["exp_avg"].numel() + 1)
    elif how == "a NaN weight":
        key = next(iter(ckpt["model"]))
        ckpt["model"][key] = torch.full_like(ckpt["model"][key], float("nan"))
    elif how == "an infinite Adam moment":
        ckpt["optimizers"][1]["state"][0]["exp_avg_sq"].fill_(float("inf"))
    elif how == "steps that are not its history's":
        ckpt["steps"] += 1
    elif how == "a random state of another size":
        ckpt["rng"]["cpu"] = torch.zeros(3, dtype=torch.uint8)
    elif how == "scores of fewer images than the test set":
        ckpt["scores"] = [ckpt["scores"][0][:10]]
    elif how == "integer scores":
        ckpt["scores"] = [ckpt["scores"][0].long()]
    return ckpt


@pytest.mark.parametrize("how,match", [
    ("no rng", "malformed rng"), ("config does not fit the weights", "size mismatch"),
    ("optimizers do not fit the parts", "parameter group"),
    ("one optimizer too few", "1 optimizer states, 2 update counts, 2 parts"),
    ("a random state of another size", "malformed rng"), ("scores of fewer images than the test set", "or scores"),
    ("integer scores", "or scores"),
    ("config lacks a setting", "lacks or has unknown settings: warmup"), ("mode not a mode", "--mode"),
    ("negative hidden", "--hidden"), ("steps not a number", "--steps: want int"),
    ("history not a list", "malformed history"), ("rng not a state", "malformed rng"),
    ("epoch a float", "malformed epoch"), ("updates not ints", "do not match its history"),
    ("not a dict", "no sound checkpoint at"), ("negative update counts", "do not match its history"),
    ("epoch -5", "do not match its history"), ("history emptied", "do not match its history"),
    ("an Adam moment of another shape", "an Adam moment does not have its parameter's shape"),
    ("a NaN weight", "a NaN or an infinite value"), ("an infinite Adam moment", "a NaN or an infinite value"),
    ("steps that are not its history's", "do not match its history")])
def test_a_malformed_checkpoint_is_refused_with_one_line_naming_what_is_wrong(how, match, tmp_path, capsys):
    out = tmp_path / "run"
    assert gp.main(TINY + ["--parts", "1,3", "--epochs", "1", "--out", str(out)]) == 0
    torch.save(malform(torch.load(out / "checkpoint.pt", weights_only=True), how), out / "checkpoint.pt")
    capsys.readouterr()
    assert gp.main(["--out", str(out), "--resume", "--epochs", "2"]) == 2
    assert match in one_error_line(capsys)


def test_a_checkpoint_of_another_run_is_refused_and_metrics_behind_the_checkpoint_are_rewritten(tmp_path, capsys):
    for name, seed in (("mine", "0"), ("other", "1")):
        assert gp.main(TINY + ["--epochs", "2", "--seed", seed, "--out", str(tmp_path / name)]) == 0
    mine = (tmp_path / "mine" / "metrics.jsonl").read_text()
    (tmp_path / "mine" / "checkpoint.pt").write_bytes((tmp_path / "other" / "checkpoint.pt").read_bytes())
    capsys.readouterr()
    assert gp.main(["--out", str(tmp_path / "mine"), "--resume", "--epochs", "3"]) == 2
    assert "is not the run in" in one_error_line(capsys)
    assert (tmp_path / "mine" / "metrics.jsonl").read_text() == mine  # nothing of the run was replaced
    other = (tmp_path / "other" / "metrics.jsonl").read_text()
    (tmp_path / "other" / "metrics.jsonl").write_text(other.splitlines(keepends=True)[0])  # behind the checkpoint
    assert gp.main(["--out", str(tmp_path / "other"), "--resume", "--epochs", "3"]) == 0
    assert [m["epoch"] for m in read_metrics(tmp_path / "other")] == [1, 2, 3]


def test_resume_applies_and_logs_the_flags_it_may_change_and_refuses_the_others(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert gp.main(TINY + ["--mode", "sequential", "--epochs", "2", "--out", out]) == 0
    capsys.readouterr()
    refused = {"--hidden 32": "hidden = 16", "--mode full": "mode = sequential", "--dataset fashion-mnist": "digits",
               "--epochs 3": "sequential turns follow --epochs", "--finetune 0": "already has 2 epochs"}
    for flags, match in refused.items():
        assert gp.main(["--out", out, "--resume", *flags.split()]) == 2
        err = one_error_line(capsys)
        assert flags.split()[0] in err or "already" in err
        assert match in err, err
    assert gp.main(["--out", out, "--resume", "--finetune", "1", "--lr", "1e-4", "--dataset", "digits"]) == 0
    printed = capsys.readouterr().out
    assert "resume: --lr [0.0001, 0.0001] (was [0.002, 0.002])" in printed and "resume: --finetune 1 (was 0)" in printed
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["config"]["lr"] == [1e-4, 1e-4] and ckpt["config"]["hidden"] == 16
    assert read_metrics(tmp_path / "run")[-1]["steps"] == 3 * 16


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
    assert read_metrics(tmp_path / "cut")[-1] | {"seconds": 0} == straight[-1] | {"seconds": 0}


# --- data parallel under torchrun


def torchrun(nproc, script, args, timeout=600, **kwargs):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script,
               *args]
    if kwargs.get("popen"):
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=HERE,
                                env=env)
    return subprocess.run(command, capture_output=True, text=True, cwd=HERE, env=env, timeout=timeout)


def average_on_two_processes(rank, path, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)  # process 1's gradient is twice process 0's
    gp.average_gradients(torch.optim.SGD([p], lr=1.0))
    results[rank] = p.grad.tolist()
    dist.destroy_process_group()


def test_data_parallel_averages_each_parts_gradients_over_the_processes(tmp_path):
    import torch.multiprocessing as mp
    results = mp.Manager().dict()
    mp.spawn(average_on_two_processes, args=(str(tmp_path / "store"), results), nprocs=2)
    assert results[0] == results[1] == [1.5, 3.0, 4.5]  # the mean; a sum would give 3, 6, 9


def test_ddp_on_two_processes_trains_one_run_and_resumed_equals_uninterrupted_bit_for_bit(tmp_path):
    flags = TINY + ["--mode", "alternate", "--ema", "0.9"]
    proc = torchrun(2, "glow_parts.py", flags + ["--epochs", "4", "--out", str(tmp_path / "straight")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("epoch ") == 4 and "Traceback" not in proc.stderr  # process 0 alone logs
    assert torchrun(2, "glow_parts.py", flags + ["--epochs", "2", "--out", str(tmp_path / "cut")]).returncode == 0
    proc = torchrun(2, "glow_parts.py", flags + ["--epochs", "4", "--out", str(tmp_path / "cut"), "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "cut")
    assert [m | {"seconds": 0} for m in resumed] == [m | {"seconds": 0} for m in straight]
    single = tiny_train(tiny_cfg(mode="alternate", epochs=2)).history
    assert [m["steps"] for m in straight[:2]] == [m["steps"] for m in single]  # one global batch a step


def test_a_torchrun_usage_error_is_reported_once_as_one_line_and_no_process_waits_for_it(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("x")
    for flags, match in ((["--batch-size", "31", "--out", str(tmp_path / "r")], "divide among 2"),
                         (["--out", str(tmp_path / "taken")], "already holds notes.txt")):  # only process 0 claims
        t0 = time.perf_counter()
        proc = torchrun(2, "glow_parts.py", TINY + ["--epochs", "1"] + flags, timeout=300)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("glow_parts.py:")]
        assert proc.returncode != 0 and lines == [lines[0]] and match in lines[0], proc.stderr[-2000:]
        assert time.perf_counter() - t0 < 25  # no process waits for a peer until torchrun kills it (30 s)
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


def test_a_signal_ends_a_process_at_once_while_it_waits_for_its_peer(tmp_path):
    out = tmp_path / "ddp"
    proc = torchrun(2, "glow_parts.py", TINY + ["--epochs", "50", "--out", str(out)], popen=True)
    while not (out / "metrics.jsonl").exists() and proc.poll() is None:
        time.sleep(0.05)
    ranks = workers(proc.pid)
    os.kill(ranks[1], signal.SIGSTOP)  # process 1 stops answering: process 0 waits for it in an all-reduce
    time.sleep(1)
    os.kill(ranks[0], signal.SIGTERM)
    t0 = time.perf_counter()
    while os.path.exists(f"/proc/{ranks[0]}") and open(f"/proc/{ranks[0]}/stat").read().split()[2] != "Z" \
            and time.perf_counter() - t0 < 20:
        time.sleep(0.05)
    heard = time.perf_counter() - t0
    os.kill(ranks[1], signal.SIGCONT)
    err = proc.communicate(timeout=120)[1]
    assert heard < 5 and proc.returncode != 0, err[-2000:]  # torchrun reports its child's end in its own words
    assert 'glow_parts.py", line' not in err, err[-3000:]  # no traceback from our processes
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] >= 1  # and the checkpoint is whole


def test_a_dead_process_under_torchrun_leaves_one_line_from_the_survivor_naming_the_kept_checkpoint(tmp_path):
    out = tmp_path / "ddp"
    proc = torchrun(2, "glow_parts.py", TINY + ["--epochs", "50", "--out", str(out)], popen=True)
    while not (out / "metrics.jsonl").exists() and proc.poll() is None:
        time.sleep(0.05)
    os.kill(workers(proc.pid)[1], signal.SIGKILL)
    err = proc.communicate(timeout=120)[1]
    ours = [line for line in err.splitlines() if line.startswith("glow_parts.py:")]
    assert proc.returncode != 0 and len(ours) == 1 and "a process of the run was lost" in ours[0], err[-3000:]
    assert "is kept" in ours[0] and "glow_parts.py\", line" not in err, err[-3000:]


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "abc"}, {"WORLD_SIZE": "2"}, {"RANK": "1", "LOCAL_RANK": "x"}])
def test_a_stray_torchrun_variable_does_not_make_a_plain_run_a_data_parallel_one(env, tmp_path):
    proc = subprocess.run([sys.executable, "glow_parts.py", *TINY, "--epochs", "1", "--out", str(tmp_path / "r")],
                          cwd=HERE, capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]  # only torchrun's launch is one
    assert read_metrics(tmp_path / "r")[-1]["steps"] == 512 // 32


# --- the tutorial


def test_tutorial_notebook_executes_top_to_bottom(monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    monkeypatch.setenv("GLOW_PARTS_QUICK", "1")  # fewer epochs; the same code runs
    nb = nbformat.read(os.path.join(HERE, "tutorial.ipynb"), as_version=4)
    assert any(cell.cell_type == "code" and "import glow_parts" in cell.source for cell in nb.cells)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": HERE}}).execute()
    # execute() raises on the first cell that fails; what it stored must show the pictures the notebook draws
    images = sum("image/png" in o.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
                 for o in cell.outputs)
    assert images >= 5, images
