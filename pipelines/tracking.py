"""MLflow bookkeeping for the DVC stage scripts (docs/mlflow.md is the user's side of it).

* One experiment per study family, ``sdn-<study>-<family>`` (:func:`experiment_name`), whose
  description (tag ``mlflow.note.content``) says what its runs are and where their numbers come from.
* One run per trained (dataset, model, seed). No DVC output names it (a run id is random: a rerun
  of the same study must give the same ``dvc.lock``); the store links runs and files by tags. The
  train stage tags its run with the checkpoint folder it trains in (:data:`CHECKPOINT_TAG`, with
  ``host``; :data:`CONFIG_TAG` its configuration fingerprint) and, once exported, with the sha256 of
  ``eval_weights.pt`` (:data:`WEIGHTS_TAG`); the evaluate and fid stages log into the run that
  trained the weights they read (:meth:`Tracker.run_of_model`), preferring the run of their own
  DVC experiment.
* An interrupted training run (SIGKILL, crash) is reopened by the rerun that resumes its checkpoint
  (the run tagged with that checkpoint folder on this host): same run, the curve steps already in
  the store are not logged twice.
* Artifacts: experiments get ``mlflow-artifacts:/<experiment>`` as artifact location, which this
  module resolves against the store's folder (``<root>/mlartifacts/<experiment>/...``) and which
  ``mlflow server`` (cwd = that folder) serves: no absolute path is stored, a moved clone keeps
  every artifact link.

Only ``pipelines/`` imports this module; the rest of the library never imports mlflow.
The store is SQLite at the repository root (``mlflow.db``) unless ``MLFLOW_TRACKING_URI`` is set.
The root is found from git's *common* dir, so ``dvc exp run`` temp copies log to the same store.
"""

from __future__ import annotations

import csv
import fcntl
import getpass
import json
import math
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol

# Set before mlflow is imported anywhere: no telemetry, no background job workers.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

import mlflow  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipelines.provenance import package_versions
from pipelines.runs import experiment_name  # noqa: E402
from sdn.callbacks import EVAL_PREFIX, Callback  # noqa: E402
from sdn.data.hashing import file_digests  # noqa: E402

ROOT_ENV = "SDN_REPO_ROOT"
DB_NAME = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
ARTIFACT_SCHEME = "mlflow-artifacts:"
# The tags that link a run to the files of its training (no DVC output names a run):
CONFIG_TAG = "config_hash"  # the checkpoint folder's name: the fingerprint of the run's resolved configuration
CHECKPOINT_TAG = "checkpoint_dir"  # the checkpoint folder's absolute path on ``host``: the training it resumes
WEIGHTS_TAG = "weights_sha256"  # sha256 of the exported ``eval_weights.pt``: what evaluate and fid find it by
WEIGHTS_FILE = "eval_weights.pt"  # the name of the evaluation weights (pipelines.runs.RunPaths.weights)
# The training curve the train stage keeps beside the checkpoint (read back to complete a run).
CURVE_FILE = "curve.csv"
KEY_TAGS = ("dataset", "model", "seed")
COMPLETE_TAG = "complete"
# Files DVC itself rewrites during `dvc repro` (outputs in git): not a sign of edited code or params.
DVC_WRITTEN = ("dvc.lock", "results", "reports")
_DVC_EXPS = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep

class TrackedFamily(Protocol):
    """What tracking needs of a study family (``pipelines.families.Family`` has it)."""

    name: str
    stages: tuple[str, ...]  # a run is complete once every one of these stages is done
    mlflow_text: str  # what its runs hold


def experiment_description(study_name: str, family: TrackedFamily) -> str:
    """The experiment's description (MLflow's ``mlflow.note.content``, Markdown)."""
    return (
        f"Study `{study_name}`, family `{family.name}`. {family.mlflow_text}\n\n"
        f"The numbers come from the DVC stages (`python -m pipelines.train|evaluate|fid`, run by "
        f"`dvc repro` / `dvc exp run`); the record is the DVC metrics files under "
        f"`results/{study_name}/metrics/` (`train/`, `eval/`, `fid/`) and the curves under "
        f"`results/{study_name}/curves/`: `test/<key>` and `fid/<key>` equal those files' `<key>`. "
        f"Timings (`train/seconds`, `train/images_per_second`) exist only here. Runs with "
        f"`tags.complete = 'true'` have every stage's metrics; `tags.dvc_experiment` names the DVC "
        f"experiment (`workspace` outside one). See docs/mlflow.md.")


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


