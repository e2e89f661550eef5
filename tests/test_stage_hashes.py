"""What DVC hashes (docs/pipeline.md "What a stage depends on"): a stage depends on the code that
computes its outputs, so editing MLflow logging reruns nothing while editing a model reruns its
stages; and no output holds a run id, a time or a path, so the tiny study reproduced in a second,
fresh workspace gives the same dvc.lock, hash for hash. Both start from the session's built tiny study
(pipeline_harness.built_workspace, shared with test_pipeline_e2e.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

import pipeline_harness as harness

pytestmark = pytest.mark.slow

DENSITY_STAGES = {f"{stage}@patches32-{model}" for stage in ("train_density", "evaluate_density", "fid")
                  for model in ("sdn", "cnn")}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return harness.built_workspace(tmp_path_factory.getbasetemp())[0]


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


def _out_hashes(lock: dict) -> dict[str, str]:
    """{output path: its hash} of every stage in a parsed dvc.lock."""
    return {out["path"]: out.get("md5") or out.get("hash")
            for stage in lock["stages"].values() for out in stage.get("outs", [])}


def test_the_study_reproduced_in_a_fresh_workspace_has_the_same_lock(built, tmp_path):
    again = harness.make_workspace(tmp_path / "again")
    harness.dvc(again, "repro")
    first, second = (yaml.safe_load((ws / "dvc.lock").read_text()) for ws in (built, again))
    first_outs, second_outs = _out_hashes(first), _out_hashes(second)
    assert first_outs.keys() == second_outs.keys() and len(first_outs) > 20
    differing = sorted(path for path in first_outs if first_outs[path] != second_outs[path])
    assert differing == [], f"outputs whose hash differs between two identical runs: {differing}"
    assert first == second  # deps (code, params, other stages' outputs) too
