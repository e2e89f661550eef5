"""The seeded, resumable, DDP-aware trainer: Adamax, exponential LR decay, EMA weights, atomic checkpoints.

One ``seed`` drives everything (Python, NumPy, torch, DataLoader workers, the data order), so two
runs of one config on CPU give bit-identical results, and a run killed after a checkpoint and
resumed gives the same result as an uninterrupted one. Launch with ``torchrun`` for multi-GPU; the
global batch is split into equal per-rank slices, so the result matches a single-process run.

Gradient accumulation: each rank runs its slice as ``TrainConfig.micro_batch_size`` micro-batches
(DDP's ``no_sync`` on all but the last), each loss weighted 1 / (accumulation steps), so the
update is that of the whole global batch: 1 GPU x 4 micro-batches, 2 x 2 and 4 x 1 train on the
same images and reach the same weights (to float rounding). A model with ``posterior_noise_size``
receives its posterior noise from the trainer, drawn per image from a generator seeded by (seed,
:data:`TRAIN_NOISE_STREAM`, epoch, dataset index), and ``RandomHFlip`` flips per (seed, epoch, index):
such a model trains on the same noise whatever the number of processes or micro-batches, so a job of
two nodes equals one process to float rounding (other models draw from each rank's seed). Under
fp16 a step whose loss or gradients are not finite is skipped (GradScaler backs off) and the run
stops only after ``TrainConfig.max_nonfinite_in_a_row`` such steps in a row.

Faults lose nothing: the newest checkpoint and the one before it are kept (``sdn.checkpoint``); a
truncated or corrupt checkpoint (or ``best.pt``) is named in a warning and the run continues from
the previous good checkpoint, or, when none is good, restarts from step 0 (again with a warning),
each time ending bit-identical to an uninterrupted run. A failed run leaves either its last good
checkpoint or no checkpoint folder at all.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from pydantic import Field, model_validator
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from sdn._config import ConfigBase, FiniteFloat, NonNegInt, OneOf, PositiveInt, config_dataclass
from sdn.callbacks import Callback, CallbackList
from sdn.checkpoint import (
    FORMAT_VERSION,
    CorruptCheckpointError,
    atomic_save,
    capture_rng_state,
    checkpoint_file,
    has_checkpoint,
    previous_checkpoint_file,
    read_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from sdn.distributed import (
    DEVICES,
    DistContext,
    ShardedBatchSampler,
    all_gather_objects,
    all_reduce_mean,
    barrier,
    broadcast_object,
    derive_seed,
    rank_seed,
    setup_distributed,
)
from sdn.ema import ExponentialMovingAverage
from sdn.seeding import image_noise, make_generator, seed_everything, seed_worker

log = logging.getLogger(__name__)

# Config fields that must match when resuming: changing them would silently change the result.
# Not among them: micro_batch_size (the update is that of the same global batch; see TrainConfig),
# max_nonfinite_in_a_row and the logging/checkpoint cadence.
_RESUME_FIELDS = ("seed", "batch_size", "lr", "lr_schedule", "lr_decay", "lr_decay_every", "ema_decay", "grad_clip",
                  "precision", "keep_best")
LR_SCHEDULES = ("exponential", "cosine")
PRECISIONS = ("fp32", "fp16", "bf16")
# Seed stream of the training posterior noise: image i in epoch e draws from derive_seed(seed, 1, e, i)
# (sdn.data.augment.FLIP_STREAM is the flips'; evaluation noise is derive_seed(seed, i), sdn.scores).
TRAIN_NOISE_STREAM = 1
_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_RESERVED_METRICS = ("grad_norm", "lr", "fp16_skipped")
BEST_NAME = "best.pt"  # the evaluation weights at the best ``keep_best`` value, beside the checkpoint
_EVAL_SEED_KEY = 0xE7A1  # mixes evaluation seeds away from the training streams


Rate = Annotated[FiniteFloat, Field(gt=0)]


@config_dataclass
class TrainConfig(ConfigBase):
    """Everything that defines a training run.

    ``batch_size`` is global (split equally over ranks). ``lr_schedule`` "exponential" (the
    paper's): ``lr_decay`` is the ExponentialLR gamma, applied every ``lr_decay_every`` steps (None:
    once per epoch); "cosine": the rate follows lr * (1 + cos(pi * step / steps)) / 2 down to 0 at
    the last step (for budgeted runs; ``lr_decay`` must then stay 1). ``ema_decay`` None disables EMA;
    ``grad_clip`` None disables clipping (the norm is still logged). ``eval_every`` (None: off)
    runs ``train(..., eval_fn=...)`` on the EMA model; ``keep_best`` names one of its metrics to
    minimise: the evaluation weights of the best evaluation are kept (``best.pt`` beside the
    checkpoint) and returned as ``TrainResult.best_state`` (model selection on a validation split).
    ``precision`` applies on every device: "fp32"; "fp16" autocast with a GradScaler (its state
    is checkpointed; steps whose gradients overflow are skipped by the scaler, as in the official
    ``--amp`` runs, and counted in the ``fp16_skipped`` metric); "bf16" autocast (no scaler).
    ``channels_last`` applies on CUDA only. ``deterministic`` switches on
    ``torch.use_deterministic_algorithms`` (turn it off only for a CUDA op that has no
    deterministic kernel; runs are then no longer bit-reproducible on GPU).

    ``micro_batch_size`` is the images per forward/backward pass on one rank (one GPU): each
    optimizer step runs ``accumulation_steps(batch_size, world_size, micro_batch_size)`` =
    batch_size / (world_size * micro_batch_size) micro-batches per rank and accumulates their
    gradients, each micro-batch's loss (a mean over its images) weighted by 1 / accumulation steps,
    so the gradient is the mean over the global batch whatever the split; the logged metrics are
    means over micro-batches and ranks. None: one micro-batch of batch_size / world_size per rank
    (bit-identical to a run without accumulation). Set it to the per-GPU batch that fits in memory
    and the same params reach the same global batch on 1, 2, 4 or 8 GPUs. It is not part of a
    run's identity on resume: a checkpoint resumes with another micro-batch (e.g. on other GPUs),
    with a warning, because a batch-dependent term (the HVAE's free-bits clamp acts on the
    micro-batch mean, like the official per-GPU batch) and the model's random draws then differ.

    ``max_nonfinite_in_a_row`` (fp16 only): a step whose loss or gradient norm is not finite is
    skipped like a GradScaler overflow (no update, the scale backs off, ``fp16_skipped`` = 1, its
    non-finite values left out of the logged means); :class:`NonFiniteLossError` stops the run at
    the ``max_nonfinite_in_a_row``-th skipped step in a row. Under fp32/bf16 a non-finite loss or
    gradient norm stops the run at once.
    """

    steps: PositiveInt
    batch_size: PositiveInt
    lr: Rate = 2e-3
    lr_schedule: Annotated[str, OneOf(*LR_SCHEDULES)] = "exponential"
    lr_decay: Annotated[Rate, Field(le=1)] = 1.0
    lr_decay_every: Optional[PositiveInt] = None
    ema_decay: Optional[Annotated[FiniteFloat, Field(ge=0, lt=1)]] = 0.999
    grad_clip: Optional[Rate] = None
    checkpoint_every: PositiveInt = 1000
    log_every: PositiveInt = 100
    eval_every: Optional[PositiveInt] = None
    keep_best: Optional[str] = None
    seed: NonNegInt = 0
    num_workers: NonNegInt = 0
    precision: Annotated[str, OneOf(*PRECISIONS)] = "fp32"
    micro_batch_size: Optional[PositiveInt] = None
    max_nonfinite_in_a_row: PositiveInt = 20
    channels_last: bool = True
    device: Annotated[str, OneOf(*DEVICES)] = "auto"
    deterministic: bool = True
    find_unused_parameters: bool = False
    progress: bool = True

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainConfig:
        if self.lr_schedule == "cosine" and (self.lr_decay != 1.0 or self.lr_decay_every is not None):
            raise ValueError("TrainConfig.lr_decay and lr_decay_every apply to the exponential schedule only; "
                             f"leave them unset with lr_schedule='cosine' (got {self.lr_decay!r}, {self.lr_decay_every!r})")
        if self.keep_best is not None and self.eval_every is None:
            raise ValueError("TrainConfig.keep_best must name a metric of eval_fn and needs eval_every, "
                             f"got keep_best={self.keep_best!r} with eval_every={self.eval_every!r}")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(f"TrainConfig.micro_batch_size {self.micro_batch_size} must divide "
                             f"TrainConfig.batch_size {self.batch_size} (the global batch)")
        return self


def accumulation_steps(batch_size: int, world_size: int, micro_batch_size: int | None) -> int:
    """Micro-batches per rank and optimizer step: batch_size / (world_size * micro_batch_size), which
    must be a whole number >= 1 (None: 1, the per-rank batch in one pass). Raises a ValueError
    naming ``TrainConfig.micro_batch_size`` (or ``batch_size``) and the numbers otherwise."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if batch_size < 1 or batch_size % world_size:
        raise ValueError(f"TrainConfig.batch_size (global) must be a multiple of the world size {world_size}, "
                         f"got {batch_size}")
    if micro_batch_size is None:
        return 1
    per_rank = batch_size // world_size
    if micro_batch_size < 1 or per_rank % micro_batch_size:
        raise ValueError(
            f"TrainConfig.micro_batch_size {micro_batch_size} must divide the per-rank batch {per_rank} "
            f"(TrainConfig.batch_size {batch_size} over {world_size} ranks): batch_size / (world_size * "
            f"micro_batch_size) = {batch_size / (world_size * micro_batch_size):g} accumulation steps is not a "
            "whole number >= 1")
    return per_rank // micro_batch_size


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf at ``step`` (under fp16: at ``in_a_row`` skipped
    steps in a row, ``step`` the last of them); parameters were not updated with it and the last
    checkpoint on disk (if any) is from before that step."""

    def __init__(self, step: int, metrics: Mapping[str, float], in_a_row: int = 1) -> None:
        self.step = step
        self.metrics = dict(metrics)
        self.in_a_row = in_a_row
        shown = ", ".join(f"{k}={v}" for k, v in sorted(self.metrics.items()))
        streak = (f", after {in_a_row} fp16 steps in a row were skipped (TrainConfig.max_nonfinite_in_a_row)"
                  if in_a_row > 1 else "")
        super().__init__(
            f"non-finite loss or gradient norm at step {step} ({shown}){streak}; training stopped, "
            "the last good checkpoint is kept"
        )


@dataclass
class TrainResult:
    """What a finished run hands back. ``metrics`` are the means over the last logging window
    (averaged over ranks); ``ema_model`` is None when EMA is off. With ``keep_best``: ``best`` is
    {"step", "value", "metrics"} of the selected evaluation and ``best_state`` its weights (rank 0)."""

    metrics: dict[str, float]
    steps: int
    model: nn.Module
    ema_model: nn.Module | None
    eval_metrics: dict[str, float] | None
    checkpoint_path: Path | None
    start_step: int
    best: dict[str, Any] | None = None
    best_state: dict[str, torch.Tensor] | None = None

    @property
    def eval_model(self) -> nn.Module:
        """The weights evaluation should use: EMA when enabled, the raw model otherwise."""
        return self.ema_model if self.ema_model is not None else self.model


def forward_backward(
    model: nn.Module, images: torch.Tensor, precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None, loss_weight: float = 1.0, noise: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Run ``model(images)`` (``model(images, noise=noise)`` when ``noise`` is given) under
    ``precision`` ("fp16"/"bf16": autocast on the images' device) and backpropagate ``"loss"`` times
    ``loss_weight`` (1 / accumulation steps for a micro-batch), multiplied by ``scaler``'s scale when
    given; gradients add to those already in ``.grad``.

    Returns the model's output dict after checking the contract: scalar tensors including ``"loss"``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dtype = _AUTOCAST_DTYPES.get(precision)
    with torch.autocast(device_type=images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(images) if noise is None else model(images, noise=noise)
    if not isinstance(out, Mapping) or "loss" not in out:
        raise ValueError(f"model forward must return a dict with a 'loss' entry, got {type(out).__name__}")
    for key, value in out.items():
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError(f"model output {key!r} must be a scalar tensor, got {value!r}")
        if key in _RESERVED_METRICS:
            raise ValueError(f"model output {key!r} clashes with a metric the trainer logs itself")
    loss = out["loss"].reshape(())
    if loss_weight != 1.0:
        loss = loss * loss_weight
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return dict(out)


def grad_norm_and_clip(parameters: Iterable[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Total L2 norm of the gradients (before clipping); clip them to ``max_norm`` if given."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        raise ValueError("no parameter received a gradient: the loss does not depend on the model")
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def train(
    model: nn.Module,
    train_dataset: Dataset,
    config: TrainConfig,
    checkpoint_dir: str | os.PathLike[str] | None,
    callbacks: Iterable[Callback] = (),
    resume: bool = True,
    eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
) -> TrainResult:
    """Train ``model`` (``forward(images_uint8) -> {"loss", ...}``) on ``train_dataset`` (items
    ``(image_uint8, factors)``) for ``config.steps`` optimizer steps.

    With ``resume`` and a checkpoint in ``checkpoint_dir``, training continues from it; if that
    checkpoint is already at ``config.steps`` nothing is trained. An unreadable newest checkpoint
    is reported (warning naming the file), removed, and the previous one used; with no usable
    checkpoint the run starts from step 0. ``resume=False`` removes the directory's checkpoints.
    When the run fails (e.g. :class:`NonFiniteLossError`) before any checkpoint was written, a
    ``checkpoint_dir`` this call created is removed again if empty. Under torchrun every rank calls
    this; ``checkpoint_dir`` must then be on a filesystem all ranks see. ``eval_fn(model)`` (no grad,
    eval mode, fixed seed per step) gets the EMA model every ``config.eval_every`` steps on every
    rank (so it may use collectives, e.g. shard the validation set); rank 0's metrics are the ones
    logged, selected on (``keep_best``) and returned on every rank.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not hasattr(train_dataset, "__len__") or not hasattr(train_dataset, "__getitem__"):
        raise ValueError("train_dataset must be a map-style dataset with __len__ and __getitem__")
    if config.eval_every is not None and eval_fn is None:
        raise ValueError("TrainConfig.eval_every is set but no eval_fn was given")
    hooks = CallbackList(callbacks)
    ctx = setup_distributed(config.device)
    micro_batches = accumulation_steps(config.batch_size, ctx.world_size, config.micro_batch_size)
    num_samples = len(train_dataset)
    steps_per_epoch = num_samples // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the dataset has {num_samples} items, fewer than TrainConfig.batch_size={config.batch_size}")
    if not ctx.is_main:
        hooks = CallbackList()
    decay_every = config.lr_decay_every or steps_per_epoch
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    ckpt_path = checkpoint_file(ckpt_dir) if ckpt_dir is not None else None
    created_dir = ckpt_dir is not None and not ckpt_dir.exists()
    try:
        return _train(model, train_dataset, config, ckpt_dir, ckpt_path, hooks, resume, eval_fn, ctx,
                      num_samples, steps_per_epoch, decay_every, micro_batches)
    except BaseException:
        if ctx.is_main and ckpt_dir is not None:
            _discard_unresumable(ckpt_dir, created_dir)
        raise


