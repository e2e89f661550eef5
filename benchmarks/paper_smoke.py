"""GPU smoke test of the paper study: every run of ``params-paper.yaml`` built and stepped through the real trainer.

Why: the paper study needs days of GPU time, so before launching it one wants to know, in minutes,
that every paper config builds at full size, trains with the paper's precision and per-GPU batch
under DistributedDataParallel without errors (unused parameters, fp16 overflows that never
recover, missing deterministic kernels, out-of-memory), and what the whole study will cost.

What: for one run per (family, dataset, model) of the study (seeds share the cost), build the model
with ``Study.build_model``, take the run's ``TrainConfig`` from ``Study.train_config`` (steps, global
batch, precision), and call ``sdn.training.train`` for ``--warmup + --steps`` steps at the per-GPU
batch on synthetic uint8 images of the config's shape, as a one-rank DDP job (env:// rendezvous on
127.0.0.1; nccl on CUDA, gloo on CPU). A callback times the steps after the warm-up. One table
row per run: median step time, images/s per GPU, peak memory, and the estimated GPU-hours of the
full run, steps x (global batch / per-GPU batch) x median step time, i.e. total GPU time
assuming perfect data-parallel scaling.

The torchrun environment of one rank makes ``sdn.distributed.setup_distributed`` start a process
group and the trainer wrap the model in DistributedDataParallel (see :func:`one_rank_ddp`): the
timed step includes DDP's gradient all-reduce hooks and the trainer's rank reductions, as on 8 GPUs.

On CPU (``--tiny``, the default there) the same code runs on tiny versions of every config (the
architecture fields of ``sdn.models.hvae`` preset "tiny", a narrow SDN for the VAE, per-GPU batch 2); the test
suite runs it (tests/test_paper_smoke.py). Its timings and estimates say nothing about the paper.

    python benchmarks/paper_smoke.py --device cuda --json paper_smoke.json   # full size, on a GPU
    python benchmarks/paper_smoke.py --device cpu                            # tiny configs, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_step import _peak_rss_mib  # noqa: E402
from pipelines.families import families  # noqa: E402
from pipelines.study import Run, Study, load_study, validate  # noqa: E402
from sdn import training  # noqa: E402
from sdn.callbacks import Callback  # noqa: E402
from sdn.distributed import resolve_device  # noqa: E402
from sdn.models.hvae import PRESETS as HVAE_PRESETS  # noqa: E402
from sdn.models.vanilla_vae import IMAGE_SIZE as VAE_IMAGE_SIZE  # noqa: E402
from sdn.seeding import seed_everything  # noqa: E402

DEFAULT_PARAMS = ROOT / "params-paper.yaml"
TINY_BATCH = 2  # per-GPU batch of the tiny configs
# GPUs of the official runs: the density scripts trained data-parallel on 8 GPUs, the 3DShapes script
# on one. A run's per-GPU batch is its (global) train batch_size over this count.
OFFICIAL_GPUS = {"density": 8, "disentanglement": 1}
# Architecture fields taken from the "tiny" density preset; the rest (channels, bits, SDN
# directions) stays the paper config's.
TINY_DENSITY_FIELDS = ("image_size", "depth", "ds_list", "h_size", "z_size", "iaf_context", "sdn_max_scale",
                       "sdn_nfeat_0", "sdn_nfeat_diff", "mixtures")
TINY_VAE = {"sdn_features": 8}  # the VAE's image size (64) and encoder are fixed; only the SDN narrows
CAPTION = ("Estimated GPU-hours = run steps x (global batch / per-GPU batch) x median step time / 3600: "
           "the total GPU time of one seed of the run, assuming perfect data-parallel scaling "
           "(wall-clock hours on the official GPU count = GPU-hours / GPUs).")


@dataclasses.dataclass
class Row:
    """The measurements of one paper run (one table row, one JSON object)."""

    config: str
    family: str
    model: str
    precision: str
    per_gpu_batch: int
    params: int
    step_s: float  # median over the timed steps
    images_per_s: float  # per GPU
    peak_mib: float
    memory: str  # "cuda" (max allocated) or "rss" (process peak resident set, monotone over runs)
    steps: int  # of the full run
    global_batch: int
    official_gpus: int
    gpu_hours: float
    timed_steps: int
    world_size: int
    ddp: bool
    device: str
    tiny: bool
    loss: float


class StepTimer(Callback):
    """Wall-clock time of every trainer step after ``warmup`` (needs ``log_every=1``); CUDA is
    synchronised before the clock is read, so a step's time includes its kernels."""

    def __init__(self, device: torch.device, warmup: int) -> None:
        self.device, self.warmup = device, warmup
        self.info: dict[str, Any] = {}
        self.times: list[float] = []
        self.metrics: dict[str, float] = {}
        self._last = 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def on_train_start(self, info: dict[str, Any]) -> None:
        """Keep the trainer's run info (world size, parameter count) and start the clock."""
        self.info = dict(info)
        self._last = self._now()

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        """Record the time since the previous step, unless ``step`` is a warm-up step."""
        now = self._now()
        if step > self.warmup:
            self.times.append(now - self._last)
        self._last, self.metrics = now, dict(metrics)