def _sqlite_folder(uri: str) -> Optional[Path]:
    """The folder of a SQLite store's database file (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).resolve().parent


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


def _git(cwd: Path, *args: str) -> Optional[str]:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def git_commit(root: Path) -> str:
    """HEAD's commit hash at ``root`` (``"none"`` outside git or before the first commit)."""
    out = _git(Path(root), "rev-parse", "HEAD")
    return out.strip() if out else "none"


def git_state(cwd: Optional[Path] = None) -> dict[str, str]:
    """What the code and params of a stage run are: ``git_commit`` and ``git_dirty``.

    Outside a DVC experiment the commit is HEAD; inside one (``DVC_EXP_BASELINE_REV`` set) the
    experiment's own commit does not exist yet while it runs, so the commit is the experiment's
    baseline and ``git_dirty`` says whether the experiment's files (e.g. its ``-S`` params) differ
    from it. Dirty = a tracked file differs from the commit (``git status --porcelain -uno``:
    untracked files ignored), not counting what DVC itself rewrites (:data:`DVC_WRITTEN`).
    """
    cwd = Path(cwd or Path.cwd())
    commit = os.environ.get("DVC_EXP_BASELINE_REV") or git_commit(cwd)
    if commit == "none":
        return {"git_commit": "none", "git_dirty": "unknown"}
    excludes = [f":(exclude){p}" for p in DVC_WRITTEN]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        out = _git(cwd, "diff", "--name-only", commit, "--", ".", *excludes)
    else:
        out = _git(cwd, "status", "--porcelain", "--untracked-files=no", "--", ".", *excludes)
    dirty = "unknown" if out is None else ("true" if out.strip() else "false")
    return {"git_commit": commit, "git_dirty": dirty}


def weights_digest(path: Path) -> str:
    """sha256 of a weights file: the content key that links a trained model to its MLflow run."""
    return file_digests(path, ("sha256",), progress=False)["sha256"]


@dataclass(frozen=True)
class RunKey:
    """What one MLflow run stands for in a study."""

    experiment: str
    dataset: str
    model: str
    seed: int

    @property
    def run_name(self) -> str:
        """``<dataset>/<model>/seed<seed>``, with ``[<dvc experiment>]`` inside a DVC experiment."""
        name = f"{self.dataset}/{self.model}/seed{self.seed}"
        exp = os.environ.get("DVC_EXP_NAME")
        return f"{name} [{exp}]" if exp else name

    def filter_string(self) -> str:
        return " and ".join(f"tags.{k} = '{getattr(self, k)}'" for k in KEY_TAGS)


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock (``mlflow.db-lock`` beside a SQLite store) while the store is created,
    migrated or an experiment made: parallel seeds and DVC experiments on a fresh clone otherwise race
    on MLflow's schema migration (``table _alembic_tmp_experiments already exists``)."""
    folder = _sqlite_folder(uri)
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{DB_NAME}-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class StoreError(RuntimeError):
    """The MLflow store is damaged or unreachable; the message is one line naming it and what to do."""


