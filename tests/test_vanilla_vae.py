"""Tests of the vanilla VAE (disentanglement study) and its single-component pixel likelihoods."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from sdn.models.vae_likelihoods import (
    BernoulliLikelihood,
    DiscretizedLogistic,
    discretized_logistic_log_prob,
    uint8_to_centered,
)
from sdn.models.vanilla_vae import (
    VAEConfig,
    VanillaVAE,
    PRESETS,
    build_vanilla_vae,
    get_config,
)
from sdn.models import count_parameters

ALL_VALUES = torch.arange(256, dtype=torch.float64) / 255.0 - 0.5  # bin centres in [-0.5, 0.5]
HALF_BIN = 0.5 / 255.0


def _images(batch: int, channels: int, seed: int = 0, binary: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if binary:
        return torch.randint(0, 2, (batch, channels, 64, 64), generator=g).to(torch.uint8) * 255
    return torch.randint(0, 256, (batch, channels, 64, 64), generator=g, dtype=torch.uint8)


def _tiny(decoder: str = "cnn", **overrides) -> VanillaVAE:
    """A small model: narrow SDN (F=8) so CPU tests stay fast; the CNN path is the paper's."""
    base = dict(sdn_features=8, z_dim=4)
    base.update(overrides)
    return build_vanilla_vae(VAEConfig(**base), decoder)


def _naive_logistic_log_probs(mean: float, scale: float) -> np.ndarray:
    """log P(k), k = 0..255, by CDF differences with scipy; edge bins take the tails."""
    x = ALL_VALUES.numpy()
    upper = stats.logistic.cdf(x + HALF_BIN, loc=mean, scale=scale)
    lower = stats.logistic.cdf(x - HALF_BIN, loc=mean, scale=scale)
    probs = upper - lower
    probs[0] = upper[0]
    probs[-1] = 1.0 - lower[-1]
    return np.log(probs)


# --------------------------------------------------------------------------- likelihoods
def test_discretized_logistic_normalised_over_all_256_values():
    g = torch.Generator().manual_seed(1)
    means = torch.rand(50, generator=g, dtype=torch.float64) * 2.0 - 1.0  # also outside the data range
    log_scales = torch.rand(50, generator=g, dtype=torch.float64) * 8.0 - 7.0  # scale e^-7 .. e^1
    for dtype in (torch.float64, torch.float32):
        lp = discretized_logistic_log_prob(
            ALL_VALUES[:, None].to(dtype), means[None, :].to(dtype), log_scales[None, :].to(dtype)
        )
        total = torch.logsumexp(lp.double(), dim=0).exp()
        assert torch.allclose(total, torch.ones_like(total), atol=1e-5), total


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.3, -4.5), (-0.45, -2.0), (0.1, 0.5), (0.7, -3.0)])
def test_discretized_logistic_matches_scipy_reference(mean, log_scale):
    expected = _naive_logistic_log_probs(mean, float(np.exp(log_scale)))
    got = discretized_logistic_log_prob(
        ALL_VALUES, torch.tensor(mean, dtype=torch.float64), torch.tensor(log_scale, dtype=torch.float64)
    ).numpy()
    finite = expected > -30  # the naive CDF difference loses all precision further out
    assert finite.sum() > 10
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-7, atol=1e-9)


def test_discretized_logistic_far_tails_match_log_space_scipy():
    """Where naive CDF differences underflow, compare with scipy's logcdf/logsf in log space."""
    mean, scale = 0.45, float(np.exp(-6.0))
    x = ALL_VALUES.numpy()
    a, b = x + HALF_BIN, x - HALF_BIN
    # All bins below the mean: log(cdf(a) - cdf(b)) = logcdf(a) + log(1 - exp(logcdf(b) - logcdf(a))).
    la, lb = stats.logistic.logcdf(a, mean, scale), stats.logistic.logcdf(b, mean, scale)
    expected = la + np.log(-np.expm1(lb - la))
    expected[0] = la[0]
    below = x < mean - 0.05
    got = discretized_logistic_log_prob(
        ALL_VALUES, torch.tensor(mean, dtype=torch.float64), torch.tensor(-6.0, dtype=torch.float64)
    ).numpy()
    assert np.all(np.isfinite(got))
    assert expected[below].min() < -200  # really in the far tail
    np.testing.assert_allclose(got[below], expected[below], rtol=1e-9)


