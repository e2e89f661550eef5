"""Likelihood pieces against independent references: exhaustive normalisation, a naive scipy
per-pixel DML, torch.distributions Gaussians, hand-computed bpd, and sampler histograms."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import logistic

from sdn.likelihoods import (
    DiscretizedMixtureLogistics,
    gaussian_kl,
    gaussian_log_prob,
    levels_to_unit_interval,
    nats_to_bpd,
    preprocess,
    quantize_uint8,
    unit_interval_to_uint8,
)


def random_params(dml: DiscretizedMixtureLogistics, n: int, seed: int, log_scale_range=(-4.0, 0.5)) -> torch.Tensor:
    """(n, P, 1, 1) float64 parameters with spread-out logits, means, scales and coefficients."""
    g = torch.Generator().manual_seed(seed)
    m, c = dml.num_mixtures, dml.channels
    logits = 2 * torch.randn(n, m, generator=g, dtype=torch.float64)
    means = 2.4 * torch.rand(n, c, m, generator=g, dtype=torch.float64) - 1.2
    lo, hi = log_scale_range
    log_scales = lo + (hi - lo) * torch.rand(n, c, m, generator=g, dtype=torch.float64)
    coeffs = 1.5 * torch.randn(n, c, m, generator=g, dtype=torch.float64)
    rest = torch.stack([means, log_scales, coeffs], dim=2)  # (n, C, 3, M)
    return torch.cat([logits, rest.reshape(n, -1)], dim=1)[:, :, None, None]


def all_values_log_probs(dml: DiscretizedMixtureLogistics, params: torch.Tensor, chunk_first: int = 16) -> torch.Tensor:
    """log P of every one of the (2**bits)**C values of one pixel (params (1, P, 1, 1))."""
    levels = torch.arange(2**dml.bits)
    out = []
    for start in range(0, len(levels), chunk_first):
        firsts = levels[start:start + chunk_first]
        grids = torch.meshgrid(firsts, *([levels] * (dml.channels - 1)), indexing="ij")
        combos = torch.stack([g.reshape(-1) for g in grids], dim=1)  # (N, C)
        x = levels_to_unit_interval(combos, dml.bits, torch.float64)[:, :, None, None]
        out.append(dml.log_prob_pixels(params.expand(len(combos), -1, -1, -1), x).reshape(-1))
    return torch.cat(out)


@pytest.mark.parametrize("channels,bits", [(1, 1), (1, 3), (1, 5), (1, 8), (3, 1), (3, 3), (3, 5)])
def test_dml_probabilities_of_all_values_sum_to_one(channels: int, bits: int) -> None:
    dml = DiscretizedMixtureLogistics(3, channels, bits)
    params = random_params(dml, 3, seed=10 * channels + bits)
    for i in range(params.shape[0]):
        total = torch.logsumexp(all_values_log_probs(dml, params[i:i + 1]), dim=0).exp().item()
        assert abs(total - 1.0) < 1e-5, (i, total)


def naive_dml_log_prob(params: np.ndarray, x: np.ndarray, num_mixtures: int, bits: int) -> np.ndarray:
    """Per-pixel reference from the PixelCNN++ definition with scipy logistic CDFs (float64 loops)."""
    b, _, h, w = params.shape
    c = x.shape[1]
    half = 1.0 / (2**bits - 1)
    out = np.zeros((b, h, w))
    for n, i, j in itertools.product(range(b), range(h), range(w)):
        p = params[n, :, i, j]
        logits = p[:num_mixtures]
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
        rest = p[num_mixtures:].reshape(c, 3, num_mixtures)
        xs = x[n, :, i, j]
        total = 0.0
        for k in range(num_mixtures):
            prob = weights[k]
            for ch in range(c):
                mu = rest[ch, 0, k]
                if ch == 1:
                    mu += np.tanh(rest[0, 2, k]) * xs[0]
                if ch == 2:
                    mu += np.tanh(rest[1, 2, k]) * xs[0] + np.tanh(rest[2, 2, k]) * xs[1]
                s = np.exp(max(rest[ch, 1, k], -7.0))
                upper = 1.0 if xs[ch] > 0.999 else logistic.cdf(xs[ch] + half, loc=mu, scale=s)
                lower = 0.0 if xs[ch] < -0.999 else logistic.cdf(xs[ch] - half, loc=mu, scale=s)
                prob *= upper - lower
            total += prob
        out[n, i, j] = math.log(total)
    return out


@pytest.mark.parametrize("channels,bits", [(3, 8), (1, 8), (3, 5), (1, 2)])
def test_dml_matches_naive_scipy_reference(channels: int, bits: int) -> None:
    g = torch.Generator().manual_seed(channels * 100 + bits)
    dml = DiscretizedMixtureLogistics(4, channels, bits)
    b, h, w = 2, 3, 4
    flat = random_params(dml, b * h * w, seed=bits, log_scale_range=(-3.5, -0.5))
    params = flat[:, :, 0, 0].reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
    levels = torch.randint(0, 2**bits, (b, channels, h, w), generator=g)
    levels[0, :, 0, 0] = 0  # make sure both edge bins are exercised
    levels[0, :, 0, 1] = 2**bits - 1
    x = levels_to_unit_interval(levels, bits, torch.float64)
    got = dml.log_prob_pixels(params, x).numpy()
    want = naive_dml_log_prob(params.numpy(), x.numpy(), 4, bits)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(dml.log_prob(params, x).numpy(), want.reshape(b, -1).sum(1), rtol=1e-7)


def test_dml_is_finite_with_extreme_parameters_and_gradients() -> None:
    dml = DiscretizedMixtureLogistics(2, 3, 8)
    params = random_params(dml, 6, seed=3, log_scale_range=(-20.0, 8.0)) * 3
    params = params.float().requires_grad_(True)
    x = levels_to_unit_interval(torch.tensor([[0, 128, 255]] * 6), 8)[:, :, None, None]
    lp = dml.log_prob(params, x)
    assert torch.isfinite(lp).all() and (lp <= 1e-6).all()
    lp.sum().backward()
    assert torch.isfinite(params.grad).all()


def test_dml_rejects_bad_shapes_and_settings() -> None:
    with pytest.raises(ValueError, match="channels"):
        DiscretizedMixtureLogistics(5, 2, 8)
    with pytest.raises(ValueError, match="bits"):
        DiscretizedMixtureLogistics(5, 3, 9)
    dml = DiscretizedMixtureLogistics(5, 3, 8)
    assert dml.num_params == 50  # M * (1 + 3C), the official 10 * M for RGB
    with pytest.raises(ValueError, match="params of shape"):
        dml.log_prob(torch.zeros(1, 49, 2, 2), torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="x must have shape"):
        dml.log_prob(torch.zeros(1, 50, 2, 2), torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize("channels,bits", [(1, 2), (3, 1)])
def test_dml_sampler_histogram_matches_probabilities(channels: int, bits: int) -> None:
    dml = DiscretizedMixtureLogistics(3, channels, bits)
    params = random_params(dml, 1, seed=7, log_scale_range=(-2.0, -0.5)).float()
    n = 40000
    draws = dml.sample(params.expand(n, -1, -1, -1), torch.Generator().manual_seed(0))
    levels = torch.round((draws[:, :, 0, 0] + 1) * (2**bits - 1) / 2).long()
    index = torch.zeros(n, dtype=torch.long)
    for ch in range(channels):
        index = index * 2**bits + levels[:, ch]
    freq = torch.bincount(index, minlength=2 ** (bits * channels)).double() / n
    probs = all_values_log_probs(dml, params.double()).exp()
    assert torch.allclose(freq, probs, atol=0.012), (freq, probs)


def test_dml_mode_picks_argmax_component_mean() -> None:
    dml = DiscretizedMixtureLogistics(2, 3, 8)
    # component 1 dominates; its means 0.2, 0.1, -0.3 with coefficients tanh(0) = 0 except a0.
    logits = torch.tensor([0.0, 5.0])
    means = torch.tensor([[0.9, 0.2], [0.9, 0.1], [0.9, -0.3]])
    log_scales = torch.full((3, 2), -2.0)
    coeffs = torch.zeros(3, 2)
    coeffs[0, 1] = math.atanh(0.5)  # green += 0.5 * red
    rest = torch.stack([means, log_scales, coeffs], dim=1)
    params = torch.cat([logits, rest.reshape(-1)])[None, :, None, None]
    mode = dml.mode(params)[0, :, 0, 0]
    snap = lambda v: round((v + 1) * 127.5) / 127.5 - 1  # nearest 8-bit bin centre
    red = snap(0.2)
    want = torch.tensor([red, snap(0.1 + 0.5 * red), snap(-0.3)])
    assert torch.allclose(mode, want, atol=1e-6)


def test_preprocess_quantizes_and_scales_and_round_trips() -> None:
    values = torch.arange(256, dtype=torch.uint8)
    np.testing.assert_allclose(preprocess(values, 8).numpy(), (np.arange(256) / 127.5 - 1).astype(np.float32), atol=1e-6)
    for bits in range(1, 9):
        levels = quantize_uint8(values, bits)
        assert torch.equal(levels, torch.from_numpy(np.floor(np.arange(256) / 2 ** (8 - bits)).astype(np.int64)))
        x = preprocess(values, bits)
        assert x.min() == -1 and x.max() == 1
        back = unit_interval_to_uint8(x, bits)
        assert torch.equal(quantize_uint8(back, bits), levels)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(values.float(), 8)
    with pytest.raises(ValueError, match="bits"):
        preprocess(values, 0)


def test_gaussian_log_prob_and_kl_match_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    mq, mp, x = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(3))
    lq, lp = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(2))
    q = torch.distributions.Normal(mq, torch.exp(0.5 * lq))
    p = torch.distributions.Normal(mp, torch.exp(0.5 * lp))
    torch.testing.assert_close(gaussian_log_prob(x, mq, lq), q.log_prob(x))
    torch.testing.assert_close(gaussian_kl(mq, lq, mp, lp), torch.distributions.kl_divergence(q, p))
    torch.testing.assert_close(gaussian_kl(mq, lq, mq, lq), torch.zeros(50, dtype=torch.float64), atol=1e-14, rtol=0)
    # the model's one-sample KL (log q - log p at z ~ q) is unbiased for the closed form
    z = q.sample((20000,))
    mc = (gaussian_log_prob(z, mq, lq) - gaussian_log_prob(z, mp, lp)).mean(0)
    torch.testing.assert_close(mc, gaussian_kl(mq, lq, mp, lp), atol=0.15, rtol=0.05)


def test_bpd_conversion_by_hand() -> None:
    # 1000 nats on a 1x28x28 image: 1000 * log2(e) / 784 bits per dim
    assert nats_to_bpd(1000.0, 784) == pytest.approx(1000 * 1.4426950408889634 / 784, rel=1e-12)
    # a uniform 8-bit model on 3x32x32 costs 3072 * ln(256) nats = exactly 8 bpd
    assert nats_to_bpd(3072 * math.log(256), 3072) == pytest.approx(8.0, abs=1e-12)
    with pytest.raises(ValueError):
        nats_to_bpd(1.0, 0)


def test_shared_bin_maths_matches_a_naive_float64_reference_for_both_families() -> None:
    """``discretized_logistic_bins`` (used by the DML and the vanilla VAE's logistic) against the
    direct formula sigmoid(upper edge) - sigmoid(lower edge) in float64 with scipy."""
    from sdn.likelihoods import discretized_logistic_bins
    from sdn.models import vae_likelihoods

    assert not hasattr(vae_likelihoods, "_log1mexp")  # one copy of the maths
    g = torch.Generator().manual_seed(0)
    half_bin = 0.5 / 255
    x = torch.arange(256, dtype=torch.float64) / 255 - 0.5
    for mean, log_scale in ((0.0, -4.0), (0.3, -2.0), (-0.45, -6.0), (0.1, 0.5), (0.9, -3.0)):
        mu = mean + 0.01 * torch.randn(256, generator=g, dtype=torch.float64)
        got = discretized_logistic_bins(x - mu, torch.tensor(math.exp(-log_scale), dtype=torch.float64), half_bin,
                                        x < -0.5 + half_bin, x > 0.5 - half_bin)
        s = math.exp(log_scale)
        xs, ms = x.numpy(), mu.numpy()
        top, bottom = xs > 0.5 - half_bin, xs < -0.5 + half_bin
        # P(lower < X < upper) from the CDF left of the mean and from the survival function right of it
        by_cdf = (np.where(top, 1.0, logistic.cdf(xs + half_bin, ms, s))
                  - np.where(bottom, 0.0, logistic.cdf(xs - half_bin, ms, s)))
        by_sf = (np.where(bottom, 1.0, logistic.sf(xs - half_bin, ms, s))
                 - np.where(top, 0.0, logistic.sf(xs + half_bin, ms, s)))
        want = np.log(np.where(xs < ms, by_cdf, by_sf))
        finite = np.isfinite(want)  # the naive difference underflows far in the tails; the identity does not
        assert finite.mean() > 0.5
        np.testing.assert_allclose(got.numpy()[finite], want[finite], rtol=1e-7, atol=1e-9)
        assert torch.isfinite(got).all()
        via_vae = vae_likelihoods.discretized_logistic_log_prob(x, mu, torch.tensor(log_scale, dtype=torch.float64))
        assert torch.equal(via_vae, got)


@pytest.mark.parametrize("log_scale", [20.0, 40.0, 80.0])
def test_gradients_are_finite_where_the_bin_width_underflows(log_scale: float) -> None:
    """Very wide logistics make the standardised bin width ~0 where log(1 - exp(-a)) has an infinite
    slope in the branch torch.where does not select: the guard keeps both families' gradients finite."""
    from sdn.models.vae_likelihoods import DiscretizedLogistic

    g = torch.Generator().manual_seed(1)
    lik = DiscretizedLogistic(init_log_scale=log_scale)
    mean = (0.3 * torch.randn(2, 3, 8, 8, generator=g)).requires_grad_(True)
    images = torch.randint(0, 256, (2, 3, 8, 8), generator=g, dtype=torch.uint8)
    lp = lik.log_prob(mean, images)
    grads = torch.autograd.grad(lp.sum(), (mean, lik.log_scale))
    assert torch.isfinite(lp).all() and all(torch.isfinite(t).all() for t in grads)

    dml = DiscretizedMixtureLogistics(2, 3, 8)
    params = torch.randn(2, dml.num_params, 4, 4, generator=g)
    params[:, 2:].view(2, 3, 3, 2, 4, 4)[:, :, 1] = log_scale  # every log-scale
    params.requires_grad_(True)
    lp = dml.log_prob(params, preprocess(images[:, :, :4, :4], 8))
    (grad,) = torch.autograd.grad(lp.sum(), params)
    assert torch.isfinite(lp).all() and torch.isfinite(grad).all()
