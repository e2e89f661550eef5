"""DVC stage ``fid@<dataset>-<model>``: FID and KID of the samples of every trained seed of one density model.

Without Inception weights (``fid.weights_path`` empty or not present: a study that does not download
them) or reference statistics, the metrics file says n/a with the reason instead of failing; the
implementation, version, sample count, reference split and KID subset settings are recorded with
every value.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's sdn/ and baselines/

import torch  # noqa: E402

from sdn.metrics.fid import compute_model_fid  # noqa: E402
from pipelines.study import Run, Study, run_stage  # noqa: E402


def fid_run(study: Study, run: Run) -> None:
    """FID of ``run``'s samples (or n/a with the reason), written and logged."""
    paths = study.paths(run)
    fid_cfg = study.params["fid"]
    kid_cfg = fid_cfg["kid"]
    temperature = float(study.section("density", run.dataset)["samples"]["temperature"])
    device = "cuda" if torch.cuda.is_available() else "cpu"

    model = study.build_model(run)
    model.load_state_dict(torch.load(paths.weights, map_location="cpu", weights_only=True))
    model.to(device).eval()
    result = compute_model_fid(
        model, study.fid_stats_dir(run.dataset) / "stats.npz", fid_cfg["weights_path"],
        temperature=temperature, seed=run.seed, num_samples=fid_cfg["num_samples"],
        batch_size=fid_cfg["batch_size"], device=device, progress=False,
        kid_subsets=kid_cfg["subsets"], kid_subset_size=kid_cfg["subset_size"], kid_seed=kid_cfg["seed"],
    )
    record = result.to_dict()
    record["fid"] = result.value if result.available else "n/a"
    record["kid"] = result.kid_mean if result.kid_available else "n/a"
    paths.fid_metrics.parent.mkdir(parents=True, exist_ok=True)
    paths.fid_metrics.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    from sdn.tracking import Tracker

    tracker = Tracker(study.experiment)
    run_id = tracker.run_for_update(
        tracker.key(run.dataset, run.model, run.seed), study.resolved(run),
        {"family": run.family, "study": study.name, "fid_status": "ok" if result.available else "n/a",
         "kid_status": "ok" if result.kid_available else "n/a"},
    )
    if result.available:
        tracker.log_metrics(run_id, {"fid": result.value})
    if result.kid_available:
        tracker.log_metrics(run_id, {"kid_mean": result.kid_mean, "kid_std": result.kid_std})
    tracker.log_artifact(run_id, paths.fid_metrics, "metrics", name="fid.json")
    tracker.finish(run_id)


def main(argv: list[str] | None = None) -> None:
    # Without Inception weights every seed only writes "n/a": not worth a process each.
    run_stage(__doc__, __file__, fid_run, argv, family="density",
              side_by_side=lambda study: bool(study.params["fid"]["weights_path"])
              and Path(study.params["fid"]["weights_path"]).is_file())


if __name__ == "__main__":
    main()
