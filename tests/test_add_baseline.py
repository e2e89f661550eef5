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


def test_add_a_toy_baseline(tiny_study, tmp_path):
    built, _ = tiny_study
    ws = tmp_path / "ws"
    shutil.copytree(built, ws, symlinks=True)
    harness.add_toy_baseline(ws)

    result = harness.dvc(ws, "repro")
    assert harness.ran_stages(result.stdout) == {"validate",
        "train_density@patches32-toy", "evaluate_density@patches32-toy", "fid@patches32-toy", "report"}

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sdn-embedded-density")
    runs = client.search_runs([exp.experiment_id], "tags.model = 'toy' and tags.complete = 'true'")
    assert sorted(r.data.tags["seed"] for r in runs) == ["0", "1"]  # one complete run per seed
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


def test_the_documented_example_runs_as_written(tmp_path):
    """The example of docs/baselines.md, saved as baselines/my_block.py in a copy of the package,
    registers `my_block`, and the tiny HVAE built from it trains a step with its blocks."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "baselines.md").read_text()
    section = text[text.index("## Adding a baseline"):]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
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
