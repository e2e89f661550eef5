"""Named configs match the paper table; parameter counts on the meta device (no allocation);
validation errors; the embedded config trains one step on CPU."""

from __future__ import annotations

import math

import pytest
import torch

from sdn.configs import CONFIGS, HVAEConfig, build_model, count_parameters, get_config


def test_paper_configs_match_the_reference_table() -> None:
    rows = {  # depth, ds, h, z, max scale, F0, dF, dirs, mixtures, bits, lr, decay, ema, temp, seed, gpus x batch
        "cifar10": (15, (5, 10), 200, 4, 32, 360, 128, 2, 5, 8, 0.002, 0.999, 0.999, 0.85, 1234, 8, 32),
        "imagenet32": (16, (3, 7, 11), 200, 4, 32, 424, 0, 3, 10, 8, 0.002, 1.0, 0.9995, 1.0, 13, 8, 32),
        "celebahq256": (17, (4, 7, 9, 11, 13, 15), 200, 8, 64, 400, 80, 2, 30, 5, 0.001, 0.999, 0.999, 0.85, 1234, 8, 4),
    }
    for name, row in rows.items():
        c = get_config(name)
        got = (c.depth, c.ds_list, c.h_size, c.z_size, c.sdn_max_scale, c.sdn_nfeat_0, c.sdn_nfeat_diff, c.sdn_num_dirs,
               c.mixtures, c.bits, c.lr, c.lr_decay, c.ema, c.sampling_temperature, c.seed, c.num_devices, c.batch_size)
        assert got == row, name
        assert c.free_bits == 0.01 and c.sdn_min_scale == 0 and c.iaf_context == 100
    assert get_config("cifar10").hflip and get_config("celebahq256").hflip and not get_config("imagenet32").hflip
    assert get_config("celebahq256").image_size == 256 and get_config("cifar10").num_dims == 3072


def test_cifar_parameter_counts_on_meta_device() -> None:
    cfg = get_config("cifar10")
    counts = {}
    for name in ("sdn", "cnn", "cnn_matched"):
        model = build_model(cfg, name, device="meta")
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
    assert count_parameters(build_model(get_config("cifar10"), "cnn", device="meta")) == total


def test_all_named_configs_build_on_meta_with_every_baseline() -> None:
    for name in ("imagenet32", "celebahq256", "embedded", "tiny"):
        sizes = [count_parameters(build_model(get_config(name), m, device="meta")) for m in ("sdn", "cnn", "cnn_matched")]
        assert sizes[1] < sizes[0] and abs(sizes[2] - sizes[0]) <= 0.05 * sizes[0], (name, sizes)


def test_embedded_config_trains_a_step_on_cpu() -> None:
    cfg = get_config("embedded")
    assert cfg.image_size == 16 and cfg.bits == 8 and cfg.mixtures == 5 and cfg.depth == 2
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, "sdn")
    assert count_parameters(model) < 2_000_000
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adamax(model.parameters(), lr=cfg.lr)
    losses = []
    for _ in range(3):
        out = model(images)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_config_validation_errors() -> None:
    with pytest.raises(ValueError, match="unknown config"):
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
        build_model({"name": "cifar10"}, "sdn")
    assert set(CONFIGS) >= {"cifar10", "imagenet32", "celebahq256", "embedded"}
