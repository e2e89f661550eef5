"""A damaged or unreachable MLflow store is named in one line before a stage touches anything, and a
stage that fails for any reason leaves its previous outputs (git- and DVC-tracked) as they were."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import sqlite3
import subprocess
import time
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
def committed(tiny_study, tmp_path_factory) -> Path:
    """A copy of the session's built tiny study, committed (so `git status` is clean)."""
    built, _ = tiny_study
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


def _metric_rows(store: Path) -> int:
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT count(*) FROM metrics").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_server_lost_mid_run_keeps_the_outputs_and_a_rerun_completes_the_run(committed, tmp_path):
    from mlflow import MlflowClient

    ws = tmp_path / "ws"
    shutil.copytree(committed, ws, symlinks=True)
    harness.dvc(ws, "config", "core.site_cache_dir", str(ws / ".dvc" / "site"))
    harness.edit_params(ws, lambda p: p["density"]["patches32"]["train"].update(steps=200, eval_every=100,
                                                                                  checkpoint_every=100))
    server_root = tmp_path / "server"
    server_root.mkdir()
    fast = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    with harness.mlflow_server(server_root, tmp_path / "server.log", harness.env(server_root)) as uri:
        proc = subprocess.Popen([str(harness.BIN / "dvc"), "repro", "--single-item", STAGE], cwd=ws,
                                env={**harness.env(ws), **fast, "MLFLOW_TRACKING_URI": uri},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 600
        while _metric_rows(server_root / "mlflow.db") == 0:  # training has logged its first points
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.1)
    output = proc.communicate(timeout=900)[0]  # the server is gone: the stage goes on without it
    assert proc.returncode == 0, output
    assert "warning: MLflow server" in output and f"dvc repro -f --single-item {STAGE}" in output, output
    outputs = {k: v for k, v in _snapshot(ws)[2].items() if "/patches32/sdn" in k}
    assert json.loads(outputs["results/embedded/metrics/train/patches32/sdn/seed0.json"])["steps"] == 200

    # The documented command, with the server back (same store, new port): the run is completed.
    with harness.mlflow_server(server_root, tmp_path / "server2.log", harness.env(server_root)) as uri:
        rerun = _run(ws, ["repro", "-f", "--single-item", STAGE], MLFLOW_TRACKING_URI=uri)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert {k: v for k, v in _snapshot(ws)[2].items() if "/patches32/sdn" in k} == outputs
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("sdn-embedded-density")
        for seed in (0, 1):
            runs = client.search_runs([exp.experiment_id], f"tags.model = 'sdn' and tags.seed = '{seed}'")
            assert len(runs) == 1, runs
            run = runs[0]
            assert run.info.status == "FINISHED" and run.data.tags["done_train"] == "true"
            weights = ws / f"results/embedded/models/patches32/sdn/seed{seed}/eval_weights.pt"
            assert run.data.tags["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
            curve = list(csv.DictReader(io.StringIO(
                outputs[f"results/embedded/curves/patches32/sdn/seed{seed}.csv"].decode())))
            expected = [(int(r["step"]), float(r["loss"])) for r in curve if r.get("loss")]
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
            assert history == expected  # every curve point once, equal to the DVC curve
