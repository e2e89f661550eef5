"""DVC stage ``evaluate_<family>@<dataset>-<model>``: test metrics of every trained seed of one model.

density: ELBO and importance-weighted bits/dim on the test split (K = ``eval.iw_samples``) and the
ELBO of as many training images (the train − test gap);
disentanglement: BetaVAE, FactorVAE, MIG, DCI and SAP of the encoder mean (evaluation seed 0), and
the number of active latent dimensions (Burda et al.: Cov_x(E_q[z_j]) > 0.01) on ``num_train`` samples.
Writes a DVC metrics file per run and logs the metrics into the run's current MLflow run; seeds
run ``study.runs_at_once`` at a time (``pipelines.study.run_stage``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's sdn/ and baselines/

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from sdn.seeding import seed_everything  # noqa: E402
from pipelines.study import Run, Study, run_stage  # noqa: E402

EVAL_SEED = 0  # disentanglement_lib evaluates every model with the same seed


def density_metrics(study: Study, run, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
    """ELBO and IW bits/dim of the test split (or its first ``max_examples`` images), and the ELBO
    of as many training images (a fixed draw, no augmentation) for the train − test gap."""
    from sdn.scores import evaluate_bpd

    cfg = study.section("density", run.dataset)["eval"]
    test = study.dataset(run.dataset, "test")
    if cfg["max_examples"] is not None and cfg["max_examples"] < len(test):
        test = Subset(test, range(cfg["max_examples"]))
    loader = DataLoader(test, batch_size=cfg["batch_size"], shuffle=False)
    scores = evaluate_bpd(model, loader, num_samples=cfg["iw_samples"], seed=EVAL_SEED, device=device,
                          progress=False)
    train = study.dataset(run.dataset, "train")
    picked = np.sort(np.random.default_rng(EVAL_SEED).choice(len(train), min(len(test), len(train)), replace=False))
    train_loader = DataLoader(Subset(train, picked.tolist()), batch_size=cfg["batch_size"], shuffle=False)
    train_scores = evaluate_bpd(model, train_loader, num_samples=1, seed=EVAL_SEED, device=device, progress=False)
    return {"elbo_bpd": float(scores["elbo_bpd"]), "iw_bpd": float(scores["iw_bpd"]),
            "iw_samples": int(scores["num_samples"]), "num_examples": int(scores["num_images"]),
            "train_elbo_bpd": float(train_scores["elbo_bpd"]), "train_examples": int(train_scores["num_images"])}


def disentanglement_metrics(study: Study, run, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
    """The five disentanglement metrics of the posterior mean, with the settings used, and the
    active-dimension count that tells a collapsed model from a disentangled one."""
    from sdn.metrics.active_units import compute_active_units
    from sdn.metrics.disentanglement import compute_all

    def representation(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model.encode_mean(torch.from_numpy(np.ascontiguousarray(images)).to(device)).cpu().numpy()

    cfg = dict(study.section("disentanglement", run.dataset)["metrics"])
    data = study.ground_truth(run.dataset)
    scores = compute_all(data, representation, seed=EVAL_SEED, **cfg)
    scores.update(compute_active_units(data, representation, seed=EVAL_SEED,
                                       num_points=max(2, cfg.get("num_train") or 10000),
                                       batch_size=cfg.get("encode_batch_size") or cfg.get("batch_size", 64)))
    return scores


def evaluate_run(study: Study, run: Run) -> None:
    """Score ``run``'s evaluation weights, write its metrics file and log it."""
    paths = study.paths(run)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed_everything(EVAL_SEED)
    model = study.build_model(run)
    model.load_state_dict(torch.load(paths.weights, map_location="cpu", weights_only=True))
    model.to(device).eval()
    if run.family == "density":
        metrics = density_metrics(study, run, model, device)
    else:
        metrics = disentanglement_metrics(study, run, model, device)
    paths.eval_metrics.parent.mkdir(parents=True, exist_ok=True)
    paths.eval_metrics.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")

    from sdn.tracking import Tracker

    tracker = Tracker(study.experiment)
    run_id = tracker.run_for_update(tracker.key(run.dataset, run.model, run.seed), study.resolved(run),
                                    {"family": run.family, "study": study.name})
    tracker.log_metrics(run_id, {f"test/{k}": v for k, v in metrics.items()})
    tracker.log_artifact(run_id, paths.eval_metrics, "metrics", name="eval.json")
    tracker.finish(run_id)


def main(argv: list[str] | None = None) -> None:
    run_stage(__doc__, __file__, evaluate_run, argv)


if __name__ == "__main__":
    main()
