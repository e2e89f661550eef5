"""ELBO / importance-weighted bpd: exact known cases, float64 log-sum-exp against scipy across chunkings,
IW >= ELBO and growth in K on a real tiny model, sign, seeding and train-mode restoration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import baselines  # noqa: F401  (registers the decoder blocks)
from sdn.models.hvae import build_hvae, get_config
from sdn.scores import evaluate_bpd, image_nll


class UniformModel(nn.Module):
    """A decoder that ignores z: p(x) uniform over 2**bits levels per dim and no KL."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.dummy = nn.Parameter(torch.zeros(()))

    def log_weights(self, images: torch.Tensor, num_samples: int) -> torch.Tensor:
        per_image = -images[0].numel() * self.bits * math.log(2.0)
        return torch.full((num_samples, images.shape[0]), per_image, dtype=torch.float64)


class RecordingModel(nn.Module):
    """Returns random log-weights around -1e4 (so a naive exp underflows) and records them."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.calls: list[torch.Tensor] = []

    def log_weights(self, images: torch.Tensor, num_samples: int) -> torch.Tensor:
        offset = images.flatten(1).double().mean(1)  # image-dependent
        lw = -1e4 - offset + 5 * torch.randn(num_samples, images.shape[0], dtype=torch.float64)
        self.calls.append(lw)
        return lw


def loader_of(images: torch.Tensor, batch_size: int) -> DataLoader:
    factors = torch.zeros(len(images), 0, dtype=torch.int64)
    return DataLoader(TensorDataset(images, factors), batch_size=batch_size, shuffle=False)


@pytest.mark.parametrize("bits,num_samples,chunk", [(8, 1, 4), (8, 7, 3), (8, 16, 100), (5, 5, 2)])
def test_uniform_decoder_scores_exactly_bits_per_dim(bits: int, num_samples: int, chunk: int) -> None:
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    result = evaluate_bpd(UniformModel(bits), loader_of(images, 4), num_samples, chunk, progress=False)
    assert result["elbo_bpd"] == pytest.approx(bits, abs=1e-12)
    assert result["iw_bpd"] == pytest.approx(bits, abs=1e-12)
    assert result["num_images"] == 10 and result["num_samples"] == num_samples


@pytest.mark.parametrize("chunk", [1, 3, 8, 1000])
def test_chunked_float64_logsumexp_matches_scipy(chunk: int) -> None:
    images = torch.randint(0, 256, (5, 1, 2, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    model = RecordingModel()
    torch.manual_seed(0)
    nll = image_nll(model, images, num_samples=13, chunk_size=chunk)
    # rebuild the (K, B) table from the recorded calls: calls walk image chunks, then sample chunks
    table = np.zeros((13, 5))
    calls = iter(model.calls)
    for start in range(0, 5, chunk):
        stop = min(start + chunk, 5)
        done = 0
        while done < 13:
            lw = next(calls).numpy()
            table[done:done + lw.shape[0], start:stop] = lw
            done += lw.shape[0]
    assert next(calls, None) is None
    assert all(c.numel() <= chunk for c in model.calls)  # memory bounded by the chunk size
    assert len(model.calls) == sum(math.ceil(13 / max(1, chunk // len(part))) for part in images.split(chunk))
    np.testing.assert_allclose(nll["iw"].numpy(), -(logsumexp(table, axis=0) - math.log(13)), rtol=1e-13)
    np.testing.assert_allclose(nll["elbo"].numpy(), -table.mean(0), rtol=1e-13)
    assert nll["iw"].dtype == torch.float64


def test_iw_bound_is_tighter_than_elbo_and_improves_with_k_on_a_real_model() -> None:
    torch.manual_seed(0)
    model = build_hvae(get_config("tiny"), "cnn")
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    results = [evaluate_bpd(model, loader_of(images, 6), k, chunk_size=48, seed=3, progress=False) for k in (1, 4, 32)]
    iw = [r["iw_bpd"] for r in results]
    assert iw[0] >= iw[1] >= iw[2] > 0  # positive NLL that shrinks with K
    assert all(r["iw_bpd"] <= r["elbo_bpd"] + 1e-12 for r in results)
    assert results[0]["iw_bpd"] == pytest.approx(results[0]["elbo_bpd"], rel=1e-12)  # K = 1: same number
    assert iw[0] - iw[2] > 1e-3  # the bound actually moved


def test_elbo_bpd_agrees_with_forward_and_is_seeded_and_restores_mode() -> None:
    torch.manual_seed(0)
    model = build_hvae(get_config("tiny"), "sdn")
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    model.train()
    a = evaluate_bpd(model, loader_of(images, 4), 1, chunk_size=64, seed=11, progress=False)
    b = evaluate_bpd(model, loader_of(images, 4), 1, chunk_size=64, seed=11, progress=False)
    assert a == b and model.training
    torch.manual_seed(11)
    with torch.no_grad():
        forward_bpd = model(images)["bpd"].item()
    assert a["elbo_bpd"] == pytest.approx(forward_bpd, rel=1e-6)


def test_bad_arguments_raise_value_error() -> None:
    model = UniformModel(8)
    images = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="num_samples"):
        image_nll(model, images, 0)
    with pytest.raises(ValueError, match="chunk_size"):
        image_nll(model, images, 1, chunk_size=0)
    with pytest.raises(ValueError, match="uint8"):
        evaluate_bpd(model, [images.float()], progress=False)
    with pytest.raises(ValueError, match="no images"):
        evaluate_bpd(model, [], progress=False)
