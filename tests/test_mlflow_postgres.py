"""One MLflow server on a real database (docs/team.md): the tiny pipeline's parallel queue (`dvc queue
start -j 2`) logs through `mlflow server` backed by PostgreSQL on loopback; every run's MLflow metrics
equal its own DVC metrics files, and the SQLite store and its lock are not touched.

Needs a PostgreSQL server: ``SDN_TEST_POSTGRES_DSN`` (``postgresql://user@127.0.0.1:port/postgres``,
a role that may create databases); `.ci/run` starts one (.ci/postgres.sh). Skipped without it."""

from __future__ import annotations

import os
import time
import uuid

import pytest

import pipeline_harness as harness
from test_dvc_queue_mlflow import RUN_DIR, STEPS, TARGETS, _exp_metrics, _git, _wait_for_queue

DSN_ENV = "SDN_TEST_POSTGRES_DSN"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get(DSN_ENV),
                       reason=f"no PostgreSQL server: set {DSN_ENV} (.ci/run starts one with .ci/postgres.sh)"),
]


def _database(dsn: str, sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        conn.cursor().execute(sql)
    finally:
        conn.close()


def test_parallel_queue_logs_its_own_numbers_into_a_postgres_backed_server(tmp_path):
    from mlflow import MlflowClient

    dsn = os.environ[DSN_ENV]
    name = f"mlflow_{uuid.uuid4().hex[:10]}"
    _database(dsn, f"CREATE DATABASE {name}")
    # MLflow's server reads postgresql:// with psycopg (3); name the pinned driver, psycopg2.
    backend = dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://", 1) + "/" + name
    server_root = tmp_path / "server"
    server_root.mkdir()
    try:
        with harness.mlflow_server(server_root, tmp_path / "server.log", harness.env(server_root),
                                   backend=backend) as uri:
            ws = harness.make_workspace(tmp_path / "ws")
            harness.edit_params(ws, lambda p: p["study"].update(seeds=[0, 1]))
            _git(ws, "add", "-A")
            _git(ws, "commit", "-q", "-m", "baseline")
            server = {"MLFLOW_TRACKING_URI": uri}
            for exp_name, steps in STEPS.items():
                harness.dvc(ws, "exp", "run", "--queue", "--name", exp_name,
                            "-S", f"density.patches32.train.steps={steps}", *TARGETS, extra_env=server)
            started = time.monotonic()
            harness.dvc(ws, "queue", "start", "-j", "2", extra_env=server)
            status = _wait_for_queue(ws, timeout=900)
            assert "Failed" not in status, status + "\n" + "\n".join(
                harness.dvc(ws, "queue", "logs", n, check=False).stdout[-3000:] for n in STEPS)
            print(f"two queued experiments against PostgreSQL finished in {time.monotonic() - started:.0f} s")

            exps = _exp_metrics(ws)
            client = MlflowClient(uri)
            exp = client.get_experiment_by_name("sdn-embedded-density")
            for exp_name, steps in STEPS.items():
                runs = client.search_runs([exp.experiment_id], f"tags.dvc_experiment = '{exp_name}'")
                assert sorted((r.data.tags["model"], r.data.tags["seed"]) for r in runs) == [("sdn", "0"), ("sdn", "1")]
                for run in runs:
                    seed = run.data.tags["seed"]
                    evaluation = exps[exp_name][RUN_DIR.format(kind="metrics/eval", seed=seed)]
                    train = exps[exp_name][RUN_DIR.format(kind="metrics/train", seed=seed)]
                    metrics = run.data.metrics
                    numeric = {k: v for k, v in evaluation.items()
                               if isinstance(v, (int, float)) and not isinstance(v, bool)}
                    assert train["steps"] == steps and numeric
                    assert {k: metrics[f"test/{k}"] for k in numeric} == numeric
                    assert metrics["train/loss"] == train["train_loss"]
                    assert run.info.status == "FINISHED" and run.data.tags["complete"] == "true"
                    assert "samples.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
            # The SQLite store and its lock belong to the local default only.
            assert not (ws / "mlflow.db").exists() and not (ws / "mlflow.db-lock").exists()
    finally:
        _database(dsn, f"DROP DATABASE IF EXISTS {name}")
