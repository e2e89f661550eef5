"""GPU smoke of the paper study: every paper run, at its real per-GPU micro-batch and accumulation,
through the real trainer, evaluation, sampling, FID features and a checkpoint/resume.

Why: the paper study needs days of GPU time; before launching it one wants to know, in minutes, that
every paper config trains at its params' micro-batch and precision under DistributedDataParallel on
the GPUs at hand, that every later phase fits (validation, an importance-weighted chunk, a sampling
batch, an Inception feature batch), that a checkpoint resumes, and what the whole study will cost.

What, per (family, dataset, model) of the study (seeds share the cost), on synthetic uint8 images
of the config's shape:

* train: ``sdn.training.train`` with the run's ``TrainConfig`` (micro-batch, precision): ``--warmup``
  (>= 20: the fp16 GradScaler's first steps overflow) optimizer steps of one micro-batch per GPU,
  ending in a checkpoint; one step resumed from it (``resume`` = it restarted there); then
  1 + ``--steps`` optimizer steps at the global batch, i.e. at the real accumulation of
  batch / (GPUs x micro-batch) micro-batches per step, all but the first timed. (Warming up at the
  full accumulation would cost 8 x more: all runs would not fit 10 minutes of one H100.)
* validation: one ``sdn.scores.evaluate_bpd`` pass (K = 1) of two ``eval.batch_size`` batches;
* IW chunk: one ``eval.batch_size`` batch with as many samples per image as make one chunk of
  ``eval.iw_chunk_size`` image x sample pairs (``evaluate_bpd``);
* sampling: ``model.sample(samples.batch_size)`` (the FID sampling batch per GPU);
* FID features: torch-fidelity's Inception-v3 (untrained weights: only time and memory matter) on
  ``fid.batch_size`` images.

Memory per phase is ``torch.cuda.max_memory_reserved`` (what the allocator holds, the figure that
runs out), the cache emptied and the peak reset before each phase; ``fp16_skipped`` counts the
skipped (overflowed) fp16 steps among all steps. GPU-hours = run steps x median step time x GPUs.

With one GPU (or on CPU) the trainer runs as a one-rank DDP job (a torchrun-like environment); with
more GPUs and no torchrun environment the script relaunches itself under
``torch.distributed.run --standalone --nproc_per_node=<GPUs>``: every phase then runs on all ranks
(evaluation and sampling shard), and rank 0 prints the table.

On CPU (``--tiny``, the default there) the same code runs on tiny versions of every config
(tests/test_paper_smoke.py); its timings and estimates say nothing about the paper.

    python benchmarks/paper_smoke.py --device cuda --json paper_smoke.json   # full size: every GPU
    python benchmarks/paper_smoke.py --device cpu                            # tiny configs
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.memory_plan import paper_runs, run_sizes  # noqa: E402
from benchmarks.train_step import _peak_rss_mib  # noqa: E402
from pipelines.families import families  # noqa: E402
from pipelines.study import Run, Study, load_study, validate  # noqa: E402
from sdn import training  # noqa: E402
from sdn.callbacks import Callback  # noqa: E402
from sdn.distributed import resolve_device  # noqa: E402
from sdn.memory_plan import build_fid_inception, image_shape  # noqa: E402
from sdn.models.hvae import PRESETS as HVAE_PRESETS  # noqa: E402
from sdn.scores import evaluate_bpd  # noqa: E402
from sdn.seeding import seed_everything  # noqa: E402

DEFAULT_PARAMS = ROOT / "params-paper.yaml"
MIN_WARMUP = 20  # full size: the fp16 GradScaler starts at 2**16 and backs off over its first steps
PHASES = ("train", "validation", "iw_chunk", "sampling", "fid_features")
# Tiny configs: architecture fields of the "tiny" density preset (the rest stays the paper config's),
# a narrow SDN for the VAE, and small sizes that still accumulate (2 micro-batches of 2 per step).
TINY_DENSITY_FIELDS = ("image_size", "depth", "ds_list", "h_size", "z_size", "iaf_context", "sdn_max_scale",
                       "sdn_nfeat_0", "sdn_nfeat_diff", "mixtures")
TINY_VAE = {"sdn_features": 8}
TINY_MICRO, TINY_ACCUMULATION = 2, 2
TINY_EVAL = {"batch_size": 2, "iw_samples": 8, "iw_chunk_size": 4}


@dataclasses.dataclass
class Row:
    """The measurements of one paper run (one table row, one JSON object)."""

    config: str
    family: str
    model: str
    precision: str
    world_size: int
    micro_batch: int
    accumulation: int
    global_batch: int
    params: int
    step_s: float  # median over the timed optimizer steps
    images_per_s: float  # per GPU
    fp16_skipped: int  # over all steps, warm-up included
    memory_gib: dict[str, float | None]  # per phase: max reserved CUDA memory (CPU: peak RSS of the process)
    memory: str  # "cuda reserved" or "rss"
    resumed: bool
    steps: int  # of the full run
    gpu_hours: float
    timed_steps: int
    warmup: int
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
        self.skipped = 0  # fp16 steps skipped for a non-finite gradient or loss, warm-up included
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
        self.skipped += int(metrics.get("fp16_skipped", 0))
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


def tiny_study(study: Study) -> Study:
    """The study with every model shrunk (per-model overrides, so they win), micro-batch 2 with 2
    accumulation steps per GPU (density; the VAE: 1), and small evaluation sizes, validated."""
    tiny = HVAE_PRESETS["tiny"]
    shrink = {"density": {f: getattr(tiny, f) for f in TINY_DENSITY_FIELDS}, "disentanglement": dict(TINY_VAE)}
    params = json.loads(json.dumps(study.params))  # a deep, plain copy
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for family, fields in shrink.items():
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
        accumulation = TINY_ACCUMULATION if family == "density" else 1
        for dataset in study.datasets(family):
            section = params[family][dataset]
            for model in study.models(family):
                section["models"][model] = {**(section["models"][model] or {}), **fields}
            section["train"].update(batch_size=TINY_MICRO * accumulation * world, micro_batch_size=TINY_MICRO)
            if family == "density":
                section["eval"].update(TINY_EVAL)
                section["samples"]["batch_size"] = TINY_MICRO
    params["fid"]["batch_size"] = TINY_MICRO
    return validate(params)


def _reset_memory(device: torch.device) -> None:
    """Free the previous phase's memory and restart CUDA's peak counters."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    """Peak reserved CUDA memory since the last reset, or the process's peak RSS on CPU (GiB)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_reserved(device) / 2**30
    return _peak_rss_mib() / 1024


