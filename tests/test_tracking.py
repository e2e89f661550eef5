"""MLflow bookkeeping: store location, one current run per key, params/metrics/artifacts, callback."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pipelines import tracking


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    """One migrated SQLite store per session (a new one costs seconds of migrations)."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    tracking.Tracker("warmup", uri=f"sqlite:///{path}", root=path.parent)
    return path


@pytest.fixture
def tracker(migrated_db, tmp_path, monkeypatch) -> tracking.Tracker:
    db = tmp_path / "mlflow.db"
    shutil.copyfile(migrated_db, db)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(tracking.ROOT_ENV, str(tmp_path))
    return tracking.Tracker("sdn-test")


def _git_init(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q", str(path)], check=True)


def test_root_from_git_common_dir_and_dvc_experiment_copies(tmp_path, monkeypatch):
    for env in (tracking.ROOT_ENV, "DVC_ROOT"):
        monkeypatch.delenv(env, raising=False)
    repo = tmp_path / "repo"
    _git_init(repo)
    (repo / "sub" / "dir").mkdir(parents=True)
    assert tracking.resolve_repo_root(repo / "sub" / "dir") == repo.resolve()
    # A `dvc exp run --temp/--queue` copy is its own git repo under <root>/.dvc/tmp/exps/.
    copy = repo / ".dvc" / "tmp" / "exps" / "standalone" / "tmpabc123"
    _git_init(copy)
    assert tracking.resolve_repo_root(copy) == repo.resolve()
    # DVC sets DVC_ROOT for stage commands; an explicit SDN_REPO_ROOT wins over it.
    monkeypatch.setenv("DVC_ROOT", str(copy))
    assert tracking.resolve_repo_root(tmp_path) == repo.resolve()
    monkeypatch.setenv(tracking.ROOT_ENV, str(tmp_path / "elsewhere"))
    assert tracking.resolve_repo_root(repo) == (tmp_path / "elsewhere").resolve()


def test_tracking_uri_default_and_override(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////somewhere/else.db")
    assert tracking.tracking_uri(tmp_path) == "sqlite:////somewhere/else.db"


def test_flatten_nested_params():
    flat = tracking.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None, "f": {}, "g": (3, 4)})
    assert flat == {"a.b": "1", "a.c.d": "[1, 2]", "e": "None", "f": "{}", "g": "[3, 4]"}


def _current(tracker, key):
    runs = tracker.runs_for(key)
    return {r.info.run_id: r.data.tags[tracking.CURRENT_TAG] for r in runs}


def test_rerun_creates_a_new_current_run_and_demotes_the_old(tracker, monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "train_density@patches32-sdn-0")
    key = tracker.key("patches32", "sdn", 0)
    other = tracker.key("patches32", "cnn", 0)
    params = {"train": {"lr": 0.002, "steps": 4}, "model_config": {"ds_list": (0, 1)}}
    first = tracker.new_run(key, params, {"family": "density"})
    kept = tracker.new_run(other, params, {})
    second = tracker.new_run(key, params, {"family": "density"})
    assert first != second
    assert _current(tracker, key) == {first: "false", second: "true"}
    assert tracker.current_run_id(key) == second
    assert _current(tracker, other) == {kept: "true"}
    run = tracker.client.get_run(second)
    assert run.data.params["train.lr"] == "0.002" and run.data.params["model_config.ds_list"] == "[0, 1]"
    tags = run.data.tags
    assert (tags["dataset"], tags["model"], tags["seed"]) == ("patches32", "sdn", "0")
    assert tags["dvc_stage"] == "train_density@patches32-sdn-0"
    assert tags["family"] == "density" and tags["version.torch"] != "absent" and "git_commit" in tags
    assert run.info.run_name == "patches32/sdn/seed0"


def test_run_for_update_reuses_the_current_run_or_creates_one(tracker):
    key = tracker.key("dsprites_procedural", "cnn", 1)
    created = tracker.run_for_update(key, {"a": 1}, {"family": "disentanglement"})
    assert tracker.client.get_run(created).data.tags["note"].startswith("no training run")
    assert tracker.run_for_update(key, {"a": 1}, {"extra": "x"}) == created
    assert tracker.client.get_run(created).data.tags["extra"] == "x"


def test_metrics_artifacts_and_callback(tracker, tmp_path):
    key = tracker.key("patches32", "cnn", 2)
    run_id = tracker.new_run(key, {}, {})
    callback = tracking.MlflowCallback(tracker, run_id)
    callback.on_train_start({"device": "cpu", "world_size": 1, "num_parameters": 123})
    callback.on_step_end(2, {"loss": 5.0, "bpd": 3.0})
    callback.on_step_end(4, {"loss": 4.0, "bpd": 2.5})
    callback.on_eval(4, {"bpd": 2.6})
    tracker.log_metrics(run_id, {"iw_bpd": 2.4, "fid": "n/a", "bad": float("nan")})
    history = tracker.client.get_metric_history(run_id, "train/bpd")
    assert [(m.step, m.value) for m in history] == [(2, 3.0), (4, 2.5)]
    metrics = tracker.client.get_run(run_id).data.metrics
    assert metrics["iw_bpd"] == 2.4 and metrics["num_params"] == 123 and metrics["train/eval_bpd"] == 2.6
    assert "fid" not in metrics and "bad" not in metrics
    png = tmp_path / "grid.png"
    png.write_bytes(b"\x89PNG\r\n")
    tracker.log_artifact(run_id, png, name="samples.png")
    tracker.finish(run_id)
    assert [a.path for a in tracker.client.list_artifacts(run_id)] == ["samples.png"]
    assert tracker.client.get_run(run_id).info.status == "FINISHED"
    # Artifacts of a SQLite store sit next to the database, not in the working directory.
    assert (tmp_path / tracking.ARTIFACT_DIR / "sdn-test").is_dir()


def test_bad_experiment_name(tracker):
    with pytest.raises(ValueError, match="experiment"):
        tracking.Tracker("")
