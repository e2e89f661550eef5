"""DVC stage ``fid@<dataset>-<model>``: FID and KID of the samples of every trained seed of one density model.

Without Inception weights (``fid.weights_path`` empty or not present: a study that does not download
them) or reference statistics, the metrics file says n/a with the reason instead of failing; the
implementation, version, sample count, reference split and KID subset settings are recorded with
every value.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipelines.study import Run, RunPaths, Study, run_stage
from sdn.metrics.fid import compute_model_fid


def fid_run(study: Study, run: Run, paths: RunPaths) -> None:
    """FID of ``run``'s samples against the dataset's reference statistics (or n/a with the
    reason), written and logged (``fid/fid``, ``fid/kid``, ``fid/kid_std`` into the run's MLflow
    run, named in ``mlflow_run.json`` of its model folder)."""
    from pipelines.tracking import Tracker

    tracker = Tracker.for_family(study.name, run.family)
    run_id = tracker.run_of_model(paths.model_dir, tracker.key(run.dataset, run.model, run.seed),
                                  study.resolved(run), {"family": run.family, "study": study.name})
    try:
        record, result = _fid_record(study, run, paths)
    except BaseException:
        tracker.stage_failed(run_id, "fid")
        raise
    for name, value in (("fid_status", result.available), ("kid_status", result.kid_available)):
        tracker.client.set_tag(run_id, name, "ok" if value else "n/a")
    # Each name is the metrics file's key (fid, kid = kid_mean, kid_std); n/a values are not logged.
    tracker.log_metrics(run_id, {f"fid/{k}": record.get(k) for k in ("fid", "kid", "kid_std")})
    tracker.log_artifact(run_id, paths.fid_metrics, "metrics", name="fid.json")
    tracker.stage_done(run_id, "fid", run.family)


def _fid_record(study: Study, run: Run, paths: RunPaths):
    """Compute, write and return the fid metrics file's record (and the FID result)."""
    fid_cfg = study.validated.fid
    kid_cfg = fid_cfg.kid
    temperature = float(study.section(run).samples.temperature)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    model = study.build_model(run)
    model.load_state_dict(torch.load(paths.weights, map_location="cpu", weights_only=True))
    model.to(device).eval()
    result = compute_model_fid(
        model, paths.dirs.reference, fid_cfg.weights_path,
        temperature=temperature, seed=run.seed, num_samples=fid_cfg.num_samples,
        batch_size=fid_cfg.batch_size, device=device, progress=False,
        kid_subsets=kid_cfg.subsets, kid_subset_size=kid_cfg.subset_size, kid_seed=kid_cfg.seed,
    )
    record = result.to_dict()
    record["fid"] = result.value if result.available else "n/a"
    record["kid"] = result.kid_mean if result.kid_available else "n/a"
    paths.fid_metrics.parent.mkdir(parents=True, exist_ok=True)
    paths.fid_metrics.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record, result


def main(argv: list[str] | None = None) -> None:
    # Without Inception weights every seed only writes "n/a": not worth a process each.
    run_stage(__doc__, "pipelines.fid", fid_run, argv, family="density",
              side_by_side=lambda study: Path(study.validated.fid.weights_path).is_file(),
              dirs=("models", "reference", "fid_metrics"))


if __name__ == "__main__":
    main()
