"""Side-by-side speed of the SDN correction stage: naive in-place line loop vs ``sdn.layers``.

Both run the same sweeps with the same GRUCell weights. Timings alternate between the two
implementations, are repeated, and the median is printed with the speed-up ratio; memory is the
bytes autograd saves for the backward (on CUDA, also the peak allocated memory).

    python benchmarks/sdn_layer.py              # full grid (B=32, F∈{32,64}, 8/16/32, 2/4 dirs)
    python benchmarks/sdn_layer.py --quick      # the target size only
    python benchmarks/sdn_layer.py --sweep triton --device cuda   # the Triton kernels as "library"

``--sweep`` picks the library's sweep (``SDN_SWEEP``: auto = Triton on CUDA, plain on CPU). On CPU
the plain sweep stays: the only other candidate, the Triton kernels, runs on CPU in Triton's
interpreter, thousands of times slower (``python benchmarks/sweep_gpu.py --tiny`` shows it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from sdn.layers import DirectionalSweep, _run_sweeps

DIRS = {2: ["left_right", "top_down"], 4: ["left_right", "right_left", "top_down", "bottom_up"]}


def inplace_loop(x: torch.Tensor, sweeps) -> torch.Tensor:
    """The official code's approach: a channels-last map, every updated line written in place.

    Like djordjemila/sdn, each step pads the previous line with zeros, concatenates, reshapes,
    clones the hidden line and assigns the GRU output back into the map (but with the correct
    line count on non-square maps).
    """
    x = x.contiguous(memory_format=torch.channels_last).clone()
    batch, feat, height, width = x.shape
    for sweep in sweeps:
        rows = sweep.direction in ("top_down", "bottom_up")
        size = height if rows else width
        reverse = sweep.direction in ("right_left", "bottom_up")
        zero_pad = torch.zeros(batch, feat, 1, dtype=x.dtype, device=x.device)
        for d in (range(size - 2, -1, -1) if reverse else range(1, size)):
            p = d + 1 if reverse else d - 1
            prev = x[:, :, p, :] if rows else x[:, :, :, p]
            hid = x[:, :, d, :] if rows else x[:, :, :, d]
            nb = torch.cat([zero_pad, prev, zero_pad], dim=2).transpose(1, 2)
            inp = torch.cat([nb[:, :-2].reshape(-1, feat), nb[:, 1:-1].reshape(-1, feat),
                             nb[:, 2:].reshape(-1, feat)], dim=1)
            new = sweep.cell(inp, hid.transpose(1, 2).reshape(-1, feat).clone())
            new = new.reshape(batch, -1, feat).transpose(1, 2)
            if rows:
                x[:, :, d, :] = new
            else:
                x[:, :, :, d] = new
    return x.contiguous()


def library(x: torch.Tensor, sweeps) -> torch.Tensor:
    return _run_sweeps(x, sweeps)


class SavedBytes:
    """Counts the bytes autograd saves for the backward pass."""

    def __init__(self) -> None:
        self.total = 0

    def pack(self, t: torch.Tensor):
        self.total += t.numel() * t.element_size()
        return t


def run_once(impl, x, sweeps, backward: bool, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    if backward:
        y = impl(x, sweeps)
        y.backward(torch.ones_like(y))
    else:
        with torch.no_grad():
            impl(x, sweeps)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(batch, feat, size, ndirs, repeats, device):
    torch.manual_seed(0)
    sweeps = torch.nn.ModuleList(DirectionalSweep(feat, d) for d in DIRS[ndirs]).to(device)
    x = torch.randn(batch, feat, size, size, device=device, requires_grad=True)
    impls = {"inplace": inplace_loop, "library": library}
    # equality check of outputs and input gradients
    outs = {}
    for name, impl in impls.items():
        x.grad = None
        y = impl(x, sweeps)
        y.backward(torch.ones_like(y))
        outs[name] = (y.detach(), x.grad.clone())
    max_diff = max((outs["inplace"][i] - outs["library"][i]).abs().max().item() for i in (0, 1))
    times = {(n, b): [] for n in impls for b in (False, True)}
    for _ in range(repeats):  # alternate implementations inside each repeat
        for backward in (False, True):
            for name, impl in impls.items():
                times[(name, backward)].append(run_once(impl, x, sweeps, backward, device))
    saved, peak = {}, {}
    for name, impl in impls.items():
        counter = SavedBytes()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            y = impl(x, sweeps)
        y.backward(torch.ones_like(y))
        saved[name] = counter.total / 2**20
        peak[name] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    med = {k: statistics.median(v) for k, v in times.items()}
    return med, saved, peak, max_diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only B=32, F=64, 32x32, 2 dirs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sweep", choices=["auto", "plain", "triton"], default="auto",
                        help="the library's sweep implementation (SDN_SWEEP)")
    args = parser.parse_args()
    os.environ["SDN_SWEEP"] = args.sweep
    torch.set_num_threads(args.threads)
    grid = [(32, 64, 32, 2)] if args.quick else [
        (32, f, s, d) for f in (32, 64) for s in (8, 16, 32) for d in (2, 4)
    ]
    print(f"device={args.device} sweep={args.sweep} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} "
          f"repeats={args.repeats} (median, alternating)")
    header = (f"{'B':>3} {'F':>3} {'map':>6} {'dirs':>4} | {'fwd inplace':>11} {'fwd lib':>9} "
              f"{'x':>5} | {'f+b inplace':>11} {'f+b lib':>9} {'x':>5} | "
              f"{'saved MiB in/lib':>16} | {'peak MiB in/lib':>15} | {'max|diff|':>9}")
    print(header)
    print("-" * len(header))
    for batch, feat, size, ndirs in grid:
        med, saved, peak, diff = measure(batch, feat, size, ndirs, args.repeats, args.device)
        fi, fl = med[("inplace", False)], med[("library", False)]
        bi, bl = med[("inplace", True)], med[("library", True)]
        print(f"{batch:>3} {feat:>3} {size:>3}x{size:<2} {ndirs:>4} | {fi:>10.4f}s {fl:>8.4f}s "
              f"{fi / fl:>4.2f}x | {bi:>10.4f}s {bl:>8.4f}s {bi / bl:>4.2f}x | "
              f"{saved['inplace']:>7.1f}/{saved['library']:<8.1f} | "
              f"{peak['inplace']:>7.1f}/{peak['library']:<7.1f} | {diff:>9.2e}", flush=True)


if __name__ == "__main__":
    main()
