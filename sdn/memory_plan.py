"""Peak GPU memory and FLOPs of a model's phases, planned on the meta device (nothing is allocated).

Why: a paper run that runs out of memory does so after hours of queueing; the plan says beforehand,
on a CPU, whether each phase fits a GPU and which batch or chunk sizes do.

How: the model is built on ``device="meta"`` inside :class:`MemoryTracker`, a ``TorchDispatchMode``
that sees every ATen call and keeps the byte count of every live storage (a weakref finalizer on the
storage subtracts it when the storage dies), so its ``peak`` is the peak of live tensors exactly as
the CUDA caching allocator would be asked for them (parameters, gradients, optimizer and EMA state,
activations saved for backward, temporaries). It also counts FLOPs with the formulas of
``torch.utils.flop_counter`` (plus the in-place ``addmm_``/``baddbmm_`` the counter misses).

``torch.autocast`` has no meta device: :func:`meta_autocast` stands in for it while planning, casting
the inputs of convolutions and linear layers (the ops CUDA autocast runs in fp16/bf16) to the
autocast dtype, so what autograd saves under AMP is planned at its real width; ``enabled=False``
regions (the SDN sweep, the likelihood) stay fp32 as on the GPU. Ops on CUDA autocast's fp32 list
(exp, log, softmax, ...) are not promoted back to fp32: a small underestimate under AMP.

A plan is a lower bound of what the allocator reserves; :data:`HEADROOM_FRACTION` (allocator
rounding and fragmentation) and :data:`CONTEXT_BYTES` (CUDA context, cuBLAS/cuDNN workspaces) are
added to give :attr:`PhasePlan.planned_bytes`, the figure compared with a GPU's memory.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from sdn.models.vanilla_vae import IMAGE_SIZE as VAE_IMAGE_SIZE
from sdn.sweep_triton import TRITON_AVAILABLE

GIB = 2**30
HEADROOM_FRACTION = 0.15  # allocator block rounding + fragmentation: 15 % over the live-tensor peak
CONTEXT_BYTES = 1 * GIB   # CUDA context, cuBLAS/cuDNN workspaces and NCCL buffers (≈ 0.5-1 GiB on an H100)
PHASES = ("train", "validation", "iw_chunk", "sampling", "fid_features")

_aten = torch.ops.aten
# In-place GEMMs the flop counter has no formula for (the SDN sweep accumulates with addmm_).
_INPLACE_FLOPS = {_aten.addmm_: flop_registry[_aten.addmm], _aten.baddbmm_: flop_registry[_aten.baddbmm]}


def _sweep_kernel_flops(lines: torch.Tensor, *args, **kwargs) -> int:
    """GEMM FLOPs inside one fused sweep kernel (``sdn.sweep_triton``), forward or backward: each of the
    S − 1 updated lines multiplies its (L·B, 3F) neighbour rows by the (3F, 3F) input weights, which
    is what the plain sweep's addmm_ calls count (gate arithmetic left out, as for the plain path)."""
    num_lines, length, batch, feat = lines.shape
    return 2 * max(num_lines - 1, 0) * length * batch * (3 * feat) * (3 * feat)


def _custom_op_flops() -> dict[Any, Callable[..., int]]:
    """FLOP formulas of the project's fused operators (one opaque op each on the meta device)."""
    if not TRITON_AVAILABLE:
        return {}
    return {torch.ops.sdn.sweep_forward: _sweep_kernel_flops, torch.ops.sdn.sweep_backward: _sweep_kernel_flops}


