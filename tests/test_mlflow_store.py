"""A moved (or copied) clone keeps every artifact link: the store holds no absolute artifact path,
and `mlflow server` started in the moved folder (as `make ui` does) serves a run's artifacts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pipelines import tracking

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def _serve(root: Path, log: Path):
    """`mlflow server` on ``root``'s store, started in ``root`` (the Makefile's `make ui`)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", tracking.ROOT_ENV, "DVC_ROOT")}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if _get(f"{base}/health"):
                return proc, base
        except OSError:
            pass
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "mlflow server did not come up"
        time.sleep(0.5)


def _stop(proc) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_server_serves_artifacts_of_a_moved_store(tmp_path, monkeypatch):
    original = tmp_path / "clone"
    original.mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(tracking.ROOT_ENV, str(original))
    tracker = tracking.Tracker.for_family("moved", "density")
    run_id = tracker.new_run(tracker.key("patches32", "sdn", 0), {"a": 1}, {})
    payload = bytes(range(256)) * 3
    src = tmp_path / "samples.png"
    src.write_bytes(payload)
    tracker.log_artifact(run_id, src)
    tracker.log_artifact(run_id, src, "metrics", name="eval.json")
    tracker.finish(run_id)
    del tracker

    moved = tmp_path / "elsewhere" / "clone-moved"
    moved.parent.mkdir()
    shutil.move(str(original), str(moved))
    assert not original.exists()
    assert str(original) not in (moved / "mlflow.db").read_bytes().decode("latin-1")

    proc, base = _serve(moved, tmp_path / "server.log")
    try:
        assert _get(f"{base}/get-artifact?path=samples.png&run_uuid={run_id}") == payload
        assert _get(f"{base}/get-artifact?path=metrics/eval.json&run_uuid={run_id}") == payload
        listed = json.loads(_get(f"{base}/api/2.0/mlflow/artifacts/list?run_id={run_id}"))
        assert {f["path"] for f in listed["files"]} == {"samples.png", "metrics"}
        proxied = _get(f"{base}/api/2.0/mlflow-artifacts/artifacts/sdn-moved-density/{run_id}/artifacts/samples.png")
        assert proxied == payload
    finally:
        _stop(proc)
