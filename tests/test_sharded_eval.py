"""Sharded evaluation: 2 gloo ranks (torchrun) give every rank the same IW/ELBO bpd and FID sample
features as one process, with odd numbers of images and samples and ranks that get none; and the
collectives' sharding rule."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdn.collectives import merge_disjoint, rank_and_world, shard

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("num", [0, 1, 7, 10])
def test_shards_are_contiguous_disjoint_and_complete(num: int) -> None:
    for world in (1, 2, 3, 8):
        shares = [shard(num, rank, world) for rank in range(world)]
        assert [i for share in shares for i in share] == list(range(num))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard(3, 2, 2)


def test_without_a_process_group_merging_is_the_identity() -> None:
    tensor = torch.arange(6.0).view(3, 2)
    assert rank_and_world() == (0, 1) and merge_disjoint(tensor) is tensor


@pytest.mark.slow  # two torchrun processes
def test_two_ranks_score_and_sample_like_one_process(tmp_path: Path) -> None:
    worker = REPO / "tests" / "eval_ddp_worker.py"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(worker), "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"result_rank{r}_of2.pt", weights_only=False) for r in range(2)]

    spec = importlib.util.spec_from_file_location("eval_ddp_worker", worker)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    single = module.run(tmp_path)

    for key in ("bpd", "bpd_one_image"):
        assert ranks[0][key] == ranks[1][key], key  # every rank returns the same numbers
        assert ranks[0][key]["num_images"] == single[key]["num_images"]
        for name in ("elbo_bpd", "iw_bpd"):
            assert ranks[0][key][name] == pytest.approx(single[key][name], rel=1e-6), (key, name)
    assert single["bpd"]["iw_bpd"] < single["bpd"]["elbo_bpd"]  # K = 5 did something
    for features, grid in (("features", "grid"), ("features_one_batch", "grid_one_batch")):
        assert np.array_equal(ranks[0][features], ranks[1][features]) and torch.equal(ranks[0][grid], ranks[1][grid])
        np.testing.assert_allclose(ranks[0][features], single[features], rtol=1e-6, atol=1e-7)
        assert torch.equal(ranks[0][grid], single[grid])
        assert (np.abs(single[features]).sum(axis=1) > 0).all()  # every sample has its features
    assert single["features"].shape == (7, 2048) and single["grid"].shape == (5, 3, 8, 8)
    assert single["features_one_batch"].shape == (3, 2048) and single["grid_one_batch"].shape == (2, 3, 8, 8)
