"""ELBO / importance-weighted bpd: exact known cases, the float64 log-sum-exp against scipy on a table
built independently from the per-image noise rule, the real model against a naive per-image,
per-sample reference (images repeated before the encoder, the old way), invariance to batch and
chunk sizes, the encoder running once per image, IW >= ELBO, seeding and bad arguments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import baselines  # noqa: F401  (registers the decoder blocks)
from sdn.distributed import derive_seed
from sdn.models.hvae import build_hvae, get_config
from sdn.scores import evaluate_bpd, image_log_weights

NOISE_SIZE = 3


class UniformModel(nn.Module):
    """A decoder that ignores z: p(x) uniform over 2**bits levels per dim and no KL."""

    posterior_noise_size = NOISE_SIZE

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.dummy = nn.Parameter(torch.zeros(()))

    def posterior_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [images]

    def log_weights_from_features(self, features, rows, noise) -> torch.Tensor:
        per_image = -features[0][0].numel() * self.bits * math.log(2.0)
        return torch.full((rows.shape[0],), per_image, dtype=torch.float64)


class NoiseModel(nn.Module):
    """log w = -1e4 - mean pixel of the image + 5 * noise[0] (so a naive exp underflows); records the
    images it encodes and the sizes of its forward passes."""

    posterior_noise_size = NOISE_SIZE

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.encoded: list[torch.Tensor] = []
        self.passes: list[int] = []

    def posterior_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        self.encoded.append(images.clone())
        return [images.flatten(1).double().mean(1)]

    def log_weights_from_features(self, features, rows, noise) -> torch.Tensor:
        self.passes.append(rows.shape[0])
        return -1e4 - features[0][rows] + 5 * noise[:, 0].double()


def images_of(n: int, seed: int, shape=(3, 8, 8)) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def dataset_of(images: torch.Tensor) -> TensorDataset:
    return TensorDataset(images, torch.zeros(len(images), 0, dtype=torch.int64))


def noise_of_image(index: int, seed: int, num_samples: int, size: int) -> torch.Tensor:
    """The documented rule: sample k of image ``index`` uses the k-th randn(size) of a CPU generator
    seeded by derive_seed(seed, index)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, index))
    return torch.stack([torch.randn(size, generator=generator) for _ in range(num_samples)])


@pytest.mark.parametrize("bits,num_samples,batch,chunk", [(8, 1, 4, 4), (8, 7, 3, 3), (8, 16, 10, 100), (5, 5, 1, 2)])
def test_uniform_decoder_scores_exactly_bits_per_dim(bits: int, num_samples: int, batch: int, chunk: int) -> None:
    result = evaluate_bpd(UniformModel(bits), dataset_of(images_of(10, 0, (3, 4, 4))), batch_size=batch,
                          num_samples=num_samples, chunk_size=chunk, progress=False)
    assert result["elbo_bpd"] == pytest.approx(bits, abs=1e-12)
    assert result["iw_bpd"] == pytest.approx(bits, abs=1e-12)
    assert result["num_images"] == 10 and result["num_samples"] == num_samples


@pytest.mark.parametrize("batch,chunk", [(5, 1), (2, 3), (5, 8), (3, 1000)])
def test_float64_logsumexp_over_seeded_noise_matches_scipy(batch: int, chunk: int) -> None:
    images = images_of(5, 1, (1, 2, 2))
    model = NoiseModel()
    result = evaluate_bpd(model, dataset_of(images), batch_size=batch, num_samples=13, chunk_size=chunk, seed=4,
                          progress=False)
    offsets = images.flatten(1).double().mean(1).numpy()
    table = np.stack([-1e4 - offsets[i] + 5 * noise_of_image(i, 4, 13, NOISE_SIZE)[:, 0].double().numpy()
                      for i in range(5)])  # (images, samples), built without the library
    want_iw = -(logsumexp(table, axis=1) - math.log(13)).mean() / (4 * math.log(2))
    want_elbo = -table.mean() / (4 * math.log(2))
    assert result["iw_bpd"] == pytest.approx(want_iw, rel=1e-13)
    assert result["elbo_bpd"] == pytest.approx(want_elbo, rel=1e-13)
    assert max(model.passes) <= chunk and sum(model.passes) == 5 * 13  # memory bounded by the chunk size
    encoded = torch.cat(model.encoded)
    assert torch.equal(encoded, images) and max(len(e) for e in model.encoded) <= min(batch, chunk)  # once each


@pytest.fixture(scope="module", params=["sdn", "cnn"])
def tiny_model(request) -> nn.Module:
    torch.manual_seed(0)
    return build_hvae(get_config("tiny"), request.param).eval()


def naive_log_weights(model, images: torch.Tensor, num_samples: int, seed: int) -> torch.Tensor:
    """(B, K) by the old way, one image at a time: the image repeated K times through the whole model
    (encoder included), with each sample's noise by the documented per-image rule."""
    rows = []
    for i, image in enumerate(images):
        noise = noise_of_image(i, seed, num_samples, model.posterior_noise_size)
        with torch.no_grad():
            log_px, kls = model._elbo_terms(image.expand(num_samples, -1, -1, -1).contiguous(), noise=noise)
        rows.append((log_px - torch.stack(kls).sum(dim=0)).double())
    return torch.stack(rows)


