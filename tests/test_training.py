"""Tests of the trainer (sdn.training), its checkpoints, EMA, sampler, callbacks and DDP path.

The models here are tiny stand-ins that follow the model contract of docs/architecture.md:
``forward(images_uint8) -> {"loss", "bpd", ...}``. ``TinyVAE`` draws a reparameterised latent,
so resume bit-identity also checks that RNG states are saved and restored.
"""

from __future__ import annotations

import copy
import csv
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import ddp_worker
from sdn.callbacks import Callback, CallbackList, CurveWriter
from sdn.checkpoint import (
    CorruptCheckpointError,
    atomic_save,
    capture_rng_state,
    load_checkpoint,
    read_checkpoint,
    remove_other_checkpoints,
    restore_rng_state,
    run_checkpoint_dir,
)
from sdn.distributed import ShardedBatchSampler, derive_seed, epoch_permutation
from sdn.ema import ExponentialMovingAverage
from sdn.training import NonFiniteLossError, TrainConfig, train


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest (and unaffected by other load) on one intra-op thread; the trainer's
    global switch to deterministic algorithms is undone for the test modules that follow."""
    before = torch.get_num_threads()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


class TinyVAE(nn.Module):
    """Bernoulli VAE on binary images: conv encoder -> Gaussian latent (one reparameterised draw)
    -> conv decoder. Loss = batch-mean negative ELBO in nats per image. ``nan_at_call`` makes the
    n-th training forward return a NaN loss."""

    def __init__(self, latent: int = 2, nan_at_call: int | None = None) -> None:
        super().__init__()
        self.enc = nn.Conv2d(1, 2 * latent, 3, padding=1)
        self.dec = nn.Conv2d(latent, 1, 3, padding=1)
        self.nan_at_call = nan_at_call
        self.calls = 0

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.float() / 255.0
        mu, logvar = self.enc(2 * x - 1).chunk(2, dim=1)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        logits = self.dec(z)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
        kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).flatten(1).sum(1)
        loss = (recon + kl).mean()
        if self.training:
            self.calls += 1
            if self.calls == self.nan_at_call:
                loss = loss * float("nan")
        return {"loss": loss, "bpd": loss / (x[0].numel() * math.log(2)), "kl": kl.mean()}


class LinearDenoiser(nn.Module):
    """Deterministic model for checking the optimiser maths: loss = mean over images of the summed
    squared error of a 3x3 conv reconstruction."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.float() / 255.0
        loss = (self.conv(x) - x).square().flatten(1).sum(1).mean()
        return {"loss": loss, "bpd": loss / (x[0].numel() * math.log(2))}


class CountingDataset(Dataset):
    """TensorDataset-like: items (image uint8 (1, 8, 8), factors int64 (2,)); counts item reads."""

    def __init__(self, n: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = (torch.rand(n, 1, 8, 8, generator=generator) < 0.4).to(torch.uint8) * 255
        self.factors = torch.randint(0, 4, (n, 2), generator=generator)
        self.reads = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads += 1
        return self.images[index], self.factors[index]


class Recorder(Callback):
    """Records every hook call."""

    def __init__(self) -> None:
        self.starts, self.steps, self.evals, self.checkpoints, self.ends = [], [], [], [], []

    def on_train_start(self, info):
        self.starts.append(info)

    def on_step_end(self, step, metrics):
        self.steps.append((step, dict(metrics)))

    def on_eval(self, step, metrics):
        self.evals.append((step, dict(metrics)))

    def on_checkpoint(self, step, path):
        self.checkpoints.append((step, Path(path)))

    def on_train_end(self, summary):
        self.ends.append(summary)


class Kill(Callback):
    """Simulates the process dying right after step ``at`` finished."""

    class Killed(Exception):
        pass

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, step, metrics):
        if step == self.at:
            raise Kill.Killed(step)


def config(**overrides) -> TrainConfig:
    base = dict(steps=10, batch_size=4, lr=1e-2, lr_decay=0.9, lr_decay_every=None, ema_decay=0.8,
                grad_clip=5.0, checkpoint_every=5, log_every=1, seed=3, num_workers=0, device="cpu",
                progress=False)
    base.update(overrides)
    return TrainConfig(**base)


def fresh_model(init_seed: int = 0, **kwargs) -> TinyVAE:
    torch.manual_seed(init_seed)
    return TinyVAE(**kwargs)


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("field", "value"),
    [("steps", 0), ("batch_size", 0), ("batch_size", 2.0), ("lr", 0.0), ("lr", float("nan")),
     ("lr_decay", 0.0), ("lr_decay", 1.5), ("lr_decay_every", 0), ("ema_decay", 1.0), ("ema_decay", -0.1),
     ("grad_clip", 0.0), ("checkpoint_every", 0), ("log_every", 0), ("eval_every", 0), ("seed", -1),
     ("seed", True), ("num_workers", -1), ("precision", "fp8"), ("precision", True), ("keep_best", "elbo_bpd"), ("channels_last", "yes"), ("deterministic", 0),
     ("device", "tpu")],
)
def test_config_rejects_bad_fields_naming_them(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}"):
        config(**{field: value})


def test_config_from_dict_round_trips_and_rejects_unknown_keys():
    cfg = config()
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_dict({**cfg.to_dict(), "learning_rate": 1.0})


# ----------------------------------------------------------------------------- sampler


def test_sampler_epoch_order_depends_only_on_seed_and_epoch():
    def batches(seed, epoch):
        return list(ShardedBatchSampler(20, 4, seed, epoch))

    assert batches(5, 2) == batches(5, 2)
    assert batches(5, 2) != batches(5, 3)
    assert batches(5, 2) != batches(6, 2)
    flat = [i for b in batches(5, 2) for i in b]
    assert len(flat) == 20 and sorted(flat) == list(range(20))  # a permutation, 5 full batches
    assert len(ShardedBatchSampler(22, 4, 5, 2)) == 5  # incomplete last batch dropped
    assert derive_seed(1, 2) != derive_seed(2, 1)