def test_discretized_logistic_module_sums_pixels_and_mode_is_argmax():
    lik = DiscretizedLogistic(init_log_scale=-2.5)
    g = torch.Generator().manual_seed(2)
    params = torch.randn(2, 3, 4, 5, generator=g) * 0.4
    images = torch.randint(0, 256, (2, 3, 4, 5), generator=g, dtype=torch.uint8)
    expected = np.zeros(2)
    for idx in np.ndindex(*params.shape):
        ref = _naive_logistic_log_probs(float(params[idx]), float(np.exp(-2.5)))
        expected[idx[0]] += ref[int(images[idx])]
    np.testing.assert_allclose(lik.log_prob(params, images).detach().numpy(), expected, rtol=1e-5)
    # Mode: brute-force argmax over all 256 values (includes means beyond the edges).
    params = torch.tensor([[[[-0.7, -0.49, 0.011, 0.123, 0.499, 0.9]]]])  # no exact ties between bins
    for log_scale in (-5.0, -1.0, 1.0):
        lik.log_scale.data.fill_(log_scale)
        lp = discretized_logistic_log_prob(ALL_VALUES.float()[:, None], params.flatten()[None, :], lik.log_scale)
        assert torch.equal(lik.mode(params).flatten().long(), lp.argmax(dim=0))


def test_discretized_logistic_sampling_frequencies():
    lik = DiscretizedLogistic(init_log_scale=-3.0)
    params = torch.full((1, 1, 200, 200), 0.47)  # near the top edge: the tail bin matters
    draws = lik.sample(params, generator=torch.Generator().manual_seed(3)).flatten().long()
    freq = torch.bincount(draws, minlength=256).double() / draws.numel()
    probs = torch.from_numpy(np.exp(_naive_logistic_log_probs(0.47, float(np.exp(-3.0)))))
    # 40k draws: standard error of each frequency <= 0.0025
    assert torch.allclose(freq, probs, atol=0.01)
    assert abs(freq[255].item() - probs[255].item()) < 0.01 and probs[255] > 0.2


