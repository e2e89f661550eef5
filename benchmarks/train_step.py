"""Throughput and peak memory of one training step of a density model, as ``sdn.training`` runs it.

One step = forward (bf16 autocast on CUDA), backward, gradient norm (+ optional clipping) and an
Adamax update, on random uint8 images of the config's shape; the median over timed steps is
reported as images/second. Memory is the peak allocated CUDA memory on GPU, the process's peak
resident set size on CPU (which includes the Python/torch baseline, printed separately).

    python benchmarks/train_step.py --model sdn --config embedded           # GPU+AMP if available
    python benchmarks/train_step.py --model cnn --config embedded --device cpu --steps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdn.distributed import resolve_device  # noqa: E402
from sdn.seeding import seed_everything  # noqa: E402
from sdn.training import forward_backward, grad_norm_and_clip  # noqa: E402


def _load_configs():
    import baselines  # noqa: F401  (registers the decoder blocks)
    from sdn.models.hvae import build_hvae, get_config

    return get_config, build_hvae


def _peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def optimizer_step(model: torch.nn.Module, images: torch.Tensor, optimizer: torch.optim.Optimizer,
                   precision: str, scaler: torch.amp.GradScaler | None) -> dict[str, torch.Tensor]:
    """One training step as the trainer takes it (forward/backward under ``precision``, unscale,
    grad norm, scaler or plain update), without its bookkeeping; returns the model's outputs."""
    optimizer.zero_grad(set_to_none=True)
    out = forward_backward(model, images, precision, scaler)
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm_and_clip(model.parameters(), None)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return out


def benchmark(model_name: str, config_name: str, batch_size: int, device_name: str,
              steps: int, warmup: int, precision: str, seed: int, lr: float = 0.01) -> dict[str, float | int | str]:
    """Time ``steps`` training steps after ``warmup`` ones; return the measurements."""
    get_config, build_hvae = _load_configs()
    config = get_config(config_name, seed=seed)
    device = resolve_device(device_name)
    batch = batch_size
    seed_everything(seed)
    baseline_rss = _peak_rss_mib()
    model = build_hvae(config, model_name).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adamax(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, config.channels, config.image_size, config.image_size),
                           dtype=torch.uint8, generator=generator).to(device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        out = optimizer_step(model, images, optimizer, precision, scaler)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - began
        if not torch.isfinite(out["loss"]).item():
            raise RuntimeError(f"non-finite loss {out['loss'].item()} in the benchmark step")
        return elapsed

    model.train()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [step() for _ in range(steps)]
    median = statistics.median(times)
    result: dict[str, float | int | str] = {
        "model": model_name, "config": config_name, "device": str(device), "precision": precision,
        "batch_size": batch, "image_shape": f"{config.channels}x{config.image_size}x{config.image_size}",
        "threads": torch.get_num_threads(), "params": sum(p.numel() for p in model.parameters()),
        "step_s_median": median, "step_s_min": min(times), "images_per_s": batch / median,
    }
    if device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        result["peak_rss_mib"] = _peak_rss_mib()
        result["baseline_rss_mib"] = baseline_rss
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sdn", help="registered model name, e.g. sdn or cnn")
    parser.add_argument("--config", default="embedded", help="preset name for sdn.models.hvae.get_config")
    parser.add_argument("--batch-size", type=int, default=32, help="per-device batch")
    parser.add_argument("--lr", type=float, default=0.01, help="Adamax learning rate (the embedded study's)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = benchmark(args.model, args.config, args.batch_size, args.device, args.steps, args.warmup,
                       args.precision or ("bf16" if resolve_device(args.device).type == "cuda" else "fp32"), args.seed,
                       args.lr)
    width = max(len(k) for k in result)
    for key, value in result.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
