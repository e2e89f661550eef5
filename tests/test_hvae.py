"""The hierarchical VAE on tiny shapes: contract, objective arithmetic, IAF correctness (autoregressive
mask and log-determinant against autograd), block factories, weight norm / EMA copies, determinism."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import baselines  # noqa: F401  (registers the decoder blocks)
from sdn.models import count_parameters
from sdn.models.blocks import block_builder, register_blocks, registered_blocks, unregister_blocks
from sdn.models.hvae import build_hvae, get_config
from sdn.layers import ResSDNLayer
from sdn.likelihoods import gaussian_log_prob, nats_to_bpd
from sdn.models.blocks import ConvBlockFactory, HiddenConvBlock, SDNBlockFactory
from sdn.models.iaf import ARConvNet, IAFStep, MaskedConv2d

MODELS = ("sdn", "cnn", "cnn_matched")


def tiny_images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_contract(name: str) -> None:
    torch.manual_seed(0)
    model = build_hvae(get_config("tiny"), name)
    out = model(tiny_images())
    assert set(out) >= {"loss", "bpd", "kl", "recon"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    # bpd is -ELBO per dim: (recon + kl) / (C H W ln 2)
    assert out["bpd"].item() == pytest.approx((out["recon"] + out["kl"]).item() / (192 * math.log(2)), rel=1e-5)


def test_free_bits_objective_is_max_of_batch_mean_kl_per_layer_and_zero_is_the_plain_elbo() -> None:
    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = build_hvae(cfg, "cnn")
    images = tiny_images(4)
    torch.manual_seed(1)
    log_px, kls = model._elbo_terms(images)
    means = [k.mean().item() for k in kls]
    between = (min(means) + max(means)) / 2  # clamps some layers, not all
    assert min(means) < between < max(means)
    for free_bits in (between, 1e4):
        model.config = cfg.replace(free_bits=free_bits)
        torch.manual_seed(1)
        out = model(images)
        want = -log_px.mean().item() + sum(max(k.mean().item(), free_bits) for k in kls)
        assert out["loss"].item() == pytest.approx(want, rel=1e-6)
    assert out["loss"].item() == pytest.approx(-log_px.mean().item() + cfg.depth * 1e4, rel=1e-6)
    model.config = cfg.replace(free_bits=0.0)  # no clamp, not even at 0: a layer's KL sample may be negative
    torch.manual_seed(1)
    out = model(images)
    assert out["loss"].item() == pytest.approx(-log_px.mean().item() + sum(k.mean().item() for k in kls), rel=1e-6)
    assert out["loss"].item() == pytest.approx((out["recon"] + out["kl"]).item(), rel=1e-6)


def test_forward_bpd_equals_log_weights_with_one_sample_and_is_deterministic() -> None:
    torch.manual_seed(0)
    model = build_hvae(get_config("tiny"), "sdn")
    images = tiny_images(4)
    torch.manual_seed(5)
    bpd = model(images)["bpd"].item()
    torch.manual_seed(5)
    log_w = model.log_weights(images, 1)
    assert log_w.dtype == torch.float64 and log_w.shape == (1, 4)
    assert bpd == pytest.approx(nats_to_bpd(-log_w.mean().item(), 192), rel=1e-6)
    torch.manual_seed(5)
    assert torch.equal(model.log_weights(images, 1), log_w)
    g1, g2 = (torch.Generator().manual_seed(3) for _ in range(2))
    assert torch.equal(model.log_weights(images, 3, g1), model.log_weights(images, 3, g2))


@pytest.mark.parametrize("name", MODELS)
def test_log_weights_share_the_bottom_up_pass_exactly(name: str) -> None:
    """K samples per image from one bottom-up pass equal the full model run on K copies of the
    batch (sample-major rows), drawing the same posterior noise."""
    torch.manual_seed(0)
    model = build_hvae(get_config("tiny"), name).eval()
    images, k = tiny_images(3), 4
    shared = model.log_weights(images, k, torch.Generator().manual_seed(7))
    with torch.no_grad():
        log_px, kls = model._elbo_terms(images.repeat(k, 1, 1, 1), torch.Generator().manual_seed(7))
    naive = (log_px - torch.stack(kls).sum(dim=0)).double().view(k, 3)
    torch.testing.assert_close(shared, naive, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(shared[0], shared[1])  # the samples differ from each other


@pytest.mark.parametrize("name", MODELS)
def test_split_evaluation_pass_equals_the_whole_model_on_repeated_images(name: str) -> None:
    """Encoder once on the B images, then the top-down pass on rows gathered from it, equals the
    whole model run on the images repeated before the encoder (the old way), with the same noise."""
    torch.manual_seed(0)
    model = build_hvae(get_config("tiny"), name).eval()
    images, rows = tiny_images(3), torch.tensor([2, 0, 0, 1, 2, 2, 1])
    noise = torch.randn(len(rows), model.posterior_noise_size, generator=torch.Generator().manual_seed(4))
    features = model.posterior_features(images)
    split = model.log_weights_from_features(features, rows, noise)
    with torch.no_grad():
        log_px, kls = model._elbo_terms(images[rows], noise=noise)
    naive = (log_px - torch.stack(kls).sum(dim=0)).double()
    assert split.dtype == torch.float64 and split.shape == (7,)
    torch.testing.assert_close(split, naive, rtol=1e-5, atol=1e-4)
    moved = noise.clone()
    moved[3] += 1.0  # one sample's noise: only that sample's weight changes
    other = model.log_weights_from_features(features, rows, moved)
    keep = [0, 1, 2, 4, 5, 6]
    assert abs(other[3] - split[3]) > 1e-3
    torch.testing.assert_close(other[keep], split[keep], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="posterior noise"):
        model.log_weights_from_features(features, rows, noise[:, :-1])


def test_noise_shapes_are_the_posterior_shapes_of_the_top_down_steps() -> None:
    torch.manual_seed(0)
    model = build_hvae(get_config("tiny"), "sdn").eval()
    seen: list[tuple[int, ...]] = []
    hooks = [layer.iaf.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape[1:])))
             for layer in model.layers]
    try:
        with torch.no_grad():
            model(tiny_images(2))
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == model.noise_shapes  # called top layer first
    assert model.posterior_noise_size == sum(math.prod(shape) for shape in seen)


def test_sample_contract_temperature_zero_and_generator() -> None:
    torch.manual_seed(0)
    model = build_hvae(get_config("tiny"), "sdn")
    s1 = model.sample(5, 0.8, torch.Generator().manual_seed(1))
    s2 = model.sample(5, 0.8, torch.Generator().manual_seed(1))
    assert s1.dtype == torch.uint8 and s1.shape == (5, 3, 8, 8) and torch.equal(s1, s2)
    # at temperature 0 every z is its prior mean, so samples do not depend on the noise
    assert torch.equal(model.sample(2, 0.0, torch.Generator().manual_seed(1)), model.sample(2, 0.0, torch.Generator().manual_seed(9)))
    with pytest.raises(ValueError, match="num"):
        model.sample(0)


def test_bad_images_raise_value_error() -> None:
    model = build_hvae(get_config("tiny"), "cnn")
    with pytest.raises(ValueError, match="uint8"):
        model(tiny_images().float())
    with pytest.raises(ValueError, match=r"\(B, 3, 8, 8\)"):
        model(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="num_samples"):
        model.log_weights(tiny_images(), 0)


def test_weight_norm_everywhere_and_deepcopy_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    model = build_hvae(get_config("tiny"), "sdn")
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert convs and all(hasattr(m, "parametrizations") and "weight" in m.parametrizations for m in convs)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    ema.load_state_dict(model.state_dict())
    images = tiny_images()
    torch.manual_seed(2)
    a = model(images)["loss"]
    torch.manual_seed(2)
    b = ema(images)["loss"]
    assert torch.equal(a, b)


def test_masked_conv_is_autoregressive_in_raster_order() -> None:
    torch.manual_seed(0)
    net = ARConvNet(z_size=2, context_size=6)
    z = torch.randn(1, 2, 5, 5)
    context = torch.randn(1, 6, 5, 5)
    m, s = net(z, context)
    for pos in (0, 7, 12, 24):
        i, j = divmod(pos, 5)
        z2 = z.clone()
        z2[0, :, i, j] += 1.0
        m2, s2 = net(z2, context)
        changed = ((m2 - m).abs() + (s2 - s).abs()).sum(1)[0].flatten() > 1e-7
        assert not changed[: pos + 1].any(), pos  # outputs at and before the perturbed position are untouched
        if pos < 24:
            assert changed[pos + 1:].any()
    with pytest.raises(ValueError):
        MaskedConv2d("C", 1, 1)


def test_iaf_log_scale_is_minus_log_det_jacobian() -> None:
    torch.manual_seed(0)
    step = IAFStep(z_size=2, context_size=4).double()
    for p in step.parameters():  # make the flow far from identity so the test has teeth
        p.data.mul_(8.0)
    z0 = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    context = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda z: step(z.view_as(z0), context)[0].flatten(), z0.flatten())
    _, log_scale = step(z0, context)
    sign, logdet = torch.linalg.slogdet(jac)
    assert sign.item() == 1.0
    assert log_scale.sum().item() == pytest.approx(-logdet.item(), rel=1e-9, abs=1e-9)
    # so log q(z) = log N(z0) + sum(log_scale) is the change-of-variables density
    assert log_scale.abs().sum() > 0.1


def test_sdn_factory_directions_features_and_scales() -> None:
    factory = SDNBlockFactory(min_scale=4, max_scale=16, nfeat_0=120, nfeat_diff=50, num_dirs=2)
    a0 = factory("down_a", 8, 9, 16, False)
    b0 = factory("down_b", 10, 16, 16, True)  # resampling SDN layer: F shrinks afterwards
    a1 = factory("down_a", 8, 9, 8, False)
    b1 = factory("down_b", 10, 16, 8, True)
    a2 = factory("down_a", 8, 9, 4, False)
    conv = factory("down_a", 8, 9, 2, False)  # below min scale
    out = factory("output", 8, 50, 32, False)  # image scale above max scale
    assert isinstance(a0, ResSDNLayer) and isinstance(b0, ResSDNLayer)
    assert a0.sdn.directions == ["left_right", "right_left"] and b0.sdn.directions == ["top_down", "bottom_up"]
    assert a1.sdn.directions == ["left_right", "right_left"]
    feats = [blk.sdn.sweeps[0].num_features for blk in (a0, b0, a1, b1, a2)]
    assert feats == [120, 120, 70, 70, 50]  # 120 -> 70 -> max(50, 20)
    assert isinstance(b0.conv, nn.ConvTranspose2d)
    assert isinstance(conv, nn.Conv2d) and isinstance(out, nn.Conv2d)
    three = SDNBlockFactory(0, 32, 8, 0, 3)
    dirs = [three("down_a", 2, 2, 8, False).sdn.directions for _ in range(3)]
    assert dirs == [["left_right", "right_left", "top_down"], ["bottom_up", "left_right", "right_left"],
                    ["top_down", "bottom_up", "left_right"]]
    with pytest.raises(ValueError, match="role"):
        factory("middle", 8, 8, 8, False)
    with pytest.raises(ValueError, match="upsample"):
        factory("down_a", 8, 8, 8, True)


def test_models_use_the_expected_blocks() -> None:
    cfg = get_config("tiny")
    sdn, cnn, matched = (build_hvae(cfg, n) for n in MODELS)
    assert isinstance(sdn.output, ResSDNLayer) and len(sdn.output.sdn.directions) == 4
    assert all(isinstance(l.down_a, ResSDNLayer) and isinstance(l.down_b, ResSDNLayer) for l in sdn.layers)
    assert not any(isinstance(m, ResSDNLayer) for m in cnn.modules())
    assert all(isinstance(l.down_a, HiddenConvBlock) for l in matched.layers)
    n_sdn, n_cnn, n_matched = map(count_parameters, (sdn, cnn, matched))
    assert n_cnn < n_sdn and abs(n_matched - n_sdn) <= 0.05 * n_sdn
    # the resampling layer's blocks change resolution as the ladder needs
    assert sdn.top_size == 4 and sdn.layers[1].downsample and not sdn.layers[0].downsample


def test_registry_adds_a_baseline_from_one_function() -> None:
    @register_blocks("test_only_conv")
    def build(config):
        return ConvBlockFactory()

    try:
        assert "test_only_conv" in registered_blocks()
        model = build_hvae(get_config("tiny"), "test_only_conv")
        assert count_parameters(model) == count_parameters(build_hvae(get_config("tiny"), "cnn"))
        with pytest.raises(ValueError, match="already registered"):
            register_blocks("test_only_conv")(lambda c: ConvBlockFactory())
    finally:
        unregister_blocks("test_only_conv")
    with pytest.raises(ValueError, match=r"unknown decoder blocks 'nope'; registered: \['cnn', 'cnn_matched', 'sdn'\]"):
        block_builder("nope")


def test_one_sample_kl_uses_iaf_density() -> None:
    """log q(z|x) in the layer equals the Gaussian density of z0 plus the IAF log-scale."""
    torch.manual_seed(0)
    model = build_hvae(get_config("tiny"), "cnn")
    layer = model.layers[-1]
    x = torch.randn(2, 8, 4, 4)
    q_up = torch.randn(2, layer.q_size, 4, 4)
    g = torch.Generator().manual_seed(4)
    _, kl = layer.down(x, q_up, generator=g)
    # recompute by hand with the same noise
    out = layer.down_a(torch.nn.functional.elu(x))
    h_det, q_down, p_params = out.split([layer.h_size, layer.q_size, 2 * layer.z_size], 1)
    q_mean, q_logvar, ctx = (q_up + q_down).split([layer.z_size, layer.z_size, layer.context], 1)
    eps = torch.randn(q_mean.shape, generator=torch.Generator().manual_seed(4))
    z0 = q_mean + torch.exp(0.5 * q_logvar) * eps
    z, log_scale = layer.iaf(z0, ctx)
    p_mean, p_logvar = p_params.chunk(2, 1)
    log_q = torch.distributions.Normal(q_mean, torch.exp(0.5 * q_logvar)).log_prob(z0) + log_scale
    log_p = torch.distributions.Normal(p_mean, torch.exp(0.5 * p_logvar)).log_prob(z)
    torch.testing.assert_close(kl, (log_q - log_p).flatten(1).sum(1), rtol=1e-5, atol=1e-4)
    assert torch.allclose(gaussian_log_prob(z0, q_mean, q_logvar), torch.distributions.Normal(q_mean, torch.exp(0.5 * q_logvar)).log_prob(z0), atol=1e-5)