def test_bernoulli_matches_torch_distributions():
    lik = BernoulliLikelihood()
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 1, 8, 8, generator=g) * 3
    images = torch.randint(0, 2, (3, 1, 8, 8), generator=g).to(torch.uint8) * 255
    expected = torch.distributions.Bernoulli(logits=logits).log_prob((images > 0).float()).flatten(1).sum(1)
    assert torch.allclose(lik.log_prob(logits, images), expected, rtol=1e-6, atol=1e-5)
    assert torch.equal(lik.mode(logits), (torch.sigmoid(logits) > 0.5).to(torch.uint8) * 255)
    with pytest.raises(ValueError, match="binary"):
        lik.log_prob(logits, torch.full((3, 1, 8, 8), 7, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        lik.log_prob(logits, images.float())


def test_uint8_to_centered_range():
    x = uint8_to_centered(torch.tensor([0, 255], dtype=torch.uint8))
    assert x.tolist() == [-0.5, 0.5]


# --------------------------------------------------------------------------- model
def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(5)
    mean, logvar = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).sum(1)
    assert torch.allclose(VanillaVAE.kl_to_standard_normal(mean, logvar), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decoder", ["cnn", "sdn"])
@pytest.mark.parametrize("channels,likelihood", [(3, "logistic"), (1, "bernoulli")])
def test_shapes_and_loss_terms(decoder, channels, likelihood):
    model = _tiny(decoder, channels=channels, likelihood=likelihood)
    images = _images(2, channels, binary=likelihood == "bernoulli")
    torch.manual_seed(0)
    out = model(images)
    assert set(out) >= {"loss", "recon", "kl", "elbo", "bpd"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    assert torch.allclose(out["elbo"], -(out["recon"] + out["kl"]))
    assert torch.allclose(out["loss"], out["recon"] + out["kl"])  # beta = 1
    assert torch.allclose(out["bpd"], -out["elbo"] / (channels * 64 * 64 * np.log(2.0)))
    assert out["kl"] >= 0
    # The reconstruction term is -log p(x|z) for the z drawn in forward: recompute it with the same noise.
    torch.manual_seed(0)
    mean, logvar = model.encode(images)
    z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
    recon = -model.likelihood.log_prob(model.decode(z), images).mean()
    assert torch.allclose(out["recon"], recon)
    assert model.encode_mean(images).shape == (2, 4)
    for pixels in ("mean", "mode", "sample"):
        samples = model.sample(3, generator=torch.Generator().manual_seed(0), pixels=pixels)
        assert samples.dtype == torch.uint8 and samples.shape == (3, channels, 64, 64)
        if likelihood == "bernoulli" and pixels != "mean":
            assert set(samples.unique().tolist()) <= {0, 255}
    with pytest.raises(ValueError, match="pixels"):
        model.sample(1, pixels="median")
    # Reconstructions decode the posterior mean; "mean" pictures are the likelihood's mean image.
    recon = model.reconstruct(images)
    assert recon.dtype == torch.uint8 and recon.shape == images.shape
    params = model.decode(model.encode_mean(images))
    if likelihood == "bernoulli":
        want = torch.round(255 * torch.sigmoid(params)).to(torch.uint8)
    else:
        want = torch.round((params + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    assert torch.equal(recon, want)


def test_sdn_decoder_replaces_only_the_32_block():
    from sdn.layers import SDNLayer

    cnn, sdn = _tiny("cnn"), _tiny("sdn")
    sdn_layers = [m for m in sdn.decoder if isinstance(m, SDNLayer)]
    assert len(sdn_layers) == 1 and not any(isinstance(m, SDNLayer) for m in cnn.decoder)
    x = torch.zeros(1, 4)
    # Follow the activations through the decoder: the SDN layer must output (32, 32, 32).
    h = x
    for module in sdn.decoder:
        h = module(h)
        if isinstance(module, SDNLayer):
            assert h.shape == (1, 32, 32, 32)
    two = _tiny("sdn", sdn_scales=(16, 64), sdn_directions=("top_down", "bottom_up"))
    assert sum(isinstance(m, SDNLayer) for m in two.decoder) == 2
    assert two.decode(torch.zeros(2, 4)).shape == (2, 3, 64, 64)


@pytest.mark.parametrize("decoder", ["cnn", "sdn"])
def test_gradients_reach_every_parameter(decoder):
    model = _tiny(decoder)
    torch.manual_seed(0)
    model(_images(4, 3))["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_decoder_parameter_counts_match_reference():
    """Counted: parameters of ``model.decoder`` only (the Linear/ConvTranspose/SDN stack), for the
    paper config (z=10, RGB, F=200); the encoder and the likelihood's single log-scale are excluded.
    The reference quotes CNN ~0.38M and SDN ~0.96M; we check both an exact closed form and a 3% band."""
    config = get_config("shapes3d")
    cnn = count_parameters(build_vanilla_vae(config, "cnn").decoder)
    sdn = count_parameters(build_vanilla_vae(config, "sdn").decoder)

    def conv_t(cin, cout):
        return cin * cout * 16 + cout

    z, f = 10, 200
    linears = (z * 256 + 256) + (256 * 1024 + 1024)
    expected_cnn = linears + conv_t(64, 64) + conv_t(64, 32) + conv_t(32, 32) + conv_t(32, 3)
    # SDN block: ConvTranspose(32 -> F) project-in, GRUCell(3F -> F), 1x1 Conv(F -> 32) project-out.
    sdn_block = conv_t(32, f) + (3 * f * 3 * f + 3 * f * f + 2 * 3 * f) + (f * 32 + 32)
    expected_sdn = expected_cnn - conv_t(32, 32) + sdn_block
    assert cnn == expected_cnn
    assert sdn == expected_sdn
    assert abs(cnn - 0.38e6) / 0.38e6 < 0.03
    assert abs(sdn - 0.96e6) / 0.96e6 < 0.03


def test_beta_annealing_schedule_and_resume():
    model = _tiny(beta=2.0, beta_anneal_steps=4)
    images = _images(2, 3)
    betas = []
    for _ in range(6):
        out = model(images)
        betas.append(out["beta"].item())
        assert torch.allclose(out["loss"], out["recon"] + out["beta"] * out["kl"])
    assert betas == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert int(model.step) == 6
    model.eval()
    model(images)
    assert int(model.step) == 6  # evaluation does not advance the schedule
    # Resume mid-schedule: the step counter lives in the state_dict.
    first = _tiny(beta=2.0, beta_anneal_steps=4)
    first(images)
    resumed = _tiny(beta=2.0, beta_anneal_steps=4)
    resumed.load_state_dict(first.state_dict())
    assert "step" in first.state_dict()
    assert resumed(images)["beta"].item() == 1.0
    assert _tiny(beta=3.0)(images)["beta"].item() == 3.0  # no annealing: constant


def test_determinism_with_fixed_seed():
    a, b = _tiny("sdn"), _tiny("sdn")
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    assert not torch.equal(a.encoder[0].weight, _tiny("sdn", seed=7).encoder[0].weight)
    images = _images(2, 3)
    torch.manual_seed(11)
    out_a = a(images)
    torch.manual_seed(11)
    out_b = b(images)
    for key in out_a:
        assert torch.equal(out_a[key], out_b[key]), key
    s1 = a.sample(2, temperature=0.7, generator=torch.Generator().manual_seed(5), pixels="sample")
    s2 = a.sample(2, temperature=0.7, generator=torch.Generator().manual_seed(5), pixels="sample")
    assert torch.equal(s1, s2)


def test_encode_mean_is_deterministic_and_uses_no_noise():
    model = _tiny()
    images = _images(3, 3)
    state = torch.get_rng_state()
    first, second = model.encode_mean(images), model.encode_mean(images)
    assert torch.equal(torch.get_rng_state(), state)  # no random draws at all
    assert torch.equal(first, second)
    assert torch.equal(first, model.encode(images)[0])
    # Independent recomputation of the posterior mean: scale, run the encoder stack, take the first half.
    x = images.float() / 255.0 - 0.5
    assert torch.allclose(first, model.encoder(x)[:, :4])


def test_bad_inputs_raise_value_error():
    model = _tiny()
    with pytest.raises(ValueError, match="uint8"):
        model(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(2, 1, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape"):
        model.encode_mean(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="num"):
        model.sample(0)
    with pytest.raises(ValueError, match="decoder"):
        build_vanilla_vae(VAEConfig(), "resnet")
    with pytest.raises(ValueError, match="likelihood"):
        VAEConfig(likelihood="gaussian")
    with pytest.raises(ValueError, match="sdn_scales"):
        VAEConfig(sdn_scales=(128,))
    with pytest.raises(ValueError, match="sdn_directions"):
        VAEConfig(sdn_directions=("diagonal",))
    with pytest.raises(ValueError, match="unknown VAE config"):
        get_config("celeba")


def test_named_configs():
    shapes = get_config("shapes3d")
    assert (shapes.z_dim, shapes.beta, shapes.seed) == (10, 1.0, 1234)
    assert not hasattr(shapes, "lr") and not hasattr(shapes, "batch_size")  # the trainer's settings
    assert (shapes.channels, shapes.likelihood, shapes.sdn_features) == (3, "logistic", 200)
    assert shapes.sdn_scales == (32,) and shapes.sdn_directions == ("left_right",)
    embedded = get_config("embedded")
    assert set(PRESETS) == {"shapes3d", "embedded"}
    assert (embedded.channels, embedded.likelihood) == (1, "bernoulli")
    assert get_config("embedded", beta=4.0).beta == 4.0


def test_objective_stays_float32_under_bf16_autocast():
    """The trainer runs forward under bf16 autocast on CUDA; the pixel sums must still be float32."""
    model = _tiny()
    images = _images(2, 3)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        torch.manual_seed(0)
        out = model(images)
    assert all(v.dtype == torch.float32 for v in out.values())
    torch.manual_seed(0)
    reference = model(images)
    # bf16 network outputs perturb the means slightly; the summed NLL must stay close (no bf16 sums).
    assert torch.allclose(out["recon"], reference["recon"], rtol=2e-2)


@pytest.mark.parametrize("decoder", ["cnn", "sdn"])
def test_initialisation_is_the_official_weights_init(decoder):
    """Orthogonal conv / conv-transpose weights, N(0, 0.02) linear weights, zero biases."""
    model = _tiny(decoder)
    linear = []
    for layer in model.modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            w = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
            rows, cols = w.shape
            gram = w @ w.T if rows <= cols else w.T @ w  # the smaller side is orthonormal
            np.testing.assert_allclose(gram.numpy(), np.eye(min(rows, cols)), atol=1e-5)
        elif isinstance(layer, torch.nn.Linear):
            linear.append(layer.weight.detach().double().flatten())
        else:
            continue
        if layer.bias is not None:
            assert torch.count_nonzero(layer.bias) == 0
    values = torch.cat(linear).numpy()
    assert len(values) > 10000 and abs(values.mean()) < 1e-3 and abs(values.std() - 0.02) < 1e-3
