"""MLflow bookkeeping for the DVC stage scripts: one experiment per study, one run per
(dataset, model, seed), with exactly one run per key tagged ``current=true``.

Only ``pipelines/`` imports this module; the rest of the library never imports mlflow.
The store is SQLite at the repository root (``mlflow.db``) unless ``MLFLOW_TRACKING_URI`` is set.
The root is found from git's *common* dir, so ``dvc exp run`` temp copies log to the same store.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

# Set before mlflow is imported anywhere: no telemetry, no background job workers.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipelines.provenance import package_versions  # noqa: E402
from sdn.callbacks import Callback  # noqa: E402

ROOT_ENV = "SDN_REPO_ROOT"
DB_NAME = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
# Tags that identify a run's key; ``current`` marks the run the UI and reports should show.
KEY_TAGS = ("dataset", "model", "seed")
CURRENT_TAG = "current"
_DVC_EXPS = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep


def resolve_repo_root(start: Optional[Path] = None) -> Path:
    """The main repository root: ``$SDN_REPO_ROOT``, else ``$DVC_ROOT``, else git's common dir's parent.

    DVC runs queued/temp experiments in copies under the ``exps`` folder of ``<root>/.dvc/tmp`` (with their own
    ``.git``) and sets ``DVC_ROOT`` to the main root; a path inside such a copy also resolves to
    ``<root>``, so every run lands in one store.
    """
    for env in (ROOT_ENV, "DVC_ROOT"):
        if os.environ.get(env):
            return _outside_exp_copy(Path(os.environ[env]).resolve())
    start = Path(start or Path.cwd()).resolve()
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
            cwd=start, capture_output=True, text=True, check=True,
        ).stdout.strip()
        root = Path(out).parent
    except (OSError, subprocess.CalledProcessError):
        root = start
    return _outside_exp_copy(root)


def _outside_exp_copy(root: Path) -> Path:
    """``<root>`` for a path inside the ``exps`` folder of ``<root>/.dvc/tmp`` (a DVC experiment copy), else the path."""
    text = str(root) + os.sep
    if _DVC_EXPS in text:
        return Path(text.split(_DVC_EXPS, 1)[0])
    return root


def tracking_uri(root: Optional[Path] = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<root>/mlflow.db``."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(root) if root is not None else resolve_repo_root()
    return f"sqlite:///{(root / DB_NAME).resolve()}"


def _artifact_location(uri: str, experiment: str) -> Optional[str]:
    """Artifacts of a SQLite store live next to the database; other stores decide themselves."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    return (db.parent / ARTIFACT_DIR / experiment).resolve().as_uri()


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> ``{"a.b.c": "value"}`` with JSON-ish string values (MLflow params)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name))
        elif isinstance(value, (list, tuple, Mapping)):
            out[name] = json.dumps(value, default=str)
        else:
            out[name] = str(value)
    return out