def test_sampler_rank_slices_tile_the_single_process_global_batch():
    single = list(ShardedBatchSampler(24, 6, seed=9, epoch=1))
    for world in (2, 3):
        shards = [list(ShardedBatchSampler(24, 6, 9, 1, rank=r, world_size=world)) for r in range(world)]
        for t, global_batch in enumerate(single):
            assert [i for r in range(world) for i in shards[r][t]] == global_batch


def test_sampler_start_batch_skips_exactly_the_consumed_batches():
    full = list(ShardedBatchSampler(24, 4, seed=1, epoch=0, rank=1, world_size=2))
    tail = ShardedBatchSampler(24, 4, seed=1, epoch=0, rank=1, world_size=2, start_batch=4)
    assert len(tail) == 2 and list(tail) == full[4:]
    single_tail = [i for b in ShardedBatchSampler(24, 4, seed=1, epoch=0, start_batch=4) for i in b]
    assert single_tail == epoch_permutation(24, 1, 0)[16:24].tolist()


def test_sampler_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of the world size"):
        ShardedBatchSampler(20, 5, 0, 0, rank=0, world_size=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardedBatchSampler(3, 4, 0, 0)


# ----------------------------------------------------------------------------- EMA, RNG, atomic save


def test_ema_matches_naive_float64_recursion():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = ExponentialMovingAverage(model, decay=0.7)
    reference = None
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        current = [p.detach().double().clone() for p in model.parameters()]
        reference = current if reference is None else [0.7 * r + 0.3 * c for r, c in zip(reference, current)]
    for averaged, expected in zip(ema.module.parameters(), reference):
        torch.testing.assert_close(averaged.double(), expected, rtol=1e-6, atol=1e-7)
    assert ema.num_updates == 5
    with pytest.raises(ValueError, match="decay"):
        ExponentialMovingAverage(model, decay=1.0)


def test_rng_state_capture_restore_replays_all_generators():
    state = capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn())
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn()) == first