class MemoryTracker(TorchDispatchMode):
    """Live and peak bytes of all tensor storages created under it, and the FLOPs of its ATen calls.

    Storages are counted once (views share theirs) from the op that creates them until they die.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0
        self.flops = 0
        self.ops = 0
        self._custom_flops = _custom_op_flops()

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def reset_peak(self) -> None:
        """Restart the peak at what is live now (the start of a phase)."""
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        packet = func._overloadpacket
        formula = flop_registry.get(packet) or _INPLACE_FLOPS.get(packet)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        elif packet in self._custom_flops:
            self.flops += int(self._custom_flops[packet](*args, **kwargs))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return out


# ----------------------------------------------------------------------------- autocast on meta
_autocast_dtype: list[torch.dtype | None] = [None]  # the innermost emulated autocast region's dtype
_real_autocast = torch.autocast


class _MetaAwareAutocast:
    """``torch.autocast`` that emulates itself for ``device_type="meta"`` and delegates otherwise."""

    def __init__(self, device_type: str, dtype: torch.dtype | None = None, enabled: bool = True,
                 cache_enabled: bool | None = None) -> None:
        self._real = None if device_type == "meta" else _real_autocast(device_type, dtype, enabled, cache_enabled)
        self._dtype = (dtype or torch.float16) if enabled else None

    def __enter__(self):
        if self._real is not None:
            return self._real.__enter__()
        _autocast_dtype.append(self._dtype)
        return self

    def __exit__(self, *exc):
        if self._real is not None:
            return self._real.__exit__(*exc)
        _autocast_dtype.pop()
        return False


def _lower_precision(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``function`` with its floating tensor arguments cast to the emulated autocast dtype, if any."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        dtype = _autocast_dtype[-1]
        if dtype is not None:
            def cast(value):
                return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
            args = tuple(cast(a) for a in args)
            kwargs = {k: cast(v) for k, v in kwargs.items()}
        return function(*args, **kwargs)

    return wrapper


_AUTOCAST_LOWER = ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "linear")


@contextmanager
def meta_autocast() -> Iterator[None]:
    """Inside the block ``torch.autocast(device_type="meta", ...)`` works (see the module docstring)."""
    saved = {name: getattr(F, name) for name in _AUTOCAST_LOWER}
    torch.autocast = _MetaAwareAutocast
    for name, function in saved.items():
        setattr(F, name, _lower_precision(function))
    try:
        yield
    finally:
        torch.autocast = _real_autocast
        for name, function in saved.items():
            setattr(F, name, function)
        del _autocast_dtype[1:]


# ----------------------------------------------------------------------------- plans
@dataclasses.dataclass(frozen=True)
class PhasePlan:
    """One phase at one size: the peak of live tensors, the planned figure and the FLOPs of one call."""

    phase: str
    size: int  # images (train, validation, sampling, FID) or image x sample pairs (IW chunk)
    peak_bytes: int
    flops: int

    @property
    def planned_bytes(self) -> int:
        """The peak plus headroom: what the GPU must have."""
        return int(self.peak_bytes * (1 + HEADROOM_FRACTION)) + CONTEXT_BYTES

    @property
    def planned_gib(self) -> float:
        return self.planned_bytes / GIB

    def fits(self, budget_bytes: int) -> bool:
        return self.planned_bytes <= budget_bytes


ModelBuilder = Callable[[], nn.Module]  # builds the model on the current default device (meta here)


def _meta_images(batch: int, shape: tuple[int, int, int]) -> torch.Tensor:
    return torch.zeros((batch, *shape), dtype=torch.uint8, device="meta")


def _build(build: ModelBuilder) -> nn.Module:
    with torch.device("meta"):
        return build()


def plan_train_step(build: ModelBuilder, image_shape: tuple[int, int, int], micro_batch: int, precision: str,
                    ema: bool = True, ddp: bool = False) -> PhasePlan:
    """One training step at ``micro_batch`` per GPU: parameters, gradients, Adamax state (2x), the EMA
    copy and (``ddp``) DistributedDataParallel's gradient buckets, plus the forward/backward peak.

    The trainer's own ``sdn.training.forward_backward`` runs the step (under emulated autocast for
    "fp16"/"bf16"), then Adamax steps and the EMA updates, as in the trainer.
    """
    from sdn.training import forward_backward  # the trainer's step; imported late (sdn.training is heavy)

    tracker = MemoryTracker()
    with meta_autocast(), tracker:
        model = _build(build).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adamax(params, lr=1e-3)
        for p in params:  # Adamax creates its state (exp_avg, exp_inf) at its first step
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        averaged = copy.deepcopy(model) if ema else None
        buckets = [torch.empty_like(p) for p in params] if ddp else []  # DDP's flat gradient buckets
        images = _meta_images(micro_batch, image_shape)
        tracker.reset_peak()
        flops_before = tracker.flops
        forward_backward(model, images, precision)
        flops = tracker.flops - flops_before
        optimizer.step()
        if averaged is not None:
            with torch.no_grad():
                for a, p in zip(averaged.parameters(), model.parameters()):
                    a.lerp_(p, 1e-3)
        peak = tracker.peak
        del buckets
    return PhasePlan("train", micro_batch, peak, flops)


def _plan_no_grad(phase: str, size: int, build: ModelBuilder, run: Callable[[nn.Module], Any],
                  extra_state_bytes: int = 0) -> PhasePlan:
    tracker = MemoryTracker()
    with meta_autocast(), tracker, torch.no_grad():
        model = _build(build).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        tracker.reset_peak()
        flops_before = tracker.flops
        run(model)
        peak, flops = tracker.peak, tracker.flops - flops_before
    return PhasePlan(phase, size, peak + extra_state_bytes, flops)


def parameter_bytes(build: ModelBuilder) -> int:
    """Bytes of the model's parameters and buffers (fp32 as built)."""
    model = _build(build)
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def training_state_bytes(build: ModelBuilder, ema: bool = True) -> int:
    """What stays allocated between training steps besides the model: Adamax state (2x) and the EMA copy."""
    return parameter_bytes(build) * (2 + int(ema))


def plan_validation(build: ModelBuilder, image_shape: tuple[int, int, int], batch: int,
                    during_training: bool = True, ema: bool = True) -> PhasePlan:
    """The validation ELBO (one posterior sample) of ``batch`` images with the EMA weights; during
    training the trained model, its Adamax state and the EMA copy stay allocated beside it."""
    extra = training_state_bytes(build, ema) if during_training else 0
    return _plan_no_grad("validation", batch, build, lambda m: m.log_weights(_meta_images(batch, image_shape), 1),
                         extra)


