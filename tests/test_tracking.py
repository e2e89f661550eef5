"""MLflow bookkeeping: store location, experiments per family, run tags, metrics keys, artifacts
next to the store, the run file that links stages to their run, resume of an interrupted run."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pipelines import tracking
from pipelines.families import families


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    """One migrated SQLite store per session (a new one costs seconds of migrations)."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    tracking.prepare_store(f"sqlite:///{path}")
    return path


@pytest.fixture
def store(migrated_db, tmp_path, monkeypatch) -> Path:
    """A fresh store in ``tmp_path/store`` (the repository root as far as tracking knows)."""
    root = tmp_path / "store"
    root.mkdir()
    shutil.copyfile(migrated_db, root / "mlflow.db")
    for env in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE"):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv(tracking.ROOT_ENV, str(root))
    return root


@pytest.fixture
def tracker(store) -> tracking.Tracker:
    return tracking.Tracker.for_family("test", families()["density"])


def _git_init(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q", str(path)], check=True)


def _git_commit_all(path: Path) -> str:
    run = dict(cwd=path, check=True, capture_output=True)
    subprocess.run(["git", "add", "-A"], **run)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c"], **run)
    return subprocess.run(["git", "rev-parse", "HEAD"], text=True, **run).stdout.strip()


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


def test_one_experiment_per_study_family_with_description_and_relative_artifacts(tracker):
    assert tracking.experiment_name("embedded", "density") == "sdn-embedded-density"
    exp = tracker.client.get_experiment_by_name("sdn-test-density")
    assert exp.experiment_id == tracker.experiment_id
    note = exp.tags["mlflow.note.content"]
    assert "density" in note and "results/test/metrics/" in note and "test/<key>" in note
    # No absolute path in the store: the location is relative to the store's folder.
    assert exp.artifact_location == "mlflow-artifacts:/sdn-test-density"
    other = tracking.Tracker.for_family("test", families()["disentanglement"])
    assert other.experiment_id != tracker.experiment_id
    assert "disentanglement" in other.client.get_experiment(other.experiment_id).tags["mlflow.note.content"]
    # Reopening an experiment finds it again (no duplicate, description kept).
    assert tracking.Tracker.for_family("test", families()["density"]).experiment_id == tracker.experiment_id
    with pytest.raises(ValueError, match="experiment"):
        tracking.Tracker("")


def test_run_names_and_tags(tracker, monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "train_density@patches32-sdn")
    key = tracker.key("patches32", "sdn", 0)
    params = {"train": {"lr": 0.002, "steps": 4}, "model_config": {"ds_list": (0, 1)}}
    run_id = tracker.new_run(key, params, {"family": "density"})
    run = tracker.client.get_run(run_id)
    assert run.info.run_name == "patches32/sdn/seed0"
    assert run.data.params["train.lr"] == "0.002" and run.data.params["model_config.ds_list"] == "[0, 1]"
    tags = run.data.tags
    assert (tags["dataset"], tags["model"], tags["seed"], tags["family"]) == ("patches32", "sdn", "0", "density")
    assert tags["dvc_stage"] == "train_density@patches32-sdn" and tags["dvc_experiment"] == "workspace"
    assert tags["mlflow.source.name"] == "dvc stage train_density@patches32-sdn"
    assert tags["mlflow.user"] and tags["version.torch"] != "absent"
    assert tags["git_dirty"] in ("true", "false") and len(tags["git_commit"]) == 40
    assert "current" not in tags
    # In a DVC experiment: its name, and the baseline commit (the experiment's commit does not exist yet).
    monkeypatch.setenv("DVC_EXP_NAME", "tiny-exp")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", tags["git_commit"])
    tags = tracker.client.get_run(tracker.new_run(key, params, {})).data.tags
    assert tags["dvc_experiment"] == "tiny-exp" and tags["mlflow.runName"] == "patches32/sdn/seed0 [tiny-exp]"
    assert tags["git_commit"] == tags["mlflow.source.git.commit"]
    assert tags["mlflow.source.name"] == "dvc stage train_density@patches32-sdn (experiment tiny-exp)"


def test_git_state_ignores_untracked_and_dvc_written_files(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    repo = tmp_path / "repo"
    _git_init(repo)
    (repo / "params.yaml").write_text("a: 1\n")
    (repo / "results").mkdir()
    (repo / "results" / "m.json").write_text("{}\n")
    (repo / "dvc.lock").write_text("x\n")
    commit = _git_commit_all(repo)
    assert tracking.git_state(repo) == {"git_commit": commit, "git_dirty": "false"}
    (repo / "untracked.txt").write_text("new\n")
    (repo / "results" / "m.json").write_text('{"a": 1}\n')
    (repo / "dvc.lock").write_text("y\n")
    assert tracking.git_state(repo)["git_dirty"] == "false"
    (repo / "params.yaml").write_text("a: 2\n")
    assert tracking.git_state(repo) == {"git_commit": commit, "git_dirty": "true"}
    # A DVC experiment: dirty = differs from the baseline commit (here: params.yaml).
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", commit)
    assert tracking.git_state(repo) == {"git_commit": commit, "git_dirty": "true"}
    monkeypatch.delenv("DVC_EXP_BASELINE_REV")
    (tmp_path / "nogit").mkdir()
    assert tracking.git_state(tmp_path / "nogit") == {"git_commit": "none", "git_dirty": "unknown"}


def test_callback_metric_keys_timing_and_artifacts_next_to_the_store(tracker, store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # artifacts go next to the store, never into the cwd
    run_id = tracker.new_run(tracker.key("patches32", "cnn", 2), {}, {})
    callback = tracking.MlflowCallback(tracker, run_id)
    callback.on_train_start({"device": "cpu", "world_size": 1, "config": {"batch_size": 8}, "start_step": 0})
    callback.on_step_end(2, {"loss": 5.0, "bpd": 3.0})
    callback.on_eval(2, {"elbo_bpd": 2.7})
    callback.on_checkpoint(2, tmp_path)
    callback.on_step_end(4, {"loss": 4.0, "bpd": 2.5})
    callback.on_eval(4, {"elbo_bpd": 2.6})
    callback.on_checkpoint(4, tmp_path)
    callback.on_train_end({"steps": 4})
    tracker.log_metrics(run_id, {"num_params": 123, "fid": "n/a", "bad": float("nan"), "flag": True}, step=4)
    history = tracker.client.get_metric_history(run_id, "train/bpd")
    assert [(m.step, m.value) for m in history] == [(2, 3.0), (4, 2.5)]
    assert [m.step for m in tracker.client.get_metric_history(run_id, "validation/elbo_bpd")] == [2, 4]
    seconds = tracker.client.get_metric_history(run_id, "train/seconds")
    assert [m.step for m in seconds] == [2, 4] and 0 < seconds[0].value <= seconds[1].value
    assert callback.seconds == seconds[1].value
    metrics = tracker.client.get_run(run_id).data.metrics
    assert metrics["train/images_per_second"] == pytest.approx(4 * 8 / callback.seconds)
    assert metrics["num_params"] == 123 and not {"fid", "bad", "flag"} & set(metrics)
    assert not [k for k in metrics if k.startswith("train_") or k.startswith("train/eval_")]
    png = tmp_path / "grid.png"
    png.write_bytes(b"\x89PNG\r\n")
    tracker.log_artifact(run_id, png, name="samples.png")
    tracker.log_artifact(run_id, png, "samples", name="samples_t0.6.png")
    assert tracker.list_artifacts(run_id) == ["samples.png", "samples/samples_t0.6.png"]
    assert tracker.client.get_run(run_id).info.artifact_uri == f"mlflow-artifacts:/sdn-test-density/{run_id}/artifacts"
    assert (store / "mlartifacts" / "sdn-test-density" / run_id / "artifacts" / "samples.png").read_bytes() == png.read_bytes()
    assert not (tmp_path / "mlartifacts").exists()


def _weights(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_later_stages_log_into_the_finished_run_without_moving_its_end(tracker, tmp_path, monkeypatch):
    key = tracker.key("patches32", "sdn", 0)
    weights = _weights(tmp_path / "models" / "seed0" / tracking.WEIGHTS_FILE, b"trained weights")
    run_id = tracker.new_run(key, {}, {tracking.WEIGHTS_TAG: hashlib.sha256(b"trained weights").hexdigest()})
    tracker.stage_done(run_id, "train")
    tracker.finish(run_id)
    end = tracker.client.get_run(run_id).info.end_time
    # Another run with the same weights (an identical DVC experiment): each stage picks its own.
    monkeypatch.setenv("DVC_EXP_NAME", "twin")
    twin = tracker.new_run(key, {}, {tracking.WEIGHTS_TAG: tracking.weights_digest(weights)})
    assert tracker.run_of_model(weights, key, {}, {}) == twin
    monkeypatch.delenv("DVC_EXP_NAME")
    assert tracker.run_of_model(weights, key, {}, {"study": "test"}) == run_id
    # ... and the run that trained beside the weights (its checkpoint folder there) comes first.
    tracker.client.set_tag(twin, tracking.CHECKPOINT_TAG, str((weights.parent / "checkpoints" / "cfg").resolve()))
    assert tracker.run_of_model(weights, key, {}, {}) == twin
    tracker.client.set_tag(twin, tracking.CHECKPOINT_TAG, "/elsewhere/checkpoints/cfg")
    tracker.log_metrics(run_id, {"test/iw_bpd": 2.5})  # MLflow accepts metrics on a finished run
    tracker.stage_done(run_id, "evaluate")
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.end_time == end and run.data.metrics["test/iw_bpd"] == 2.5
    assert "complete" not in run.data.tags
    # A failed fid stage marks the run FAILED (end time kept); its successful rerun restores it.
    tracker.stage_failed(run_id, "fid")
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FAILED" and run.info.end_time == end
    tracker.stage_done(run_id, "fid")
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.end_time == end and run.data.tags["complete"] == "true"
    assert "failed_stage" not in run.data.tags
    # The workspace's runs: those that trained the weights beside the models (not in checkpoint folders).
    _weights(weights.parent / "checkpoints" / "abc" / tracking.WEIGHTS_FILE, b"other")
    other = tracker.new_run(key, {}, {tracking.WEIGHTS_TAG: hashlib.sha256(b"other").hexdigest()})
    assert other not in tracking.workspace_runs(tmp_path) == sorted([run_id, twin])
    found = tracker.client.search_runs([tracker.experiment_id], tracking.workspace_filter(tmp_path))
    assert sorted(r.info.run_id for r in found) == sorted([run_id, twin])
    # Weights no run of the store trained (pulled from a remote) get a run saying so; the next stage finds it.
    pulled = _weights(tmp_path / "pulled" / tracking.WEIGHTS_FILE, b"pulled weights")
    orphan = tracker.run_of_model(pulled, key, {}, {})
    assert orphan not in (run_id, twin) and "no run of this store trained" in tracker.client.get_run(orphan).data.tags["note"]
    assert tracker.run_of_model(pulled, key, {}, {}) == orphan


def test_open_training_run_new_resumed_finished_and_stale(tracker, tmp_path):
    key = tracker.key("patches32", "sdn", 1)
    ckpts = tmp_path / "models" / "seed1" / "checkpoints"
    stale = tracking.open_training_run(tracker, ckpts / "old", key, {}, {})
    assert stale.mode == "new"
    first = tracking.open_training_run(tracker, ckpts / "cfg", key, {}, {})
    tags = tracker.client.get_run(first.run_id).data.tags
    assert first.mode == "new" and tags[tracking.CONFIG_TAG] == "cfg"
    assert tags[tracking.CHECKPOINT_TAG] == str((ckpts / "cfg").resolve())
    # Only a checkpoint folder that exists is resumed: the runs of `cfg` are found once training made it.
    (ckpts / "cfg").mkdir(parents=True)
    # The run of the discarded sibling configuration is not left RUNNING.
    assert tracker.status(stale.run_id) == "KILLED"
    tracker.log_metrics(first.run_id, {"train/loss": 3.0}, step=2)
    tracker.log_metrics(first.run_id, {"train/loss": 2.0}, step=4)
    # A SIGKILL leaves it RUNNING; the rerun reopens it and does not log steps it already has.
    again = tracking.open_training_run(tracker, ckpts / "cfg", key, {}, {})
    assert (again.run_id, again.mode) == (first.run_id, "resumed")
    fresh = tracking.Tracker.for_family("test", families()["density"])  # the rerun is a new process
    fresh.reopen(first.run_id)
    fresh.log_metrics(first.run_id, {"train/loss": 2.0}, step=4)
    fresh.log_metrics(first.run_id, {"train/loss": 1.0}, step=6)
    history = tracker.client.get_metric_history(first.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(2, 3.0), (4, 2.0), (6, 1.0)]
    assert tracker.client.get_run(first.run_id).data.tags["resumed"] == "1"
    tracker.finish(first.run_id)
    done = tracking.open_training_run(tracker, ckpts / "cfg", key, {}, {})
    assert (done.run_id, done.mode) == (first.run_id, "finished")
    assert tracker.status(first.run_id) == "FINISHED"
    # A copy of the workspace (another folder) re-exporting the weights the run exported: that run.
    copy = tmp_path / "copy" / "seed1"
    (copy / "checkpoints" / "cfg").mkdir(parents=True)
    exported = _weights(copy / tracking.WEIGHTS_FILE, b"weights of cfg")
    tracker.client.set_tag(first.run_id, tracking.WEIGHTS_TAG, hashlib.sha256(b"weights of cfg").hexdigest())
    copied = tracking.open_training_run(tracker, copy / "checkpoints" / "cfg", key, {}, {}, weights=exported)
    assert (copied.run_id, copied.mode) == (first.run_id, "finished")
    # The same configuration trained in another folder (another clone) with other weights: another run.
    exported.write_bytes(b"other weights")
    elsewhere = tracking.open_training_run(tracker, copy / "checkpoints" / "cfg", key, {}, {}, weights=exported)
    assert elsewhere.mode == "new" and elsewhere.run_id != first.run_id
    assert tracker.status(first.run_id) == "FINISHED"


def test_processes_opening_a_fresh_store_at_once_do_not_race(tmp_path):
    """Seeds side by side and parallel DVC experiments on a fresh clone all create/migrate the
    store at once: the store lock serialises that (without it: `_alembic_tmp_experiments exists`)."""
    import os
    import sys

    code = ("from pipelines import tracking; from pipelines.families import families; "
            "t = tracking.Tracker.for_family('race', families()['density']); "
            "t.finish(t.new_run(t.key('d', 'm', 0), {}, {}))")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    env.update({tracking.ROOT_ENV: str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(errors)[-3000:]
    client = tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sdn-race-density")
    assert len(client.search_runs([exp.experiment_id])) == 3


@pytest.mark.parametrize("other_text", ["same", "different"])
def test_description_written_by_a_concurrent_stage_does_not_fail_this_one(store, monkeypatch, other_text):
    """A server's SQL store answers a second insert of the description tag with a unique-key violation
    (two stages of a parallel queue opening a new experiment together): the stage reads the tag back and
    goes on, rewriting it when the other stage wrote another text."""
    description = tracking.experiment_description("test", families()["density"])
    written = {"other": description if other_text == "same" else "an older description"}
    real_set = tracking.MlflowClient.set_experiment_tag
    calls = []

    def racing_set(self, experiment_id, key, value):
        calls.append(value)
        if len(calls) == 1:  # the other stage's insert lands first; ours then violates the key
            real_set(self, experiment_id, key, written["other"])
            raise tracking.MlflowException("duplicate key value violates unique constraint experiment_tag_pk")
        return real_set(self, experiment_id, key, value)

    monkeypatch.setattr(tracking.MlflowClient, "set_experiment_tag", racing_set)
    tracker = tracking.Tracker.for_family("test", families()["density"])
    tags = tracking.MlflowClient(tracker.uri).get_experiment(tracker.experiment_id).tags
    assert tags["mlflow.note.content"] == description
    assert len(calls) == (1 if other_text == "same" else 2)


def test_a_tracker_opened_after_the_server_went_away_lets_the_stage_go_on(store, monkeypatch, capsys):
    """A seed started side by side can open its tracker after the stage's store check passed and the
    server stopped (a CI race): the tracker warns once, names the server, and has no experiment; runs
    are then neither found nor created (None: train trains without MLflow, evaluate and fid write their
    outputs without it)."""
    import socket

    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("DVC_STAGE", "train_density@toy-sdn")
    tracker = tracking.Tracker.for_family("test", families()["density"], uri=uri)
    assert tracker.lost is not None and uri in tracker.lost
    assert tracker.experiment_id is None
    key = tracker.key("toy", "sdn", 0)
    assert tracker.runs_for(key) is None
    assert tracker.new_run(key, {"lr": 1}, {}) is None
    folder = store / "checkpoints" / "cfg"
    folder.mkdir(parents=True)
    assert tracking.open_training_run(tracker, folder, key, {"lr": 1}, {}) is None  # train goes on without MLflow
    weights = store / "weights.pt"
    weights.write_bytes(b"weights")
    assert tracker.run_of_model(weights, key, {"lr": 1}, {}) is None  # evaluate and fid go on without a run
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "dvc repro -f --single-item train_density@toy-sdn" in warnings[0]


def test_a_family_brings_its_own_stages_and_description(store):
    """Tracking knows no family: the family object says which stages complete a run and what its runs hold."""
    from types import SimpleNamespace

    toy = SimpleNamespace(name="toyfam", stages=("train",), mlflow_text="Toy runs hold `train/*` only.")
    tracker = tracking.Tracker.for_family("test", toy)
    described = tracking.MlflowClient(tracker.uri).get_experiment(tracker.experiment_id)
    assert described.name == "sdn-test-toyfam"
    assert described.tags["mlflow.note.content"].startswith("Study `test`, family `toyfam`. Toy runs hold `train/*` only.")
    run_id = tracker.new_run(tracker.key("d", "m", 0), {}, {})
    tracker.stage_done(run_id, "train")
    assert tracker.client.get_run(run_id).data.tags["complete"] == "true"  # density would also need evaluate, fid