def test_atomic_save_keeps_old_file_when_write_fails(tmp_path):
    path = tmp_path / "c.pt"
    atomic_save({"a": torch.ones(2)}, path)
    with pytest.raises(Exception):
        atomic_save({"a": lambda: None}, path)  # unpicklable: fails mid-write
    assert torch.equal(torch.load(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    # rotating: the old file moves to `previous` only once the new one is complete
    atomic_save({"a": torch.full((2,), 2.0)}, path, previous=tmp_path / "c.prev.pt")
    with pytest.raises(Exception):
        atomic_save({"a": lambda: None}, path, previous=tmp_path / "c.prev.pt")
    assert torch.equal(torch.load(path)["a"], torch.full((2,), 2.0))
    assert torch.equal(torch.load(tmp_path / "c.prev.pt")["a"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.prev.pt", "c.pt"]


# ----------------------------------------------------------------------------- optimiser maths


def test_step_matches_hand_written_adamax_with_decay_clipping_and_ema():
    """Adamax (Kingma & Ba, Alg. 2, eps inside the max as in torch), lr * gamma^floor((t-1)/every),
    clipping of the global grad norm, EMA — all recomputed by hand from autograd gradients."""
    data = CountingDataset(4, seed=1)  # one batch = the whole data set, so order does not matter
    cfg = config(steps=5, batch_size=4, lr=0.05, lr_decay=0.5, lr_decay_every=2, grad_clip=0.3,
                 ema_decay=0.6, log_every=1)
    torch.manual_seed(0)
    model = LinearDenoiser()
    ref = copy.deepcopy(model).double()
    recorder = Recorder()
    result = train(model, data, cfg, None, callbacks=[recorder])

    x = data.images.double()
    b1, b2, eps = 0.9, 0.999, 1e-8
    params = list(ref.parameters())
    m = [torch.zeros_like(p) for p in params]
    u = [torch.zeros_like(p) for p in params]
    ema = None
    for t in range(1, 6):
        for p in params:
            p.grad = None
        loss = (ref.conv(x / 255.0) - x / 255.0).square().flatten(1).sum(1).mean()
        loss.backward()
        norm = math.sqrt(sum(float(p.grad.square().sum()) for p in params))
        scale = min(1.0, 0.3 / (norm + 1e-6))
        lr = 0.05 * 0.5 ** ((t - 1) // 2)
        step, logged = recorder.steps[t - 1]
        assert step == t
        assert logged["lr"] == pytest.approx(lr, rel=1e-12)
        assert logged["grad_norm"] == pytest.approx(norm, rel=1e-5)
        assert logged["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
        with torch.no_grad():
            for i, p in enumerate(params):
                g = p.grad * scale
                m[i] = b1 * m[i] + (1 - b1) * g
                u[i] = torch.maximum(b2 * u[i], g.abs() + eps)
                p -= lr / (1 - b1**t) * m[i] / u[i]
        current = [p.detach().clone() for p in params]
        ema = current if ema is None else [0.6 * e + 0.4 * c for e, c in zip(ema, current)]
    assert scale < 1.0  # clipping was active
    for got, want in zip(result.model.parameters(), params):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    for got, want in zip(result.ema_model.parameters(), ema):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- reproducibility


def test_two_runs_of_one_config_are_bit_identical(tmp_path):
    cfg = config(steps=6, num_workers=1, log_every=3)  # one worker process exercises seed_worker
    results = [train(fresh_model(), CountingDataset(24), cfg, tmp_path / f"run{i}") for i in range(2)]
    assert results[0].metrics == results[1].metrics
    assert set(results[0].metrics) == {"loss", "bpd", "kl", "grad_norm", "lr"}
    assert_same_params(results[0].model, results[1].model)
    assert_same_params(results[0].ema_model, results[1].ema_model)
    # a different seed changes the run
    other = train(fresh_model(), CountingDataset(24), config(steps=6, seed=4), tmp_path / "other")
    assert other.metrics["loss"] != results[0].metrics["loss"]


@pytest.mark.parametrize("micro_batch_size", [None, 1])
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path, micro_batch_size):
    # 24 items / batch 4 = 6 steps per epoch: the checkpoint at step 5 is mid-epoch, the resumed run
    # crosses the epoch boundary (and the per-epoch LR decay) at step 6. micro_batch_size 1: four
    # accumulated micro-batches per step, each drawing the VAE's noise.
    cfg = config(steps=10, checkpoint_every=5, log_every=2, micro_batch_size=micro_batch_size)
    full = train(fresh_model(), CountingDataset(24), cfg, tmp_path / "full",
                 callbacks=[CurveWriter(tmp_path / "full.csv")])

    with pytest.raises(Kill.Killed):
        train(fresh_model(), CountingDataset(24), cfg, tmp_path / "cut",
              callbacks=[CurveWriter(tmp_path / "cut.csv"), Kill(at=8)])
    assert read_checkpoint(tmp_path / "cut")["step"] == 5

    torch.manual_seed(999)  # scramble the global RNG: the checkpoint must restore it
    random.seed(999)
    np.random.seed(999)
    data = CountingDataset(24)
    recorder = Recorder()
    resumed = train(fresh_model(init_seed=1), data, cfg, tmp_path / "cut",
                    callbacks=[CurveWriter(tmp_path / "cut.csv"), recorder])

    assert resumed.start_step == 5 and resumed.steps == 10
    assert recorder.starts[0]["start_step"] == 5
    # lr_decay_every=None decays once per epoch (6 steps): steps 1-6 use lr, steps 7-12 use lr * 0.9
    assert [(s, m["lr"]) for s, m in recorder.steps] == [(6, 1e-2), (8, 1e-2 * 0.9), (10, 1e-2 * 0.9)]
    assert data.reads == 5 * 4  # consumed batches were skipped without reading them
    assert_same_params(full.model, resumed.model)
    assert_same_params(full.ema_model, resumed.ema_model)
    assert full.metrics == resumed.metrics
    # the curve was truncated to the checkpoint and continued: identical to the uninterrupted curve
    assert (tmp_path / "cut.csv").read_text() == (tmp_path / "full.csv").read_text()
    with (tmp_path / "full.csv").open() as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)] == [2, 4, 6, 8, 10]


def test_resuming_with_another_micro_batch_warns_and_trains_the_same_global_batches(tmp_path):
    cfg = config(steps=6, checkpoint_every=3, micro_batch_size=2)
    with pytest.raises(Kill.Killed):
        train(fresh_model(), CountingDataset(24), cfg, tmp_path, callbacks=[Kill(at=4)])
    data = CountingDataset(24)
    with pytest.warns(UserWarning, match=r"micro-batches of 2 images per rank, this run uses 4"):
        resumed = train(fresh_model(), data, config(steps=6, checkpoint_every=3), tmp_path)
    assert resumed.start_step == 3 and resumed.steps == 6 and data.reads == 3 * 4


def test_finished_run_is_not_trained_again(tmp_path):
    cfg = config(steps=4, checkpoint_every=3)
    first = train(fresh_model(), CountingDataset(24), cfg, tmp_path)
    data, recorder = CountingDataset(24), Recorder()
    again = train(fresh_model(init_seed=5), data, cfg, tmp_path, callbacks=[recorder])
    assert data.reads == 0 and recorder.starts == [] and again.steps == 4
    assert again.metrics == first.metrics
    assert_same_params(again.model, first.model)
    assert_same_params(again.ema_model, first.ema_model)


def test_without_ema_evaluation_uses_the_raw_weights(tmp_path):
    result = train(fresh_model(), CountingDataset(24), config(steps=3, ema_decay=None, grad_clip=None), tmp_path)
    assert result.ema_model is None and result.eval_model is result.model
    restored = TinyVAE()
    assert not load_checkpoint(tmp_path, restored)["used_ema"]
    assert_same_params(restored, result.model)


def test_resume_refuses_a_checkpoint_of_a_different_run(tmp_path):
    train(fresh_model(), CountingDataset(24), config(steps=2), tmp_path)
    with pytest.raises(ValueError, match="lr"):
        train(fresh_model(), CountingDataset(24), config(steps=4, lr=0.5), tmp_path)
    with pytest.raises(ValueError, match="dataset size"):
        train(fresh_model(), CountingDataset(28), config(steps=4), tmp_path)
    # resume=False starts over and overwrites
    result = train(fresh_model(), CountingDataset(24), config(steps=3, lr=0.5), tmp_path, resume=False)
    assert result.start_step == 0 and read_checkpoint(tmp_path)["step"] == 3


# ----------------------------------------------------------------------------- failures


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    cfg = config(steps=10, checkpoint_every=3)
    with pytest.raises(NonFiniteLossError, match="step 7") as info:
        train(fresh_model(nan_at_call=7), CountingDataset(24), cfg, tmp_path / "nan")
    assert info.value.step == 7
    # the checkpoint on disk is the step-6 state and equals a clean 6-step run
    clean = train(fresh_model(), CountingDataset(24), config(steps=6, checkpoint_every=3), tmp_path / "clean")
    restored = TinyVAE()
    meta = load_checkpoint(tmp_path / "nan", restored, ema=False)
    assert meta["step"] == 6 and not meta["finished"]
    assert_same_params(restored, clean.model)
    assert load_checkpoint(tmp_path / "nan", restored)["used_ema"]
    assert_same_params(restored, clean.ema_model)


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut ``path`` short, as a full disk or an interrupted copy would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_nan_loss_leaves_the_last_good_checkpoint_or_no_folder(tmp_path):
    # before the first checkpoint: no folder at all (not an empty one)
    with pytest.raises(NonFiniteLossError, match="step 2"):
        train(fresh_model(nan_at_call=2), CountingDataset(24), config(steps=10, checkpoint_every=3), tmp_path / "early")
    assert not (tmp_path / "early").exists()
    # with keep_best, a best.pt written before the first checkpoint is not left behind either
    with pytest.raises(NonFiniteLossError, match="step 2"):
        train(fresh_model(nan_at_call=2), CountingDataset(24),
              config(steps=10, checkpoint_every=3, eval_every=1, keep_best="elbo_bpd"), tmp_path / "best",
              eval_fn=lambda m: {"elbo_bpd": 1.0})
    assert not (tmp_path / "best").exists()
    # after checkpoints: exactly the last good one (step 6) and the one before it
    with pytest.raises(NonFiniteLossError, match="step 7"):
        train(fresh_model(nan_at_call=7), CountingDataset(24), config(steps=10, checkpoint_every=3), tmp_path / "late")
    assert sorted(p.name for p in (tmp_path / "late").iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]
    assert read_checkpoint(tmp_path / "late")["step"] == 6
    assert read_checkpoint(tmp_path / "late" / "checkpoint.prev.pt")["step"] == 3
    # a folder that existed before the run is never removed
    (tmp_path / "given").mkdir()
    with pytest.raises(NonFiniteLossError):
        train(fresh_model(nan_at_call=2), CountingDataset(24), config(steps=10, checkpoint_every=3), tmp_path / "given")
    assert (tmp_path / "given").is_dir() and not any((tmp_path / "given").iterdir())


def test_checkpoints_rotate_two_deep_and_a_finished_run_keeps_one(tmp_path):
    cfg = config(steps=10, checkpoint_every=3)
    with pytest.raises(Kill.Killed):
        train(fresh_model(), CountingDataset(24), cfg, tmp_path / "run", callbacks=[Kill(at=8)])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]
    assert [read_checkpoint(tmp_path / "run" / n)["step"] for n in ("checkpoint.pt", "checkpoint.prev.pt")] == [6, 3]
    train(fresh_model(), CountingDataset(24), cfg, tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["checkpoint.pt"]  # as before this change
    assert read_checkpoint(tmp_path / "run")["finished"]
    # the train stage's clean-up of stale configurations keeps both files of the kept run
    keep, stale = run_checkpoint_dir(tmp_path, {"lr": 1}), run_checkpoint_dir(tmp_path, {"lr": 2})
    with pytest.raises(Kill.Killed):
        train(fresh_model(), CountingDataset(24), cfg, keep, callbacks=[Kill(at=8)])
    train(fresh_model(), CountingDataset(24), config(steps=2), stale)
    assert remove_other_checkpoints(keep) == [stale]
    assert sorted(p.name for p in keep.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]


def test_truncated_checkpoint_is_named_and_the_run_resumes_exactly_from_the_previous_one(tmp_path, caplog):
    cfg = config(steps=10, checkpoint_every=3, log_every=1)
    full = train(fresh_model(), CountingDataset(24), cfg, tmp_path / "full",
                 callbacks=[CurveWriter(tmp_path / "full.csv")])
    with pytest.raises(Kill.Killed):
        train(fresh_model(), CountingDataset(24), cfg, tmp_path / "cut",
              callbacks=[CurveWriter(tmp_path / "cut.csv"), Kill(at=8)])
    newest = tmp_path / "cut" / "checkpoint.pt"
    truncate(newest)
    with pytest.raises(CorruptCheckpointError, match=r"checkpoint .*cut/checkpoint\.pt is truncated or corrupt"):
        read_checkpoint(tmp_path / "cut")

    caplog.set_level("WARNING", logger="sdn.training")
    resumed = train(fresh_model(init_seed=1), CountingDataset(24), cfg, tmp_path / "cut",
                    callbacks=[CurveWriter(tmp_path / "cut.csv")])
    assert str(newest) in caplog.text and "falling back to the previous checkpoint" in caplog.text
    assert resumed.start_step == 3 and resumed.steps == 10
    assert_same_params(full.model, resumed.model)
    assert_same_params(full.ema_model, resumed.ema_model)
    assert full.metrics == resumed.metrics
    assert (tmp_path / "cut.csv").read_text() == (tmp_path / "full.csv").read_text()
    assert [p.name for p in (tmp_path / "cut").iterdir()] == ["checkpoint.pt"]
    full_ckpt, cut_ckpt = read_checkpoint(tmp_path / "full"), read_checkpoint(tmp_path / "cut")
    assert cut_ckpt["step"] == full_ckpt["step"] == 10
    for key in full_ckpt["model"]:
        assert torch.equal(full_ckpt["model"][key], cut_ckpt["model"][key])


def test_a_truncated_fallback_is_not_rotated_in_after_resuming(tmp_path):
    # killed again right after resuming from the fallback: the directory holds only good checkpoints
    cfg = config(steps=12, checkpoint_every=3)
    full = train(fresh_model(), CountingDataset(24), cfg, tmp_path / "full")
    with pytest.raises(Kill.Killed):
        train(fresh_model(), CountingDataset(24), cfg, tmp_path / "cut", callbacks=[Kill(at=8)])
    truncate(tmp_path / "cut" / "checkpoint.pt")
    with pytest.raises(Kill.Killed):  # resumes at 3, writes 6, dies at 7
        train(fresh_model(), CountingDataset(24), cfg, tmp_path / "cut", callbacks=[Kill(at=7)])
    assert [read_checkpoint(tmp_path / "cut" / n)["step"] for n in ("checkpoint.pt", "checkpoint.prev.pt")] == [6, 3]
    truncate(tmp_path / "cut" / "checkpoint.pt")
    resumed = train(fresh_model(), CountingDataset(24), cfg, tmp_path / "cut")
    assert resumed.start_step == 3
    assert_same_params(full.model, resumed.model)


def test_no_usable_checkpoint_restarts_from_step_zero_with_a_message(tmp_path, caplog):
    cfg = config(steps=10, checkpoint_every=3)
    full = train(fresh_model(), CountingDataset(24), cfg, tmp_path / "full")
    with pytest.raises(Kill.Killed):
        train(fresh_model(), CountingDataset(24), cfg, tmp_path / "cut", callbacks=[Kill(at=8)])
    truncate(tmp_path / "cut" / "checkpoint.pt")
    (tmp_path / "cut" / "checkpoint.prev.pt").write_bytes(b"")
    caplog.set_level("WARNING", logger="sdn.training")
    again = train(fresh_model(), CountingDataset(24), cfg, tmp_path / "cut")
    assert "no usable checkpoint" in caplog.text and "restarts from step 0" in caplog.text
    assert "checkpoint.pt" in caplog.text and "checkpoint.prev.pt" in caplog.text
    assert again.start_step == 0
    assert_same_params(full.model, again.model)
    assert_same_params(full.ema_model, again.ema_model)
    # a finished run whose only checkpoint is truncated is trained again, to the same result
    truncate(tmp_path / "full" / "checkpoint.pt", 0.9)
    redone = train(fresh_model(), CountingDataset(24), cfg, tmp_path / "full")
    assert redone.start_step == 0
    assert_same_params(full.model, redone.model)


def test_truncated_best_weights_are_named_and_the_selection_is_recomputed(tmp_path, caplog):
    curve = {2: 5.0, 4: 3.0, 6: 4.0, 8: 3.5, 10: 3.2}
    current = {"step": 0}

    class StepTracker(Callback):
        def on_step_end(self, step, metrics):
            current["step"] = step

    def eval_fn(module):
        return {"elbo_bpd": curve[current["step"]]}

    cfg = config(steps=10, checkpoint_every=5, eval_every=2, keep_best="elbo_bpd")
    full = train(fresh_model(), CountingDataset(24), cfg, tmp_path / "full", callbacks=[StepTracker()],
                 eval_fn=eval_fn)
    with pytest.raises(Kill.Killed):  # checkpoint at step 5 selects step 4
        train(fresh_model(), CountingDataset(24), cfg, tmp_path / "cut", callbacks=[StepTracker(), Kill(at=7)],
              eval_fn=eval_fn)
    best = tmp_path / "cut" / "best.pt"
    truncate(best)
    caplog.set_level("WARNING", logger="sdn.training")
    resumed = train(fresh_model(), CountingDataset(24), cfg, tmp_path / "cut", callbacks=[StepTracker()],
                    eval_fn=eval_fn)
    assert str(best) in caplog.text and "restarts from step 0" in caplog.text
    assert resumed.best == full.best
    for key in full.best_state:
        assert torch.equal(resumed.best_state[key], full.best_state[key])
    assert_same_params(full.model, resumed.model)
    # a finished run whose best.pt was cut short is trained again rather than blocked
    truncate(tmp_path / "full" / "best.pt")
    caplog.clear()
    again = train(fresh_model(), CountingDataset(24), cfg, tmp_path / "full", callbacks=[StepTracker()],
                  eval_fn=eval_fn)
    assert "best.pt" in caplog.text and again.start_step == 0 and again.best == full.best
    for key in full.best_state:
        assert torch.equal(again.best_state[key], full.best_state[key])


def test_resume_false_removes_the_old_checkpoints(tmp_path):
    with pytest.raises(Kill.Killed):
        train(fresh_model(), CountingDataset(24), config(steps=10, checkpoint_every=3), tmp_path, callbacks=[Kill(at=8)])
    with pytest.raises(Kill.Killed):  # a fresh run of another configuration, killed before its first checkpoint
        train(fresh_model(), CountingDataset(24), config(steps=10, lr=0.5), tmp_path, resume=False,
              callbacks=[Kill(at=2)])
    assert not any(tmp_path.iterdir())  # nothing of the other run is left to fall back to


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="fewer than TrainConfig.batch_size"):
        train(fresh_model(), CountingDataset(3), config(), None)
    floats = torch.utils.data.TensorDataset(torch.rand(8, 1, 8, 8), torch.zeros(8, 0, dtype=torch.int64))
    with pytest.raises(ValueError, match="uint8"):
        train(fresh_model(), floats, config(), None)

    class NoLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, images):
            return {"bpd": self.w}

    with pytest.raises(ValueError, match="'loss'"):
        train(NoLoss(), CountingDataset(8), config(), None)
    with pytest.raises(ValueError, match="Callback"):
        CallbackList([object()])
    with pytest.raises(ValueError, match="eval_fn"):
        train(fresh_model(), CountingDataset(8), config(eval_every=2), None)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing", TinyVAE())


# ----------------------------------------------------------------------------- callbacks and eval


def test_callbacks_checkpoints_and_eval_on_the_ema_model(tmp_path):
    cfg = config(steps=6, checkpoint_every=4, log_every=4, eval_every=3)
    seen = []

    def eval_fn(module):
        seen.append((module.training, torch.is_grad_enabled(), [p.clone() for p in module.parameters()]))
        return {"noise": torch.randn(()).item()}  # consumes RNG: must not perturb training

    recorder = Recorder()
    result = train(fresh_model(), CountingDataset(24), cfg, tmp_path / "a", callbacks=[recorder], eval_fn=eval_fn)
    plain = train(fresh_model(), CountingDataset(24), config(steps=6, checkpoint_every=4, log_every=4),
                  tmp_path / "b")
    assert_same_params(result.model, plain.model)  # evaluation left the training RNG alone
    assert [s for s, _ in recorder.steps] == [4, 6]
    assert [s for s, _ in recorder.checkpoints] == [4, 6]
    assert all(p == tmp_path / "a" / "checkpoint.pt" for _, p in recorder.checkpoints)
    assert [s for s, _ in recorder.evals] == [3, 6]
    assert recorder.ends[0]["steps"] == 6 and result.eval_metrics == recorder.evals[-1][1]
    training_flag, grad_flag, weights = seen[-1]
    assert not training_flag and not grad_flag
    for got, want in zip(weights, result.ema_model.parameters()):
        assert torch.equal(got, want)  # the last evaluation saw the final EMA weights
    # log-window means: the step-6 record averages steps 5 and 6 (log_every=4)
    per_step = Recorder()
    train(fresh_model(), CountingDataset(24), config(steps=6, checkpoint_every=4, log_every=1), None,
          callbacks=[per_step])
    losses = {s: m["loss"] for s, m in per_step.steps}
    assert recorder.steps[1][1]["loss"] == pytest.approx((losses[5] + losses[6]) / 2, rel=1e-12)
    assert recorder.steps[1][1]["lr"] == per_step.steps[-1][1]["lr"]
    # evaluation is itself seeded by (seed, step)
    again = train(fresh_model(), CountingDataset(24), cfg, tmp_path / "c", eval_fn=eval_fn)
    assert again.eval_metrics == result.eval_metrics


def test_curve_writer_formats(tmp_path):
    for name in ("c.csv", "c.jsonl"):
        writer = CurveWriter(tmp_path / name)
        writer.on_train_start({"start_step": 0})
        writer.on_step_end(1, {"loss": 2.5, "bpd": 1.0, "lr": 0.1, "grad_norm": 3.0, "kl": 0.5})
        writer.on_eval(1, {"elbo_bpd": 4.5})
    with (tmp_path / "c.csv").open() as handle:
        assert list(csv.DictReader(handle)) == [
            {"step": "1", "loss": "2.5", "bpd": "1.0", "lr": "0.1", "grad_norm": "3.0", "val_elbo_bpd": ""},
            {"step": "1", "loss": "", "bpd": "", "lr": "", "grad_norm": "", "val_elbo_bpd": "4.5"}]
    assert '"kl": 0.5' in (tmp_path / "c.jsonl").read_text()
    with pytest.raises(ValueError, match=".csv"):
        CurveWriter(tmp_path / "c.txt")


# ----------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_ddp_two_processes_match_single_process_run(tmp_path):
    ranks = ddp_worker.launch(tmp_path, 2)
    single = ddp_worker.run(tmp_path)

    for key in single["params"]:
        assert torch.equal(ranks[0]["params"][key], ranks[1]["params"][key]), key
        assert torch.equal(ranks[0]["ema"][key], ranks[1]["ema"][key]), key
        torch.testing.assert_close(ranks[0]["params"][key], single["params"][key], rtol=0, atol=1e-5)
        torch.testing.assert_close(ranks[0]["ema"][key], single["ema"][key], rtol=0, atol=1e-5)
    torch.manual_seed(0)
    initial = ddp_worker.DeterministicNet().state_dict()
    assert all(not torch.equal(initial[k], single["params"][k]) for k in initial)  # training moved them
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # reduced across ranks
    for name, value in single["metrics"].items():
        assert ranks[0]["metrics"][name] == pytest.approx(value, rel=1e-5)
    assert ranks[0]["steps"] == 6
    # eval_fn ran on both ranks (its all-reduce returned) and rank 0's metrics are every rank's result
    assert single["eval_metrics"] == {"rank": 0.0, "rank_sum": 0.0}
    assert ranks[0]["eval_metrics"] == ranks[1]["eval_metrics"] == {"rank": 0.0, "rank_sum": 1.0}
    # only rank 0 wrote logs and the checkpoint; the checkpoint holds both ranks' RNG states
    assert (tmp_path / "curve_rank0_of2.csv").is_file() and not (tmp_path / "curve_rank1_of2.csv").exists()
    state = read_checkpoint(tmp_path / "ckpt_2")
    assert state["step"] == 6 and state["world_size"] == 2 and len(state["rng"]) == 2


def test_cosine_schedule_follows_the_closed_form_and_resumes_exactly(tmp_path):
    """Step t (1-based) trains with lr * (1 + cos(pi * (t - 1) / steps)) / 2; a run killed after its
    checkpoint resumes with the same rates and ends with the same weights."""
    cfg = config(steps=8, lr=0.05, lr_schedule="cosine", lr_decay=1.0, checkpoint_every=4, log_every=1)
    recorder = Recorder()
    full = train(fresh_model(), CountingDataset(24), cfg, tmp_path / "full", callbacks=[recorder])
    want = [0.05 * (1 + math.cos(math.pi * (t - 1) / 8)) / 2 for t in range(1, 9)]
    assert [m["lr"] for _, m in recorder.steps] == pytest.approx(want, rel=1e-12)
    with pytest.raises(Kill.Killed):
        train(fresh_model(), CountingDataset(24), cfg, tmp_path / "cut", callbacks=[Kill(at=6)])
    again = Recorder()
    resumed = train(fresh_model(init_seed=1), CountingDataset(24), cfg, tmp_path / "cut", callbacks=[again])
    assert [m["lr"] for _, m in again.steps] == pytest.approx(want[4:], rel=1e-12)
    assert_same_params(full.model, resumed.model)


def test_cosine_schedule_refuses_exponential_settings():
    with pytest.raises(ValueError, match="exponential schedule only"):
        config(lr_schedule="cosine", lr_decay=0.9)
    with pytest.raises(ValueError, match=r"TrainConfig\.lr_schedule: must be one of"):
        config(lr_schedule="linear")


# ----------------------------------------------------------------------------- precision


def test_fp16_run_with_grad_scaler_resumes_exactly(tmp_path):
    # The GradScaler's scale and growth tracker are part of the checkpoint: a killed fp16 run resumed
    # from step 5 ends with the same weights, EMA and scale as an uninterrupted one.
    cfg = config(steps=10, checkpoint_every=5, log_every=1, precision="fp16")
    full = train(fresh_model(), CountingDataset(24), cfg, tmp_path / "full")
    with pytest.raises(Kill.Killed):
        train(fresh_model(), CountingDataset(24), cfg, tmp_path / "cut", callbacks=[Kill(at=7)])
    saved = read_checkpoint(tmp_path / "cut")
    assert saved["step"] == 5 and saved["scaler"]["scale"] > 0
    resumed = train(fresh_model(init_seed=1), CountingDataset(24), cfg, tmp_path / "cut")
    assert resumed.start_step == 5
    assert_same_params(full.model, resumed.model)
    assert_same_params(full.ema_model, resumed.ema_model)
    assert read_checkpoint(tmp_path / "full")["scaler"] == read_checkpoint(tmp_path / "cut")["scaler"]
    # fp16 autocast really ran: the result differs from the fp32 run of the same seed
    fp32 = train(fresh_model(), CountingDataset(24), config(steps=10, checkpoint_every=5), tmp_path / "fp32")
    assert not torch.equal(fp32.model.enc.weight, full.model.enc.weight)


def test_resume_refuses_a_checkpoint_of_another_precision(tmp_path):
    train(fresh_model(), CountingDataset(24), config(steps=4, checkpoint_every=2), tmp_path)
    with pytest.raises(ValueError, match="precision: checkpoint 'fp32' vs config 'bf16'"):
        train(fresh_model(), CountingDataset(24), config(steps=6, checkpoint_every=2, precision="bf16"), tmp_path)


def test_fp16_overflow_skips_the_update_and_halves_the_scale(tmp_path):
    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value):
            return value.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    class Model(LinearDenoiser):
        calls = 0

        def forward(self, images):
            out = super().forward(images)
            out["loss"] = out["loss"] * 1e-4  # small enough that the initial scale 2**16 does not overflow
            Model.calls += 1
            if Model.calls == 3:  # third step: finite loss, infinite gradient
                out["loss"] = InfGrad.apply(out["loss"])
            return out

    recorder = Recorder()
    torch.manual_seed(0)
    model = Model()
    cfg = config(steps=4, checkpoint_every=4, log_every=1, ema_decay=None, grad_clip=None, precision="fp16")
    before = {}

    class Snapshot(Callback):
        def on_step_end(self, step, metrics):
            before[step] = model.conv.weight.detach().clone()

    train(model, CountingDataset(24), cfg, tmp_path, callbacks=[recorder, Snapshot()])
    skipped = {s: m["fp16_skipped"] for s, m in recorder.steps}
    assert skipped == {1: 0.0, 2: 0.0, 3: 1.0, 4: 0.0}
    assert recorder.steps[2][1]["grad_norm"] == 0.0 and math.isfinite(recorder.steps[2][1]["loss"])
    assert torch.equal(before[2], before[3])  # the overflowing step left the weights alone
    assert not torch.equal(before[3], before[4])
    assert read_checkpoint(tmp_path)["scaler"]["scale"] == 2.0**16 * 0.5  # default init scale, backed off once


