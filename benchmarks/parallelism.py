"""How to use two CPU cores for the embedded study's training runs, measured with the real trainer.

Contenders, each training the embedded study's models with ``sdn.training.train`` (same global
batch, EMA and validation off, random data of the study's shape):

* ``1 proc x 1 thread``   — the reference;
* ``1 proc x 2 threads``  — intra-op parallelism (what ``study.launcher: python`` does);
* ``2 DDP ranks x 1``     — ``torchrun --nproc_per_node=2`` (``study.launcher``), half the batch per rank;
* ``2 runs at once x 1``  — two independent 1-thread trainings side by side (two stages at once):
  the figure is the time per run, i.e. half the wall time of the pair.

Each contender runs in fresh processes, the contenders alternate ``--repeats`` times, and the
median wall time of the training loop is printed as ms per step (model building and process start
excluded: ``train`` is timed between two barriers), with the speed-up over 1 x 1. ``--channels-last``
adds the 2-thread contender with channels-last weights and inputs (it pays off for the VAE's 64x64
convolutions, not for the 16x16 density model). ``--profile`` prints the top operators of one
2-thread step. Measure on an idle machine: anything else running skews the 2-thread figures most.

    python benchmarks/parallelism.py                         # density models and the VAE decoders
    python benchmarks/parallelism.py --family vae --steps 20 --repeats 5 --channels-last
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# name -> (launcher prefix, threads per process, concurrent copies, channels_last)
CONTENDERS = {
    "1 proc x 1 thread": ([sys.executable], 1, 1, False),
    "1 proc x 2 threads": ([sys.executable], 2, 1, False),
    "2 DDP ranks x 1": (TORCHRUN, 1, 1, False),
    "2 runs at once x 1": ([sys.executable], 1, 2, False),
}
CHANNELS_LAST = {"1 proc x 2 threads, channels-last": ([sys.executable], 2, 1, True)}
MODELS = {"density": ("sdn", "cnn", "cnn_matched"), "vae": ("cnn", "sdn")}
BATCH = {"density": 32, "vae": 64}


def _model_and_data(family: str, model_name: str, num: int, seed: int):
    """The embedded study's model (the library's ``embedded`` configs) and random data of its shape."""
    import torch

    from sdn.seeding import seed_everything

    seed_everything(seed)
    if family == "density":
        import baselines  # noqa: F401  (registers the decoder blocks)
        from sdn.models.hvae import build_hvae, get_config

        config = get_config("embedded", seed=seed)  # weights as seed_everything(seed) gave them before
        model = build_hvae(config, model_name)
        shape = (config.channels, config.image_size, config.image_size)
        images = torch.randint(0, 256, (num, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    else:
        from sdn.models.vanilla_vae import IMAGE_SIZE, build_vanilla_vae, get_config

        model = build_vanilla_vae(get_config("embedded", seed=seed), model_name)
        images = (torch.rand(num, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed)) < 0.1)
        images = images.to(torch.uint8) * 255
    return model, torch.utils.data.TensorDataset(images)


def worker(args: argparse.Namespace) -> None:
    """One contender's run (every rank under torchrun): print {"seconds": ...} from rank 0."""
    import torch

    torch.set_num_threads(args.threads)
    from sdn.distributed import barrier, setup_distributed
    from sdn.training import TrainConfig, train

    model, dataset = _model_and_data(args.family, args.model, args.batch_size * (args.steps + 1), 0)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, ema_decay=None, checkpoint_every=10**9,
                         log_every=args.steps, device="cpu", progress=False, channels_last=args.channels_last)
    ctx = setup_distributed("cpu")  # idempotent: train() reuses the process group
    with tempfile.TemporaryDirectory() as tmp:
        barrier(ctx)
        began = time.perf_counter()
        train(model, dataset, config, Path(tmp))
        barrier(ctx)
        seconds = time.perf_counter() - began
    if ctx.is_main:
        print(json.dumps({"seconds": seconds}))


def _time_contender(args: argparse.Namespace, model: str, launcher: list[str], threads: int, copies: int,
                    channels_last: bool) -> float:
    """Seconds per run of one contender (for concurrent copies: the pair's wall time / copies)."""
    command = [*launcher, str(Path(__file__).resolve()), "--worker", "--family", args.family, "--model", model,
               "--threads", str(threads), "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    if channels_last:
        command.append("--channels-last")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(copies)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"benchmark worker failed: {' '.join(command)}")
    # Copies run side by side: the slower one's training loop, shared by the runs it finished.
    return max(json.loads(out.strip().splitlines()[-1])["seconds"] for out in outs) / copies


def profile(family: str, model_name: str, batch_size: int, steps: int) -> None:
    """Top operators of the train step at 2 threads, by self CPU time."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from sdn.training import forward_backward

    torch.set_num_threads(2)
    model, dataset = _model_and_data(family, model_name, batch_size, 0)
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-3)
    images = dataset.tensors[0]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward_backward(model, images, precision="fp32")
        optimizer.step()

    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    print(f"\nprofile of the {family} {model_name} train step (2 threads, batch {batch_size}, {steps} steps):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("density", "vae", "both"), default="both")
    parser.add_argument("--models", nargs="+", help="default: every model of the family")
    parser.add_argument("--batch-size", type=int, help="global batch (split over ranks); default: the study's")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--channels-last", action="store_true", help="add the channels-last 2-thread contender")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="sdn", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    families = ("density", "vae") if args.family == "both" else (args.family,)
    contenders = {**CONTENDERS, **(CHANNELS_LAST if args.channels_last else {})}
    for family in families:
        run = argparse.Namespace(**vars(args))
        run.family, run.batch_size = family, args.batch_size or BATCH[family]
        print(f"\n{family}: training-loop wall time, median of {args.repeats} alternated runs, {args.steps} steps "
              f"of global batch {run.batch_size}; ms/step (speed-up over 1 x 1)")
        print(f"{'model':<12}" + "".join(f"{name:>36}" for name in contenders))
        for model in args.models or MODELS[family]:
            times: dict[str, list[float]] = {name: [] for name in contenders}
            for _ in range(args.repeats):
                for name, spec in contenders.items():
                    times[name].append(_time_contender(run, model, *spec))
            medians = {name: statistics.median(values) for name, values in times.items()}
            reference = medians["1 proc x 1 thread"]
            cells = "".join(f"{medians[n] / args.steps * 1e3:>26.1f} ms ({reference / medians[n]:.2f}x)"
                            for n in contenders)
            print(f"{model:<12}{cells}   best: {min(medians, key=medians.get)}", flush=True)
        if args.profile:
            for model in args.models or MODELS[family]:
                profile(family, model, run.batch_size, min(args.steps, 10))


if __name__ == "__main__":
    main()
