"""SIGKILL mid-training, then the same stage command again: the training resumes bit-identically
and continues the same MLflow run, which ends FINISHED with the whole curve (every step once)."""

from __future__ import annotations

import csv
import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import pipeline_harness as harness

pytestmark = pytest.mark.slow

KILL_AT = 6  # after the step-4 checkpoint and after step 6 reached MLflow (so the rerun must skip it)
STAGE_ARGS = ["--family", "density", "--dataset", "patches32", "--model", "sdn", "--seed", "0",
              "--params", "params.yaml", "--models", "models", "--samples", "samples",
              "--train-metrics", "metrics", "--curves", "curves"]
# The real stage, with MLflow's callback killing its own process once it has logged step KILL_AT.
KILLER = f"""
import os, signal, sys
from pipelines import tracking, train
original = tracking.MlflowCallback.on_step_end
def on_step_end(self, step, metrics):
    original(self, step, metrics)
    if step == {KILL_AT}:
        os.kill(os.getpid(), signal.SIGKILL)
tracking.MlflowCallback.on_step_end = on_step_end
train.main(sys.argv[1:])
"""


def _workspace(path: Path) -> Path:
    path.mkdir(parents=True)
    params = harness.tiny_params(yaml.safe_load((harness.ROOT / "params.yaml").read_text()))
    params["study"]["seeds"] = [0]
    params["density"]["patches32"]["train"].update(steps=12, log_every=2, checkpoint_every=4, eval_every=4)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _run(ws: Path, argv: list[str]) -> subprocess.CompletedProcess:
    env = harness.env(harness.ROOT)
    env["SDN_REPO_ROOT"] = str(ws)
    return subprocess.run([sys.executable, *argv, *STAGE_ARGS], cwd=ws, env=env, capture_output=True, text=True)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_sigkill_then_rerun_continues_the_same_mlflow_run(tmp_path):
    from mlflow import MlflowClient

    killed_ws, plain_ws = _workspace(tmp_path / "killed"), _workspace(tmp_path / "plain")
    killed = _run(killed_ws, ["-c", KILLER])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{killed_ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sdn-embedded-density")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "RUNNING"  # what a SIGKILL leaves, until the rerun
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == KILL_AT

    rerun = _run(killed_ws, ["-m", "pipelines.train"])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    plain = _run(plain_ws, ["-m", "pipelines.train"])
    assert plain.returncode == 0, plain.stderr[-3000:]

    # Bit-identical to the uninterrupted training: curve, metrics file, evaluation weights.
    for name in ("curves/seed0.csv", "metrics/seed0.json", "models/seed0/eval_weights.pt"):
        assert (killed_ws / name).read_bytes() == (plain_ws / name).read_bytes(), name

    (run,) = client.search_runs([exp.experiment_id])  # still one run: the killed one, continued
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "1"
    # The later stages find it by the hash of the weights it exported (no output names the run).
    assert run.data.tags["weights_sha256"] == hashlib.sha256((killed_ws / "models/seed0/eval_weights.pt").read_bytes()).hexdigest()
    curve = _rows(killed_ws / "curves/seed0.csv")
    train_rows = [r for r in curve if r["loss"]]
    val_rows = [r for r in curve if r["val_elbo_bpd"]]
    for key, column, rows in (("train/loss", "loss", train_rows), ("train/bpd", "bpd", train_rows),
                              ("validation/elbo_bpd", "val_elbo_bpd", val_rows)):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert history == [(int(r["step"]), float(r[column])) for r in rows], key
    assert [int(r["step"]) for r in train_rows] == list(range(2, 13, 2))
    seconds = client.get_metric_history(run_id, "train/seconds")
    assert sorted(m.step for m in seconds) == [4, 8, 12]
    assert sorted(m.value for m in seconds) == [m.value for m in sorted(seconds, key=lambda m: m.step)]
    metrics = run.data.metrics
    assert metrics["train/images_per_second"] == pytest.approx(12 * 8 / metrics["train/seconds"])
    tm = json.loads((killed_ws / "metrics/seed0.json").read_text())
    assert metrics["num_params"] == tm["num_params"] and metrics["selected_step"] == tm["selected_step"]
    assert metrics["train/loss"] == tm["train_loss"]  # the final train_* values are the curve's last points
    assert run.data.tags["done_train"] == "true"
