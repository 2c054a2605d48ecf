"""Oracles for glow_parts: round trips, brute-force Jacobians, dense vs LU, gradient isolation, the CLI.

Run: python -m pytest -q test_glow_parts.py
"""
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
        gp.bits_per_dim(model.log_prob(x), x, 8).mean().backward()
        opt.step()
    return model


def perturbed(layer, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def brute_logdet(fn, x):
    """log|det J| of fn at one sample x (1, ...) by autograd's full Jacobian."""
    def flat(v):
        return torch.cat([t.flatten() for t in fn(v.view_as(x))])
    J = torch.autograd.functional.jacobian(flat, x.flatten())
    return torch.linalg.slogdet(J)[1]


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
        zs, _ = model(x)
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
    _, logdet = model(x)
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
    full = gp.bits_per_dim(model.log_prob(x), x, 8).mean()
    losses = [model.part_loss(x, k) for k in range(3)]
    assert torch.allclose(losses[-1], full, rtol=1e-12)
    assert all(torch.isfinite(v) and 0 < v < 20 for v in losses)
    one_pass = [gp.bits_per_dim(lp, x, 8).mean() for lp in model.truncated(x)[0]]
    assert torch.allclose(torch.stack(one_pass), torch.stack(losses), rtol=1e-12)


def test_isolated_sum_of_part_losses_gives_each_part_its_own_gradient():
    model = trained(tiny_glow([3, 1, 2], torch.float64), torch.float64)
    x = torch.rand(8, 1, 8, 8, dtype=torch.float64) - 0.5
    model.zero_grad(set_to_none=True)
    sum(gp.bits_per_dim(lp, x, 8).mean() for lp in model.truncated(x)[0]).backward()
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
        bpd = gp.bits_per_dim(model.log_prob(x), x, n_bits).mean().item()
        # ActNorm whitens uniform noise; a Gaussian fit to a uniform costs log2(sqrt(2 pi e / 12)) = 0.25 bits
        assert abs(bpd - (n_bits + 0.25)) < 0.1, (n_bits, bpd)


def test_sample_is_finite_with_the_right_shape_and_temperature_zero_is_the_mean_image():
    model = trained(tiny_glow([3, 1, 2]), torch.float32)
    s = model.sample(5, temperature=0.7)
    assert s.shape == (5, 1, 8, 8) and torch.isfinite(s).all()
    a, b = model.sample(2, temperature=0.0), model.sample(2, temperature=0.0)
    assert torch.equal(a, b) and torch.equal(a[0], a[1])


@pytest.mark.parametrize("parts,match", [
    ([2, 2], "sum to 4"), ([3, 0, 3], "positive"), ([3, -1, 4], "positive"), ([2.5, 3.5], "integers"),
    (["3", "3"], "integers"), ([], "non-empty"), ([True, 3], "integers")])
def test_malformed_parts_raise_value_error(parts, match):
    with pytest.raises(ValueError, match=match):
        gp.Glow(in_channels=1, image_size=8, n_levels=3, n_steps=2, hidden=8, parts=parts)


def test_image_size_not_divisible_by_two_to_the_levels_raises():
    with pytest.raises(ValueError, match="divisible"):
        gp.Glow(in_channels=1, image_size=12, n_levels=3, n_steps=2, hidden=8)


def test_default_model_is_the_cifar10_glow_cut_as_the_poster_in_the_library_and_the_cli():
    model = gp.Glow()
    assert model.part_sizes == [32, 16, 16, 32] == gp.Config().parts
    assert sum(isinstance(l, gp.FlowStep) for p in model.parts for l in p.layers) == 96
    assert gp.default_parts(2, 8) == [8, 8] and gp.default_parts(3, 5) == [5, 2, 3, 5]


# --- speed and memory: recomputation and torch.compile change neither values nor gradients


def grads_of(model, x):
    model.zero_grad(set_to_none=True)
    loss = gp.bits_per_dim(model.log_prob(x), x, 8).mean() + model.part_loss(x, 1)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_recompute_gives_the_plain_gradients_and_saves_far_fewer_activations():
    model = trained(tiny_glow([3, 1, 2]), torch.float32)
    x = torch.rand(8, 1, 8, 8) - 0.5
    plain_loss, plain = grads_of(model, x)
    plain_bytes = gp.measure_step(model, x, "full", [0, 1, 2])[0]
    for part in model.parts:
        part.recompute = True
    loss, recomputed = grads_of(model, x)
    assert torch.equal(loss, plain_loss) and len(recomputed) == len(plain)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(recomputed, plain))
    inputs = {}  # what recomputation must still keep: every flow step's input (its storage)

    def note(module, args):
        inputs[args[0].untyped_storage().data_ptr()] = args[0].untyped_storage().nbytes()
    hooks = [m.register_forward_pre_hook(note) for m in model.modules() if isinstance(m, gp.FlowStep)]
    kept = gp.measure_step(model, x, "full", [0, 1, 2])[0]
    for h in hooks:
        h.remove()
    assert sum(inputs.values()) <= kept < plain_bytes / 2


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
        zs, _ = model(x)
        assert (model.reverse(zs) - x).abs().max() < 1e-4
    assert set(model.state_dict()) == set(tiny_glow([3, 3]).state_dict())  # checkpoints keep their keys