class NaNAtCalls(LinearDenoiser):
    """Deterministic model whose loss is NaN on the training forward calls (1-based) in ``nan_calls``
    (every call from ``nan_from`` on, if given); it records each finite loss it returns."""

    def __init__(self, nan_calls=(), nan_from=None) -> None:
        super().__init__()
        self.nan_calls, self.nan_from, self.calls, self.losses = set(nan_calls), nan_from, 0, []

    def forward(self, images):
        out = super().forward(images)
        out["loss"] = out["loss"] * 1e-4  # small enough that the initial scale 2**16 does not overflow
        self.calls += 1
        if self.calls in self.nan_calls or (self.nan_from is not None and self.calls >= self.nan_from):
            out["loss"] = out["loss"] * float("nan")
        else:
            self.losses.append(float(out["loss"].detach()))
        return out


def test_non_finite_loss_under_fp16_is_skipped_like_an_overflow(tmp_path):
    torch.manual_seed(0)
    model = NaNAtCalls(nan_calls={2})
    weights = {}

    class Snapshot(Callback):
        def on_step_end(self, step, metrics):
            weights[step] = model.conv.weight.detach().clone()

    recorder = Recorder()
    cfg = config(steps=4, checkpoint_every=4, log_every=2, ema_decay=None, grad_clip=None, precision="fp16")
    train(model, CountingDataset(24), cfg, tmp_path, callbacks=[Snapshot(), recorder])
    logged = dict(recorder.steps)
    assert logged[2]["fp16_skipped"] == 0.5 and logged[4]["fp16_skipped"] == 0.0  # window means of 0/1 flags
    # the skipped step's NaN loss is left out of the window mean: step 1's loss alone
    assert logged[2]["loss"] == pytest.approx(model.losses[0], rel=1e-6)
    assert logged[4]["loss"] == pytest.approx((model.losses[1] + model.losses[2]) / 2, rel=1e-6)
    assert not torch.equal(weights[2], weights[4])
    state = read_checkpoint(tmp_path)
    assert state["scaler"]["scale"] == 2.0**16 * 0.5  # backed off once, as for an overflow
    assert state["skipped_in_a_row"] == 0