def _train(model: nn.Module, train_dataset: Dataset, config: TrainConfig, checkpoint_dir: Path | None,
           ckpt_path: Path | None, hooks: CallbackList, resume: bool,
           eval_fn: Callable[[nn.Module], Mapping[str, float]] | None, ctx: DistContext,
           num_samples: int, steps_per_epoch: int, decay_every: int, micro_batches: int) -> TrainResult:
    """The body of :func:`train` once the arguments are checked and the process group is up."""
    device = ctx.device
    channels_last = config.channels_last and device.type == "cuda"
    seed_everything(rank_seed(config.seed, ctx.rank), deterministic=config.deterministic)
    if not config.deterministic:
        torch.use_deterministic_algorithms(False)

    state, resumed_from = _resume_state(checkpoint_dir, resume, config, num_samples, ctx)
    start_step = state["step"] if state else 0
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if state:
        model.load_state_dict(state["model"])
    best = state.get("best") if state else None
    if state and start_step == config.steps:
        log.info("checkpoint %s is already at step %d: nothing to train", resumed_from, start_step)
        ema = _make_ema(model, config, state)
        return TrainResult(dict(state["metrics"]), start_step, model, ema.module if ema else None,
                           state["eval_metrics"], ckpt_path, start_step, best,
                           _read_best(checkpoint_dir, best, ctx))

    net: nn.Module = model
    if ctx.is_distributed:  # broadcasts rank 0's weights, so EMA below starts identical everywhere
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.find_unused_parameters,
        )
    ema = _make_ema(model, config, state)
    optimizer = torch.optim.Adamax(model.parameters(), lr=config.lr)
    scheduler = _make_scheduler(optimizer, config)
    scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
    best_in_memory: dict[str, torch.Tensor] | None = None
    window: dict[str, Any] = {"count": 0, "sums": {}, "lr": None}
    metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] | None = None
    skipped_in_a_row = 0  # fp16 steps skipped for a non-finite loss or gradient, up to this step
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(state["scaler"])
        window, metrics, eval_metrics = state["window"], dict(state["metrics"]), state["eval_metrics"]
        skipped_in_a_row = state.get("skipped_in_a_row", 0)
        _restore_rank_rng(state["rng"], config.seed, start_step, ctx)
        _warn_if_micro_batch_changed(state, config, ctx)
        log.info("resuming from %s at step %d", resumed_from, start_step)

    hooks.on_train_start({
        "start_step": start_step, "steps": config.steps, "config": config.to_dict(),
        "world_size": ctx.world_size, "distributed": ctx.is_distributed, "device": str(device),
        "steps_per_epoch": steps_per_epoch, "accumulation_steps": micro_batches,
        "num_parameters": sum(p.numel() for p in model.parameters()),
    })
    began = time.perf_counter()
    step = start_step
    metric_keys: list[str] | None = None
    model.train()
    bar = tqdm(total=config.steps, initial=start_step, desc="train", dynamic_ncols=True,
               disable=not (ctx.is_main and config.progress))
    try:
        while step < config.steps:
            epoch, start_batch = divmod(step, steps_per_epoch)
            if hasattr(train_dataset, "set_epoch"):  # e.g. RandomHFlip: its flips follow (seed, epoch, index)
                train_dataset.set_epoch(epoch)
            loader = _make_loader(train_dataset, config, ctx, epoch, start_batch)
            # The sampler's index lists, read alongside the loader's batches (the same seeded order).
            for indices, batches in zip(_in_groups(loader.batch_sampler, micro_batches),
                                        _in_groups(loader, micro_batches)):
                step += 1
                images = [_images_on(device, batch, channels_last) for batch in batches]
                noises = [_posterior_noise(model, config.seed, epoch, i, device) for i in indices]
                lr = optimizer.param_groups[0]["lr"]
                values = _optimizer_step(net, model, images, noises, optimizer, config.grad_clip,
                                         config.precision, scaler, ctx, step)
                if metric_keys is None:
                    metric_keys = sorted(values)
                elif sorted(values) != metric_keys:  # the all-reduced vector must line up across steps
                    raise ValueError(f"model output keys changed from {metric_keys} to {sorted(values)}")
                skipped_in_a_row = skipped_in_a_row + 1 if values.get("fp16_skipped") else 0
                if skipped_in_a_row >= config.max_nonfinite_in_a_row:
                    raise NonFiniteLossError(step, values, skipped_in_a_row)
                if ema is not None:
                    ema.update(model)
                if config.lr_schedule == "cosine" or step % decay_every == 0:
                    scheduler.step()
                _accumulate(window, values, lr)
                bar.update(1)
                last = step == config.steps
                if step % config.log_every == 0 or last:
                    metrics = _window_means(window)
                    window = {"count": 0, "sums": {}, "lr": None}
                    hooks.on_step_end(step, metrics)
                    bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "bpd") if k in metrics})
                if eval_fn is not None and config.eval_every is not None and (step % config.eval_every == 0 or last):
                    eval_module = ema.module if ema else model
                    eval_metrics = _evaluate(eval_fn, eval_module, config.seed, step, ctx)
                    hooks.on_eval(step, eval_metrics)
                    if config.keep_best is not None and ctx.is_main and _improves(config.keep_best, eval_metrics, best):
                        best = {"step": step, "value": eval_metrics[config.keep_best], "metrics": dict(eval_metrics)}
                        best_in_memory = _keep_best_weights(checkpoint_dir, best, eval_module)
                if ckpt_path is not None and (step % config.checkpoint_every == 0 or last):
                    _save(ckpt_path, step, steps_per_epoch, last, model, ema, optimizer, scheduler, scaler,
                          window, metrics, eval_metrics, best, config, num_samples, ctx, hooks, skipped_in_a_row)
                if last:
                    break
    finally:
        bar.close()
    hooks.on_train_end({
        "start_step": start_step, "steps": step, "metrics": metrics, "eval_metrics": eval_metrics,
        "checkpoint_path": ckpt_path, "wall_time_s": time.perf_counter() - began,
    })
    best_state = best_in_memory if best_in_memory is not None else _read_best(checkpoint_dir, best, ctx)
    return TrainResult(metrics, step, model, ema.module if ema else None, eval_metrics, ckpt_path, start_step,
                       best, best_state)