def store_problem(uri: Optional[str] = None, timeout: float = 10.0) -> Optional[str]:
    """One line naming what is wrong with the MLflow store at ``uri`` and what to do, or None when
    it is usable. SQLite: the database file must read back whole (``PRAGMA quick_check``; a missing
    file is fine, it is created). A server (``http(s)://``): its ``/health`` must answer within
    ``timeout`` seconds. Any other store: one ``search_experiments`` call must succeed."""
    uri = uri or tracking_uri()
    folder = _sqlite_folder(uri)
    if folder is not None:
        path = Path(uri[len("sqlite:///"):]).resolve()
        if not path.exists():
            return None if os.access(_existing_parent(path), os.W_OK) else (
                f"MLflow store {path} cannot be created: {_existing_parent(path)} is not writable")
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout) as db:
                verdict = db.execute("PRAGMA quick_check").fetchone()
            if verdict is None or verdict[0] != "ok":
                raise sqlite3.DatabaseError(str(verdict[0] if verdict else "no answer"))
        except sqlite3.Error as error:
            if "locked" in str(error):  # another stage is writing: busy, not damaged
                return None
            return (f"MLflow store {path} is damaged ({error}): move it aside (mv {path} {path}.broken) "
                    f"to start an empty store there, or restore it from a backup")
        return None
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
                if response.status == 200:
                    return None
                reason = f"HTTP {response.status}"
        except (OSError, urllib.error.URLError) as error:
            reason = str(getattr(error, "reason", error))
        return (f"MLflow server {uri} (MLFLOW_TRACKING_URI) is unreachable ({reason}): start it "
                f"(docs/team.md), or unset MLFLOW_TRACKING_URI to log to the local mlflow.db")
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - any failure means the store is unusable; named below
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"MLflow store {uri} (MLFLOW_TRACKING_URI) is unusable ({first[:300]}): check the URI and the database"
    return None


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_store(uri: Optional[str] = None) -> str:
    """The store's URI once it is usable; :class:`StoreError` with :func:`store_problem`'s line otherwise.
    The stage runner calls it before a stage touches anything (``pipelines.study.run_stage``)."""
    uri = uri or tracking_uri()
    problem = store_problem(uri)
    if problem is not None:
        raise StoreError(problem)
    return uri


def _completion_hint() -> str:
    stage = os.environ.get("DVC_STAGE")
    if stage:
        return f"dvc repro -f --single-item {stage}"
    return "the same command again"


class _GuardedClient:
    """An ``MlflowClient`` whose calls stop failing the stage once the store has gone away.

    The store was checked when the stage started. When a call then fails and the store no longer
    answers (:func:`store_problem`), a warning names it once and every later call does nothing and
    returns None: training goes on and the stage writes its DVC outputs; rerunning the stage with the
    store back completes the MLflow run (it is reopened and its curve filled in from the curve file).
    A failing call while the store still answers is a real error and is raised."""

    def __init__(self, client: MlflowClient, uri: str, warn: Callable[[str], None]):
        self._client, self._uri, self._warn = client, uri, warn
        self.lost: Optional[str] = None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.lost is not None:
                return None
            try:
                return attr(*args, **kwargs)
            except Exception:
                problem = store_problem(self._uri, timeout=5.0)
                if problem is None:
                    raise
                self.lost = problem
                self._warn(problem)
                return None

        return call


def _warn_store_lost(problem: str) -> None:
    print(f"warning: {problem}. The stage goes on without MLflow and writes its DVC outputs; once the "
          f"store is back, complete the MLflow runs with: {_completion_hint()}", file=sys.stderr, flush=True)


def prepare_store(uri: Optional[str] = None) -> str:
    """Create (and migrate) the store without creating an experiment; return its URI."""
    uri = uri or tracking_uri()
    with store_lock(uri):
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    return uri


