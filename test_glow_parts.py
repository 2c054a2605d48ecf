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
    norm.init_pending = True
    y, _ = norm(x)
    assert y.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (y.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-4
    assert bool(norm.initialized)


def test_model_first_batch_initialises_every_actnorm_and_state_dict_round_trip_does_not_reinit():
    model = tiny_glow()
    x = torch.rand(32, 1, 8, 8) - 0.5
    first = model.parts[0].layers[1].actnorm  # the first flow step's ActNorm (after the squeeze)
    model.log_prob(x)  # first call initialises
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
    one_pass = [gp.bits_per_dim(lp, x, 8).mean() for lp in model.truncated_log_probs(x)]
    assert torch.allclose(torch.stack(one_pass), torch.stack(losses), rtol=1e-12)


def test_isolated_sum_of_part_losses_gives_each_part_its_own_gradient():
    model = trained(tiny_glow([3, 1, 2], torch.float64), torch.float64)
    x = torch.rand(8, 1, 8, 8, dtype=torch.float64) - 0.5
    model.zero_grad(set_to_none=True)
    sum(gp.bits_per_dim(lp, x, 8).mean() for lp in model.truncated_log_probs(x)).backward()
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
    (["3", "3"], "integers"), ([], "empty")])
def test_malformed_parts_raise_value_error(parts, match):
    with pytest.raises(ValueError, match=match):
        gp.Glow(in_channels=1, image_size=8, n_levels=3, n_steps=2, hidden=8, parts=parts)


def test_image_size_not_divisible_by_two_to_the_levels_raises():
    with pytest.raises(ValueError, match="divisible"):
        gp.Glow(in_channels=1, image_size=12, n_levels=3, n_steps=2, hidden=8)


def test_default_model_is_the_cifar10_glow_with_one_part_per_level():
    model = gp.Glow()
    assert len(model.parts) == 3 and model.part_sizes == [32, 32, 32]
    assert sum(isinstance(l, gp.FlowStep) for p in model.parts for l in p.layers) == 96
