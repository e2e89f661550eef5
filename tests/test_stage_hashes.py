"""What DVC hashes (docs/pipeline.md "What a stage depends on"): a stage depends on the code that
computes its outputs, so editing MLflow logging reruns nothing while editing a model reruns its
stages. Checked with `dvc status` in a copy of the session's built tiny study
(pipeline_harness.built_workspace, shared with test_pipeline_e2e.py). That no output holds what
differs between two identical runs (the same dvc.lock in a fresh workspace) is checked by
test_dvc_queue_mlflow.py, whose queued experiment reproduces part of the tiny study."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import pipeline_harness as harness

pytestmark = pytest.mark.slow

DENSITY_STAGES = {f"{stage}@patches32-{model}" for stage in ("train_density", "evaluate_density", "fid")
                  for model in ("sdn", "cnn")}


@pytest.fixture(scope="module")
def built(tiny_study) -> Path:
    return tiny_study[0]


def _changed_stages(ws: Path) -> set[str]:
    return set(json.loads(harness.dvc(ws, "status", "--json").stdout))


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_only_edits_of_code_that_computes_outputs_make_stages_stale(built, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(built, ws, symlinks=True)
    assert _changed_stages(ws) == set()
    _append(ws / "pipelines" / "tracking.py", "\n# MLflow logging only: no stage's output changes.\n")
    assert _changed_stages(ws) == set()
    _append(ws / "sdn" / "models" / "hvae.py", "\n# the density model\n")
    # validate checks the params against the whole library; its output is the same text whatever it
    # depends on, so only the stages that list hvae.py rerun after it (`dvc repro`, docs/dvc.md).
    assert _changed_stages(ws) == {"validate"} | DENSITY_STAGES


def test_seeds_trained_one_at_a_time_give_the_same_outputs_as_side_by_side(built, tmp_path):
    """``study.runs_at_once`` only schedules: it is no stage's param, and a train stage retrained with
    its seeds one after another reproduces the side-by-side training's every output hash."""
    ws = tmp_path / "ws"
    shutil.copytree(built, ws, symlinks=True)
    harness.dvc(ws, "config", "core.site_cache_dir", str(ws / ".dvc" / "site"))
    lock = (ws / "dvc.lock").read_text()
    harness.edit_params(ws, lambda p: p["study"].update(runs_at_once=1))
    # validate checks the whole params file and the report lists the whole study section; both take seconds
    assert _changed_stages(ws) <= {"validate", "report"}
    shutil.rmtree(ws / "results" / "embedded" / "models" / "patches32" / "sdn")  # no checkpoint to re-export
    harness.dvc(ws, "repro", "--force", "--single-item", "train_density@patches32-sdn")
    assert list((ws / "results" / "embedded" / "models" / "patches32" / "sdn").glob("seed*/checkpoints/*"))
    assert (ws / "dvc.lock").read_text() == lock