class Tracker:
    """Opens one experiment in the store and logs into its runs."""

    def __init__(self, experiment: str, uri: Optional[str] = None, root: Optional[Path] = None,
                 description: Optional[str] = None, stages: tuple[str, ...] = ("train", "evaluate")):
        if not isinstance(experiment, str) or not experiment:
            raise ValueError(f"experiment must be a non-empty string, got {experiment!r}")
        self.root = Path(root) if root is not None else resolve_repo_root()
        self.uri = uri or tracking_uri(self.root)
        self.experiment = experiment
        self.stages = tuple(stages)  # a run whose stages are all done is tagged complete
        # Where mlflow-artifacts:/ URIs point: the SQLite store's folder (what `mlflow server` run
        # there serves as ./mlartifacts); None for other stores, which handle artifacts themselves.
        folder = _sqlite_folder(self.uri)
        self.artifact_root = folder / ARTIFACT_DIR if folder is not None else None
        self._logged: dict[str, set[tuple[str, int]]] = {}
        # A store that goes away, even while the experiment is being opened, does not fail the stage
        # (see _GuardedClient): a seed started side by side may open its tracker after the stage's
        # store check passed and the server stopped; it then trains without MLflow, as the others do.
        self.experiment_id: Optional[str] = None
        with store_lock(self.uri):  # MlflowClient creates and migrates a SQLite store right away
            self.client = _GuardedClient(MlflowClient(tracking_uri=self.uri), self.uri, _warn_store_lost)
            self._open_experiment(experiment, description)

    @property
    def lost(self) -> Optional[str]:
        """What happened to the store when it went away during this stage (None: it did not)."""
        return getattr(self.client, "lost", None)

    def _open_experiment(self, experiment: str, description: Optional[str]) -> None:
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            location = f"{ARTIFACT_SCHEME}/{experiment}" if self.artifact_root is not None else None
            try:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            except MlflowException:  # another process (of another store lock) created it first
                found = self.client.get_experiment_by_name(experiment)
                if found is None and self.lost is not None:
                    return  # the store went away in between: no experiment, the stage goes on without it
                if found is None:
                    raise
                self.experiment_id = found.experiment_id
        else:
            self.experiment_id = found.experiment_id
        if description is not None and (found is None or found.tags.get("mlflow.note.content") != description):
            self._describe_experiment(description)

    def _describe_experiment(self, description: str) -> None:
        """Set the experiment's description, tolerating a concurrent stage that sets it at the same time.

        A server's SQL store inserts a tag it does not find: two stages of a parallel queue that open a new
        experiment together race, and the loser gets a unique-key violation although the row it wanted is
        there. It reads the tag back and, if another stage wrote a different text, writes once more (an
        update now, since the row exists).
        """
        try:
            self.client.set_experiment_tag(self.experiment_id, "mlflow.note.content", description)
        except MlflowException:
            current = self.client.get_experiment(self.experiment_id)
            if current is None:  # the store went away in between
                return
            if current.tags.get("mlflow.note.content") != description:
                self.client.set_experiment_tag(self.experiment_id, "mlflow.note.content", description)

    @classmethod
    def for_family(cls, study_name: str, family: TrackedFamily, **kwargs: Any) -> "Tracker":
        """The tracker of the experiment of ``family`` in study ``study_name``, with its description and stages."""
        return cls(experiment_name(study_name, family.name), description=experiment_description(study_name, family),
                   stages=family.stages, **kwargs)

    def key(self, dataset: str, model: str, seed: int) -> RunKey:
        return RunKey(self.experiment, dataset, model, int(seed))

    def runs_for(self, key: RunKey) -> list:
        """All runs of ``key`` in this experiment (newest first)."""
        return self.client.search_runs(
            [self.experiment_id], filter_string=key.filter_string(), order_by=["attributes.start_time DESC"],
            max_results=1000,
        )

    def new_run(self, key: RunKey, params: Mapping[str, Any], tags: Mapping[str, str]) -> Optional[str]:
        """Create a run for ``key``, log its params and tags; return its id (None when the store has gone
        away: like every call of the guarded client, the stage then goes on without MLflow)."""
        git = git_state()
        base_tags = {
            "dataset": key.dataset, "model": key.model, "seed": str(key.seed), **git,
            "mlflow.runName": key.run_name, "mlflow.user": _user(),
            "mlflow.source.name": _source_name(), "mlflow.source.type": "LOCAL",
            "host": platform.node(), "argv": " ".join(sys.argv),
            "dvc_stage": os.environ.get("DVC_STAGE", "none"),
            "dvc_experiment": os.environ.get("DVC_EXP_NAME", "workspace"),
        }
        if git["git_commit"] != "none":
            base_tags["mlflow.source.git.commit"] = git["git_commit"]
        base_tags.update({f"version.{k}": v for k, v in package_versions().items()})
        base_tags.update({k: str(v) for k, v in tags.items()})
        run = self.client.create_run(self.experiment_id, run_name=key.run_name, tags=base_tags)
        if run is None:
            return None
        run_id = run.info.run_id
        self._logged[run_id] = set()
        items = list(flatten(params).items())
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i:i + 100]])
        return run_id

    def get_run(self, run_id: str):
        """The run, or None when the store does not have it (or it was deleted)."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None
        return run if run is not None and run.info.lifecycle_stage == "active" else None

    def status(self, run_id: str) -> Optional[str]:
        run = self.get_run(run_id)
        return run.info.status if run is not None else None

    def reopen(self, run_id: str) -> None:
        """Mark ``run_id`` RUNNING again and remember every (metric, step) it holds, so a resumed
        stage logs only what is new (:meth:`log_metrics` skips the rest)."""
        run = self.client.get_run(run_id)
        logged: set[tuple[str, int]] = set()
        for name in run.data.metrics if run is not None else ():
            logged.update((name, int(m.step)) for m in self.client.get_metric_history(run_id, name) or ())
        self._logged[run_id] = logged
        self.client.update_run(run_id, status="RUNNING")

    def metric_at(self, run_id: str, name: str, step: int) -> Optional[float]:
        """The value of ``name`` at the last step <= ``step`` (None if there is none)."""
        points = [m for m in self.client.get_metric_history(run_id, name) or () if m.step <= step]
        return max(points, key=lambda m: (m.step, m.timestamp)).value if points else None

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Log finite numeric metrics (non-numbers such as "n/a", bools and NaN are skipped). In a
        reopened run a (metric, step) pair already in the store is not logged again."""
        now = int(time.time() * 1000)
        logged = self._logged.setdefault(run_id, set())
        batch = []
        for k, v in metrics.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(float(v)):
                continue
            if (str(k), int(step)) in logged:
                continue
            logged.add((str(k), int(step)))
            batch.append(mlflow.entities.Metric(str(k), float(v), now, int(step)))
        for i in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[i:i + 1000])

    def artifact_dir(self, run_id: str) -> Optional[Path]:
        """The local folder of the run's artifacts when its URI is ``mlflow-artifacts:/...`` and the
        store is SQLite (resolved against the store's folder, never the process's cwd)."""
        run = self.client.get_run(run_id)
        if run is None:
            return None
        uri = run.info.artifact_uri
        if self.artifact_root is None or not uri.startswith(ARTIFACT_SCHEME):
            return None
        return self.artifact_root / uri[len(ARTIFACT_SCHEME):].lstrip("/")

    def log_artifact(self, run_id: str, path: Path, artifact_path: Optional[str] = None,
                     name: Optional[str] = None) -> None:
        """Copy a file (stored as ``name`` if given) or a directory into the run's artifacts."""
        path = Path(path)
        local = self.artifact_dir(run_id)
        if local is not None:
            dest = local / artifact_path if artifact_path else local
            if path.is_dir():
                for file in sorted(p for p in path.rglob("*") if p.is_file()):
                    _copy_atomic(file, dest / path.name / file.relative_to(path))
            else:
                _copy_atomic(path, dest / (name or path.name))
            return
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        elif name is None or name == path.name:
            self.client.log_artifact(run_id, str(path), artifact_path)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                renamed = Path(tmp) / name
                shutil.copyfile(path, renamed)
                self.client.log_artifact(run_id, str(renamed), artifact_path)

    def list_artifacts(self, run_id: str) -> list[str]:
        """Every artifact file of the run, as paths relative to its artifact root (sorted)."""
        local = self.artifact_dir(run_id)
        if local is not None:
            return sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        out, folders = [], [None]
        while folders:
            for info in self.client.list_artifacts(run_id, folders.pop()):
                (folders if info.is_dir else out).append(info.path)
        return sorted(out)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        """Terminate the run (its end time: now)."""
        self.client.set_terminated(run_id, status=status)

    def stage_failed(self, run_id: str, stage: str) -> None:
        """Mark a run FAILED by a later stage without moving its end time (the training time stays)."""
        self.client.set_tag(run_id, "failed_stage", stage)
        self.client.update_run(run_id, status="FAILED")

    def stage_done(self, run_id: str, stage: str) -> None:
        """Tag ``done_<stage>=true``; once every stage of the family is done, ``complete=true``. A
        run a failed ``stage`` had marked FAILED is FINISHED again."""
        self.client.set_tag(run_id, f"done_{stage}", "true")
        run = self.client.get_run(run_id)
        if run is None:  # the store went away
            return
        tags = run.data.tags
        if run.info.status == "FAILED" and tags.get("failed_stage") == stage:
            self.client.delete_tag(run_id, "failed_stage")
            self.client.update_run(run_id, status="FINISHED")
        if all(tags.get(f"done_{s}") == "true" for s in self.stages):
            self.client.set_tag(run_id, COMPLETE_TAG, "true")

    def runs_with(self, key: RunKey, **tags: str) -> list:
        """The runs of ``key`` whose tags have these (quote-free) values, newest first; [] when the store is gone."""
        extra = "".join(f" and tags.{name} = '{value}'" for name, value in tags.items())
        return list(self.client.search_runs(
            [self.experiment_id], filter_string=key.filter_string() + extra,
            order_by=["attributes.start_time DESC"], max_results=1000) or ())

    def run_of_model(self, weights: Path, key: RunKey, params: Mapping[str, Any],
                     tags: Mapping[str, str]) -> Optional[str]:
        """The run that trained the weights file ``weights`` (evaluate and fid log into it): of the runs
        of ``key`` tagged with its sha256 (several when identical studies ran), the one that trained
        beside it (its checkpoint folder under the weights' folder, on this host), else the one of
        this DVC experiment, else the newest. Weights no run of this store trained (e.g. pulled from a
        DVC remote) get a new run saying so, which the next stage finds by the same tag. None when the
        store has gone away (the stage goes on without MLflow)."""
        digest = weights_digest(weights)
        runs = self.runs_with(key, **{WEIGHTS_TAG: digest})
        if runs:
            folder = str(Path(weights).resolve().parent) + os.sep
            experiment = os.environ.get("DVC_EXP_NAME", "workspace")
            run = min(runs, key=lambda r: (
                not (r.data.tags.get("host") == platform.node()
                     and r.data.tags.get(CHECKPOINT_TAG, "").startswith(folder)),
                r.data.tags.get("dvc_experiment") != experiment))  # min keeps the newest of equals
            for name, value in tags.items():
                self.client.set_tag(run.info.run_id, name, str(value))
            return run.info.run_id
        why = f"no run of this store trained {weights} (sha256 {digest})"
        run_id = self.new_run(key, params, {**tags, WEIGHTS_TAG: digest, "note": why})
        if run_id is not None:
            self.client.set_terminated(run_id, "FINISHED")
        return run_id


