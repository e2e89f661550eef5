"""Adding to the study = one file + its name in params.yaml + `dvc repro` (docs/extending.md).

Starts from a finished tiny pipeline (shared with test_pipeline_e2e.py) and extends a copy of it with
one of each extension kind (a toy density baseline, docs/extending.md's example disentanglement metric),
runs ONE `dvc repro`, and checks per kind that exactly the expected stages ran and that its results
reached the metrics files, MLflow and the report.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline_harness as harness

pytestmark = pytest.mark.slow

EVAL = Path("results/embedded/metrics/eval")
RAN = {  # per extension kind: the stages its addition reruns (besides validate and the report)
    "baseline": {"train_density@patches32-toy", "evaluate_density@patches32-toy", "fid@patches32-toy"},
    "metric": {"evaluate_disentanglement@dsprites_procedural-cnn", "evaluate_disentanglement@dsprites_procedural-sdn"},
}


@pytest.fixture(scope="module")
def extended(tiny_study, tmp_path_factory) -> tuple[Path, Path, set[str]]:
    """(built study, its copy with every extension added, the stages the copy's one `dvc repro` ran)."""
    built, _ = tiny_study
    ws = tmp_path_factory.mktemp("extended") / "ws"
    shutil.copytree(built, ws, symlinks=True)
    harness.add_toy_baseline(ws)
    harness.add_documented_metric(ws)
    result = harness.dvc(ws, "repro")
    return built, ws, harness.ran_stages(result.stdout)


def _runs(ws: Path, family: str, query: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name(f"sdn-embedded-{family}")
    return client.search_runs([exp.experiment_id], f"{query} and tags.complete = 'true'")


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_exactly_the_extensions_stages_and_the_report_ran(extended):
    _, _, ran = extended
    assert ran == {"validate", "report"}.union(*RAN.values())


def test_add_a_toy_baseline(extended):
    _, ws, ran = extended
    assert RAN["baseline"] <= ran
    runs = _runs(ws, "density", "tags.model = 'toy'")
    assert sorted(r.data.tags["seed"] for r in runs) == ["0", "1"]  # one complete run per seed
    assert all(r.data.tags["dataset"] == "patches32" for r in runs)
    assert all(r.data.metrics["test/iw_bpd"] > 0 and r.data.metrics["num_params"] > 0 for r in runs)

    rows = {r["model"]: r for r in _csv(ws / "reports" / "density.csv")}
    assert set(rows) == {"sdn", "cnn", "toy"}
    mean = sum(r.data.metrics["test/iw_bpd"] for r in runs) / len(runs)
    assert float(rows["toy"]["iw_bpd_mean"]) == pytest.approx(mean, rel=1e-5)
    assert "sdn − toy" in {r["comparison"] for r in _csv(ws / "reports" / "density_comparison.csv")}
    assert "| patches32 | toy |" in (ws / "reports" / "fid.md").read_text()


def test_add_the_documented_metric(extended):
    """docs/extending.md's metric file + its name in the params: its score is in every evaluate metrics file
    (the other scores unchanged), in MLflow as `test/<metric>.score`, and in the report's table and claims."""
    built, ws, ran = extended
    assert RAN["metric"] <= ran
    key = f"{harness.DOCUMENTED_METRIC}.score"
    files = sorted((ws / EVAL / "dsprites_procedural").glob("*/seed*.json"))
    assert len(files) == 4  # cnn, sdn x seeds 0, 1
    scores = {}
    for path in files:
        now, before = json.loads(path.read_text()), json.loads((built / path.relative_to(ws)).read_text())
        assert 0.0 <= now[key] <= 1.0
        assert {k: v for k, v in now.items() if k != key} == before  # adding a metric changes no other number
        scores[(path.parent.name, path.stem.removeprefix("seed"))] = now[key]

    runs = _runs(ws, "disentanglement", "tags.dataset = 'dsprites_procedural'")
    logged = {(r.data.tags["model"], r.data.tags["seed"]): r.data.metrics[f"test/{key}"] for r in runs}
    assert logged == pytest.approx(scores, rel=1e-12)

    rows = {r["model"]: r for r in _csv(ws / "reports" / "disentanglement.csv")}
    for model in ("cnn", "sdn"):
        mean = (scores[(model, "0")] + scores[(model, "1")]) / 2
        assert float(rows[model][f"{key}_mean"]) == pytest.approx(mean, rel=1e-5)  # the CSV keeps 6 digits
    header = next(line for line in (ws / "reports" / "disentanglement.md").read_text().splitlines()
                  if line.startswith("| dataset"))
    assert key in header
    assert f"SDN decoder improves {key}" in {r["claim"] for r in _csv(ws / "reports" / "claims.csv")}


def test_the_documented_example_runs_as_written(tmp_path):
    """The example of docs/baselines.md, saved as baselines/my_block.py in a copy of the package,
    registers `my_block`, and the tiny HVAE built from it trains a step with its blocks."""
    root = harness.ROOT
    example = harness.documented_example("baselines.md", "## Adding a baseline")
    shutil.copytree(root / "baselines", tmp_path / "baselines")
    (tmp_path / "baselines" / "my_block.py").write_text(example)
    (tmp_path / "sdn").symlink_to(root / "sdn")
    check = (
        "import torch\n"
        "import baselines\n"
        "from sdn.models.hvae import build_hvae, get_config\n"
        "assert 'my_block' in baselines.NAMES\n"
        "config = get_config('tiny', sdn_max_scale=0)\n"
        "model = build_hvae(config, 'my_block')\n"
        "assert any(type(m).__name__ == 'MyBlock' for m in model.modules())\n"
        "images = torch.randint(0, 256, (2, config.channels, config.image_size, config.image_size), dtype=torch.uint8)\n"
        "out = model(images)\n"
        "out['loss'].backward()\n"
        "assert torch.isfinite(out['loss'])\n"
        "print('ok', sum(p.numel() for p in model.parameters()))\n"
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
