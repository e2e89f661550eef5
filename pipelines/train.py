"""DVC stage ``train_<family>@<dataset>-<model>``: train every seed of one model (or ``--seed``).

Per run: the trainer checkpoint and the weights evaluation uses, a sample grid (and, for VAEs,
reconstructions), the training curve (DVC plots) and a metrics file, all logged to a new MLflow run
marked current. Seeds run ``study.runs_at_once`` at a time (``pipelines.study.run_stage``). Works
unchanged under ``torchrun`` (every rank trains; rank 0 writes files and tracks).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's sdn/ and baselines/

import torch  # noqa: E402
import torchvision.utils  # noqa: E402

from sdn.callbacks import CurveWriter  # noqa: E402
from sdn.checkpoint import remove_other_checkpoints, run_checkpoint_dir  # noqa: E402
from sdn.configs import count_parameters  # noqa: E402
from sdn.seeding import make_generator, seed_everything  # noqa: E402
from pipelines.study import Run, Study, run_stage  # noqa: E402
from sdn.data.augment import RandomHFlip  # noqa: E402
from sdn.training import train  # noqa: E402


def validation_bpd_fn(study, run):
    """``eval_fn`` of a density run: ELBO bits/dim of the whole validation split (one posterior
    sample per image, the trainer fixes the seed), so the curve shows held-out progress and
    ``train.keep_best: elbo_bpd`` can select the checkpoint on it."""
    from sdn.scores import evaluate_bpd
    from torch.utils.data import DataLoader

    loader = DataLoader(study.dataset(run.dataset, "validation"),
                        batch_size=study.section(run.family, run.dataset)["eval"]["batch_size"])

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        scores = evaluate_bpd(model, loader, num_samples=1, seed=0, device=device, progress=False)
        return {"elbo_bpd": float(scores["elbo_bpd"])}

    return evaluate


RECONSTRUCTED = 8  # inputs shown above their reconstructions (the same grid points for every run)


def save_reconstructions(model: torch.nn.Module, dataset, path: Path) -> None:
    """Write ``RECONSTRUCTED`` training inputs (top row) above their decoded posterior means (bottom
    row); the inputs are a fixed draw of the dataset, so runs can be compared image by image."""
    import numpy as np

    indices = np.random.default_rng(0).choice(len(dataset), RECONSTRUCTED, replace=False)
    inputs = torch.stack([dataset[int(i)][0] for i in indices])
    recons = model.reconstruct(inputs)
    torchvision.utils.save_image(torch.cat([inputs, recons]).float() / 255.0, path, nrow=RECONSTRUCTED,
                                 padding=1)


def sample_grids(paths, samples_cfg) -> list[tuple[float, Path]]:
    """(temperature, PNG path) of every sample grid of a run: the main grid at ``temperature``
    (the one FID uses) first, then one per extra ``temperatures`` entry (the paper's 0.6-1.0)."""
    extra = [float(t) for t in samples_cfg.get("temperatures", []) if float(t) != float(samples_cfg["temperature"])]
    return [(float(samples_cfg["temperature"]), paths.samples)] + [
        (t, paths.samples.with_name(f"{paths.samples.stem}_t{t:g}.png")) for t in extra]


def train_run(study: Study, run: Run) -> None:
    """Train (or resume, or just re-export a finished) ``run`` and write its outputs."""
    paths = study.paths(run)
    rank = int(os.environ.get("RANK", "0"))

    dataset = study.dataset(run.dataset, "train")
    model_config = study.model_config(run.family, run.dataset, run.model, run.seed)
    if getattr(model_config, "hflip", False):
        dataset = RandomHFlip(dataset)
    seed_everything(run.seed)
    model = study.build_model(run)
    num_params = count_parameters(model)
    train_config = study.train_config(run.family, run.dataset, run.seed, run.model)

    # The model directory is a persistent DVC output: an interrupted run resumes from the checkpoint
    # of exactly this configuration, a changed configuration starts afresh. The curve is kept beside
    # the checkpoint (DVC deletes the plots file before a rerun) and copied out when training ends.
    checkpoint_dir = run_checkpoint_dir(paths.model_dir, study.resolved(run))
    curve = checkpoint_dir / "curve.csv"
    if rank == 0 and checkpoint_dir.exists() and not curve.exists():
        print(f"train: {curve} is missing, retraining {run.stage_suffix} from scratch", file=sys.stderr)
        shutil.rmtree(checkpoint_dir)
    callbacks = []
    tracker = run_id = None
    if rank == 0:
        from sdn.tracking import MlflowCallback, Tracker

        for path in (paths.samples, paths.train_metrics, paths.curve):
            path.parent.mkdir(parents=True, exist_ok=True)
        tracker = Tracker(study.experiment)
        run_id = tracker.new_run(
            tracker.key(run.dataset, run.model, run.seed), study.resolved(run),
            {"family": run.family, "study": study.name, "stage": f"train_{run.family}@{run.stage_suffix}"},
        )
        callbacks = [CurveWriter(curve), MlflowCallback(tracker, run_id)]
    try:
        eval_fn = validation_bpd_fn(study, run) if train_config.eval_every and run.family == "density" else None
        result = train(model, dataset, train_config, checkpoint_dir, callbacks=callbacks, resume=True,
                       eval_fn=eval_fn)
    except BaseException:
        if tracker is not None:
            tracker.finish(run_id, "FAILED")
        raise
    if rank != 0:
        return

    remove_other_checkpoints(checkpoint_dir)
    shutil.copyfile(curve, paths.curve)
    eval_model = result.eval_model.eval()
    if result.best_state is not None:  # train.keep_best: the weights of the best validation step
        eval_model.load_state_dict(result.best_state)
    torch.save(eval_model.state_dict(), paths.weights)
    samples_cfg = study.section(run.family, run.dataset)["samples"]
    eval_model = eval_model.cpu()
    for temperature, path in sample_grids(paths, samples_cfg):
        images = eval_model.sample(samples_cfg["num"], temperature=temperature, generator=make_generator(run.seed))
        nrow = max(1, int(round(samples_cfg["num"] ** 0.5)))
        torchvision.utils.save_image(images.float() / 255.0, path, nrow=nrow, padding=1)
    if run.family == "disentanglement":
        save_reconstructions(eval_model, study.dataset(run.dataset, "train"), paths.reconstructions)

    final = {f"train_{k}": float(v) for k, v in result.metrics.items()}
    metrics = {"num_params": num_params, "steps": result.steps, **final}
    if result.best is not None:  # which evaluation was selected, and its validation score
        metrics["selected_step"] = int(result.best["step"])
        metrics.update({f"selected_validation_{k}": float(v) for k, v in result.best["metrics"].items()})
    paths.train_metrics.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")

    tracker.log_metrics(run_id, metrics, step=result.steps)
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "resolved_config.json"
        resolved.write_text(json.dumps(study.resolved(run), indent=2, default=str) + "\n")
        tracker.log_artifact(run_id, resolved)
    for temperature, path in sample_grids(paths, samples_cfg)[1:]:
        tracker.log_artifact(run_id, path, "samples", name=f"samples_t{temperature:g}.png")
    tracker.log_artifact(run_id, paths.samples, name="samples.png")
    if run.family == "disentanglement":
        tracker.log_artifact(run_id, paths.reconstructions, name="reconstructions.png")
    tracker.log_artifact(run_id, paths.train_metrics, "metrics", name="train.json")
    tracker.log_artifact(run_id, paths.curve, "metrics", name="train_curve.csv")
    tracker.finish(run_id)


def main(argv: list[str] | None = None) -> None:
    run_stage(__doc__, __file__, train_run, argv)


if __name__ == "__main__":
    main()
