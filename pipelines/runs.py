"""One run of the study and where its files are: the stage's directories come from dvc.yaml, the
files of one seed inside them are named here (``RunPaths``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class Run:
    """One (family, dataset, model, seed) entry of the study."""

    family: str
    dataset: str
    model: str
    seed: int

    @property
    def stage_suffix(self) -> str:
        """The DVC matrix suffix of this run's stages (one stage per model handles every seed)."""
        return f"{self.dataset}-{self.model}"


@dataclass(frozen=True)
class StageDirs:
    """The paths dvc.yaml gives one per-model stage (None: the stage does not use that kind)."""

    models: Optional[Path] = None  # checkpoints and evaluation weights (DVC cache)
    samples: Optional[Path] = None  # sample grids, reconstructions (DVC cache)
    train_metrics: Optional[Path] = None  # DVC metrics (git)
    curves: Optional[Path] = None  # DVC plots (git)
    eval_metrics: Optional[Path] = None
    fid_metrics: Optional[Path] = None
    reference: Optional[Path] = None  # the dataset's FID reference statistics file (fid_stats stage)


@dataclass(frozen=True)
class RunPaths:
    """The files of one seed inside its stage's directories."""

    dirs: StageDirs
    seed: int

    def _in(self, directory: Optional[Path], name: str) -> Path:
        if directory is None:
            raise ValueError(f"this stage was given no directory for {name}")
        return directory / name

    @property
    def model_dir(self) -> Path:
        return self._in(self.dirs.models, f"seed{self.seed}")

    @property
    def weights(self) -> Path:
        """The weights evaluation uses (the selected EMA weights), saved by the train stage."""
        return self.model_dir / "eval_weights.pt"

    @property
    def samples(self) -> Path:
        return self._in(self.dirs.samples, f"seed{self.seed}.png")

    @property
    def reconstructions(self) -> Path:
        return self._in(self.dirs.samples, f"seed{self.seed}_reconstructions.png")

    @property
    def train_metrics(self) -> Path:
        return self._in(self.dirs.train_metrics, f"seed{self.seed}.json")

    @property
    def curve(self) -> Path:
        return self._in(self.dirs.curves, f"seed{self.seed}.csv")

    @property
    def eval_metrics(self) -> Path:
        return self._in(self.dirs.eval_metrics, f"seed{self.seed}.json")

    @property
    def fid_metrics(self) -> Path:
        return self._in(self.dirs.fid_metrics, f"seed{self.seed}.json")



def results_paths(results: Path, run: Run) -> RunPaths:
    """The files of ``run`` under a study's results folder, as dvc.yaml lays the stages' outputs out
    (``<results>/<kind>/<dataset>/<model>/``; tests/test_study_params.py checks it against dvc.yaml)."""
    def under(*kind: str) -> Path:
        return Path(results, *kind, run.dataset, run.model)

    return RunPaths(StageDirs(models=under("models"), samples=under("samples"),
                              train_metrics=under("metrics", "train"), curves=under("curves"),
                              eval_metrics=under("metrics", "eval"), fid_metrics=under("metrics", "fid")), run.seed)


def experiment_name(study_name: str, family: str) -> str:
    """The MLflow experiment of one study family: ``sdn-<study>-<family>`` (e.g. ``sdn-embedded-density``)."""
    if not study_name or not family:
        raise ValueError(f"study name and family must be non-empty, got {study_name!r}, {family!r}")
    return f"sdn-{study_name}-{family}"
