"""The whole study on a tiny params file: DVC stages, metrics, plots, reports and MLflow runs.

One `dvc repro` in a temporary copy of the repository (shared with test_add_baseline.py), then:
a second repro does nothing; `dvc metrics show` / `dvc plots show` work; the report's numbers are
the metrics files' numbers; an `mlflow server` on the store answers runs/search with the runs,
params, metrics and artifacts; editing one model's params reruns only that model's stages. The
tiny study has two seeds run side by side (``study.runs_at_once: 2``), as the embedded study does.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

import pipeline_harness as harness

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tiny_study, tmp_path_factory):
    """This module's own copy of the session's tiny study (its tests run DVC and MLflow in it, while
    other workers copy the shared one) and the output of the repro that built it."""
    shared, output = tiny_study
    ws = tmp_path_factory.mktemp("e2e") / "ws"
    shutil.copytree(shared, ws, symlinks=True)
    return ws, output


def _expected_stages(with_toy: bool = False) -> set[str]:
    density = ["sdn", "cnn"] + (["toy"] if with_toy else [])
    stages = {"validate", "prepare_embedded@patches32", "prepare_embedded@dsprites_procedural", "fid_stats@patches32",
              "report"}
    for m in density:
        stages |= {f"train_density@patches32-{m}", f"evaluate_density@patches32-{m}", f"fid@patches32-{m}"}
    for m in ("cnn", "sdn"):
        stages |= {f"train_disentanglement@dsprites_procedural-{m}",
                   f"evaluate_disentanglement@dsprites_procedural-{m}"}
    return stages


def test_repro_runs_every_stage_once_and_then_nothing(built):
    ws, output = built
    assert harness.ran_stages(output) == _expected_stages()
    again = harness.dvc(ws, "repro")
    assert harness.ran_stages(again.stdout) == set()
    assert "up to date" in harness.dvc(ws, "status").stdout


def test_dvc_metrics_and_plots(built):
    ws, _ = built
    metrics = json.loads(harness.dvc(ws, "metrics", "show", "--json").stdout)
    data = next(iter(metrics.values()))["data"]
    flat = {path: entry["data"] for path, entry in data.items()}
    ev = flat["results/embedded/metrics/eval/patches32/sdn/seed0.json"]
    assert ev["iw_bpd"] > 0 and ev["elbo_bpd"] > 0 and ev["iw_samples"] == 4 and ev["train_elbo_bpd"] > 0
    assert flat["results/embedded/metrics/eval/patches32/sdn/seed1.json"]["iw_bpd"] != ev["iw_bpd"]
    dis = flat["results/embedded/metrics/eval/dsprites_procedural/cnn/seed0.json"]
    assert {"beta_vae.eval_accuracy", "factor_vae.eval_accuracy", "mig.discrete_mig", "dci.disentanglement",
            "sap.SAP_score"} <= set(dis)
    assert flat["results/embedded/metrics/fid/patches32/cnn/seed0.json"]["fid"] == "n/a"
    # keep_best: the weights written for evaluation are those of the selected validation step
    train = flat["results/embedded/metrics/train/patches32/sdn/seed0.json"]
    assert train["selected_step"] in (2, 4) and train["selected_validation_elbo_bpd"] > 0
    curve = _rows(ws / "results/embedded/curves/patches32/sdn/seed0.csv")
    val = {int(r["step"]): float(r["val_elbo_bpd"]) for r in curve if r.get("val_elbo_bpd")}
    assert train["selected_step"] == min(val, key=val.get)
    assert train["selected_validation_elbo_bpd"] == pytest.approx(min(val.values()), rel=1e-6)
    plots = json.loads(harness.dvc(ws, "plots", "show", "--json").stdout)
    text = json.dumps(plots)
    assert "results/embedded/curves/patches32/sdn/seed0.csv" in text
    assert "results/embedded/curves/dsprites_procedural/sdn/seed0.csv" in text


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_reports_hold_the_metrics_files_numbers(built):
    ws, _ = built
    reports = ws / "reports"
    rows = {r["model"]: r for r in _rows(reports / "density.csv")}
    assert set(rows) == {"sdn", "cnn"}
    for model, row in rows.items():
        ev = json.loads((ws / f"results/embedded/metrics/eval/patches32/{model}/seed0.json").read_text())
        tr = json.loads((ws / f"results/embedded/metrics/train/patches32/{model}/seed0.json").read_text())
        ev1 = json.loads((ws / f"results/embedded/metrics/eval/patches32/{model}/seed1.json").read_text())
        assert float(row["iw_bpd_mean"]) == pytest.approx((ev["iw_bpd"] + ev1["iw_bpd"]) / 2, rel=1e-5)
        assert int(row["num_params"]) == tr["num_params"] and row["seeds"] == "2"
    assert rows["sdn"]["num_params"] != rows["cnn"]["num_params"]
    dis = {r["model"] for r in _rows(reports / "disentanglement.csv")}
    assert dis == {"cnn", "sdn"}
    fid_md = (reports / "fid.md").read_text()
    assert "n/a (no network: data/raw/fid/weights-inception-2015-12-05-6726825d.pth not found" in fid_md
    assert "seeds 0" not in fid_md
    index = (reports / "index.md").read_text()
    for needle in ("## Claims", "### Run checks", "## Density", "## Disentanglement", "## FID", "## Versions",
                   "## Reduced from the paper", "figures/curves_patches32.png", "figures/val_curves_patches32.png",
                   "figures/samples_patches32_sdn.png", "figures/reconstructions_dsprites_procedural_sdn.png",
                   "K = 4"):
        assert needle in index
    assert "selected_step" in index and "Temperature 0.6" in index
    for name in ("curves_patches32.png", "bars_patches32.png", "bars_dsprites_procedural.png",
                 "samples_dsprites_procedural_cnn.png", "samples_patches32_sdn_t0.6.png", "samples_patches32_cnn_t1.png"):
        assert (reports / "figures" / name).read_bytes()[:4] == b"\x89PNG"


def _request(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as response:
        return json.loads(response.read() or b"{}")


def test_mlflow_server_shows_the_runs(built, tmp_path):
    ws, _ = built
    with harness.mlflow_server(ws, tmp_path / "server.log", harness.env(ws)) as base:
        runs = {}
        for family in ("density", "disentanglement"):
            exp = _request(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=sdn-embedded-{family}")
            found = _request(f"{base}/api/2.0/mlflow/runs/search", {
                "experiment_ids": [exp["experiment"]["experiment_id"]], "filter": "tags.complete = 'true'",
                "max_results": 100})
            for run in found["runs"]:
                tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
                runs[(tags["dataset"], tags["model"], tags["seed"])] = run
        run = runs[("patches32", "sdn", "0")]
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert params["train.steps"] == "4" and params["model_config.h_size"] == "8" and params["seed"] == "0"
        ev = json.loads((ws / "results/embedded/metrics/eval/patches32/sdn/seed0.json").read_text())
        assert metrics["test/iw_bpd"] == pytest.approx(ev["iw_bpd"])
        assert "train/bpd" in metrics and metrics["num_params"] > 0
        assert tags["dvc_stage"] == "train_density@patches32-sdn" and tags["fid_status"] == "n/a"
        dis = {m["key"] for m in runs[("dsprites_procedural", "sdn", "0")]["data"]["metrics"]}
        assert "test/mig.discrete_mig" in dis
        listed = _request(f"{base}/api/2.0/mlflow/artifacts/list?run_id={run['info']['run_id']}")
        assert {"samples.png", "resolved_config.json", "metrics"} <= {f["path"] for f in listed["files"]}
        vae = runs[("dsprites_procedural", "sdn", "1")]["info"]["run_id"]
        listed = _request(f"{base}/api/2.0/mlflow/artifacts/list?run_id={vae}")
        assert "reconstructions.png" in {f["path"] for f in listed["files"]}


def test_one_models_params_rerun_only_that_model(built, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(built[0], ws, symlinks=True)
    harness.edit_params(ws, lambda p: p["density"]["patches32"]["models"]["cnn"].update(h_size=12))
    status = json.loads(harness.dvc(ws, "status", "--json").stdout)
    assert set(status) == {"validate", "train_density@patches32-cnn", "evaluate_density@patches32-cnn",
                           "fid@patches32-cnn", "report"}  # validate: the whole params file, checked first
    # Rerunning a stage makes a new MLflow run, tagged with the hash of the weights the later stages read.
    harness.dvc(ws, "repro", "--single-item", "train_density@patches32-cnn")
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sdn-embedded-density")
    runs = client.search_runs([exp.experiment_id],
                              "tags.dataset = 'patches32' and tags.model = 'cnn' and tags.seed = '0'")
    assert len(runs) == 2
    newest = max(runs, key=lambda r: r.info.start_time)
    weights = ws / "results/embedded/models/patches32/cnn/seed0/eval_weights.pt"
    assert newest.data.tags["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert newest.data.params["model_config.h_size"] == "12"


def test_rerun_of_an_unchanged_run_resumes_from_its_checkpoint(built, tmp_path):
    """DVC deletes a stage's plain outputs before it reruns; the persistent model directory keeps
    the checkpoint (and the curve beside it), so the run continues instead of starting over."""
    ws = tmp_path / "ws"
    shutil.copytree(built[0], ws, symlinks=True)
    study = "results/embedded"
    curve = ws / study / "curves/patches32/sdn/seed0.csv"
    weights = ws / study / "models/patches32/sdn/seed0/eval_weights.pt"
    curve_before, weights_before = curve.read_bytes(), weights.read_bytes()
    out = harness.dvc(ws, "repro", "--force", "--single-item", "train_density@patches32-sdn")
    assert "train_density@patches32-sdn" in harness.ran_stages(out.stdout + out.stderr)
    assert curve.read_bytes() == curve_before
    assert weights.read_bytes() == weights_before
    checkpoints = list((weights.parent / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and (checkpoints[0] / "checkpoint.pt").exists()


def test_fid_stages_with_a_local_weights_file(built, tmp_path):
    """With `fid.weights_path` set, the real stage scripts compute reference statistics and a
    finite FID that records its implementation (random-init FID-Inception; few images on CPU)."""
    import math
    import sys

    from fid_weights import save_random_fid_inception

    ws = tmp_path / "ws"
    shutil.copytree(built[0], ws, symlinks=True)
    weights = save_random_fid_inception(tmp_path / "inception")
    stats = ws / "data/fid_stats/patches32/stats.npz"
    subprocess.run(
        [sys.executable, "-m", "pipelines.fid_stats", "--dataset", "patches32", "--split", "train",
         "--data", "data/prepared/patches32", "--out", str(stats), "--weights-path", str(weights),
         "--batch-size", "8", "--max-images", "16"],
        cwd=ws, env=harness.env(ws), check=True, capture_output=True, text=True,
    )
    harness.edit_params(ws, lambda p: p["fid"].update(weights_path=str(weights), num_samples=8,
                                                       batch_size=8))
    harness.dvc(ws, "repro", "--single-item", "fid@patches32-sdn")
    record = json.loads((ws / "results/embedded/metrics/fid/patches32/sdn/seed0.json").read_text())
    assert record["available"] is True and math.isfinite(record["value"]) and record["value"] > 0
    assert record["fid"] == record["value"] and record["num_samples"] == 8
    assert record["kid"] == record["kid_mean"] and record["kid_subset_size"] == 8
    assert (record["implementation"], record["version"]) == ("torch-fidelity", "0.4.0")
    assert record["feature_layer"] == "2048" and record["reference"] == "patches32/train (16 images)"
