"""Named HVAE configs match the paper table (architecture here, optimisation in params-paper.yaml);
parameter counts on the meta device (no allocation); validation errors; seeded builds; the
embedded config trains one step on CPU."""

from __future__ import annotations

import math

from pathlib import Path

import pytest
import torch
import yaml

import baselines  # noqa: F401  (registers the decoder blocks)
from sdn.models import count_parameters
from sdn.models.hvae import PRESETS, HVAEConfig, build_hvae, get_config
from sdn.models.vanilla_vae import VAEConfig
from sdn.seeding import seed_everything
from sdn.training import TrainConfig


def test_paper_configs_match_the_reference_table() -> None:
    rows = {  # depth, ds, h, z, max scale, F0, dF, dirs, mixtures, bits, seed
        "cifar10": (15, (5, 10), 200, 4, 32, 360, 128, 2, 5, 8, 1234),
        "imagenet32": (16, (3, 7, 11), 200, 4, 32, 424, 0, 3, 10, 8, 13),
        "celebahq256": (17, (4, 7, 9, 11, 13, 15), 200, 8, 64, 400, 80, 2, 30, 5, 1234),
    }
    for name, row in rows.items():
        c = get_config(name)
        got = (c.depth, c.ds_list, c.h_size, c.z_size, c.sdn_max_scale, c.sdn_nfeat_0, c.sdn_nfeat_diff, c.sdn_num_dirs,
               c.mixtures, c.bits, c.seed)
        assert got == row, name
        assert c.free_bits == 0.01 and c.sdn_min_scale == 0 and c.iaf_context == 100
    assert get_config("cifar10").hflip and get_config("celebahq256").hflip and not get_config("imagenet32").hflip
    assert get_config("celebahq256").image_size == 256 and get_config("cifar10").num_dims == 3072


def test_cifar_parameter_counts_on_meta_device() -> None:
    cfg = get_config("cifar10")
    counts = {}
    for name in ("sdn", "cnn", "cnn_matched"):
        model = build_hvae(cfg, name, device="meta")
        assert all(p.is_meta for p in model.parameters())  # nothing was allocated
        counts[name] = count_parameters(model)
    # reference: SDN ~121M vs CNN ~42M (official code, which also kept ~1.1M dead top-layer weights)
    assert 115e6 < counts["sdn"] < 125e6, counts
    assert 39e6 < counts["cnn"] < 45e6, counts
    assert abs(counts["cnn_matched"] - counts["sdn"]) <= 0.05 * counts["sdn"], counts


def test_cifar_cnn_count_by_hand_formula() -> None:
    """Independent count of the CIFAR CNN from its layer list (weight-normed convs: + out gains)."""
    h, z, ctx, c, p = 200, 4, 100, 3, 50
    q = 2 * z + ctx

    def conv(i, o, k):  # weight, bias, weight-norm gain
        return i * o * k * k + 2 * o

    total = conv(c, h, 3) + h + conv(h, p, 3)  # first conv, h-vector, output conv
    for i in range(15):
        ds = i in (5, 10)
        k = 4 if ds else 3
        top = i == 14
        total += conv(h, q if top else h + q, k) + (0 if top else conv(h, 2 * h, 3))  # bottom-up
        total += conv(h, h + q + 2 * z, 3) + conv(h + z, 2 * h, k)  # down_a, down_b
        total += conv(z, ctx, 3) + conv(ctx, ctx, 3) + conv(ctx, 2 * z, 3)  # IAF net
    assert count_parameters(build_hvae(get_config("cifar10"), "cnn", device="meta")) == total


def test_all_named_configs_build_on_meta_with_every_baseline() -> None:
    for name in ("imagenet32", "celebahq256", "embedded", "tiny"):
        sizes = [count_parameters(build_hvae(get_config(name), m, device="meta")) for m in ("sdn", "cnn", "cnn_matched")]
        assert sizes[1] < sizes[0] and abs(sizes[2] - sizes[0]) <= 0.05 * sizes[0], (name, sizes)


