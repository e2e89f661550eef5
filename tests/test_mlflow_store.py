"""A moved (or copied) clone keeps every artifact link: the store holds no absolute artifact path,
and `mlflow server` started in the moved folder (as `make ui` does) serves a run's artifacts."""

from __future__ import annotations

import json
import os
import shutil
import urllib.request

from pipelines import tracking
from pipelines.families import families

import pipeline_harness as harness

def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def _server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", tracking.ROOT_ENV, "DVC_ROOT")}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    return env


def test_server_serves_artifacts_of_a_moved_store(tmp_path, monkeypatch):
    original = tmp_path / "clone"
    original.mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(tracking.ROOT_ENV, str(original))
    tracker = tracking.Tracker.for_family("moved", families()["density"])
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

    with harness.mlflow_server(moved, tmp_path / "server.log", _server_env()) as base:
        assert _get(f"{base}/get-artifact?path=samples.png&run_uuid={run_id}") == payload
        assert _get(f"{base}/get-artifact?path=metrics/eval.json&run_uuid={run_id}") == payload
        listed = json.loads(_get(f"{base}/api/2.0/mlflow/artifacts/list?run_id={run_id}"))
        assert {f["path"] for f in listed["files"]} == {"samples.png", "metrics"}
        proxied = _get(f"{base}/api/2.0/mlflow-artifacts/artifacts/sdn-moved-density/{run_id}/artifacts/samples.png")
        assert proxied == payload