def _optimizer_step(net: nn.Module, model: nn.Module, micro_batches: Sequence[torch.Tensor],
                    noises: Sequence[torch.Tensor | None],
                    optimizer: torch.optim.Optimizer, grad_clip: float | None, precision: str,
                    scaler: torch.amp.GradScaler | None, ctx: DistContext, step: int) -> dict[str, float]:
    """One optimizer step on this rank's micro-batches (with their posterior noise, or None):
    forward/backward of each (gradients
    accumulated, each loss weighted 1 / len(micro_batches), DDP synchronising on the last one
    only), metrics averaged over micro-batches and ranks, grad norm (+clip), and the update.

    fp32/bf16: the update is applied only when the loss and gradient norm are finite (otherwise
    :class:`NonFiniteLossError`). fp16: a non-finite loss or gradient is an overflow: the
    GradScaler skips that update and lowers its scale (``fp16_skipped`` = 1, ``grad_norm`` logged
    as 0 for that step); the caller counts the skipped steps in a row.
    """
    optimizer.zero_grad(set_to_none=True)
    weight = 1.0 / len(micro_batches)
    keys: list[str] | None = None
    total: torch.Tensor | None = None
    for index, (images, noise) in enumerate(zip(micro_batches, noises, strict=True)):
        syncing = index == len(micro_batches) - 1 or not isinstance(net, DistributedDataParallel)
        with contextlib.nullcontext() if syncing else net.no_sync():
            out = forward_backward(net, images, precision, scaler, loss_weight=weight, noise=noise)
        if keys is None:
            keys = sorted(out)
        elif sorted(out) != keys:
            raise ValueError(f"model output keys differ between micro-batches: {keys} vs {sorted(out)}")
        vector = torch.stack([out[k].detach().float().reshape(()) for k in keys])
        total = vector if total is None else total + vector
    assert keys is not None and total is not None
    if len(micro_batches) > 1:
        total = total / len(micro_batches)
    reduced = all_reduce_mean(total, ctx)  # the same on every rank, so all ranks skip alike
    if scaler is not None:
        # A non-finite loss is an overflow too: one NaN gradient entry makes unscale_ record it, so
        # the scaler skips the update and backs off its scale exactly as for an overflow.
        first = next((p.grad for p in model.parameters() if p.grad is not None), None)
        if first is not None:
            first.masked_fill_(~torch.isfinite(reduced).all(), math.nan)
        scaler.unscale_(optimizer)
    norm = grad_norm_and_clip(model.parameters(), grad_clip)
    # DDP leaves identical gradients on every rank, so the norm needs no reduction.
    values = dict(zip([*keys, "grad_norm"], torch.cat([reduced, norm.float().reshape(1)]).tolist(), strict=True))
    finite = all(math.isfinite(v) for v in values.values())
    if scaler is None:
        if not finite:
            raise NonFiniteLossError(step, values)
        optimizer.step()
        return values
    scaler.step(optimizer)  # skips the update when the unscaled gradients hold inf/NaN
    scaler.update()
    if not finite:
        values["grad_norm"] = 0.0
    values["fp16_skipped"] = float(not finite)
    return values