def test_iw_table_equals_the_naive_per_image_reference(tiny_model) -> None:
    images = images_of(5, 2)
    naive = naive_log_weights(tiny_model, images, 6, seed=9)
    for chunk in (1, 4, 30, 64):
        table = image_log_weights(tiny_model, images, range(5), 6, chunk, seed=9)
        torch.testing.assert_close(table, naive, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(naive[:, 0], naive[:, 1])  # the samples differ from each other
    result = evaluate_bpd(tiny_model, dataset_of(images), batch_size=2, num_samples=6, chunk_size=4, seed=9,
                          progress=False)
    table = naive.numpy()
    assert result["elbo_bpd"] == pytest.approx(-table.mean() / (192 * math.log(2)), rel=1e-6)
    want_iw = -(logsumexp(table, axis=1) - math.log(6)).mean() / (192 * math.log(2))
    assert result["iw_bpd"] == pytest.approx(want_iw, rel=1e-6)


def test_scores_do_not_depend_on_batch_or_chunk_size(tiny_model) -> None:
    data = dataset_of(images_of(7, 3))
    results = [evaluate_bpd(tiny_model, data, batch_size=b, num_samples=5, chunk_size=c, seed=1, progress=False)
               for b, c in ((7, 1000), (3, 5), (2, 1), (1, 3), (4, 7))]
    for other in results[1:]:
        assert other["elbo_bpd"] == pytest.approx(results[0]["elbo_bpd"], rel=1e-6)
        assert other["iw_bpd"] == pytest.approx(results[0]["iw_bpd"], rel=1e-6)
    again = evaluate_bpd(tiny_model, data, batch_size=3, num_samples=5, chunk_size=5, seed=1, progress=False)
    assert again == results[1]  # bit-identical when repeated
    other_seed = evaluate_bpd(tiny_model, data, batch_size=3, num_samples=5, chunk_size=5, seed=2, progress=False)
    assert other_seed["iw_bpd"] != results[1]["iw_bpd"]


def test_the_encoder_runs_once_per_image_per_evaluation(tiny_model) -> None:
    rows_seen: list[int] = []
    handle = tiny_model.first.register_forward_hook(lambda module, args, out: rows_seen.append(args[0].shape[0]))
    try:
        evaluate_bpd(tiny_model, dataset_of(images_of(5, 4)), batch_size=4, num_samples=8, chunk_size=3, seed=0,
                     progress=False)
    finally:
        handle.remove()
    assert sum(rows_seen) == 5 and max(rows_seen) <= 3  # 5 images, 40 samples, slices of <= chunk images


def test_iw_bound_is_tighter_than_elbo_and_improves_with_k_on_a_real_model() -> None:
    torch.manual_seed(0)
    model = build_hvae(get_config("tiny"), "cnn")
    data = dataset_of(images_of(12, 2))
    results = [evaluate_bpd(model, data, batch_size=6, num_samples=k, chunk_size=48, seed=3, progress=False)
               for k in (1, 4, 32)]
    iw = [r["iw_bpd"] for r in results]
    assert iw[0] >= iw[1] >= iw[2] > 0  # positive NLL that shrinks with K
    assert all(r["iw_bpd"] <= r["elbo_bpd"] + 1e-12 for r in results)
    assert results[0]["iw_bpd"] == pytest.approx(results[0]["elbo_bpd"], rel=1e-12)  # K = 1: same number
    assert iw[0] - iw[2] > 1e-3  # the bound actually moved


def test_evaluation_leaves_the_global_rng_and_the_training_mode_alone() -> None:
    torch.manual_seed(0)
    model = build_hvae(get_config("tiny"), "sdn").train()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    evaluate_bpd(model, dataset_of(images_of(3, 5)), batch_size=2, num_samples=2, chunk_size=3, progress=False)
    assert torch.equal(torch.get_rng_state(), before) and model.training


def test_bad_arguments_raise_value_error() -> None:
    model = UniformModel(8)
    data = dataset_of(torch.zeros(2, 1, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="num_samples"):
        evaluate_bpd(model, data, num_samples=0, progress=False)
    with pytest.raises(ValueError, match="chunk_size"):
        evaluate_bpd(model, data, chunk_size=0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_bpd(model, data, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="map-style dataset"):
        evaluate_bpd(model, DataLoader(data, batch_size=2), progress=False)
    with pytest.raises(ValueError, match="item 0: expected a uint8 image"):
        evaluate_bpd(model, [torch.zeros(1, 2, 2)], progress=False)
    with pytest.raises(ValueError, match="item 1 is"):
        evaluate_bpd(model, [torch.zeros(1, 2, 2, dtype=torch.uint8), torch.zeros(1, 3, 3, dtype=torch.uint8)],
                     progress=False)
    with pytest.raises(ValueError, match="no images"):
        evaluate_bpd(model, [], progress=False)
    with pytest.raises(ValueError, match="not the model's device"):
        evaluate_bpd(model, data, device="meta", progress=False)
