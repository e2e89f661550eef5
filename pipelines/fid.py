"""DVC stage ``fid@<dataset>-<model>``: FID and KID of the samples of every trained seed of one density model.

Without Inception weights (``fid.weights_path`` empty or not present: a study that does not download
them) or reference statistics, the metrics file says n/a with the reason instead of failing; the
implementation, version, sample count, reference split and KID subset settings are recorded with
every value. Under ``study.launcher`` torchrun the ranks share the sampling and Inception work
(``sdn.metrics.fid.compute_fid``); rank 0 writes and logs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from pipelines.study import Run, RunPaths, Study, run_stage
from sdn.distributed import barrier, setup_distributed
from sdn.metrics.fid import compute_model_fid


def fid_run(study: Study, run: Run, paths: RunPaths) -> None:
    """FID of ``run``'s samples against the dataset's reference statistics (or n/a with the
    reason), written and logged (``fid/fid``, ``fid/kid``, ``fid/kid_std`` into the run's MLflow
    run, the one that trained the weights: ``Tracker.run_of_model``). Under torchrun every rank samples its
    share; rank 0 alone writes and tracks, between barriers."""
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
        record, result = _fid_record(study, run, paths, ctx.device, write=ctx.is_main)
    except BaseException:
        if tracker is not None:
            tracker.stage_failed(run_id, "fid")
        raise
    if tracker is not None:
        for name, value in (("fid_status", result.available), ("kid_status", result.kid_available)):
            tracker.client.set_tag(run_id, name, "ok" if value else "n/a")
        # Each name is the metrics file's key (fid, kid = kid_mean, kid_std); n/a values are not logged.
        tracker.log_metrics(run_id, {f"fid/{k}": record.get(k) for k in ("fid", "kid", "kid_std")})
        tracker.log_artifact(run_id, paths.fid_metrics, "metrics", name="fid.json")
        tracker.stage_done(run_id, "fid")
    barrier(ctx)


def _fid_record(study: Study, run: Run, paths: RunPaths, device: torch.device, write: bool = True):
    """Compute (and, if ``write``, write) the fid metrics file's record, and return it and the FID
    result. The samples are drawn in batches of ``density.<dataset>.samples.batch_size`` (default
    ``fid.batch_size``, the Inception batch) on ``device``, the device ``fid_stats --device auto``
    picks for the reference statistics."""
    fid_cfg = study.validated.fid
    kid_cfg = fid_cfg.kid
    samples_cfg = study.section(run).samples
    model = study.build_model(run)
    model.load_state_dict(torch.load(paths.weights, map_location="cpu", weights_only=True))
    model.to(device).eval()
    result = compute_model_fid(
        model, paths.dirs.reference, fid_cfg.weights_path,
        temperature=float(samples_cfg.temperature), seed=run.seed, num_samples=fid_cfg.num_samples,
        batch_size=fid_cfg.batch_size, sample_batch_size=samples_cfg.batch_size, device=device, progress=False,
        kid_subsets=kid_cfg.subsets, kid_subset_size=kid_cfg.subset_size, kid_seed=kid_cfg.seed,
    )
    record = result.to_dict()
    record["fid"] = result.value if result.available else "n/a"
    record["kid"] = result.kid_mean if result.kid_available else "n/a"
    if write:
        paths.fid_metrics.parent.mkdir(parents=True, exist_ok=True)
        paths.fid_metrics.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record, result


def main(argv: list[str] | None = None) -> None:
    # Without Inception weights every seed only writes "n/a": not worth a process each.
    try:
        run_stage(__doc__, "pipelines.fid", fid_run, argv, family="density",
                  side_by_side=lambda study: Path(study.validated.fid.weights_path).is_file(),
                  dirs=("models", "reference", "fid_metrics"))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