def test_fp16_stops_only_after_max_nonfinite_in_a_row_and_the_streak_survives_resume(tmp_path):
    # two separate skips (calls 2, 4) never make 2 in a row: the run finishes
    torch.manual_seed(0)
    cfg = config(steps=6, checkpoint_every=3, ema_decay=None, precision="fp16", max_nonfinite_in_a_row=2)
    train(NaNAtCalls(nan_calls={2, 4}), CountingDataset(24), cfg, tmp_path / "apart")
    # NaN from step 2 on, at most 3 in a row: stops at step 4 naming it and the streak
    cfg = config(steps=6, checkpoint_every=3, ema_decay=None, precision="fp16", max_nonfinite_in_a_row=3)
    with pytest.raises(NonFiniteLossError, match=r"step 4 .*after 3 fp16 steps in a row") as info:
        train(NaNAtCalls(nan_from=2), CountingDataset(24), cfg, tmp_path / "streak")
    assert info.value.step == 4 and info.value.in_a_row == 3
    state = read_checkpoint(tmp_path / "streak")
    assert state["step"] == 3 and state["skipped_in_a_row"] == 2
    # resumed at step 3 with 2 skipped steps behind it: the next NaN step (4) is the third
    with pytest.raises(NonFiniteLossError, match="step 4") as info:
        train(NaNAtCalls(nan_from=1), CountingDataset(24), cfg, tmp_path / "streak")
    assert info.value.in_a_row == 3