def iw_chunk_split(chunk_size: int, num_samples: int) -> tuple[int, int]:
    """(images, samples per image) of one IW forward pass of at most ``chunk_size`` image x sample pairs:
    one image's samples when ``chunk_size`` < K, else whole images (``chunk_size // K`` of them)."""
    if chunk_size < num_samples:
        return 1, chunk_size
    return chunk_size // num_samples, num_samples


def iw_pass(chunk_size: int, num_samples: int, batch: int | None, features: bool) -> tuple[int, int]:
    """(images through the bottom-up pass, image x sample pairs through the top-down pass) of one IW chunk.

    With ``features`` (a model with ``posterior_features``, as ``sdn.scores`` uses it) the bottom-up
    features of the whole evaluation ``batch`` stay alive while its chunks of ``chunk_size`` pairs run;
    otherwise ``log_weights`` runs on the images of one chunk (:func:`iw_chunk_split`).
    """
    if features and batch:
        return batch, min(chunk_size, batch * num_samples)
    images, samples = iw_chunk_split(chunk_size, num_samples)
    return images, images * samples


def plan_iw_chunk(build: ModelBuilder, image_shape: tuple[int, int, int], chunk_size: int,
                  num_samples: int, batch: int | None = None) -> PhasePlan:
    """One importance-weighted pass of ``chunk_size`` image x sample pairs: the bottom-up pass once per
    image (of the evaluation ``batch`` when the model exposes ``posterior_features``), the top-down pass
    on the chunk's pairs (:func:`iw_pass`)."""
    def run(model: nn.Module) -> None:
        features = hasattr(model, "posterior_features")
        images, pairs = iw_pass(chunk_size, num_samples, batch, features)
        if features and batch:
            encoded = model.posterior_features(_meta_images(images, image_shape))
            rows = torch.arange(pairs, device="meta") // num_samples
            noise = torch.zeros((pairs, model.posterior_noise_size), device="meta")
            model.log_weights_from_features(encoded, rows, noise)
        else:
            model.log_weights(_meta_images(images, image_shape), pairs // images)

    return _plan_no_grad("iw_chunk", chunk_size, build, run)


def plan_sampling(build: ModelBuilder, num: int) -> PhasePlan:
    """``model.sample(num)`` with the model's weights."""
    return _plan_no_grad("sampling", num, build, lambda m: m.sample(num))


def build_fid_inception() -> nn.Module:
    """torch-fidelity's FID Inception-v3 (as ``sdn.metrics.fid`` builds it) without reading weights:
    for planning on meta only."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with mock.patch.object(torch, "load", lambda *args, **kwargs: {}), \
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")


def plan_fid_features(batch: int) -> PhasePlan:
    """The 2048-d Inception pool features of ``batch`` uint8 images (resized to 299 x 299 inside)."""
    return _plan_no_grad("fid_features", batch, build_fid_inception,
                         lambda m: m(torch.zeros((batch, 3, 299, 299), dtype=torch.uint8, device="meta")))


def largest_fitting_size(a: PhasePlan, b: PhasePlan, budget_bytes: int, multiple: int = 8) -> int:
    """The largest size whose planned bytes stay within ``budget_bytes`` on the line through plans ``a``
    and ``b`` of one phase at two sizes (memory is affine in the size: fixed state + per-item tensors):
    a multiple of ``multiple`` when at least ``multiple``, else a power of two; 0 when not even 1 fits."""
    if a.size == b.size:
        raise ValueError(f"need plans at two different sizes, got {a.size} twice")
    per_item = max((b.planned_bytes - a.planned_bytes) / (b.size - a.size), 1.0)
    fixed = a.planned_bytes - per_item * a.size
    size = int((budget_bytes - fixed) // per_item)
    if size >= multiple:
        return size - size % multiple
    return 2 ** int(math.log2(size)) if size >= 1 else 0


def chunks_that_fit(plan: Callable[[int], PhasePlan], budget_bytes: int, start: int, multiple: int = 8) -> int:
    """The largest size of a phase that fits ``budget_bytes``, checked: the affine prediction from the
    plans at ``start`` and ``2 * start`` (:func:`largest_fitting_size`), planned and lowered by
    ``multiple`` (below it: halved) until it fits; 0 when not even size 1 fits."""
    size = largest_fitting_size(plan(start), plan(2 * start), budget_bytes, multiple)
    while size >= 1:
        if plan(size).fits(budget_bytes):
            return size
        size = size - multiple if size > multiple else size // 2
    return 0


def image_shape(config: Any) -> tuple[int, int, int]:
    """(C, H, W) of the images of a density (``HVAEConfig``) or VAE (``VAEConfig``: fixed 64 x 64) config."""
    size = getattr(config, "image_size", VAE_IMAGE_SIZE)
    return config.channels, size, size