# --- training mechanisms, data, checkpoints, the CLI

import json  # noqa: E402
from dataclasses import replace  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

TINY = ["--dataset", "digits", "--levels", "2", "--steps", "2", "--hidden", "16", "--subset", "512",
        "--batch-size", "32", "--warmup", "10", "--lr", "2e-3"]


def quiet(*args):
    pass


def tiny_cfg(tmp_path=None, **overrides):
    cfg, _ = gp.config_from_args(gp.make_parser().parse_args(TINY + ["--out", str(tmp_path or "unused")]))
    return replace(cfg, out=str(tmp_path) if tmp_path else None, **overrides)


def tiny_train(cfg):
    return gp.train(*gp.start_run(cfg), log=quiet)


def initial_test_bpd(cfg):
    run, (_, test) = gp.start_run(replace(cfg, out=None))  # the initialised model every run starts from
    return gp.evaluate(run.model, test, 64, torch.device(cfg.device))[0]


@pytest.mark.parametrize("mode", gp.MODES)
def test_each_mechanism_lowers_test_bpd_on_digits(mode):
    cfg = tiny_cfg(mode=mode, epochs=4)
    start, end = initial_test_bpd(cfg), tiny_train(cfg).history[-1]["test_bpd"]
    assert end < start - 0.1, (mode, start, end)


def test_schedule_alternate_round_robin_and_sequential_in_order():
    assert [gp.learning_parts("alternate", s, 100, 3) for s in range(4)] == [[0], [1], [2], [0]]
    assert [gp.learning_parts("alternate", s, 100, 2, every=2) for s in range(5)] == [[0], [0], [1], [1], [0]]
    seq = [gp.learning_parts("sequential", s, 9, 3)[0] for s in range(9)]
    assert seq == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert gp.learning_parts("full", 0, 9, 3) == [0, 1, 2] == gp.learning_parts("finetune", 5, 9, 3)
    assert gp.learning_parts("parallel", 7, 9, 3) == [0, 1, 2]


@pytest.mark.parametrize("mode,learning", [("alternate", [0]), ("alternate", [1]), ("sequential", [2]),
                                           ("parallel", [0, 1, 2]), ("full", [0, 1, 2])])
def test_a_step_changes_only_the_learning_parts_parameters(mode, learning, monkeypatch):
    cfg = tiny_cfg(mode="alternate", epochs=1, batch_size=16, parts=[1, 2, 1])
    images = gp.load_images("digits")[0][:48]
    run, _ = gp.start_run(cfg, data=(images, images[:16]))
    gp.train(run, (images, images[:16]), log=quiet)  # 3 steps: every part has Adam state from its turn
    before = [[p.detach().clone() for p in part.parameters()] for part in run.model.parts]
    monkeypatch.setattr(gp, "learning_parts", lambda *args: learning)
    run.cfg = replace(run.cfg, mode=mode, epochs=2)
    gp.train(run, (images[:16], images[:16]), log=quiet)  # one step of `mode` with `learning`
    for k, part in enumerate(run.model.parts):
        changed = any(not torch.equal(p, q) for p, q in zip(part.parameters(), before[k]))
        assert changed == (k in learning), (mode, learning, k)