def test_fp16_grad_scaler_accumulates_micro_batches_like_one_pass(tmp_path):
    """Under fp16 each micro-batch's loss is scaled by the same GradScaler scale and the sum is
    unscaled once: 4 micro-batches of 1 give the update of one pass of 4 (fp16 rounding apart)."""
    results = {}  # NaNAtCalls() without NaN calls: a loss small enough not to overflow at the initial scale
    for micro in (None, 1):
        torch.manual_seed(0)
        cfg = config(steps=4, checkpoint_every=4, ema_decay=None, precision="fp16", micro_batch_size=micro)
        results[micro] = train(NaNAtCalls(), CountingDataset(24), cfg, tmp_path / str(micro))
    torch.testing.assert_close(results[1].model.conv.weight, results[None].model.conv.weight, rtol=0, atol=1e-3)
    assert results[1].metrics["loss"] == pytest.approx(results[None].metrics["loss"], rel=1e-3)
    assert results[1].metrics["fp16_skipped"] == results[None].metrics["fp16_skipped"] == 0.0
    assert read_checkpoint(tmp_path / "1")["scaler"] == read_checkpoint(tmp_path / "None")["scaler"]
    torch.manual_seed(0)
    untrained = NaNAtCalls()
    assert (results[1].model.conv.weight - untrained.conv.weight).abs().max() > 1e-2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_non_finite_loss_without_a_scaler_stops_at_once(tmp_path, precision):
    cfg = config(steps=4, precision=precision, max_nonfinite_in_a_row=5)
    with pytest.raises(NonFiniteLossError, match="step 2") as info:
        train(fresh_model(nan_at_call=2), CountingDataset(24), cfg, tmp_path)
    assert info.value.in_a_row == 1