def _copy_atomic(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (some containers)
        return "unknown"


def _source_name() -> str:
    """What the UI's Source column shows: the DVC stage (and experiment) or the command."""
    stage = os.environ.get("DVC_STAGE")
    if stage:
        exp = os.environ.get("DVC_EXP_NAME")
        return f"dvc stage {stage}" + (f" (experiment {exp})" if exp else "")
    return " ".join(["python", *sys.argv])[:500]


@dataclass
class TrainingRun:
    """The MLflow run of one training (see :func:`open_training_run`)."""

    run_id: str
    mode: str  # "new", "resumed" (reopened after an interruption) or "finished" (nothing left to log)


def open_training_run(tracker: Tracker, checkpoint_dir: Path, key: RunKey, params: Mapping[str, Any],
                      tags: Mapping[str, str], weights: Optional[Path] = None) -> Optional[TrainingRun]:
    """The run of the training whose checkpoint folder is ``checkpoint_dir``.

    When the folder exists, the newest run tagged with it on this host (:func:`runs_trained_in`) is
    its run: one that finished is reused as is (the stage only re-exports), an interrupted one
    (RUNNING after a SIGKILL, FAILED, KILLED) is reopened and continues. A folder no run names
    (a copied or moved clone) is a finished run's when the exported ``weights`` and the configuration
    are that run's. Otherwise a new run is created, tagged with the folder and the configuration
    fingerprint (its name). Runs of sibling checkpoint folders (stale configurations the stage is
    about to delete) still RUNNING are marked KILLED. None when the store has gone away.
    """
    checkpoint_dir = Path(checkpoint_dir).resolve()
    for other in {Path(r.data.tags.get(CHECKPOINT_TAG, "")) for r in _runs_on_this_host(tracker, key)}:
        if other.parent == checkpoint_dir.parent and other != checkpoint_dir:
            abandon_run_in(tracker, key, other)
    found = runs_trained_in(tracker, key, checkpoint_dir) if checkpoint_dir.is_dir() else []
    if not found and checkpoint_dir.is_dir() and weights is not None and Path(weights).is_file():
        same = tracker.runs_with(key, **{WEIGHTS_TAG: weights_digest(weights), CONFIG_TAG: checkpoint_dir.name})
        found = [r for r in same if r.info.status == "FINISHED"]
    if found:
        run = found[0]
        if run.info.status == "FINISHED":
            return TrainingRun(run.info.run_id, "finished")
        tracker.reopen(run.info.run_id)
        tracker.client.set_tag(run.info.run_id, "resumed", str(int(run.data.tags.get("resumed", "0")) + 1))
        backfill_curve(tracker, run.info.run_id, checkpoint_dir / CURVE_FILE)
        return TrainingRun(run.info.run_id, "resumed")
    run_id = tracker.new_run(key, params, {**tags, CONFIG_TAG: checkpoint_dir.name,
                                           CHECKPOINT_TAG: str(checkpoint_dir)})
    if run_id is None:  # the store went away: the stage trains without MLflow
        return None
    # A folder trained while the store was away has a curve no run holds yet.
    backfill_curve(tracker, run_id, checkpoint_dir / CURVE_FILE)
    return TrainingRun(run_id, "new")


def _runs_on_this_host(tracker: Tracker, key: RunKey) -> list:
    return [r for r in tracker.runs_for(key) or () if r.data.tags.get("host") == platform.node()]


def runs_trained_in(tracker: Tracker, key: RunKey, checkpoint_dir: Path) -> list:
    """The runs of ``key`` that trained in the checkpoint folder ``checkpoint_dir`` of this host, newest first."""
    folder = str(Path(checkpoint_dir).resolve())
    return [r for r in _runs_on_this_host(tracker, key) if r.data.tags.get(CHECKPOINT_TAG) == folder]


def backfill_curve(tracker: Tracker, run_id: str, curve: Path) -> int:
    """Log the points of the curve file ``curve`` (CSV, as ``sdn.callbacks.CurveWriter`` writes it)
    that the reopened run lacks: ``val_<m>`` as ``validation/<m>``, the other columns as
    ``train/<m>``. A store that went away during training missed them; return how many were logged."""
    try:
        with Path(curve).open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError:
        return 0
    count = 0
    for row in rows:
        step = int(float(row.pop("step")))
        values = {(f"validation/{k[len(EVAL_PREFIX):]}" if k.startswith(EVAL_PREFIX) else f"train/{k}"): float(v)
                  for k, v in row.items() if k and v not in (None, "")}
        before = len(tracker._logged.get(run_id, ()))
        tracker.log_metrics(run_id, values, step)
        count += len(tracker._logged.get(run_id, ())) - before
    return count


def abandon_run_in(tracker: Tracker, key: RunKey, folder: Path) -> None:
    """Mark the runs that trained in the checkpoint folder ``folder`` KILLED if still RUNNING (the
    checkpoint is being discarded, so nothing will ever resume them)."""
    for run in runs_trained_in(tracker, key, folder):
        if run.info.status == "RUNNING":
            tracker.client.set_tag(run.info.run_id, "note", "checkpoint discarded before training finished")
            tracker.finish(run.info.run_id, "KILLED")


class MlflowCallback(Callback):
    """Trainer callback that streams the training curve into one MLflow run.

    ``train/<metric>`` at every logged step, ``validation/<metric>`` at every evaluation,
    ``train/seconds`` (training time so far, continued across a resume) at every checkpoint, and at
    the end ``train/seconds`` and ``train/images_per_second`` at the last step.
    """

    def __init__(self, tracker: Tracker, run_id: str, prefix: str = "train/", eval_prefix: str = "validation/"):
        self.tracker, self.run_id, self.prefix, self.eval_prefix = tracker, run_id, prefix, eval_prefix
        self.began: Optional[float] = None
        self.offset = 0.0
        self.batch_size = 0
        self.seconds: Optional[float] = None
        self.images_per_second: Optional[float] = None
        self._checkpointed: Optional[tuple[int, float]] = None

    def elapsed(self) -> float:
        return self.offset + (time.perf_counter() - self.began if self.began is not None else 0.0)

    def on_train_start(self, info: dict[str, Any]) -> None:
        self.began = time.perf_counter()
        start = int(info.get("start_step", 0))
        self.batch_size = int(info.get("config", {}).get("batch_size", 0))
        if start > 0:
            self.offset = self.tracker.metric_at(self.run_id, f"{self.prefix}seconds", start) or 0.0
        self.tracker.client.set_tag(self.run_id, "device", str(info.get("device", "unknown")))
        self.tracker.client.set_tag(self.run_id, "world_size", str(info.get("world_size", 1)))

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(self.run_id, {f"{self.prefix}{k}": v for k, v in metrics.items()}, step)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(self.run_id, {f"{self.eval_prefix}{k}": v for k, v in metrics.items()}, step)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self._checkpointed = (step, self.elapsed())
        self.tracker.log_metrics(self.run_id, {f"{self.prefix}seconds": self._checkpointed[1]}, step)

    def on_train_end(self, summary: dict[str, Any]) -> None:
        steps = int(summary.get("steps", 0))
        # The last step's checkpoint already logged the time at that step: the one value of that point.
        last = self._checkpointed
        self.seconds = last[1] if last is not None and last[0] == steps else self.elapsed()
        self.tracker.log_metrics(self.run_id, {f"{self.prefix}seconds": self.seconds}, steps)
        log_throughput(self.tracker, self.run_id, steps, self.batch_size, self.seconds, self.prefix)


def log_throughput(tracker: Tracker, run_id: str, steps: int, batch_size: int, seconds: Optional[float],
                   prefix: str = "train/") -> Optional[float]:
    """Log ``<prefix>images_per_second`` (steps x global batch / training seconds) at ``steps``."""
    if not seconds or seconds <= 0 or batch_size <= 0:
        return None
    rate = steps * batch_size / seconds
    tracker.log_metrics(run_id, {f"{prefix}images_per_second": rate}, steps)
    return rate


def workspace_runs(results: Path, uri: Optional[str] = None) -> list[str]:
    """The MLflow run ids the workspace's results were made by: the runs of the store (``uri``,
    default :func:`tracking_uri`) tagged with the sha256 of an ``eval_weights.pt`` under ``results``
    (checkpoint folders aside), sorted."""
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        return []
    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    ids: set[str] = set()
    for weights in sorted(Path(results).rglob(WEIGHTS_FILE)):
        if experiments and "checkpoints" not in weights.relative_to(results).parts:
            found = client.search_runs(experiments, f"tags.{WEIGHTS_TAG} = '{weights_digest(weights)}'",
                                       max_results=1000)
            ids.update(r.info.run_id for r in found)
    return sorted(ids)


def workspace_filter(results: Path) -> str:
    """An MLflow search filter (paste into the UI's search box) for the runs of the workspace's results."""
    ids = workspace_runs(results)
    return "attributes.run_id IN (" + ", ".join(f"'{i}'" for i in ids) + ")" if ids else ""


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m pipelines.tracking workspace-filter [results/<study>]``: print the UI filter for
    the runs the workspace's results come from."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("command", choices=["workspace-filter", "workspace-runs"])
    parser.add_argument("results", nargs="?", default="results", type=Path)
    args = parser.parse_args(argv)
    if args.command == "workspace-runs":
        print("\n".join(workspace_runs(args.results)))
    else:
        print(workspace_filter(args.results))


if __name__ == "__main__":
    main()