def test_finetune_phase_follows_the_mode_and_trains_every_part(tmp_path):
    history = tiny_train(tiny_cfg(tmp_path, mode="alternate", epochs=2, finetune=1)).history
    assert [m["phase"] for m in history] == ["alternate", "alternate", "finetune"]
    assert all(v is not None for v in history[0]["train_part_losses"])
    assert history[2]["train_part_losses"] is None  # end to end: no part learns alone
    assert history[2]["steps"] == 3 * (512 // 32)


def test_cli_run_writes_metrics_checkpoint_and_samples(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "glow_parts.py", *TINY, "--mode", "sequential", "--epochs", "2",
                           "--finetune", "1", "--out", str(out)], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    for m in lines:
        assert {"epoch", "phase", "train_bpd", "test_bpd", "part_losses", "seconds", "steps"} <= m.keys()
        assert len(m["part_losses"]) == 2 and m["part_losses"][-1] == m["test_bpd"]
    assert lines[0]["seconds"] < lines[1]["seconds"] < lines[2]["seconds"]
    assert sorted(p.name for p in out.glob("samples_*.png")) == ["samples_001.png", "samples_002.png", "samples_003.png"]
    from PIL import Image
    assert Image.open(out / "samples_001.png").width >= 8 * 64  # 8x8 samples drawn big enough to see
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["config"]["mode"] == "sequential" and len(ckpt["optimizers"]) == 2
    assert proc.stdout.count("epoch") == 3


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    common = TINY + ["--mode", "alternate"]
    assert gp.main(common + ["--epochs", "3", "--out", str(tmp_path / "straight")]) == 0
    assert gp.main(common + ["--epochs", "2", "--out", str(tmp_path / "cut")]) == 0
    assert gp.main(common + ["--epochs", "3", "--out", str(tmp_path / "cut"), "--resume"]) == 0
    read = lambda d: [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    straight, resumed = read("straight"), read("cut")
    assert [m["epoch"] for m in resumed] == [1, 2, 3]
    assert resumed[-1]["test_bpd"] == straight[-1]["test_bpd"]
    assert resumed[-1]["part_losses"] == straight[-1]["part_losses"]


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


def test_cifar10_loads_from_torchvision_files_on_disk(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar
    images = write_cifar10(tmp_path)
    # torchvision checks the real archive's md5 sums; our tiny files are in its format but not those bytes
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    train, test = gp.load_images("cifar10", str(tmp_path), download=False)
    assert train.shape == (20, 3, 32, 32) and test.shape == (10, 3, 32, 32) and train.dtype == torch.uint8
    first = images["data_batch_1"][0].reshape(3, 32, 32)  # CIFAR stores planes R, G, B
    assert np.array_equal(train[0].numpy(), first)


def write_idx_images(path, images):
    n, h, w = images.shape
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + n.to_bytes(4, "big") + h.to_bytes(4, "big") + w.to_bytes(4, "big"))
        f.write(images.tobytes())


def write_idx_labels(path, n):
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + bytes(n))


def write_fashion_mnist(root):
    """A tiny Fashion-MNIST in torchvision's on-disk format: 12 training and 6 test images."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 6)):
        write_idx_images(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx_labels(raw / f"{split}-labels-idx1-ubyte", n)
    return raw


def test_fashion_mnist_loads_idx_files_and_resizes(tmp_path):
    write_fashion_mnist(tmp_path)
    cfg = tiny_cfg(dataset="fashion-mnist", data_dir=str(tmp_path), image_size=16, subset=10, levels=2)
    train, test = gp.prepare_data(cfg)
    assert train.shape == (10, 1, 16, 16) and test.shape == (6, 1, 16, 16) and train.dtype == torch.uint8


def offline(monkeypatch):
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.mnist as mnist

    def no_network(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(cifar, "download_and_extract_archive", no_network)
    monkeypatch.setattr(mnist, "download_and_extract_archive", no_network)


BAD = {
    "unknown dataset": ["--dataset", "imagenet"],
    "unknown mode": ["--mode", "greedy"],
    "parts do not sum": ["--parts", "1,2"],
    "parts not integers": ["--parts", "2,x"],
    "parts not positive": ["--parts", "4,0"],
    "image size": ["--image-size", "10"],
    "negative epochs": ["--epochs", "-1"],
    "negative finetune": ["--finetune", "-2"],
    "batch size": ["--batch-size", "0"],
    "lr": ["--lr", "0"],
    "levels": ["--levels", "0"],
    "steps": ["--steps", "0"],
    "hidden": ["--hidden", "0"],
    "subset": ["--subset", "0"],
    "n bits low": ["--n-bits", "0"],
    "n bits high": ["--n-bits", "17"],
    "part lr count": ["--part-lr", "1e-3"],
    "unknown flag": ["--bogus"],
    "not a number": ["--epochs", "many"],
    "no such device": ["--device", "cuda:7"],
    "not a device": ["--device", "toaster"],
    "batch larger than data": ["--subset", "16", "--batch-size", "32"],
    "lr inf": ["--lr", "inf"],
    "lr nan": ["--lr", "nan"],
    "part lr negative": ["--part-lr", "1e-3,-1"],
    "seed too large": ["--seed", "99999999999999999999999"],
    "seed negative": ["--seed", "-1"],
    "image size huge": ["--image-size", "1073741824"],
    "nothing to train": ["--epochs", "0", "--finetune", "0"],
    "compare without epochs": ["--compare", "--epochs", "0", "--finetune", "1"],
    "resume and compare": ["--resume", "--compare"],
    "out under /proc": ["--out", "/proc/glow-parts-test/run"],
    "unknown part prior": ["--part-prior", "wide"],
    "compare modes without full": ["--compare", "--compare-modes", "alternate,sequential"],
    "sweep budget not a multiple of 3": ["--sweep", "3,10"],
    "ema out of range": ["--ema", "1"],
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_one_line_and_no_traceback(case, tmp_path, capsys):
    code = gp.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "run")] + BAD[case])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("glow_parts.py: error:") and err.count("\n") == 1, (case, err)


def test_missing_data_offline_says_where_to_put_files_and_leaves_no_data_dir(tmp_path, capsys, monkeypatch):
    offline(monkeypatch)
    for dataset, where in (("cifar10", "cifar-10-batches-py"), ("fashion-mnist", "FashionMNIST/raw")):
        code = gp.main(["--dataset", dataset, "--data-dir", str(tmp_path / "data"), "--levels", "2", "--steps", "2",
                        "--epochs", "1", "--image-size", "16", "--out", str(tmp_path / dataset)])
        err = capsys.readouterr().err
        assert code == 2 and where in err and "--dataset digits" in err and err.count("\n") == 1, err
        assert not (tmp_path / "data").exists()  # the failed load created it, and took it away again


def test_a_corrupt_idx_file_is_named(tmp_path, capsys, monkeypatch):
    offline(monkeypatch)
    raw = write_fashion_mnist(tmp_path)
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x07" + bytes(100))  # a wrong magic number
    code = gp.main(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--image-size", "16", "--levels", "2",
                    "--steps", "2", "--epochs", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "train-images-idx3-ubyte is not an idx file" in err and err.count("\n") == 1, err


def test_resume_without_or_with_a_corrupt_checkpoint_and_out_as_file_exit_2(tmp_path, capsys):
    assert gp.main(TINY + ["--out", str(tmp_path / "empty"), "--resume"]) == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert gp.main(TINY + ["--out", str(tmp_path / "bad"), "--resume"]) == 2
    (tmp_path / "file").write_text("x")
    assert gp.main(TINY + ["--out", str(tmp_path / "file")]) == 2
    assert gp.main(TINY + ["--out", str(tmp_path / "bad")]) == 2  # holds a run: never overwritten silently
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(line.startswith("glow_parts.py: error:") for line in err)


def test_bad_input_from_the_shell_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "glow_parts.py", "--dataset", "digits", "--parts", "1,1"],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--parts" in proc.stderr


def test_nonfinite_loss_stops_naming_part_and_epoch_and_keeps_last_checkpoint(tmp_path, capsys, monkeypatch):
    real, calls = gp.Glow.truncated, [0]

    def poisoned(model, *args, **kwargs):
        log_probs, carry = real(model, *args, **kwargs)
        if torch.is_grad_enabled():  # a training step, not an evaluation
            calls[0] += 1
            if calls[0] > 512 // 32 + 3:  # epoch 2, fourth step
                log_probs = [lp * float("nan") for lp in log_probs]
        return log_probs, carry
    monkeypatch.setattr(gp.Glow, "truncated", poisoned)
    out = tmp_path / "run"
    code = gp.main(TINY + ["--mode", "alternate", "--epochs", "3", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "part 2 of 2" in err and "epoch 2" in err, err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


# --- faults: one writer per run directory, kill -9 and SIGTERM, malformed checkpoints, explicit resume


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def one_error_line(capsys):
    err = capsys.readouterr().err
    assert err.startswith("glow_parts.py: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_second_writer_is_refused_for_runs_and_comparisons(tmp_path, capsys):
    for out, extra in ((tmp_path / "run", []), (tmp_path / "cmp", ["--compare", "--epochs", "1"])):
        lock = gp.claim_run_dir(str(out))  # another process holds it (flock: another open file is another owner)
        assert gp.main(TINY + ["--epochs", "1", "--out", str(out)] + extra) == 2
        assert "in use by another run" in one_error_line(capsys)
        lock.close()  # the other writer ends
        assert gp.main(TINY + ["--epochs", "1", "--out", str(out)] + extra) == 0
    capsys.readouterr()
    assert gp.main(TINY + ["--out", str(tmp_path / "cmp"), "--compare", "--epochs", "1"]) == 2
    assert "already holds a comparison" in one_error_line(capsys)  # never overwritten


def test_out_that_cannot_be_created_is_refused_before_loading_data(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(gp, "prepare_data", lambda cfg: pytest.fail("data loaded before the check"))
    assert gp.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "file" / "run")]) == 2
    assert "cannot create or write it" in one_error_line(capsys)


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


def test_sigterm_stops_like_ctrl_c_and_tells_which_checkpoint_is_kept(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "glow_parts.py", *TINY, "--epochs", "50", "--out", str(out)],
                            cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (out / "metrics.jsonl").exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    epoch = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    assert proc.returncode == 143 and "Traceback" not in err and err.count("\n") == 1, err
    assert f"interrupted (SIGTERM); the checkpoint of epoch {epoch} in {out} is kept" in err


def malform(ckpt, how):
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
    return ckpt


@pytest.mark.parametrize("how,match", [
    ("no rng", "lacks rng"), ("config does not fit the weights", "size mismatch"),
    ("optimizers do not fit the parts", "parameter group"), ("one optimizer too few", "1 optimizer states"),
    ("config lacks a setting", "lacks or has unknown settings: warmup")])
def test_a_malformed_checkpoint_is_refused_with_one_line_naming_what_is_wrong(how, match, tmp_path, capsys):
    out = tmp_path / "run"
    assert gp.main(TINY + ["--parts", "1,3", "--epochs", "1", "--out", str(out)]) == 0
    torch.save(malform(torch.load(out / "checkpoint.pt", weights_only=True), how), out / "checkpoint.pt")
    capsys.readouterr()
    assert gp.main(["--out", str(out), "--resume", "--epochs", "2"]) == 2
    assert match in one_error_line(capsys)


def test_resume_applies_and_logs_the_flags_it_may_change_and_refuses_the_others(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert gp.main(TINY + ["--mode", "sequential", "--epochs", "2", "--out", out]) == 0
    capsys.readouterr()
    refused = {"--hidden 32": "hidden = 16", "--mode full": "mode = sequential", "--dataset fashion-mnist": "digits",
               "--epochs 3": "sequential run sizes each part's turn", "--finetune 0": "already has 2 epochs"}
    for flags, match in refused.items():
        assert gp.main(["--out", out, "--resume", *flags.split()]) == 2
        err = one_error_line(capsys)
        assert flags.split()[0] in err or "already" in err
        assert match in err, err
    assert gp.main(["--out", out, "--resume", "--finetune", "1", "--lr", "1e-4", "--dataset", "digits"]) == 0
    printed = capsys.readouterr().out
    assert "resume: --lr 0.0001 (was 0.002)" in printed and "resume: --finetune 1 (was 0)" in printed
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["config"]["lr"] == 1e-4 and ckpt["config"]["hidden"] == 16


def test_a_torchrun_resume_counts_processes_against_the_checkpoints_parts(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    assert gp.main(TINY + ["--mode", "parallel", "--parts", "1,1,2", "--epochs", "1", "--out", out]) == 0
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    assert gp.main(["--out", out, "--resume", "--epochs", "2"]) == 2
    assert "3 parts but 2 processes; use --nproc_per_node 3" in one_error_line(capsys)


def test_nonfinite_loss_names_the_part_that_broke_not_the_one_that_noticed(tmp_path, capsys):
    # part 1 steps first at a huge rate and breaks; part 2's loss, computed on part 1's output, shows it
    code = gp.main(TINY + ["--part-lr", "1e10,1e-3", "--epochs", "2", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and "part 1 of 2" in err and "no checkpoint was written" in err, err


def test_default_warmup_fits_the_run_and_is_stored_with_it(tmp_path):
    assert gp.default_warmup(gp.Config(epochs=60, finetune=30), 781) == 500  # CIFAR-10: the official 500
    assert gp.default_warmup(gp.Config(dataset="digits", levels=2, epochs=3), 46) == 6  # 138 steps / 2 parts / 10
    run, _ = gp.start_run(replace(tiny_cfg(), warmup=None, epochs=4))
    assert run.cfg.warmup == 4 * (512 // 32) // 2 // 10


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_text("old")

    def crash(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        gp.write_atomic(str(path), crash)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_torchrun_usage_error_is_reported_once_as_one_line(tmp_path):
    proc = torchrun(2, TINY + ["--mode", "parallel", "--parts", "1,1,2", "--out", str(tmp_path / "run")], timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("glow_parts.py:")]
    assert proc.returncode != 0 and lines == [lines[0]] and "one part per process" in lines[0], proc.stderr[-2000:]


# --- the poster's comparison


def test_compare_starts_every_run_from_the_same_weights_and_reports_every_field(tmp_path):
    out = tmp_path / "cmp"
    assert gp.main(TINY + ["--compare", "--compare-modes", "full,alternate,sequential", "--epochs", "2",
                           "--finetune", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert (out / "compare.png").stat().st_size > 10_000
    runs = {r["mode"]: r for r in summary["runs"]}
    assert set(runs) == {"full", "alternate", "sequential"}
    assert len({r["start_hash"] for r in runs.values()}) == 1  # identical initial weights
    for r in runs.values():
        for key in ("name", "final_test_bpd", "train_seconds", "time_to_target", "step_seconds",
                    "activation_bytes", "boundary_backward_bytes", "curve"):
            assert key in r, key
        assert len(r["curve"]) == 3 and r["step_seconds"] > 0
    assert [m["phase"] for m in runs["alternate"]["curve"]] == ["alternate", "alternate", "finetune"]
    assert [m["phase"] for m in runs["full"]["curve"]] == ["full"] * 3
    full_curve = runs["full"]["curve"]
    assert summary["target_bpd"] == pytest.approx(sum(m["test_bpd"] for m in full_curve[-3:]) / 3)  # smoothed
    for r in runs.values():  # the first evaluation at or below the target, wherever it falls
        hits = [m["seconds"] for m in r["curve"] if m["test_bpd"] <= summary["target_bpd"]]
        assert r["time_to_target"] == (hits[0] if hits else None)
        same_time = [m["test_bpd"] for m in full_curve if m["seconds"] <= r["train_seconds"]]
        assert r["full_bpd_at_equal_time"] == (same_time[-1] if same_time else None)
    assert runs["alternate"]["activation_bytes"] < runs["full"]["activation_bytes"]
    assert runs["alternate"]["boundary_backward_bytes"] == 0 == runs["sequential"]["boundary_backward_bytes"]
    # full: the gradient of the one boundary activation, (32, 2, 4, 4) float32 after level 1
    assert runs["full"]["boundary_backward_bytes"] == 32 * 2 * 4 * 4 * 4


def test_measure_step_counts_boundary_bytes_at_a_mid_level_cut():
    model = tiny_glow([3, 1, 2])
    x = torch.rand(8, 1, 8, 8) - 0.5
    model.initialize(x)
    act, crossing, _ = gp.measure_step(model, x, "full", [0, 1, 2])
    # boundaries: after part 0 (mid level 1: 8 channels at 2x2), after part 1 (split: 4 channels at 2x2)
    assert crossing == 8 * (8 * 2 * 2 + 4 * 2 * 2) * 4
    assert all(gp.measure_step(model, x, "alternate", [k])[1] == 0 for k in range(3))
    assert all(gp.measure_step(model, x, "alternate", [k])[0] < act for k in range(3))
    assert gp.measure_step(model, x, "parallel", [0, 1, 2])[1] == 0


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


def test_sweep_branches_equal_separate_runs_of_each_budget(tmp_path):
    flags = TINY + ["--ema", "0.9"]
    assert gp.main(flags + ["--sweep", "3,6", "--out", str(tmp_path / "sweep")]) == 0
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 10_000
    assert gp.main(flags + ["--mode", "alternate", "--epochs", "2", "--finetune", "1",
                            "--out", str(tmp_path / "alone")]) == 0
    assert gp.main(flags + ["--mode", "full", "--epochs", "3", "--out", str(tmp_path / "full3")]) == 0
    budget3 = summary["budgets"][0]
    # full's prefix is the shorter full run; the branch at 2N/3 is the separate alternate + finetune run
    assert budget3["full_bpd"] == read_metrics(tmp_path / "full3")[-1]["test_bpd"]
    assert budget3["alternate_finetune_bpd"] == read_metrics(tmp_path / "alone")[-1]["test_bpd"]
    assert budget3["gap"] == budget3["alternate_finetune_bpd"] - budget3["full_bpd"]
    six = summary["budgets"][1]
    assert [h["finetune_epochs"] for h in six["head_start"]] == [1, 2]
    assert six["head_start"][1]["full_after_same_epochs"] == summary["full_curve"][1]["test_bpd"]
    assert gp.main(flags + ["--sweep", "3,6", "--out", str(tmp_path / "sweep")]) == 2  # never overwritten


# --- beyond the poster: parallel parts, the pipeline across processes, data parallel, balanced cuts



def torchrun(nproc, args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "glow_parts.py", *args], capture_output=True, text=True, cwd=HERE, env=env, timeout=timeout)


def test_parallel_mode_lowers_test_bpd_on_digits():
    cfg = tiny_cfg(mode="parallel", epochs=3)
    history = tiny_train(cfg).history
    assert history[-1]["test_bpd"] < initial_test_bpd(cfg) - 0.1
    assert all(v is not None for v in history[-1]["train_part_losses"])


def test_pipeline_on_two_processes_sends_nothing_back_and_its_checkpoint_reloads_in_one_process(tmp_path):
    out = tmp_path / "pipe"
    proc = torchrun(2, TINY + ["--mode", "parallel", "--epochs", "2", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # counted at every send: per step, part 1's output h_1 (2 x 4 x 4 after the first split) and the
    # constant terms, float32, for 32 images, 16 steps an epoch; and nothing towards earlier parts
    per_epoch = f"{16 * 32 * (2 * 4 * 4 + 1) * 4:,}"
    assert f"pipeline: {per_epoch} bytes sent forward between parts this epoch, 0 backward; " \
           f"received {per_epoch} from earlier parts, 0 from later ones" in proc.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and metrics[1]["test_bpd"] < metrics[0]["test_bpd"]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    cfg = gp.Config(**ckpt["config"])
    model = gp.build_model(cfg)
    model.load_state_dict(ckpt["model"])
    _, test = gp.prepare_data(cfg)
    bpd, parts = gp.evaluate(model, test, cfg.batch_size, torch.device("cpu"))
    assert abs(bpd - metrics[-1]["test_bpd"]) < 1e-5 and abs(parts[0] - metrics[-1]["part_losses"][0]) < 1e-5
    # one process continues the pipeline's run from its checkpoint, Adam state included
    assert gp.main(TINY + ["--mode", "parallel", "--epochs", "3", "--out", str(out), "--resume"]) == 0
    # the same math in one process gives the same numbers, up to float rounding (1 vs 2 threads, memory
    # layouts) that Adam amplifies on near-zero gradients: about 1e-3 bits/dim after 32 steps
    single = tiny_train(tiny_cfg(mode="parallel", epochs=2)).history
    assert abs(single[-1]["test_bpd"] - metrics[-1]["test_bpd"]) < 5e-3


def test_ddp_on_two_processes_keeps_replicas_identical_and_matches_one_process(tmp_path):
    out = tmp_path / "ddp"
    proc = torchrun(2, TINY + ["--mode", "alternate", "--epochs", "3", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "replicas identical" in proc.stdout  # checked by hashing every process's weights each epoch
    ddp = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    single = tiny_train(tiny_cfg(mode="alternate", epochs=3)).history
    assert ddp[-1]["steps"] == single[-1]["steps"]  # the same global batch, the same number of steps
    assert abs(ddp[-1]["test_bpd"] - single[-1]["test_bpd"]) < 0.1, (ddp[-1]["test_bpd"], single[-1]["test_bpd"])


def test_auto_parts_are_positive_sum_to_all_steps_and_balance_better_than_one_per_level():
    macs = gp.step_macs(3, 32, 3, 32, 512)
    for P in (1, 2, 3, 4, 7):
        parts = gp.balanced_parts(P, macs)
        assert len(parts) == P and all(p > 0 for p in parts) and sum(parts) == 96
    cost = lambda parts: max(sum(macs[sum(parts[:k]):sum(parts[:k + 1])]) for k in range(len(parts)))
    assert cost(gp.balanced_parts(3, macs)) < 0.6 * cost([32, 32, 32])
    # exact: no other cut into 3 parts has a cheaper largest part (brute force over all cuts)
    best = min(cost([a, b, 96 - a - b]) for a in range(1, 95) for b in range(1, 96 - a))
    assert cost(gp.balanced_parts(3, macs)) == best


@pytest.mark.parametrize("env,args,match", [
    ({"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}, ["--mode", "parallel"], "one part per process"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, ["--mode", "parallel", "--finetune", "1"], "finetune"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, ["--compare"], "without torchrun"),
    ({"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}, ["--mode", "full"], "divide"),
    ({}, ["--parts", "auto:0"], "auto:0"),
    ({}, ["--parts", "auto:x"], "auto:P"),
])
def test_bad_distributed_combinations_exit_2_with_one_line(env, args, match, tmp_path, capsys, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert gp.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "run")] + args) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1, err


# --- the tutorial


def test_tutorial_notebook_executes_top_to_bottom(monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    monkeypatch.setenv("GLOW_PARTS_QUICK", "1")  # fewer epochs; the same code runs
    nb = nbformat.read(os.path.join(HERE, "tutorial.ipynb"), as_version=4)
    assert any(cell.cell_type == "code" and "import glow_parts" in cell.source for cell in nb.cells)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": HERE}}).execute()
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors


def test_benchmark_reports_every_mechanism_without_data(capsys):
    assert gp.main(TINY + ["--benchmark", "--compare-modes", "full,alternate,parallel"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in rows[1:]] == ["full", "alternate", "parallel"]
    result = {r["mode"]: r for r in gp.benchmark(tiny_cfg(), ["full", "alternate", "parallel"], repeats=1,
                                                 log=quiet)}
    assert result["alternate"]["activation_bytes"] < result["full"]["activation_bytes"]
    assert len(result["alternate"]["part_step_seconds"]) == 2 and result["alternate"]["step_seconds"] > 0
    assert result["alternate"]["boundary_backward_bytes"] == 0 == result["parallel"]["boundary_backward_bytes"]
    assert result["full"]["boundary_backward_bytes"] > 0
