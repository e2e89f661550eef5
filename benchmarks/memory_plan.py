"""The memory plan of the paper study: peak GPU memory per phase of every paper run, planned on the meta device.

Why: the paper study needs GPUs for days; whether each of its phases fits a GPU, and which batch or
chunk sizes would, is known here in minutes on a CPU (``sdn.memory_plan``: nothing is allocated).

What: for every (family, dataset, model) of the study (seeds share the plan), one row per phase at the
size params-paper.yaml gives it:

* train      -- one step at ``train.micro_batch_size`` per GPU and the run's precision, with the
                parameters, gradients, Adamax state, EMA copy and DDP gradient buckets;
* validation -- the validation ELBO at ``eval.batch_size`` while the training state stays allocated;
* iw_chunk   -- one importance-weighted pass of ``eval.iw_chunk_size`` image x sample pairs;
* sampling   -- ``model.sample(samples.batch_size)`` (FID sampling; default ``fid.batch_size``);
* fid_features -- Inception-v3 features of ``fid.batch_size`` images at 299 x 299.

Columns: the peak of live tensors, the planned figure (peak + headroom, ``sdn.memory_plan``), whether
it fits ``--gpu-memory`` GiB, the largest size that would, and FLOPs: per call, and in total (train:
one optimizer step at the global batch; iw_chunk: the IW bound of the whole test split with the
bottom-up pass once per image; fid_features: the 50,000 samples and the training-set reference;
sampling: the 50,000 FID samples). Exit status 1 when a phase does not fit.

    python benchmarks/memory_plan.py --gpu-memory 80                    # the table (minutes on a CPU)
    python benchmarks/memory_plan.py --costs --tflops 20                # also the README cost table (markdown)
    python benchmarks/memory_plan.py --no-search                        # fits? only: half the time
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.study import Run, Study, load_study  # noqa: E402
from sdn import memory_plan as mp  # noqa: E402
from sdn.models.hvae import HierarchicalVAE  # noqa: E402

DEFAULT_PARAMS = ROOT / "params-paper.yaml"
DEFAULT_IW_CHUNK = 256  # sdn.scores.evaluate_bpd's chunk_size default (eval.iw_chunk_size absent)
# Image counts of the splits (sdn/data/prepare.py; CIFAR-10's 10,000 test images); the held-out
# validation images (data.<dataset>.validation.size) come out of the training split.
TEST_IMAGES = {"cifar10": 10_000, "imagenet32": 50_000, "celebahq256": 3_000}
TRAIN_IMAGES = {"cifar10": 50_000, "imagenet32": 1_281_148, "celebahq256": 27_000}
ASSUMED_TFLOPS = 20.0  # sustained TFLOP/s on one H100 for the projections (fp32 GEMMs, TF32 off: ~30 % of 67)


def paper_runs(study: Study, configs: Sequence[str] | None = None) -> list[Run]:
    """One run per (family, dataset, model), the first seed's, optionally only the ``configs`` datasets."""
    first = study.seeds[0]
    return [r for r in study.runs() if r.seed == first and (not configs or r.dataset in configs)]