def git_commit(root: Path) -> str:
    """HEAD's commit hash at ``root`` (``"none"`` outside git or before the first commit)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "none"


@dataclass(frozen=True)
class RunKey:
    """What one MLflow run stands for in a study."""

    experiment: str
    dataset: str
    model: str
    seed: int

    @property
    def run_name(self) -> str:
        return f"{self.dataset}/{self.model}/seed{self.seed}"

    def filter_string(self) -> str:
        return " and ".join(f"tags.{k} = '{getattr(self, k)}'" for k in KEY_TAGS)


class Tracker:
    """Opens the study's experiment in the store and manages its per-key runs."""

    def __init__(self, experiment: str, uri: Optional[str] = None, root: Optional[Path] = None):
        if not isinstance(experiment, str) or not experiment:
            raise ValueError(f"experiment must be a non-empty string, got {experiment!r}")
        self.root = Path(root) if root is not None else resolve_repo_root()
        self.uri = uri or tracking_uri(self.root)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment = experiment
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=_artifact_location(self.uri, experiment)
            )
        else:
            self.experiment_id = found.experiment_id

    def key(self, dataset: str, model: str, seed: int) -> RunKey:
        return RunKey(self.experiment, dataset, model, int(seed))

    def runs_for(self, key: RunKey, current_only: bool = False) -> list:
        """All runs of ``key`` (newest first), or only the one(s) tagged current."""
        query = key.filter_string()
        if current_only:
            query += f" and tags.{CURRENT_TAG} = 'true'"
        return self.client.search_runs(
            [self.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"],
            max_results=1000,
        )

    def current_run_id(self, key: RunKey) -> Optional[str]:
        """The run tagged ``current=true`` for ``key``, or None."""
        runs = self.runs_for(key, current_only=True)
        return runs[0].info.run_id if runs else None

    def new_run(self, key: RunKey, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        """Create a run for ``key``, make it the only current one, log params and tags; return its id."""
        base_tags = {
            "dataset": key.dataset, "model": key.model, "seed": str(key.seed),
            "git_commit": git_commit(self.root), "mlflow.runName": key.run_name,
            "host": platform.node(), "argv": " ".join(sys.argv),
            "dvc_stage": os.environ.get("DVC_STAGE", "none"),
            "dvc_experiment": os.environ.get("DVC_EXP_NAME", "workspace"),
        }
        base_tags.update({f"version.{k}": v for k, v in package_versions().items()})
        base_tags.update({k: str(v) for k, v in tags.items()})
        run = self.client.create_run(self.experiment_id, run_name=key.run_name, tags=base_tags)
        run_id = run.info.run_id
        for old in self.runs_for(key, current_only=True):
            if old.info.run_id != run_id:
                self.client.set_tag(old.info.run_id, CURRENT_TAG, "false")
        self.client.set_tag(run_id, CURRENT_TAG, "true")
        flat = flatten(params)
        items = list(flat.items())
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(
                run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i:i + 100]]
            )
        return run_id

    def run_for_update(self, key: RunKey, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        """The current run of ``key`` (evaluate/fid log into it); a new current run if none exists."""
        run_id = self.current_run_id(key)
        if run_id is None:
            run_id = self.new_run(key, params, {**tags, "note": "no training run found in the store"})
        else:
            for name, value in tags.items():
                self.client.set_tag(run_id, name, str(value))
        return run_id

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log finite numeric metrics (non-numbers such as "n/a" are skipped)."""
        import math
        import time

        now = int(time.time() * 1000)
        batch = [
            mlflow.entities.Metric(str(k), float(v), now, int(step))
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        ]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[i:i + 1000])

    def log_artifact(self, run_id: str, path: Path, artifact_path: Optional[str] = None,
                     name: Optional[str] = None) -> None:
        """Copy a file (stored as ``name`` if given) or a directory into the run's artifacts."""
        import shutil
        import tempfile

        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        elif name is None or name == path.name:
            self.client.log_artifact(run_id, str(path), artifact_path)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                renamed = Path(tmp) / name
                shutil.copyfile(path, renamed)
                self.client.log_artifact(run_id, str(renamed), artifact_path)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)


class MlflowCallback(Callback):
    """Trainer callback that streams the training curve (and eval metrics) into one MLflow run."""

    def __init__(self, tracker: Tracker, run_id: str, prefix: str = "train/"):
        self.tracker, self.run_id, self.prefix = tracker, run_id, prefix

    def on_train_start(self, info: dict[str, Any]) -> None:
        self.tracker.client.set_tag(self.run_id, "device", str(info.get("device", "unknown")))
        self.tracker.client.set_tag(self.run_id, "world_size", str(info.get("world_size", 1)))
        if "num_parameters" in info:
            self.tracker.log_metrics(self.run_id, {"num_params": info["num_parameters"]})

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(self.run_id, {f"{self.prefix}{k}": v for k, v in metrics.items()}, step)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(self.run_id, {f"{self.prefix}eval_{k}": v for k, v in metrics.items()}, step)