class SyntheticImages(Dataset):
    """``count`` random uint8 images of ``shape`` (binary 0/255 when ``binary``), items ``(image, empty)``."""

    def __init__(self, shape: tuple[int, int, int], count: int, binary: bool, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (count, *shape), dtype=torch.uint8, generator=generator)
        self.images = (images >= 128).to(torch.uint8) * 255 if binary else images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], torch.empty(0)


def image_shape(config: Any) -> tuple[int, int, int]:
    """(C, H, W) of a density (``HVAEConfig``) or VAE (``VAEConfig``, fixed 64x64) config."""
    size = getattr(config, "image_size", VAE_IMAGE_SIZE)
    return config.channels, size, size


def tiny_study(study: Study) -> Study:
    """The study with every model shrunk (per-model overrides, so they win) and per-GPU batch 2, validated."""
    tiny = HVAE_PRESETS["tiny"]
    shrink = {"density": {f: getattr(tiny, f) for f in TINY_DENSITY_FIELDS}, "disentanglement": dict(TINY_VAE)}
    params = json.loads(json.dumps(study.params))  # a deep, plain copy
    for family, fields in shrink.items():
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
        for dataset in study.datasets(family):
            models = params[family][dataset]["models"]
            for model in study.models(family):
                models[model] = {**(models[model] or {}), **fields}
            params[family][dataset]["train"]["batch_size"] = TINY_BATCH * OFFICIAL_GPUS[family]
    return validate(params)


def paper_runs(study: Study, configs: Sequence[str] | None = None) -> list[Run]:
    """One run per (family, dataset, model), the first seed's, optionally only the ``configs`` datasets."""
    first = study.seeds[0]
    return [r for r in study.runs() if r.seed == first and (not configs or r.dataset in configs)]


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the block, restoring the previous values afterwards."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def one_rank_ddp() -> Iterator[None]:
    """A torchrun-like one-rank job for ``sdn.training.train`` inside the block.

    Sets MASTER_ADDR/MASTER_PORT/RANK/LOCAL_RANK/WORLD_SIZE as torchrun does: the trainer's
    ``setup_distributed`` then starts the process group (nccl on CUDA, gloo on CPU) and wraps the
    model in DistributedDataParallel. The group is destroyed afterwards, so the next run can start
    its own.
    """
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1"}
    with _environment(env):
        try:
            yield
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def _reset_memory(device: torch.device) -> None:
    """Free the previous run's memory and restart CUDA's peak counter."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float:
    """Peak allocated CUDA memory since the last reset, or the process's peak RSS on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _peak_rss_mib()


def per_gpu_batch(family: str, train_config: training.TrainConfig) -> int:
    """The per-GPU batch of a run: its global train batch over the official GPU count."""
    gpus = OFFICIAL_GPUS[family]
    if train_config.batch_size % gpus:
        raise ValueError(f"the {family} train batch_size {train_config.batch_size} is not a multiple of the "
                         f"official {gpus} GPUs")
    return train_config.batch_size // gpus


def gpu_hours(steps: int, global_batch: int, per_gpu_batch: int, step_s: float) -> float:
    """Total GPU time (hours) of ``steps`` steps at ``global_batch``, each GPU doing ``per_gpu_batch``
    images in ``step_s`` seconds (perfect data-parallel scaling)."""
    return steps * (global_batch / per_gpu_batch) * step_s / 3600


def smoke_run(study: Study, run: Run, device: torch.device, steps: int, warmup: int, tiny: bool) -> Row:
    """Build ``run``'s model and train it ``warmup + steps`` steps at its per-GPU batch under one-rank DDP."""
    config = study.model_config(run)
    paper = study.train_config(run)
    batch, total = per_gpu_batch(run.family, paper), warmup + steps
    smoke = dataclasses.replace(paper, steps=total, batch_size=batch, log_every=1, checkpoint_every=total,
                                eval_every=None, keep_best=None, progress=False, device=device.type)
    _reset_memory(device)
    seed_everything(run.seed, deterministic=paper.deterministic)
    model = study.build_model(run)
    data = SyntheticImages(image_shape(config), batch * total, getattr(config, "likelihood", "") == "bernoulli")
    timer = StepTimer(device, warmup)
    with one_rank_ddp():
        training.train(model, data, smoke, checkpoint_dir=None, callbacks=[timer], resume=False)
    step_s = statistics.median(timer.times)
    row = Row(
        config=run.dataset, family=run.family, model=run.model, precision=smoke.precision, per_gpu_batch=batch,
        params=timer.info["num_parameters"], step_s=step_s, images_per_s=batch / step_s, peak_mib=_peak_mib(device),
        memory="cuda" if device.type == "cuda" else "rss", steps=paper.steps, global_batch=paper.batch_size,
        official_gpus=OFFICIAL_GPUS[run.family],
        gpu_hours=gpu_hours(paper.steps, paper.batch_size, batch, step_s), timed_steps=len(timer.times),
        world_size=timer.info["world_size"], ddp=timer.info["distributed"],
        device=str(device), tiny=tiny, loss=timer.metrics["loss"],
    )
    del model
    return row