# ----------------------------------------------------------------------------- selection on validation


def test_keep_best_selects_the_lowest_evaluation_and_survives_resume(tmp_path):
    # a scripted validation curve: lowest at step 4, worse afterwards
    curve = {2: 5.0, 4: 3.0, 6: 4.0, 8: 3.5, 10: 3.2}
    seen: dict[int, torch.Tensor] = {}
    current = {"step": 0}

    class StepTracker(Callback):
        def on_step_end(self, step, metrics):
            current["step"] = step

    def eval_fn(module):
        seen[current["step"]] = module.enc.weight.detach().clone()
        return {"elbo_bpd": curve[current["step"]]}

    cfg = config(steps=10, checkpoint_every=5, log_every=1, eval_every=2, keep_best="elbo_bpd")
    full = train(fresh_model(), CountingDataset(24), cfg, tmp_path / "full", callbacks=[StepTracker()],
                 eval_fn=eval_fn)
    assert full.best["step"] == 4 and full.best["value"] == 3.0 and full.best["metrics"] == {"elbo_bpd": 3.0}
    assert torch.equal(full.best_state["enc.weight"], seen[4])  # the EMA weights evaluated at step 4
    assert not torch.equal(full.best_state["enc.weight"], full.ema_model.enc.weight)

    # killed at step 7 (after the best was written, past the step-5 checkpoint), resumed: same choice
    with pytest.raises(Kill.Killed):
        train(fresh_model(), CountingDataset(24), cfg, tmp_path / "cut", callbacks=[StepTracker(), Kill(at=7)],
              eval_fn=eval_fn)
    resumed = train(fresh_model(), CountingDataset(24), cfg, tmp_path / "cut", callbacks=[StepTracker()],
                    eval_fn=eval_fn)
    assert resumed.best == full.best
    assert torch.equal(resumed.best_state["enc.weight"], full.best_state["enc.weight"])
    # a finished run hands back the same selection without training
    again = train(fresh_model(), CountingDataset(24), cfg, tmp_path / "full", eval_fn=eval_fn)
    assert again.best == full.best and torch.equal(again.best_state["enc.weight"], seen[4])
    # without a checkpoint directory the best weights are kept in memory
    memory = train(fresh_model(), CountingDataset(24), cfg, None, callbacks=[StepTracker()], eval_fn=eval_fn)
    assert memory.best["step"] == 4 and torch.equal(memory.best_state["enc.weight"], seen[4])


