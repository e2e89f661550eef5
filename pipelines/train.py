"""DVC stage ``train_<family>@<dataset>-<model>``: train every seed of one model (or ``--seed``).

Per run: the trainer checkpoint and the weights evaluation uses, a sample grid (and, for VAEs,
reconstructions), the training curve (DVC plots) and a metrics file, all logged to the run's MLflow
run (``pipelines.tracking``: created here and tagged with the checkpoint folder and, once exported,
the sha256 of ``eval_weights.pt``, by which the later stages find it; no output names the run, so
a rerun reproduces every DVC hash; an interrupted training resumes its checkpoint and its run).
Seeds run ``study.runs_at_once`` at a time (``pipelines.study.run_stage``). Works unchanged under
``torchrun`` (every rank trains; rank 0 writes files and tracks): the other ranks wait in a barrier
(``sdn.distributed.PROCESS_GROUP_TIMEOUT``) while rank 0 prepares a run and while it exports one,
never in a collective of the trainer under a shorter watchdog.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


import torch
import torch.distributed as dist

from pipelines.study import Run, RunPaths, Study, run_stage
from sdn import memory_plan
from sdn.callbacks import CurveWriter
from sdn.checkpoint import has_checkpoint, remove_other_checkpoints, run_checkpoint_dir, source_fingerprint
from sdn.data.augment import RandomHFlip
from sdn.distributed import barrier, setup_distributed
from sdn.images import save_image_grid
from sdn.models import count_parameters
from sdn.seeding import make_generator, seed_everything
from sdn.training import train


def sample_grids(paths, samples_cfg) -> list[tuple[float, Path]]:
    """(temperature, PNG path) of every sample grid of a run: the main grid at ``temperature``
    (the one FID uses) first, then one per extra ``temperatures`` entry (the paper's 0.6-1.0)."""
    extra = [float(t) for t in samples_cfg.temperatures if float(t) != float(samples_cfg.temperature)]
    return [(float(samples_cfg.temperature), paths.samples)] + [
        (t, paths.samples.with_name(f"{paths.samples.stem}_t{t:g}.png")) for t in extra]


class MemoryPlanError(RuntimeError):
    """The planned training step does not fit the GPU: raised before training starts."""


def check_memory_plan(study: Study, run: Run, train_config, available_bytes: int | None = None,
                      world_size: int | None = None, distributed: bool | None = None) -> memory_plan.PhasePlan | None:
    """Pre-flight: plan one training step at the per-GPU micro-batch (``sdn.memory_plan``, on meta) and
    raise :class:`MemoryPlanError` naming ``<family>.<dataset>.train.micro_batch_size`` when the plan
    exceeds ``available_bytes`` (default: the free memory of this rank's GPU). Skipped (None) on CPU.
    ``distributed`` (default: more than one rank) adds DDP's gradient buckets: a torchrun job of one
    rank is still wrapped in DDP."""
    if available_bytes is None:
        if train_config.device == "cpu" or not torch.cuda.is_available():
            return None
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        available_bytes, _total = torch.cuda.mem_get_info(local_rank % torch.cuda.device_count())
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    micro = getattr(train_config, "micro_batch_size", None) or max(1, train_config.batch_size // world)
    config = study.model_config(run)
    build = functools.partial(study.family(run.family).build, config, run.model)
    plan = memory_plan.plan_train_step(build, memory_plan.image_shape(config), micro, train_config.precision,
                                       ema=train_config.ema_decay is not None,
                                       ddp=world > 1 if distributed is None else distributed)
    if not plan.fits(available_bytes):
        raise MemoryPlanError(
            f"{run.family}.{run.dataset}.train.micro_batch_size = {micro} ({run.model}, {train_config.precision}): "
            f"the planned training step needs {plan.planned_gib:.1f} GiB per GPU (live-tensor peak "
            f"{plan.peak_bytes / memory_plan.GIB:.1f} GiB + headroom), but {available_bytes / memory_plan.GIB:.1f} "
            f"GiB are available; lower it (the global batch is kept by gradient accumulation) or use a larger GPU "
            f"(benchmarks/memory_plan.py prints the sizes that fit)")
    return plan


# The code a training run executes and whose edits may change its weights (the library and the baselines).
TRAINING_CODE = ("sdn", "baselines")


def training_code_fingerprint() -> str:
    """The fingerprint (``sdn.checkpoint.source_fingerprint``) of the :data:`TRAINING_CODE` packages."""
    root = Path(__file__).resolve().parents[1]
    return source_fingerprint([p for package in TRAINING_CODE for p in (root / package).rglob("*.py")], root)


def train_run(study: Study, run: Run, paths: RunPaths) -> None:
    """Train (or resume, or just re-export a finished) ``run`` and write its outputs."""
    rank = int(os.environ.get("RANK", "0"))

    train_config = study.train_config(run)
    # Under torchrun, join the process group (the trainer reuses it) before rank 0 works alone.
    ctx = setup_distributed(train_config.device)
    check_memory_plan(study, run, train_config, world_size=ctx.world_size, distributed=ctx.is_distributed)  # on a GPU: fail before training
    dataset = study.dataset(run.dataset, "train")
    if getattr(study.model_config(run), "hflip", False):
        dataset = RandomHFlip(dataset, run.seed)
    family = study.family(run.family)
    seed_everything(run.seed)
    model = study.build_model(run)
    num_params = count_parameters(model)

    # The model directory is a persistent DVC output: an interrupted run resumes from the checkpoint
    # of exactly this configuration and training code, a changed configuration or an edit to the
    # library's code (not its comments or docstrings) starts afresh. The curve is kept beside the
    # checkpoint (DVC deletes the plots file before a rerun) and copied out when training ends.
    checkpoint_dir = run_checkpoint_dir(paths.model_dir, {**study.resolved(run), "code": training_code_fingerprint()})
    curve = checkpoint_dir / "curve.csv"
    tracker = mlflow_run = callback = None
    if rank == 0:
        from pipelines.tracking import Tracker

        tracker = Tracker.for_family(study.name, study.family(run.family))
    if rank == 0 and checkpoint_dir.exists() and not curve.exists():
        print(f"train: {curve} is missing, retraining {run.stage_suffix} from scratch", file=sys.stderr)
        from pipelines.tracking import abandon_run_in

        abandon_run_in(tracker, tracker.key(run.dataset, run.model, run.seed), checkpoint_dir)
        shutil.rmtree(checkpoint_dir)
    callbacks = []
    if rank == 0:
        from pipelines.tracking import MlflowCallback, open_training_run

        # The run is tagged with the checkpoint folder before training starts: an interrupted
        # training resumes its checkpoint and its MLflow run together. None: the store went away
        # (warned once, with the command that completes the run later).
        mlflow_run = open_training_run(
            tracker, checkpoint_dir, tracker.key(run.dataset, run.model, run.seed), study.resolved(run),
            {"family": run.family, "study": study.name, "stage": f"train_{run.family}@{run.stage_suffix}"},
            weights=paths.weights,
        )
        callbacks = [CurveWriter(curve)]
        if mlflow_run is not None:
            callback = MlflowCallback(tracker, mlflow_run.run_id)
            callbacks += [callback] if mlflow_run.mode != "finished" else []
    barrier(ctx)  # no rank reads the checkpoint folder before rank 0 has tidied it
    try:
        eval_fn = family.validation_fn(study, run) if train_config.eval_every else None
        result = train(model, dataset, train_config, checkpoint_dir, callbacks=callbacks, resume=True,
                       eval_fn=eval_fn)
        if rank == 0:
            _export(study, run, paths, family, result, num_params, checkpoint_dir, curve, tracker, mlflow_run,
                    callback, train_config.batch_size)
        barrier(ctx)  # the other ranks wait here, not in the next seed's first collective, while rank 0 exports
    except BaseException as error:
        if mlflow_run is not None and mlflow_run.mode != "finished":
            status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
            tracker.client.set_tag(mlflow_run.run_id, "error", f"{type(error).__name__}: {error}"[:4000])
            tracker.finish(mlflow_run.run_id, status)
        if rank == 0 and checkpoint_dir.is_dir() and not has_checkpoint(checkpoint_dir):
            shutil.rmtree(checkpoint_dir)  # nothing to resume from: leave no folder behind
        raise


def _export(study, run, paths, family, result, num_params, checkpoint_dir, curve, tracker, mlflow_run,
            callback, batch_size) -> None:
    """Rank 0 after training: the run's files (DVC outputs) and its MLflow metrics and artifacts."""
    from pipelines.tracking import WEIGHTS_TAG, log_throughput, weights_digest

    for path in (paths.samples, paths.train_metrics, paths.curve):
        path.parent.mkdir(parents=True, exist_ok=True)
    remove_other_checkpoints(checkpoint_dir)
    shutil.copyfile(curve, paths.curve)
    eval_model = result.eval_model.eval()
    if result.best_state is not None:  # train.keep_best: the weights of the best validation step
        eval_model.load_state_dict(result.best_state)
    torch.save(eval_model.state_dict(), paths.weights)
    samples_cfg = study.section(run).samples
    eval_model = eval_model.cpu()
    for temperature, path in sample_grids(paths, samples_cfg):
        images = eval_model.sample(samples_cfg.num, temperature=temperature, generator=make_generator(run.seed))
        nrow = max(1, int(round(samples_cfg.num ** 0.5)))
        save_image_grid(images, path, nrow=nrow, padding=1)
    extras = family.write_extras(study, run, eval_model, paths)

    final = {f"train_{k}": float(v) for k, v in result.metrics.items()}
    metrics = {"num_params": num_params, "steps": result.steps, **final}
    if result.best is not None:  # which evaluation was selected, and its validation score
        metrics["selected_step"] = int(result.best["step"])
        metrics.update({f"selected_validation_{k}": float(v) for k, v in result.best["metrics"].items()})
    paths.train_metrics.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")

    # Evaluate and fid find the run by the weights' hash (their dependency); a rerun that only
    # re-exports a finished run logs nothing else again and leaves its end time (= its training time).
    if mlflow_run is None:  # trained while the store was away: `dvc repro -f` of the stage logs it later
        return
    run_id = mlflow_run.run_id
    tracker.client.set_tag(run_id, WEIGHTS_TAG, weights_digest(paths.weights))
    if mlflow_run.mode == "finished":
        return
    if callback.seconds is None:  # resumed at the last checkpoint: nothing was trained in this process
        log_throughput(tracker, run_id, result.steps, batch_size,
                       tracker.metric_at(run_id, "train/seconds", result.steps))
    # Once each: the final train_* values of the metrics file are the curve's last points (train/*).
    tracker.log_metrics(run_id, {k: v for k, v in metrics.items() if k != "steps" and not k.startswith("train_")},
                        step=result.steps)
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "resolved_config.json"
        resolved.write_text(json.dumps(study.resolved(run), indent=2, default=str) + "\n")
        tracker.log_artifact(run_id, resolved)
    for temperature, path in sample_grids(paths, samples_cfg)[1:]:
        tracker.log_artifact(run_id, path, "samples", name=f"samples_t{temperature:g}.png")
    tracker.log_artifact(run_id, paths.samples, name="samples.png")
    for path in extras:
        tracker.log_artifact(run_id, path, name=path.name.removeprefix(f"seed{run.seed}_"))
    tracker.log_artifact(run_id, paths.train_metrics, "metrics", name="train.json")
    tracker.log_artifact(run_id, paths.curve, "metrics", name="train_curve.csv")
    tracker.stage_done(run_id, "train")
    tracker.finish(run_id)


def main(argv: list[str] | None = None) -> None:
    try:
        run_stage(__doc__, "pipelines.train", train_run, argv,
                  dirs=("models", "samples", "train_metrics", "curves"), resumable=("models",))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
