"""DVC stage ``evaluate_<family>@<dataset>-<model>``: test metrics of every trained seed of one model.

The family scores the model (``pipelines.families``): density, ELBO and importance-weighted
bits/dim on the test split and the train − test gap; disentanglement, the disentanglement_lib
metrics of the encoder mean and the number of active latent dimensions.
Writes a DVC metrics file per run and logs it as ``test/<key>`` into the run's MLflow run, the one
that trained the evaluation weights (this stage's dependency; found by their sha256, ``pipelines.tracking``); seeds
run ``study.runs_at_once`` at a time (``pipelines.study.run_stage``). Under ``study.launcher`` torchrun the
ranks share each run's images (``sdn.scores.evaluate_bpd``); rank 0 writes and logs.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from pipelines.families import EVAL_SEED
from pipelines.study import Run, RunPaths, Study, run_stage
from sdn.distributed import barrier, setup_distributed
from sdn.seeding import seed_everything


def evaluate_run(study: Study, run: Run, paths: RunPaths) -> None:
    """Score ``run``'s evaluation weights, write its metrics file and log it.

    Under torchrun every rank scores (the family shards the images and merges the results) and
    rank 0 alone writes and tracks, between barriers, so no rank waits in a collective while
    rank 0 talks to MLflow.
    """
    from pipelines.tracking import Tracker

    ctx = setup_distributed("auto")
    tracker = run_id = None
    if ctx.is_main:
        tracker = Tracker.for_family(study.name, study.family(run.family))
        run_id = tracker.run_of_model(paths.weights, tracker.key(run.dataset, run.model, run.seed),
                                      study.resolved(run), {"family": run.family, "study": study.name})
        if run_id is None:  # the store went away (warned once): the stage writes its outputs without MLflow
            tracker = None
    barrier(ctx)
    try:
        seed_everything(EVAL_SEED)
        model = study.build_model(run)
        model.load_state_dict(torch.load(paths.weights, map_location="cpu", weights_only=True))
        model.to(ctx.device).eval()
        metrics = study.family(run.family).evaluate(study, run, model, ctx.device)
        if ctx.is_main:
            paths.eval_metrics.parent.mkdir(parents=True, exist_ok=True)
            paths.eval_metrics.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    except BaseException:
        if tracker is not None:
            tracker.stage_failed(run_id, "evaluate")
        raise
    if tracker is not None:
        # Logged into the (finished) training run without reopening it: its end time stays.
        tracker.log_metrics(run_id, {f"test/{k}": v for k, v in metrics.items()})
        tracker.log_artifact(run_id, paths.eval_metrics, "metrics", name="eval.json")
        tracker.stage_done(run_id, "evaluate")
    barrier(ctx)


def main(argv: list[str] | None = None) -> None:
    try:
        run_stage(__doc__, "pipelines.evaluate", evaluate_run, argv, dirs=("models", "eval_metrics"))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