def test_keep_best_names_a_missing_metric(tmp_path):
    cfg = config(steps=4, eval_every=2, keep_best="iw_bpd")
    with pytest.raises(ValueError, match=r"keep_best='iw_bpd' is not a metric of eval_fn \(got \['elbo_bpd'\]\)"):
        train(fresh_model(), CountingDataset(24), cfg, tmp_path, eval_fn=lambda m: {"elbo_bpd": 1.0})


def test_a_torchrun_job_of_one_rank_trains_under_ddp_like_a_single_process(tmp_path, monkeypatch):
    import socket

    import torch.distributed as dist

    plain = train(fresh_model(), CountingDataset(24), config(steps=4), tmp_path / "plain")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    recorder = Recorder()
    try:
        ddp = train(fresh_model(), CountingDataset(24), config(steps=4), tmp_path / "ddp", callbacks=[recorder])
        assert dist.is_initialized() and dist.get_world_size() == 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert recorder.starts[0]["distributed"] is True and recorder.starts[0]["world_size"] == 1
    for a, b in zip(plain.model.parameters(), ddp.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_process_group_timeout_has_a_stated_default_and_an_env_override(monkeypatch):
    import datetime

    from sdn.distributed import PROCESS_GROUP_TIMEOUT, process_group_timeout

    monkeypatch.delenv("SDN_PG_TIMEOUT_S", raising=False)
    assert process_group_timeout() == PROCESS_GROUP_TIMEOUT == datetime.timedelta(hours=2)
    monkeypatch.setenv("SDN_PG_TIMEOUT_S", "90.5")
    assert process_group_timeout() == datetime.timedelta(seconds=90.5)
    for bad in ("0", "-3", "nan", "two hours"):
        monkeypatch.setenv("SDN_PG_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match="SDN_PG_TIMEOUT_S must be a positive number of seconds"):
            process_group_timeout()


def test_torchrun_job_starts_its_process_group_with_the_stated_timeout(tmp_path, monkeypatch):
    import datetime
    import socket

    import torch.distributed as dist

    from sdn.distributed import setup_distributed

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1", "SDN_PG_TIMEOUT_S": "123"}.items():
        monkeypatch.setenv(key, value)
    calls = []
    real = dist.init_process_group

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(dist, "init_process_group", spy)
    try:
        ctx = setup_distributed("cpu")
        assert ctx.is_distributed and dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert calls == [{"backend": "gloo", "timeout": datetime.timedelta(seconds=123)}]


def test_cuda_device_is_the_local_rank_modulo_the_visible_devices(monkeypatch):
    from sdn.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # a scheduler shows each process its GPU
    assert resolve_device("cuda", 3) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [resolve_device("auto", r).index for r in range(6)] == [0, 1, 2, 3, 0, 1]
