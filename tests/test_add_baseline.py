"""Adding a baseline = one file in baselines/ + its name in params.yaml + `dvc repro` (docs/pipeline.md).

Starts from a finished tiny pipeline (shared with test_pipeline_e2e.py), adds a toy baseline in a
copy, and checks that exactly the toy's stages and the report run, that its MLflow runs exist and
that it has rows in the generated tables.
"""

from __future__ import annotations

import csv
import shutil

import pytest

import pipeline_harness as harness

pytestmark = pytest.mark.slow


def test_add_a_toy_baseline(tmp_path_factory, tmp_path):
    built, _ = harness.built_workspace(tmp_path_factory.getbasetemp())
    ws = tmp_path / "ws"
    shutil.copytree(built, ws, symlinks=True)
    harness.add_toy_baseline(ws)

    result = harness.dvc(ws, "repro")
    assert harness.ran_stages(result.stdout) == {
        "train_density@patches32-toy", "evaluate_density@patches32-toy", "fid@patches32-toy", "report"}

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sdn-embedded")
    runs = client.search_runs([exp.experiment_id], "tags.model = 'toy' and tags.current = 'true'")
    assert sorted(r.data.tags["seed"] for r in runs) == ["0", "1"]  # one current run per seed
    assert all(r.data.tags["dataset"] == "patches32" for r in runs)
    assert all(r.data.metrics["test/iw_bpd"] > 0 and r.data.metrics["num_params"] > 0 for r in runs)

    with (ws / "reports" / "density.csv").open() as handle:
        rows = {r["model"]: r for r in csv.DictReader(handle)}
    assert set(rows) == {"sdn", "cnn", "toy"}
    mean = sum(r.data.metrics["test/iw_bpd"] for r in runs) / len(runs)
    assert float(rows["toy"]["iw_bpd_mean"]) == pytest.approx(mean, rel=1e-5)
    with (ws / "reports" / "density_comparison.csv").open() as handle:
        comparisons = {r["comparison"] for r in csv.DictReader(handle)}
    assert "sdn − toy" in comparisons
    assert "| patches32 | toy |" in (ws / "reports" / "fid.md").read_text()
