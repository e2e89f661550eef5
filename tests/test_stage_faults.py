"""A damaged or unreachable MLflow store is named in one line before a stage touches anything, and a
stage that fails for any reason leaves its previous outputs (git- and DVC-tracked) as they were."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import pipeline_harness as harness

pytestmark = pytest.mark.slow

STAGE = "train_density@patches32-sdn"


def _run(ws: Path, args: list[str], **extra: str) -> subprocess.CompletedProcess:
    env = {**harness.env(ws), **extra}
    return subprocess.run([str(harness.BIN / "dvc"), *args], cwd=ws, env=env, capture_output=True, text=True)


def _snapshot(ws: Path) -> tuple[str, str, dict[str, bytes]]:
    """git status, dvc status and every file under results/ and reports/."""
    files = {str(p.relative_to(ws)): p.read_bytes() for top in ("results", "reports")
             for p in sorted((ws / top).rglob("*")) if p.is_file()}
    return harness.git(ws, "status", "--porcelain"), harness.dvc(ws, "status").stdout, files


@pytest.fixture(scope="module")
def committed(tmp_path_factory) -> Path:
    """A copy of the session's built tiny study, committed (so `git status` is clean)."""
    built, _ = harness.built_workspace(tmp_path_factory.getbasetemp())
    ws = harness.committed_copy(built, tmp_path_factory.mktemp("faults") / "ws")
    assert "up to date" in harness.dvc(ws, "status").stdout
    return ws


def test_truncated_store_is_named_before_the_stage_touches_anything(committed):
    ws = committed
    before = _snapshot(ws)
    store = ws / "mlflow.db"
    saved = store.read_bytes()
    try:
        store.write_bytes(saved[: len(saved) // 2])
        result = _run(ws, ["repro", "-f", "--single-item", STAGE])
        assert result.returncode != 0
        output = result.stdout + result.stderr
        lines = [line for line in output.splitlines() if line.startswith("error: MLflow store")]
        print(lines[0] if lines else output[-2000:])
        assert len(lines) == 1 and str(store.resolve()) in lines[0] and "damaged" in lines[0]
        assert "mv " in lines[0] and "nothing was run" in lines[0]
        assert "Traceback" not in output
        assert _snapshot(ws) == before
    finally:
        store.write_bytes(saved)


def test_stopped_server_is_named_before_the_stage_touches_anything(committed):
    ws = committed
    before = _snapshot(ws)
    uri = f"http://127.0.0.1:{harness.free_port()}"  # nothing listens there: a stopped server
    result = _run(ws, ["repro", "-f", "--single-item", STAGE], MLFLOW_TRACKING_URI=uri)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if line.startswith("error: MLflow server")]
    print(lines[0] if lines else output[-2000:])
    assert len(lines) == 1 and uri in lines[0] and "unreachable" in lines[0] and "nothing was run" in lines[0]
    assert "Traceback" not in output
    assert _snapshot(ws) == before