def _posterior_noise(model: nn.Module, seed: int, epoch: int, indices: Sequence[int],
                     device: torch.device) -> torch.Tensor | None:
    """The training posterior noise (B, ``model.posterior_noise_size``) of the images ``indices`` in
    ``epoch``, drawn per image on ``device`` (None for a model that draws its own)."""
    size = getattr(model, "posterior_noise_size", None)
    if size is None:
        return None
    return image_noise(indices, int(size), device, seed, TRAIN_NOISE_STREAM, epoch)


def _in_groups(batches: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive groups of ``size`` items (the micro-batches of one step); a short tail is dropped."""
    group: list[Any] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def _images_on(device: torch.device, batch: Any, channels_last: bool) -> torch.Tensor:
    """The uint8 images of a loader batch ``(images, factors)`` (or bare images) on ``device``."""
    images = batch[0] if isinstance(batch, list | tuple) else batch
    if images.dtype != torch.uint8:
        raise ValueError(f"dataset images must be torch.uint8 (C, H, W), got {images.dtype}")
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def _warn_if_micro_batch_changed(state: Mapping[str, Any], config: TrainConfig, ctx: DistContext) -> None:
    """Warn when a resumed run's per-rank micro-batch differs from the checkpoint's: same global
    batches and update rule, but batch-dependent terms and random draws see other micro-batches."""
    saved = state["config"]
    before = saved.get("micro_batch_size") or saved["batch_size"] // state["world_size"]
    now = config.micro_batch_size or config.batch_size // ctx.world_size
    if before != now:
        warnings.warn(
            f"checkpoint was written with micro-batches of {before} images per rank, this run uses {now} "
            "(TrainConfig.micro_batch_size): the global batches and updates are the same, but batch-dependent "
            "terms and random draws differ, so the result differs slightly from an uninterrupted run",
            stacklevel=3,
        )


def _improves(key: str, eval_metrics: Mapping[str, float], best: Mapping[str, Any] | None) -> bool:
    """Whether ``eval_metrics[key]`` is lower than the best so far (ties keep the earlier step)."""
    if key not in eval_metrics:
        raise ValueError(f"TrainConfig.keep_best={key!r} is not a metric of eval_fn (got {sorted(eval_metrics)})")
    value = eval_metrics[key]
    return math.isfinite(value) and (best is None or value < best["value"])


def _keep_best_weights(checkpoint_dir: str | os.PathLike[str] | None, best: Mapping[str, Any],
                       module: nn.Module) -> dict[str, torch.Tensor] | None:
    """Write ``module``'s weights as the new best (atomically, beside the checkpoint), or return a
    CPU copy when the run has no checkpoint directory."""
    weights = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    if checkpoint_dir is None:
        return weights
    atomic_save({"format_version": FORMAT_VERSION, "step": best["step"], "value": best["value"], "model": weights},
                Path(checkpoint_dir) / BEST_NAME)
    return None


def _read_best(checkpoint_dir: str | os.PathLike[str] | None, best: Mapping[str, Any] | None,
               ctx: DistContext) -> dict[str, torch.Tensor] | None:
    """The kept best weights (rank 0), checked to be those of the step the checkpoint selected."""
    if best is None or checkpoint_dir is None or not ctx.is_main:
        return None
    path = Path(checkpoint_dir) / BEST_NAME
    saved = read_checkpoint(path) if path.is_file() else None
    if saved is None or saved.get("step") != best["step"]:
        raise RuntimeError(f"{path} does not hold the weights of the selected step {best['step']} "
                           f"(found step {saved.get('step') if saved else None}); rerun the training from scratch")
    return saved["model"]


def _make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """ExponentialLR(gamma=lr_decay), or the closed-form cosine decay to 0 at ``config.steps``
    (a function of the step count alone, so a resumed run gets exactly the same rates)."""
    if config.lr_schedule == "cosine":
        steps = config.steps
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps)))
    return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay)


def _make_ema(model: nn.Module, config: TrainConfig, state: Mapping[str, Any] | None) -> ExponentialMovingAverage | None:
    if config.ema_decay is None:
        return None
    ema = ExponentialMovingAverage(model, config.ema_decay)
    if state is not None:
        ema.load_state_dict(state["ema"])
    return ema


def _make_loader(dataset: Dataset, config: TrainConfig, ctx: DistContext, epoch: int, start_batch: int) -> DataLoader:
    """This rank's loader of micro-batches for ``epoch`` from global batch ``start_batch`` on; worker
    seeds depend on (seed, epoch, rank)."""
    sampler = ShardedBatchSampler(len(dataset), config.batch_size, config.seed, epoch,
                                  ctx.rank, ctx.world_size, start_batch, config.micro_batch_size)
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=config.num_workers,
        worker_init_fn=seed_worker if config.num_workers else None,
        generator=make_generator(derive_seed(config.seed, epoch, ctx.rank)),
        pin_memory=ctx.device.type == "cuda",
    )


def _accumulate(window: dict[str, Any], values: Mapping[str, float], lr: float) -> None:
    """Add one step's metrics to the logging window; the non-finite values of a skipped fp16 step
    are left out (counted in ``window["left_out"]``) so the window means stay finite."""
    window["count"] += 1
    for key, value in values.items():
        if not math.isfinite(value):
            left_out = window.setdefault("left_out", {})
            left_out[key] = left_out.get(key, 0) + 1
            value = 0.0
        window["sums"][key] = window["sums"].get(key, 0.0) + value
    window["lr"] = lr


def _window_means(window: Mapping[str, Any]) -> dict[str, float]:
    """Per-metric means over the window's steps (NaN for a metric no step of the window had finite)."""
    left_out = window.get("left_out", {})
    means = {}
    for key, total in window["sums"].items():
        count = window["count"] - left_out.get(key, 0)
        means[key] = total / count if count else math.nan
    means["lr"] = window["lr"]
    return means


def _evaluate(eval_fn: Callable[[nn.Module], Mapping[str, float]], module: nn.Module, seed: int,
              step: int, ctx: DistContext) -> dict[str, float]:
    """Run ``eval_fn`` on every rank (it may use collectives) with a seed fixed by (seed, step),
    leaving the training RNG untouched. Returns rank 0's metrics, on every rank."""
    saved = capture_rng_state(ctx.device)
    was_training = module.training
    module.eval()
    try:
        seed_everything(derive_seed(seed, step, _EVAL_SEED_KEY),
                        deterministic=torch.are_deterministic_algorithms_enabled())
        with torch.no_grad():
            raw = eval_fn(module)
    finally:
        module.train(was_training)
        restore_rng_state(saved, ctx.device)
    if not isinstance(raw, Mapping):
        raise ValueError(f"eval_fn must return a dict of floats, got {type(raw).__name__}")
    return broadcast_object({str(k): float(v) for k, v in raw.items()}, ctx)


def _save(path: Path, step: int, steps_per_epoch: int, finished: bool, model: nn.Module,
          ema: ExponentialMovingAverage | None, optimizer: torch.optim.Optimizer,
          scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None,
          window: Mapping[str, Any], metrics: Mapping[str, float], eval_metrics: Mapping[str, float] | None,
          best: Mapping[str, Any] | None, config: TrainConfig,
          num_samples: int, ctx: DistContext, hooks: CallbackList, skipped_in_a_row: int) -> None:
    """Gather every rank's RNG state; rank 0 writes the checkpoint atomically, keeping the one it
    replaces as the previous checkpoint until the run is finished."""
    rng = all_gather_objects(capture_rng_state(ctx.device), ctx)
    if ctx.is_main:
        epoch, batch_in_epoch = divmod(step, steps_per_epoch)
        save_checkpoint({
            "format_version": FORMAT_VERSION,
            "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "finished": finished,
            "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "best": dict(best) if best is not None else None,
            "rng": rng, "window": dict(window), "metrics": dict(metrics),
            "eval_metrics": dict(eval_metrics) if eval_metrics is not None else None,
            "config": config.to_dict(), "num_samples": num_samples, "world_size": ctx.world_size,
            "skipped_in_a_row": skipped_in_a_row,
        }, path.parent, finished=finished)
        hooks.on_checkpoint(step, path)


def _resume_state(checkpoint_dir: Path | None, resume: bool, config: TrainConfig, num_samples: int,
                  ctx: DistContext) -> tuple[dict[str, Any] | None, Path | None]:
    """The checkpoint to resume from (validated against ``config``) and its path, or (None, None)
    for a fresh start.

    The newest checkpoint is tried first, then the previous one; a file that cannot be read (or
    whose ``best.pt`` is unusable) is skipped with a warning naming it. Rank 0 then removes what
    cannot be resumed: the skipped files, and with no usable checkpoint (or ``resume=False``) every
    checkpoint file and ``best.pt``, so later rotations never keep a bad file as the fallback.
    """
    state, path, found, rejected = None, None, [], []
    if checkpoint_dir is not None:
        found = [p for p in (checkpoint_file(checkpoint_dir), previous_checkpoint_file(checkpoint_dir)) if p.is_file()]
    if resume:
        for candidate in found:
            try:
                loaded = read_checkpoint(candidate)
            except CorruptCheckpointError as error:
                rejected.append((candidate, str(error)))
                continue
            problem = _best_problem(candidate.parent, loaded)
            if problem is not None:
                rejected.append((candidate, f"{candidate} cannot be resumed: {problem}"))
                continue
            state, path = loaded, candidate
            break
    steps_seen = all_gather_objects(state["step"] if state else None, ctx)
    if len(set(steps_seen)) > 1:
        raise RuntimeError(f"ranks found different checkpoints (steps {steps_seen}); "
                           "checkpoint_dir must be on a filesystem every rank sees")
    if state is not None:
        saved = state["config"]
        mismatched = [f"{k}: checkpoint {saved.get(k)!r} vs config {getattr(config, k)!r}"
                      for k in _RESUME_FIELDS if saved.get(k) != getattr(config, k)]
        if state["num_samples"] != num_samples:
            mismatched.append(f"dataset size: checkpoint {state['num_samples']} vs {num_samples}")
        if mismatched:
            raise ValueError(f"cannot resume from {path}, it was written by a different run ("
                             + "; ".join(mismatched) + "); use a new checkpoint_dir or resume=False")
        if state["step"] > config.steps:
            raise ValueError(f"checkpoint {path} is at step {state['step']}, beyond TrainConfig.steps={config.steps}")
    if ctx.is_main and checkpoint_dir is not None:
        reasons = "; ".join(reason for _, reason in rejected)
        if found and not resume:
            log.warning("resume=False: the checkpoints in %s are removed, a fresh run starts", checkpoint_dir)
            _remove_checkpoints(checkpoint_dir)
        elif rejected and state is None:
            log.warning("no usable checkpoint in %s (%s): training restarts from step 0", checkpoint_dir, reasons)
            _remove_checkpoints(checkpoint_dir)
        elif rejected:
            log.warning("%s: falling back to the previous checkpoint %s at step %d", reasons, path, state["step"])
            for bad, _ in rejected:
                bad.unlink(missing_ok=True)
    barrier(ctx)  # no rank reads the directory again before rank 0 has tidied it
    return state, path


def _best_problem(checkpoint_dir: Path, state: Mapping[str, Any]) -> str | None:
    """Why ``state`` cannot be resumed for lack of its ``best.pt`` (None when it can): the file must
    hold the selected step's weights, or (mid-run) a later step's, which the resumed run rewrites."""
    best = state.get("best")
    if best is None:
        return None
    path = checkpoint_dir / BEST_NAME
    if not path.is_file():
        return f"{path} (the weights of the selected step {best['step']}) is missing"
    try:
        saved = read_checkpoint(path)
    except (CorruptCheckpointError, ValueError) as error:
        return str(error)
    step = saved.get("step")
    if step == best["step"] or (not state["finished"] and isinstance(step, int) and step > state["step"]):
        return None
    return f"{path} holds the weights of step {step}, not those of the selected step {best['step']}"


def _remove_checkpoints(checkpoint_dir: Path) -> None:
    """Delete the trainer's files in ``checkpoint_dir``: both checkpoints and ``best.pt``."""
    for path in (checkpoint_file(checkpoint_dir), previous_checkpoint_file(checkpoint_dir), checkpoint_dir / BEST_NAME):
        path.unlink(missing_ok=True)


def _discard_unresumable(checkpoint_dir: Path, created: bool) -> None:
    """After a failed run: with no checkpoint to resume from, drop ``best.pt`` (a fresh start
    rewrites it) and, if this run created ``checkpoint_dir`` and it is now empty, the directory."""
    if not checkpoint_dir.is_dir() or has_checkpoint(checkpoint_dir):
        return
    (checkpoint_dir / BEST_NAME).unlink(missing_ok=True)
    if created:
        try:
            checkpoint_dir.rmdir()
        except OSError:  # not empty: files of callbacks (e.g. a curve) stay
            pass


def _restore_rank_rng(rng: list[dict[str, Any]], seed: int, step: int, ctx: DistContext) -> None:
    if len(rng) == ctx.world_size:
        restore_rng_state(rng[ctx.rank], ctx.device)
        return
    warnings.warn(
        f"checkpoint was written by {len(rng)} ranks, this run has {ctx.world_size}: data order is "
        "unchanged but random streams are re-derived, so the result differs from an uninterrupted run",
        stacklevel=3,
    )
    seed_everything(derive_seed(seed, ctx.rank, step), deterministic=torch.are_deterministic_algorithms_enabled())
