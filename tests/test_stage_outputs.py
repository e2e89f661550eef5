"""The stage runner's output protection (pipelines.study.protected_outputs) and the MLflow store check
(pipelines.tracking.store_problem, the guarded client), without DVC: fast checks of each case."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

import pipeline_harness as harness
from pipelines import tracking
from pipelines.runs import StageDirs
from pipelines.study import _with_dirs, protected_outputs


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def stage(tmp_path) -> tuple[StageDirs, Path]:
    """A train stage's folders holding a previous run's outputs (seed 0 and a seed 5 no longer studied)."""
    dirs = StageDirs(models=tmp_path / "models/d/m", samples=tmp_path / "samples/d/m",
                     train_metrics=tmp_path / "metrics/d/m")
    for seed in (0, 5):
        (dirs.samples / f"seed{seed}.png").parent.mkdir(parents=True, exist_ok=True)
        (dirs.samples / f"seed{seed}.png").write_bytes(b"old png %d" % seed)
        (dirs.train_metrics).mkdir(parents=True, exist_ok=True)
        (dirs.train_metrics / f"seed{seed}.json").write_text(f'{{"old": {seed}}}')
    (dirs.models / "seed0/checkpoints/abc").mkdir(parents=True)
    (dirs.models / "seed0/checkpoints/abc/checkpoint.pt").write_bytes(b"ckpt")
    (dirs.models / "seed0/eval_weights.pt").write_bytes(b"old weights")
    return dirs, tmp_path


def _write_new(out: StageDirs, seed: int) -> None:
    (out.samples / f"seed{seed}.png").write_bytes(b"new png")
    (out.train_metrics / f"seed{seed}.json").write_text('{"new": 1}')
    (out.models / f"seed{seed}").mkdir(parents=True, exist_ok=True)
    (out.models / f"seed{seed}/eval_weights.pt").write_bytes(b"new weights")
    (out.models / f"seed{seed}/notes.json").write_text("{}")
    (out.models / f"seed{seed}/checkpoints/abc/checkpoint.pt").parent.mkdir(parents=True, exist_ok=True)
    (out.models / f"seed{seed}/checkpoints/abc/checkpoint.pt").write_bytes(b"ckpt 2")


def test_a_failing_stage_leaves_every_output_as_it_was_but_the_checkpoint(stage):
    dirs, root = stage
    before = _tree(root)
    with pytest.raises(RuntimeError, match="boom"):
        with protected_outputs(dirs, whole=True, resumable=("models",)) as out:
            assert out.samples != dirs.samples and out.models == dirs.models and not any(out.samples.iterdir())
            _write_new(out, 0)
            raise RuntimeError("boom")
    after = _tree(root)
    assert after.pop("models/d/m/seed0/checkpoints/abc/checkpoint.pt") == b"ckpt 2"  # the resume point
    before.pop("models/d/m/seed0/checkpoints/abc/checkpoint.pt")
    assert after == before  # new weights and notes gone, old samples and metrics kept, no leftovers


def test_a_failing_stage_removes_the_files_it_wrote_into_a_new_seed_folder(stage):
    """Seed 0 exported (a new seed1 folder: weights, run file, checkpoint), then the stage failed: the
    new seed folder keeps only its checkpoint (the resume point), not files a reader would trust."""
    dirs, root = stage
    before = _tree(root)
    with pytest.raises(RuntimeError, match="boom"):
        with protected_outputs(dirs, whole=True, resumable=("models",)) as out:
            _write_new(out, 1)
            raise RuntimeError("boom")
    after = _tree(root)
    assert after.pop("models/d/m/seed1/checkpoints/abc/checkpoint.pt") == b"ckpt 2"
    assert after == before


def test_a_whole_stage_replaces_its_folders_and_one_seed_adds_its_files(stage):
    dirs, root = stage
    with protected_outputs(dirs, whole=True, resumable=("models",)) as out:
        _write_new(out, 0)
    files = _tree(root)
    assert files["samples/d/m/seed0.png"] == b"new png" and "samples/d/m/seed5.png" not in files  # stale seed gone
    assert files["models/d/m/seed0/eval_weights.pt"] == b"new weights"
    assert not [p for p in root.rglob(".*") if p.name.startswith(".")]  # no staging, old or backup folder
    with protected_outputs(dirs, whole=False, resumable=("models",)) as out:
        _write_new(out, 1)
    files = _tree(root)
    assert files["samples/d/m/seed0.png"] == b"new png" and files["samples/d/m/seed1.png"] == b"new png"


def test_leftovers_of_a_killed_stage_are_undone(stage):
    dirs, root = stage
    before = _tree(root)
    # Killed after moving the samples aside, before the staging folder replaced them; and mid-export.
    dirs.samples.rename(dirs.samples.parent / ".m.old-999")
    (dirs.train_metrics.parent / ".m.staging-999").mkdir()
    (dirs.train_metrics.parent / ".m.staging-999/seed0.json").write_text("half")
    backup = dirs.models.parent / ".m.backup-999/seed0"
    backup.mkdir(parents=True)
    (backup / "eval_weights.pt").write_bytes(b"old weights")
    (dirs.models / "seed0/eval_weights.pt").write_bytes(b"half-written")
    with protected_outputs(dirs, whole=False, resumable=("models",)):
        assert {k: v for k, v in _tree(root).items() if "/." not in k} == before
    assert _tree(root) == before


def test_seed_processes_get_the_staging_folders():
    before = StageDirs(models=Path("m"), samples=Path("s"), curves=Path("c"))
    after = StageDirs(models=Path("m"), samples=Path(".s.staging-1"), curves=Path(".c.staging-1"))
    argv = ["--dataset", "d", "--models", "m", "--samples", "s", "--curves=c"]
    assert _with_dirs(argv, before, after) == ["--dataset", "d", "--models", "m", "--samples", ".s.staging-1",
                                               "--curves=.c.staging-1"]


def test_store_problems_are_one_line_naming_the_store(tmp_path):
    db = tmp_path / "mlflow.db"
    assert tracking.store_problem(f"sqlite:///{db}") is None  # created on first use
    with sqlite3.connect(db) as conn:  # a whole database file of some size
        conn.execute("CREATE TABLE t (x TEXT)")
        conn.executemany("INSERT INTO t VALUES (?)", [("x" * 500,)] * 400)
    assert tracking.store_problem(f"sqlite:///{db}") is None
    data = db.read_bytes()
    for cut in (len(data) // 2, 100, 0 + 17):
        db.write_bytes(data[:cut])
        problem = tracking.store_problem(f"sqlite:///{db}")
        assert problem and str(db) in problem and "damaged" in problem and "\n" not in problem
    uri = f"http://127.0.0.1:{harness.free_port()}"
    problem = tracking.store_problem(uri, timeout=2)
    assert problem and uri in problem and "unreachable" in problem and "\n" not in problem
    with pytest.raises(tracking.StoreError, match="unreachable"):
        tracking.check_store(uri)


class _Client:
    def __init__(self):
        self.calls = 0

    def log_batch(self, *args):
        self.calls += 1
        raise ConnectionError("refused")


def test_guarded_client_goes_quiet_only_when_the_store_is_gone(monkeypatch):
    warnings = []
    client = _Client()
    guarded = tracking._GuardedClient(client, "http://x", warnings.append)
    monkeypatch.setattr(tracking, "store_problem", lambda uri, timeout=10.0: None)
    with pytest.raises(ConnectionError):  # the store answers: a real error is raised
        guarded.log_batch("run")
    monkeypatch.setattr(tracking, "store_problem", lambda uri, timeout=10.0: "MLflow server http://x is unreachable")
    assert guarded.log_batch("run") is None and guarded.log_batch("run") is None
    assert warnings == ["MLflow server http://x is unreachable"] and client.calls == 2  # once warned, no more calls