def test_embedded_config_trains_a_step_on_cpu() -> None:
    cfg = get_config("embedded")
    assert cfg.image_size == 16 and cfg.bits == 8 and cfg.mixtures == 5 and cfg.depth == 2
    model = build_hvae(cfg, "sdn")
    assert count_parameters(model) < 2_000_000
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adamax(model.parameters(), lr=0.01)
    losses = []
    for _ in range(3):
        out = model(images)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_config_validation_errors() -> None:
    with pytest.raises(ValueError, match="unknown HVAE config"):
        get_config("mnist")
    with pytest.raises(ValueError, match="unknown HVAEConfig fields"):
        get_config("cifar10", hsize=3)
    with pytest.raises(ValueError, match="ds_list"):
        get_config("cifar10", ds_list=(20,))
    with pytest.raises(ValueError, match="channels"):
        get_config("cifar10", channels=2)
    with pytest.raises(ValueError, match="bits"):
        get_config("cifar10", bits=9)
    with pytest.raises(ValueError, match="divisible"):
        HVAEConfig(name="x", image_size=6, ds_list=(0, 1), depth=3)
    with pytest.raises(ValueError, match="HVAEConfig"):
        build_hvae({"name": "cifar10"}, "sdn")
    assert set(PRESETS) >= {"cifar10", "imagenet32", "celebahq256", "embedded"}


def test_paper_optimisation_settings_are_in_the_paper_study_train_sections() -> None:
    """lr, ExponentialLR gamma, EMA and the global batch (8 GPUs x per-GPU batch) of the official scripts."""
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params-paper.yaml").read_text())
    rows = {"cifar10": (0.002, 0.999, 0.999, 8 * 32), "imagenet32": (0.002, 1.0, 0.9995, 8 * 32),
            "celebahq256": (0.001, 0.999, 0.999, 8 * 4)}
    for name, row in rows.items():
        train = params["density"][name]["train"]
        assert (train["lr"], train["lr_decay"], train["ema_decay"], train["batch_size"]) == row, name
    shapes = params["disentanglement"]["shapes3d"]["train"]
    assert (shapes["lr"], shapes["batch_size"]) == (0.001, 128)


@pytest.mark.parametrize("blocks", ["sdn", "cnn", "cnn_matched"])
def test_build_is_seeded_by_the_config_and_leaves_the_global_rng_alone(blocks: str) -> None:
    cfg = get_config("tiny", seed=3)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    model = build_hvae(cfg, blocks)
    assert torch.equal(torch.random.get_rng_state(), state)
    seed_everything(3)  # what the study did before: seed the global RNG with the run seed, then build
    with torch.random.fork_rng():
        torch.manual_seed(3)
        from sdn.models.blocks import block_builder
        from sdn.models.hvae import HierarchicalVAE

        reference = HierarchicalVAE(cfg, block_builder(blocks)(cfg))
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    other = build_hvae(cfg.replace(seed=4), blocks)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))


@pytest.mark.parametrize(
    ("cls", "values", "field"),
    [(HVAEConfig, {"name": "x", "image_size": True}, "image_size"),
     (HVAEConfig, {"name": "x", "image_size": "32"}, "image_size"),
     (HVAEConfig, {"name": "x", "image_size": 32.0}, "image_size"),
     (HVAEConfig, {"name": "x", "image_size": 32, "hflip": 1}, "hflip"),
     (HVAEConfig, {"name": "x", "image_size": 32, "free_bits": "0.1"}, "free_bits"),
     (HVAEConfig, {"name": "x", "image_size": 32, "free_bits": -1.0}, "free_bits"),
     (HVAEConfig, {"name": "x", "image_size": 32, "sdn_num_dirs": 5}, "sdn_num_dirs"),
     (VAEConfig, {"z_dim": True}, "z_dim"),
     (VAEConfig, {"beta": float("inf")}, "beta"),
     (VAEConfig, {"seed": -1}, "seed"),
     (TrainConfig, {"steps": "10", "batch_size": 2}, "steps"),
     (TrainConfig, {"steps": 10, "batch_size": 2, "lr": True}, "lr")],
)
def test_configs_are_strict_and_name_the_field(cls, values, field) -> None:
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field}"):
        cls(**values)


def test_configs_are_frozen_hashable_and_accept_ints_for_floats() -> None:
    cfg = get_config("tiny", free_bits=1, ds_list=[1])
    assert cfg.free_bits == 1.0 and isinstance(cfg.free_bits, float) and cfg.ds_list == (1,)
    assert hash(cfg) == hash(get_config("tiny", free_bits=1.0)) and cfg == get_config("tiny", free_bits=1.0)
    with pytest.raises(Exception):
        cfg.depth = 4  # type: ignore[misc]
    assert HVAEConfig.from_dict(cfg.to_dict()) == cfg
    assert not {"lr", "lr_decay", "ema", "batch_size", "num_devices", "sampling_temperature"} & set(cfg.to_dict())
    with pytest.raises(ValueError, match="unknown HVAEConfig fields"):
        HVAEConfig.from_dict({**cfg.to_dict(), "lr": 0.1})
