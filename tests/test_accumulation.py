"""Gradient accumulation (``TrainConfig.micro_batch_size``): the number of micro-batches, the data
split, and that 1 rank x 4 micro-batches, 2 ranks x 2 and 4 ranks x 1 train to the same weights as
a hand-written float64 full-batch Adamax on the same global batches.

The model is ``tests/ddp_worker.DeterministicNet`` (no random draws; loss = batch mean of a
per-image NLL), so the split changes only the float rounding. The multi-rank runs use torchrun
with gloo on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ddp_worker
from sdn.distributed import ShardedBatchSampler, epoch_permutation
from sdn.training import TrainConfig, accumulation_steps

STEPS = 3
MICRO = 2  # global batch 8 = 1 x 4 x 2 = 2 x 2 x 2 = 4 x 1 x 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


def test_accumulation_steps_divide_the_global_batch():
    assert accumulation_steps(256, 1, None) == 1
    assert accumulation_steps(256, 1, 32) == 8
    assert accumulation_steps(256, 8, 32) == 1
    assert accumulation_steps(32, 2, 4) == 4
    with pytest.raises(ValueError, match=r"TrainConfig\.micro_batch_size 32 must divide the per-rank batch 16 "
                                         r"\(TrainConfig\.batch_size 32 over 2 ranks\).* = 0\.5 accumulation"):
        accumulation_steps(32, 2, 32)
    with pytest.raises(ValueError, match=r"TrainConfig\.micro_batch_size 8 must divide the per-rank batch 12.* = 1\.5 "):
        accumulation_steps(24, 2, 8)
    with pytest.raises(ValueError, match=r"TrainConfig\.batch_size \(global\) must be a multiple of the world size 3"):
        accumulation_steps(8, 3, None)


def test_config_micro_batch_must_divide_the_global_batch():
    with pytest.raises(ValueError, match=r"TrainConfig\.micro_batch_size 3 must divide TrainConfig\.batch_size 8"):
        TrainConfig(steps=1, batch_size=8, micro_batch_size=3)
    with pytest.raises(ValueError, match=r"TrainConfig\.micro_batch_size"):
        TrainConfig(steps=1, batch_size=8, micro_batch_size=0)
    with pytest.raises(ValueError, match=r"TrainConfig\.max_nonfinite_in_a_row"):
        TrainConfig(steps=1, batch_size=8, max_nonfinite_in_a_row=0)
    assert TrainConfig(steps=1, batch_size=8).micro_batch_size is None


@pytest.mark.parametrize(("world", "micro"), [(1, 2), (2, 2), (4, 2), (2, 1), (1, 8)])
def test_micro_batches_of_all_ranks_tile_each_global_batch(world, micro):
    """Step t's micro-batches, rank after rank, are the window perm[t*B:(t+1)*B] of the epoch order,
    also when starting mid-epoch."""
    n, batch, seed, epoch, start = 40, 8, 5, 2, 1
    perm = epoch_permutation(n, seed, epoch).tolist()
    per_step = batch // (world * micro)
    samplers = [ShardedBatchSampler(n, batch, seed, epoch, rank, world, start, micro) for rank in range(world)]
    streams = [list(s) for s in samplers]
    assert all(len(s) == len(stream) == (n // batch - start) * per_step for s, stream in zip(samplers, streams))
    assert all(len(mb) == micro for stream in streams for mb in stream)
    for t in range(start, n // batch):
        k = t - start
        got = [i for stream in streams for mb in stream[k * per_step:(k + 1) * per_step] for i in mb]
        assert got == perm[t * batch:(t + 1) * batch]
    with pytest.raises(ValueError, match="micro_batch_size must divide the per-rank batch 4"):
        ShardedBatchSampler(n, batch, seed, epoch, 0, 2, 0, 3)


def reference_run() -> dict[str, object]:
    """``ddp_worker.CONFIG`` for STEPS steps, by hand in float64 on whole global batches: Adamax (eps
    inside the max, as in torch), lr * 0.9^floor((t-1)/2), global-norm clipping to 1 (coefficient
    1 / (norm + 1e-6)), EMA 0.9 starting from the first step's weights."""
    cfg = ddp_worker.CONFIG
    data = ddp_worker.make_dataset()
    images = data.tensors[0]
    perm = epoch_permutation(len(images), cfg.seed, 0)
    torch.manual_seed(0)
    net = ddp_worker.DeterministicNet()
    names = [name for name, _ in net.named_parameters()]
    params = [p.detach().double().clone().requires_grad_(True) for p in net.parameters()]
    w1, b1, w2, b2 = params
    m = [torch.zeros_like(p) for p in params]
    u = [torch.zeros_like(p) for p in params]
    ema, losses, norms = None, [], []
    for t in range(1, STEPS + 1):
        x = images[perm[(t - 1) * cfg.batch_size:t * cfg.batch_size]].double() / 255.0
        logits = F.conv2d(torch.tanh(F.conv2d(2 * x - 1, w1, b1, padding=1)), w2, b2, padding=1)
        loss = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1).mean()
        grads = torch.autograd.grad(loss, params)
        norm = math.sqrt(sum(float(g.square().sum()) for g in grads))
        coef = min(1.0, cfg.grad_clip / (norm + 1e-6))
        lr = cfg.lr * cfg.lr_decay ** ((t - 1) // cfg.lr_decay_every)
        with torch.no_grad():
            for i, p in enumerate(params):
                g = grads[i] * coef
                m[i] = 0.9 * m[i] + 0.1 * g
                u[i] = torch.maximum(0.999 * u[i], g.abs() + 1e-8)
                p -= lr / (1 - 0.9**t) * m[i] / u[i]
        current = [p.detach().clone() for p in params]
        ema = current if ema is None else [cfg.ema_decay * e + (1 - cfg.ema_decay) * c for e, c in zip(ema, current)]
        losses.append(float(loss.detach()))
        norms.append(norm)
    return {"params": dict(zip(names, current)), "ema": dict(zip(names, ema)), "losses": losses, "norms": norms}


def assert_matches_reference(payload: dict, reference: dict) -> None:
    for key, want in reference["params"].items():
        torch.testing.assert_close(payload["params"][key].double(), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(payload["ema"][key].double(), reference["ema"][key], rtol=0, atol=1e-5)
    # the last logging window is step 3 alone (log_every 2): its metrics are means over micro-batches
    assert payload["metrics"]["loss"] == pytest.approx(reference["losses"][-1], rel=1e-5)
    assert payload["metrics"]["grad_norm"] == pytest.approx(reference["norms"][-1], rel=1e-5)


def test_one_rank_with_four_micro_batches_equals_full_batch_adamax(tmp_path):
    reference = reference_run()
    assert reference["norms"][0] > ddp_worker.CONFIG.grad_clip  # clipping acts on the accumulated gradient
    torch.manual_seed(0)
    initial = ddp_worker.DeterministicNet().state_dict()
    assert all((reference["params"][k] - initial[k].double()).abs().max() > 1e-3 for k in initial)
    assert_matches_reference(ddp_worker.run(tmp_path, micro_batch_size=MICRO, steps=STEPS), reference)


@pytest.mark.slow
def test_two_ranks_by_two_and_four_ranks_by_one_match_one_rank_by_four(tmp_path):
    reference = reference_run()
    one = ddp_worker.run(tmp_path / "w1", micro_batch_size=MICRO, steps=STEPS)
    for world in (2, 4):
        ranks = ddp_worker.launch(tmp_path / f"w{world}", world, "--micro-batch-size", str(MICRO), "--steps", str(STEPS))
        for payload in ranks:
            assert payload["steps"] == STEPS
            assert payload["eval_metrics"] == {"rank": 0.0, "rank_sum": float(sum(range(world)))}
            assert payload["metrics"] == ranks[0]["metrics"]  # metrics reduced over ranks
            for key in one["params"]:
                assert torch.equal(payload["params"][key], ranks[0]["params"][key])  # DDP keeps ranks in step
                torch.testing.assert_close(payload["params"][key], one["params"][key], rtol=0, atol=1e-5)
                torch.testing.assert_close(payload["ema"][key], one["ema"][key], rtol=0, atol=1e-5)
        assert_matches_reference(ranks[0], reference)
