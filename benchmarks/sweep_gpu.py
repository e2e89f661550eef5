"""The prepared GPU measurement of the SDN sweep (≤ 10 minutes on one H100/H200), side by side.

Part 1, the sweep stage at the CIFAR size (B=32, F=360, 32×32, 2 directions): the official-style
in-place line loop (``benchmarks/sdn_layer.py``: GRUCell per line, lines written into the map),
the plain sweep (``sdn.sweep``) and the persistent Triton kernels (``sdn.sweep_triton``), in fp32
and under fp16 autocast (the official ``--amp``): forward (no grad) and forward+backward seconds
(median of timed repeats), peak allocated memory, CUDA kernels per forward+backward (profiler),
and the agreement of output and input gradient with the plain fp32 sweep.

Part 2, one training step of the CIFAR-10 SDN-VAE and CNN at per-GPU batch 32 in the paper's
precision (SDN: fp16 autocast + GradScaler, as the official ``--amp`` runs; CNN: fp32, as the
official CNN line): images/s, CUDA kernels per step (torch.profiler), peak reserved memory.

    python benchmarks/sweep_gpu.py                 # on a GPU
    python benchmarks/sweep_gpu.py --tiny          # tiny shapes, any device (a smoke test)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402,F401  (registers the decoder blocks)
from sdn_layer import inplace_loop  # noqa: E402  (the official-style loop, one copy)
from train_step import optimizer_step  # noqa: E402  (the trainer's step, one copy)
from sdn.layers import DirectionalSweep, _run_sweeps  # noqa: E402
from sdn.models.hvae import build_hvae, get_config  # noqa: E402

DIRECTIONS = ["left_right", "top_down"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[precision])


def _sweep_impl(name: str):
    """A function (x, sweeps) -> y for one implementation of the correction stage."""
    if name == "inplace":
        return inplace_loop

    def run(x, sweeps):
        os.environ["SDN_SWEEP"] = name
        return _run_sweeps(x, sweeps)

    return run


def _kernel_count(fn, device: torch.device) -> int:
    """CUDA kernels launched by ``fn()`` (torch.profiler); -1 off CUDA."""
    if device.type != "cuda":
        return -1
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(device)
    return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")


def sweep_stage(batch: int, feat: int, size: int, repeats: int, device: torch.device,
                impls: list[str]) -> None:
    torch.manual_seed(0)
    sweeps = torch.nn.ModuleList(DirectionalSweep(feat, d) for d in DIRECTIONS).to(device)
    x0 = torch.randn(batch, feat, size, size, device=device)
    grad_out = torch.randn_like(x0)
    print(f"\n## sweep stage: B={batch} F={feat} {size}x{size} dirs={DIRECTIONS} "
          f"device={_device_name(device)} repeats={repeats} (median)")
    header = (f"{'impl':<8} {'prec':<5} | {'fwd s':>8} {'f+b s':>8} | {'x inplace f+b':>13} | "
              f"{'peak MiB':>9} | {'kernels f+b':>11} | {'max|dy|':>8} {'max|dx|':>8}")
    print(header)
    print("-" * len(header))
    reference = None
    baseline = {}
    for precision in ("fp32", "fp16"):
        for name in impls:
            impl = _sweep_impl(name)
            # under --amp the sweeps' input map is the fp16 output of a conv
            dtype = torch.float32 if precision == "fp32" else torch.float16
            x = x0.to(dtype).clone().requires_grad_(True)

            def fwd():
                with torch.no_grad(), _autocast(device, precision):
                    return impl(x, sweeps)

            def fwd_bwd():
                x.grad = None
                with _autocast(device, precision):
                    y = impl(x, sweeps)
                y.float().backward(grad_out.to(y.dtype).float())
                return y

            y = fwd_bwd()  # warm-up (Triton compiles here) and agreement
            _sync(device)
            result = (y.detach().float(), x.grad.detach().float())
            if reference is None:
                reference = result
            dy = (result[0] - reference[0]).abs().max().item()
            dx = (result[1] - reference[1]).abs().max().item()
            times = {"f": [], "fb": []}
            for _ in range(repeats):
                for key, fn in (("f", fwd), ("fb", fwd_bwd)):
                    _sync(device)
                    start = time.perf_counter()
                    fn()
                    _sync(device)
                    times[key].append(time.perf_counter() - start)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                fwd_bwd()
                peak = torch.cuda.max_memory_allocated(device) / 2**20
            else:
                peak = float("nan")
            kernels = _kernel_count(fwd_bwd, device)
            f, fb = statistics.median(times["f"]), statistics.median(times["fb"])
            baseline.setdefault(precision, fb)
            print(f"{name:<8} {precision:<5} | {f:>8.4f} {fb:>8.4f} | "
                  f"{baseline[precision] / fb:>12.1f}x | {peak:>9.0f} | {kernels:>11} | "
                  f"{dy:>8.1e} {dx:>8.1e}", flush=True)


def train_step(config_name: str, model_name: str, sweep: str, precision: str, batch: int,
               steps: int, device: torch.device, **overrides) -> None:
    os.environ["SDN_SWEEP"] = sweep
    config = get_config(config_name, **overrides)
    torch.manual_seed(0)
    model = build_hvae(config, model_name).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adamax(model.parameters(), lr=2e-3)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    images = torch.randint(0, 256, (batch, config.channels, config.image_size, config.image_size),
                           dtype=torch.uint8, device=device)

    def step():
        optimizer_step(model, images, optimizer, precision, scaler)

    step()  # warm-up (compiles the kernels)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    kernels = _kernel_count(step, device)
    reserved = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else float("nan")
    median = statistics.median(times)
    label = model_name if model_name != "sdn" or sweep == "triton" else "sdn-plain-sweep"
    print(f"{config_name} {label:<16} {precision:<5} | {median:>7.3f} s | {batch / median:>8.1f} | "
          f"{kernels:>11} | {reserved:>9.2f}", flush=True)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes and the tiny model (a smoke test; any device)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--skip-plain-step", action="store_true",
                        help="no SDN train step with the plain sweep (the slowest row)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"torch={torch.__version__} device={_device_name(device)}")
    # off CUDA the Triton kernels would run in the (very slow) interpreter: left out
    impls = ["inplace", "plain"] + (["triton"] if device.type == "cuda" else [])
    if args.tiny:
        sweep_stage(2, 8, 6, 1, device, impls)
        config, batch, overrides = "tiny", 2, {}
        steps = 1
    else:
        sweep_stage(32, 360, 32, args.repeats, device, impls)
        config, batch, overrides = "cifar10", 32, {}
        steps = args.steps
    print(f"\n## train step: {config}, per-GPU batch {batch}, paper precision "
          f"(SDN fp16 + GradScaler, CNN fp32), Adamax, median of {steps}")
    print(f"{'config model':<24} {'prec':<5} | {'step':>9} | {'images/s':>8} | "
          f"{'kernels':>11} | {'reserved GiB':>9}")
    fast = "triton" if device.type == "cuda" else "plain"
    rows = [("sdn", fast, "fp16"), ("cnn", "plain", "fp32")]
    if not args.skip_plain_step and fast == "triton":
        rows.insert(1, ("sdn", "plain", "fp16"))
    for model_name, sweep, precision in rows:
        if device.type == "cpu" and precision == "fp16":
            precision = "bf16"  # fp16 autocast + GradScaler is a GPU setting
        train_step(config, model_name, sweep, precision, batch, steps, device, **overrides)


if __name__ == "__main__":
    main()