@dataclasses.dataclass(frozen=True)
class RunSizes:
    """The per-GPU sizes params give each phase of a run (``None``: the family has no such phase)."""

    micro_batch: int
    global_batch: int
    steps: int
    precision: str
    ema: bool
    validation: int | None
    iw_chunk: int | None
    iw_samples: int | None
    sampling: int
    fid_features: int | None
    fid_samples: int | None

    def accumulation(self, gpus: int) -> int:
        """Micro-batches per optimizer step on each of ``gpus`` GPUs (the trainer's accumulation)."""
        return max(1, self.global_batch // (gpus * self.micro_batch))


def run_sizes(study: Study, run: Run) -> RunSizes:
    """Every phase's size from the params of ``run`` (the keys named in the module docstring)."""
    train = study.train_config(run)
    sec = study.section(run)
    micro = getattr(train, "micro_batch_size", None) or train.batch_size
    fid = study.params.get("fid", {})
    density = run.family == "density"
    return RunSizes(
        micro_batch=micro, global_batch=train.batch_size, steps=train.steps, precision=train.precision,
        ema=train.ema_decay is not None,
        validation=sec.eval.batch_size if density else None,
        iw_chunk=(getattr(sec.eval, "iw_chunk_size", None) or DEFAULT_IW_CHUNK) if density else None,
        iw_samples=sec.eval.iw_samples if density else None,
        sampling=(getattr(sec.samples, "batch_size", None) or fid["batch_size"]) if density else sec.samples.num,
        fid_features=fid["batch_size"] if density else None,
        fid_samples=fid.get("num_samples") if density else None,
    )


@dataclasses.dataclass
class PhaseRow:
    """One table row: a phase of a run at its params size, and the largest size that fits."""

    config: str
    model: str
    phase: str
    size: int
    peak_gib: float
    planned_gib: float
    fits: bool
    largest: int | None  # None: not searched (--no-search)
    flops: float        # one call at ``size``
    total_flops: float  # see the module docstring


def _planner(phase: str, build: Callable[[], torch.nn.Module], shape: tuple[int, int, int],
             sizes: RunSizes) -> Callable[[int], mp.PhasePlan]:
    """The phase's plan as a function of its size."""
    if phase == "train":
        return lambda n: mp.plan_train_step(build, shape, n, sizes.precision, ema=sizes.ema, ddp=True)
    if phase == "validation":
        return lambda n: mp.plan_validation(build, shape, n, during_training=True, ema=sizes.ema)
    if phase == "iw_chunk":
        return lambda n: mp.plan_iw_chunk(build, shape, n, sizes.iw_samples, batch=sizes.validation)
    if phase == "sampling":
        return lambda n: mp.plan_sampling(build, n)
    return mp.plan_fid_features


def plan_run(study: Study, run: Run, budget: int, cache: dict[str, Any], search: bool = True) -> list[PhaseRow]:
    """The rows of one run: every phase at its size and, with ``search``, at twice it (for the largest
    fitting size and the FLOP totals; without, ``largest`` is None and totals are per call)."""
    config = study.model_config(run)
    family = study.family(run.family)
    build = functools.partial(family.build, config, run.model)
    shape = mp.image_shape(config)
    sizes = run_sizes(study, run)
    phases = {"train": sizes.micro_batch, "validation": sizes.validation, "iw_chunk": sizes.iw_chunk,
              "sampling": sizes.sampling, "fid_features": sizes.fid_features}
    rows = []
    for phase, size in phases.items():
        if size is None:
            continue
        planner = _planner(phase, build, shape, sizes)
        key = f"{phase}:{size}"
        if phase == "fid_features" and key in cache:  # the same Inception for every run
            a, b = cache[key]
        else:
            a = planner(size)
            b = planner(2 * size) if search else None
            if phase == "fid_features":
                cache[key] = (a, b)
        rows.append(PhaseRow(run.dataset, run.model, phase, size, a.peak_bytes / mp.GIB, a.planned_gib,
                             a.fits(budget), mp.largest_fitting_size(a, b, budget) if b else None, float(a.flops),
                             _total_flops(run, phase, sizes, a, b) if b else float(a.flops)))
    return rows


def _total_flops(run: Run, phase: str, sizes: RunSizes, a: mp.PhasePlan, b: mp.PhasePlan) -> float:
    """The FLOPs of the whole phase (module docstring); per call where no total is meaningful."""
    if phase == "train":  # forward+backward is linear in the batch: the global batch's step
        return a.flops * sizes.global_batch / sizes.micro_batch
    if phase == "iw_chunk":  # flops = images x up + pairs x down, from the two chunk plans
        features = hasattr(HierarchicalVAE, "posterior_features")
        images_a, pairs_a = mp.iw_pass(a.size, sizes.iw_samples, sizes.validation, features)
        images_b, pairs_b = mp.iw_pass(b.size, sizes.iw_samples, sizes.validation, features)
        if pairs_a != pairs_b and images_a == images_b:
            down = (b.flops - a.flops) / (pairs_b - pairs_a)
            up = (a.flops - pairs_a * down) / images_a
        else:  # whole images in both: no split of the encoder's share
            down, up = a.flops / pairs_a, 0.0
        return TEST_IMAGES[run.dataset] * (up + sizes.iw_samples * down)
    if phase == "sampling" and sizes.fid_samples:
        return a.flops / a.size * sizes.fid_samples
    if phase == "fid_features" and sizes.fid_samples:
        return a.flops / a.size * (sizes.fid_samples + TRAIN_IMAGES[run.dataset])
    return float(a.flops)


COLUMNS = (  # header, field, format
    ("config", "config", "{}"), ("model", "model", "{}"), ("phase", "phase", "{}"), ("size", "size", "{}"),
    ("peak GiB", "peak_gib", "{:.2f}"), ("planned GiB", "planned_gib", "{:.2f}"), ("fits", "fits", "{}"),
    ("largest fit", "largest", "{}"), ("TFLOP/call", "flops", "{:.3g}"), ("TFLOP total", "total_flops", "{:.4g}"),
)


def format_table(rows: Sequence[PhaseRow], budget_gib: float, seconds: float) -> str:
    """The rows as one aligned text table under its caption."""
    cells = [[h for h, _, _ in COLUMNS]]
    for row in rows:
        values = {**dataclasses.asdict(row), "flops": row.flops / 1e12, "total_flops": row.total_flops / 1e12,
                  "fits": "yes" if row.fits else "NO", "largest": "-" if row.largest is None else row.largest}
        cells.append([fmt.format(values[field]) for _, field, fmt in COLUMNS])
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    caption = [
        f"Memory plan per GPU (meta device, torch {torch.__version__}, {seconds:.0f} s): budget {budget_gib:g} GiB; "
        f"planned = peak of live tensors x {1 + mp.HEADROOM_FRACTION:.2f} + {mp.CONTEXT_BYTES / mp.GIB:g} GiB "
        "(allocator, CUDA context).",
        "size: images per GPU (iw_chunk: image x sample pairs); largest fit: the largest multiple of 8 within "
        "the budget (affine in the size, from the plans at size and 2 x size).",
        "TFLOP total: train = one optimizer step at the global batch; iw_chunk = IW bound of the test split; "
        "sampling = the FID samples; fid_features = FID samples + training-set reference.",
    ]
    return "\n".join([*caption, lines[0], "-" * len(lines[0]), *lines[1:]])


def cost_table(study: Study, rows: Sequence[PhaseRow], tflops: float) -> str:
    """The README cost table (markdown): per run, micro-batch, accumulation, planned GiB per phase,
    FLOPs and projected hours on 1 and 8 GPUs at ``tflops`` sustained (one seed)."""
    by_run: dict[tuple[str, str], dict[str, PhaseRow]] = {}
    for row in rows:
        by_run.setdefault((row.config, row.model), {})[row.phase] = row
    header = ("| run | micro-batch | accum. 1 / 8 GPUs | planned GiB: train / val / IW / sample / FID | "
              "TFLOP per step | PFLOP per IW eval | projected h, 1 GPU: train / eval / FID | on 8 GPUs |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    rate = tflops * 1e12 * 3600  # FLOPs per GPU-hour
    for run in paper_runs(study):
        phases = by_run.get((run.dataset, run.model))
        if not phases:
            continue
        sizes = run_sizes(study, run)
        gib = " / ".join(f"{phases[p].planned_gib:.1f}" if p in phases else "-"
                         for p in ("train", "validation", "iw_chunk", "sampling", "fid_features"))
        train_h = phases["train"].total_flops * sizes.steps / rate
        eval_h = phases["iw_chunk"].total_flops / rate if "iw_chunk" in phases else 0.0
        fid_h = sum(phases[p].total_flops for p in ("sampling", "fid_features") if p in phases) / rate \
            if run.family == "density" else 0.0
        iw = f"{phases['iw_chunk'].total_flops / 1e15:,.0f}" if "iw_chunk" in phases else "-"
        lines.append(
            f"| {run.dataset} {run.model} | {sizes.micro_batch} | {sizes.accumulation(1)} / {sizes.accumulation(8)} "
            f"| {gib} | {phases['train'].total_flops / 1e12:.1f} | {iw} "
            f"| {train_h:,.0f} / {eval_h:,.1f} / {fid_h:,.1f} | {train_h / 8:,.0f} / {eval_h / 8:,.1f} / {fid_h / 8:,.1f} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="the study (default: params-paper.yaml)")
    parser.add_argument("--configs", nargs="+", default=None, metavar="DATASET", help="only these datasets")
    parser.add_argument("--costs", action="store_true", help="also print the README cost table (markdown)")
    parser.add_argument("--tflops", type=float, default=ASSUMED_TFLOPS,
                        help=f"sustained TFLOP/s per GPU assumed by --costs (default {ASSUMED_TFLOPS:g})")
    parser.add_argument("--no-search", dest="search", action="store_false",
                        help="plan each phase at its size only (half the time; no largest fit, FLOP totals per call)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.gpu_memory <= 0:
        parser.error("--gpu-memory must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Print the plan; 0 when every phase fits, 1 otherwise."""
    args = parse_args(argv)
    study = load_study(args.params)
    budget = int(args.gpu_memory * mp.GIB)
    start = time.perf_counter()
    rows: list[PhaseRow] = []
    cache: dict[str, Any] = {}
    for run in paper_runs(study, args.configs):
        print(f"planning {run.family}/{run.dataset}/{run.model} ...", file=sys.stderr, flush=True)
        rows += plan_run(study, run, budget, cache, search=args.search)
    print(format_table(rows, args.gpu_memory, time.perf_counter() - start))
    if args.costs and args.search:
        print()
        print(cost_table(study, rows, args.tflops))
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=2) + "\n")
    too_big = [r for r in rows if not r.fits]
    for row in too_big:
        print(f"DOES NOT FIT: {row.config}/{row.model} {row.phase} at {row.size}: {row.planned_gib:.1f} GiB "
              f"> {args.gpu_memory:g} GiB (largest that fits: {row.largest})", file=sys.stderr)
    return 1 if too_big else 0


if __name__ == "__main__":
    raise SystemExit(main())