COLUMNS = (  # header, Row field, format
    ("config", "config", "{}"), ("model", "model", "{}"), ("prec", "precision", "{}"),
    ("batch/GPU", "per_gpu_batch", "{}"), ("params", "params", "{:,}"), ("step s", "step_s", "{:.4f}"),
    ("img/s/GPU", "images_per_s", "{:.1f}"), ("peak MiB", "peak_mib", "{:.0f}"), ("run steps", "steps", "{:,}"),
    ("global batch", "global_batch", "{}"), ("GPUs", "official_gpus", "{}"), ("GPU-h", "gpu_hours", "{:.1f}"),
)


def format_table(rows: Sequence[Row], device: torch.device, tiny: bool) -> str:
    """The results as an aligned text table under a caption."""
    cells = [[header for header, _, _ in COLUMNS]]
    cells += [[fmt.format(getattr(row, field)) for _, field, fmt in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    memory = "max allocated CUDA memory" if device.type == "cuda" else "peak RSS of this process (monotone over runs)"
    caption = [f"Paper smoke on {device}: one-rank DDP, median of the timed steps; peak MiB = {memory}.", CAPTION]
    if tiny:
        caption.append("TINY configs: their timings and estimates say nothing about the paper runs.")
    return "\n".join([*caption, lines[0], "-" * len(lines[0]), *lines[1:]])


def run_all(study: Study, runs: Sequence[Run], device: torch.device, steps: int, warmup: int,
            tiny: bool) -> tuple[list[Row], list[dict[str, str]]]:
    """Smoke every run with a progress line each; a failing run is recorded and the others still run."""
    rows: list[Row] = []
    failed: list[dict[str, str]] = []
    for index, run in enumerate(runs, 1):
        name = f"[{index}/{len(runs)}] {run.dataset}/{run.model}"
        print(f"{name} ...", file=sys.stderr, flush=True)
        try:
            rows.append(smoke_run(study, run, device, steps, warmup, tiny))
        except Exception as error:  # report every run, then fail at the end
            failed.append({"config": run.dataset, "model": run.model, "error": f"{type(error).__name__}: {error}"})
            print(f"{name} FAILED: {failed[-1]['error']}", file=sys.stderr, flush=True)
        else:
            print(f"{name}: {rows[-1].step_s:.4f} s/step, {rows[-1].peak_mib:.0f} MiB", file=sys.stderr, flush=True)
    return rows, failed


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (``--tiny`` defaults to on for CPU, off for CUDA)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=None,
                        help="shrink every config (default: on for CPU, off for CUDA)")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="the study (default: params-paper.yaml)")
    parser.add_argument("--configs", nargs="+", default=None, metavar="DATASET",
                        help="only these datasets of the study (e.g. cifar10 shapes3d); default: all")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: 1 for tiny CPU runs, else torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the smoke; 0 if every run trained, 1 if some failed, 2 if the device is unusable."""
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"paper_smoke: --device cuda, but CUDA is not available (torch {torch.__version__}, built for CUDA "
              f"{torch.version.cuda}); use --device cpu for the tiny configs", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    tiny = device.type == "cpu" if args.tiny is None else args.tiny
    if args.threads or (tiny and device.type == "cpu"):
        torch.set_num_threads(args.threads or 1)
    study = load_study(args.params)
    unknown = sorted(set(args.configs or ()) - {d for family in families() for d in study.datasets(family)})
    if unknown:
        print(f"paper_smoke: --configs {unknown} are not datasets of {args.params}", file=sys.stderr)
        return 2
    study = tiny_study(study) if tiny else study
    rows, failed = run_all(study, paper_runs(study, args.configs), device, args.steps, args.warmup, tiny)
    print(format_table(rows, device, tiny))
    for failure in failed:
        print(f"FAILED {failure['config']}/{failure['model']}: {failure['error']}")
    if args.json:
        payload = {"device": str(device), "tiny": tiny, "caption": CAPTION,
                   "rows": [dataclasses.asdict(r) for r in rows], "failed": failed}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