@contextmanager
def _phase(memory: dict[str, float | None], name: str, device: torch.device) -> Iterator[None]:
    """Record the peak memory of the block as phase ``name``."""
    _reset_memory(device)
    yield
    memory[name] = _peak_gib(device)


def smoke_run(study: Study, run: Run, device: torch.device, steps: int, warmup: int, tiny: bool) -> Row:
    """Every phase of ``run`` at its params sizes (module docstring); inside a process group."""
    config = study.model_config(run)
    paper = study.train_config(run)
    sizes = run_sizes(study, run)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = training.accumulation_steps(paper.batch_size, world, paper.micro_batch_size)
    micro_batch = paper.batch_size // (world * accumulation)
    # Warm-up: ``warmup`` optimizer steps of one micro-batch per GPU (the run's micro-batch, shapes and
    # precision: kernels, allocator and the fp16 scaler settle), ending in a checkpoint; one more step
    # resumed from it; then 1 + ``steps`` steps at the real accumulation, all but the first timed.
    warm = dataclasses.replace(paper, steps=warmup, batch_size=micro_batch * world, micro_batch_size=micro_batch,
                               log_every=1, checkpoint_every=warmup, eval_every=None, keep_best=None,
                               progress=False, device=device.type)
    timed = dataclasses.replace(warm, steps=1 + steps, batch_size=paper.batch_size,
                                micro_batch_size=paper.micro_batch_size, checkpoint_every=1 + steps)
    shape = image_shape(config)
    binary = getattr(config, "likelihood", "") == "bernoulli"
    memory: dict[str, float | None] = dict.fromkeys(PHASES)
    seed_everything(run.seed, deterministic=paper.deterministic)
    model = study.build_model(run)
    data = SyntheticImages(shape, 2 * paper.batch_size, binary)
    warm_timer, timer = StepTimer(device, warmup), StepTimer(device, 1)
    with _phase(memory, "train", device), tempfile.TemporaryDirectory() as checkpoint_dir:
        training.train(model, data, warm, checkpoint_dir=checkpoint_dir, callbacks=[warm_timer], resume=False)
        model = study.build_model(run)
        result = training.train(model, data, dataclasses.replace(warm, steps=warmup + 1),
                                checkpoint_dir=checkpoint_dir, resume=True)
        resumed = result.start_step == warmup and result.steps == warmup + 1
        model = result.model
        del result
        training.train(model, data, timed, checkpoint_dir=None, callbacks=[timer], resume=False)
    info, metrics, times = dict(timer.info), dict(timer.metrics), list(timer.times)
    skipped = warm_timer.skipped + timer.skipped
    eval_model = model.eval()
    del model
    if run.family == "density":
        evaluation = study.section(run).eval
        with _phase(memory, "validation", device):
            validation = SyntheticImages(shape, 2 * sizes.validation * world, binary, seed=1)
            evaluate_bpd(eval_model, validation, batch_size=sizes.validation, num_samples=1,
                         chunk_size=sizes.iw_chunk, seed=0, device=device, progress=False)
        with _phase(memory, "iw_chunk", device):
            # one evaluation batch whose image x sample pairs make one chunk (its features stay alive)
            images, samples = sizes.validation, max(1, min(evaluation.iw_samples, sizes.iw_chunk // sizes.validation))
            chunk = SyntheticImages(shape, images * world, binary, seed=2)
            evaluate_bpd(eval_model, chunk, batch_size=images, num_samples=samples, chunk_size=sizes.iw_chunk,
                         seed=0, device=device, progress=False)
    with _phase(memory, "sampling", device), torch.no_grad():
        eval_model.sample(sizes.sampling)
    del eval_model
    if sizes.fid_features:
        with _phase(memory, "fid_features", device), torch.no_grad(), \
                (torch.device(device) if device.type == "cuda" else nullcontext()):
            inception = build_fid_inception().to(device)
            inception(torch.randint(0, 256, (sizes.fid_features, 3, shape[1], shape[2]), dtype=torch.uint8,
                                    device=device))
            del inception
    step_s = statistics.median(times)
    return Row(
        config=run.dataset, family=run.family, model=run.model, precision=paper.precision, world_size=world,
        micro_batch=micro_batch, accumulation=accumulation, global_batch=paper.batch_size,
        params=info["num_parameters"], step_s=step_s,
        images_per_s=paper.batch_size / world / step_s, fp16_skipped=int(skipped), memory_gib=memory,
        memory="cuda reserved" if device.type == "cuda" else "rss", resumed=resumed, steps=paper.steps,
        gpu_hours=paper.steps * step_s * world / 3600, timed_steps=len(times), warmup=warmup,
        ddp=info["distributed"], device=str(device), tiny=tiny, loss=metrics["loss"],
    )


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


COLUMNS = (  # header, function of the row
    ("config", lambda r: r.config), ("model", lambda r: r.model), ("prec", lambda r: r.precision),
    ("GPUs", lambda r: str(r.world_size)), ("micro", lambda r: str(r.micro_batch)),
    ("accum", lambda r: str(r.accumulation)), ("step s", lambda r: f"{r.step_s:.3f}"),
    ("img/s/GPU", lambda r: f"{r.images_per_s:.1f}"), ("fp16 skipped", lambda r: str(r.fp16_skipped)),
    *((f"{p} GiB", (lambda p: lambda r: _gib(r.memory_gib[p]))(p)) for p in PHASES),
    ("resume", lambda r: "ok" if r.resumed else "FAILED"), ("GPU-h", lambda r: f"{r.gpu_hours:,.0f}"),
)


def format_table(rows: Sequence[Row], device: torch.device, tiny: bool, warmup: int, steps: int) -> str:
    """The results as one aligned text table under a caption."""
    cells = [[header for header, _ in COLUMNS]] + [[cell(row) for _, cell in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    memory = ("max reserved CUDA memory per phase" if device.type == "cuda"
              else "peak RSS of this process (monotone over runs and phases)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    caption = [f"Paper smoke on {name} ({device}): {warmup} warm-up steps (one micro-batch) + {steps} timed optimizer "
               f"steps (global batch, real accumulation) per run, "
               f"median step; GiB = {memory}.",
               "GPU-h = run steps x median step time x GPUs: one seed of the run, at this GPU count."]
    if tiny:
        caption.append("TINY configs: their timings and estimates say nothing about the paper runs.")
    return "\n".join([*caption, lines[0], "-" * len(lines[0]), *lines[1:]])


def run_all(study: Study, runs: Sequence[Run], device: torch.device, steps: int, warmup: int,
            tiny: bool) -> tuple[list[Row], list[dict[str, str]]]:
    """Smoke every run with a progress line each (rank 0); a failing run is recorded, the others still run."""
    rows: list[Row] = []
    failed: list[dict[str, str]] = []
    rank = int(os.environ.get("RANK", "0"))
    for index, run in enumerate(runs, 1):
        name = f"[{index}/{len(runs)}] {run.dataset}/{run.model}"
        if rank == 0:
            print(f"{name} ...", file=sys.stderr, flush=True)
        try:
            rows.append(smoke_run(study, run, device, steps, warmup, tiny))
        except Exception as error:  # report every run, then fail at the end
            failed.append({"config": run.dataset, "model": run.model, "error": f"{type(error).__name__}: {error}"})
            print(f"{name} FAILED (rank {rank}): {failed[-1]['error']}", file=sys.stderr, flush=True)
        else:
            if rank == 0:
                print(f"{name}: {rows[-1].step_s:.3f} s/step", file=sys.stderr, flush=True)
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
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per run (at the global batch)")
    parser.add_argument("--warmup", type=int, default=MIN_WARMUP,
                        help=f"untimed optimizer steps of one micro-batch before them (>= {MIN_WARMUP} at full size)")
    parser.add_argument("--gpus", type=int, default=None,
                        help="GPUs to use (default: all visible; >1 relaunches under torch.distributed.run)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: 1 for tiny CPU runs, else torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.tiny is False and args.warmup < MIN_WARMUP:
        parser.error(f"--warmup must be >= {MIN_WARMUP} at full size (the fp16 scaler's first steps overflow)")
    return args


def relaunch_on_all_gpus(argv: Sequence[str], gpus: int) -> int:
    """Run this script under ``torch.distributed.run`` with one rank per GPU; its exit status."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
               str(Path(__file__).resolve()), *argv]
    print(f"paper_smoke: {gpus} GPUs, relaunching: {' '.join(command)}", file=sys.stderr, flush=True)
    return subprocess.call(command)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the smoke; 0 if every run passed, 1 if some failed, 2 if the device is unusable."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"paper_smoke: --device cuda, but CUDA is not available (torch {torch.__version__}, built for CUDA "
              f"{torch.version.cuda}); use --device cpu for the tiny configs", file=sys.stderr)
        return 2
    launched = "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    device = resolve_device(args.device)
    if device.type == "cuda" and not launched:
        gpus = args.gpus or torch.cuda.device_count()
        if gpus > 1:
            return relaunch_on_all_gpus(argv, gpus)
    if launched and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    tiny = device.type == "cpu" if args.tiny is None else args.tiny
    if not tiny and args.warmup < MIN_WARMUP:
        print(f"paper_smoke: --warmup must be >= {MIN_WARMUP} at full size", file=sys.stderr)
        return 2
    if args.threads or (tiny and device.type == "cpu"):
        torch.set_num_threads(args.threads or 1)
    study = load_study(args.params)
    unknown = sorted(set(args.configs or ()) - {d for family in families() for d in study.datasets(family)})
    if unknown:
        print(f"paper_smoke: --configs {unknown} are not datasets of {args.params}", file=sys.stderr)
        return 2
    study = tiny_study(study) if tiny else study
    with nullcontext() if launched else one_rank_ddp():
        rows, failed = run_all(study, paper_runs(study, args.configs), device, args.steps, args.warmup, tiny)
    if int(os.environ.get("RANK", "0")) != 0:
        return 1 if failed else 0
    print(format_table(rows, device, tiny, args.warmup, args.steps))
    for failure in failed:
        print(f"FAILED {failure['config']}/{failure['model']}: {failure['error']}")
    if args.json:
        payload = {"device": str(device), "tiny": tiny, "rows": [dataclasses.asdict(r) for r in rows],
                   "failed": failed}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
