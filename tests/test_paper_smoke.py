"""benchmarks/paper_smoke.py on CPU: every paper run, tiny, at micro-batch 2 with accumulation, through the
real trainer under one-rank DDP, with every later phase (validation, IW chunk, sampling, FID features)
and a checkpoint/resume.

The GPU smoke of the paper study runs the same code at full size; here it must cover every run of
params-paper.yaml with the study's precision, really use DistributedDataParallel and accumulation,
and report numbers that are consistent with each other (images/s and GPU-hours recomputed from the row).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "paper_smoke.py"
sys.path.insert(0, str(ROOT))

from benchmarks import paper_smoke  # noqa: E402
from benchmarks.paper_smoke import main  # noqa: E402
from pipelines.study import load_study  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    """The JSON report of a tiny CPU smoke over the whole paper study (2 timed steps, 1 thread)."""
    out = tmp_path_factory.mktemp("paper_smoke") / "smoke.json"
    threads = torch.get_num_threads()
    try:
        code = main(["--device", "cpu", "--tiny", "--steps", "2", "--warmup", "1", "--threads", "1",
                     "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def study():
    """The paper study, as the pipeline loads it."""
    return load_study(ROOT / "params-paper.yaml")


def test_one_row_per_paper_run(smoke: dict, study) -> None:
    """Every (family, dataset, model) of params-paper.yaml is measured once, and nothing failed."""
    expected = sorted({(r.family, r.dataset, r.model) for r in study.runs()})
    got = sorted((row["family"], row["config"], row["model"]) for row in smoke["rows"])
    assert got == expected
    assert smoke["failed"] == []
    assert smoke["tiny"] is True and smoke["device"] == "cpu"


def test_rows_use_the_study_precision_and_run_length(smoke: dict, study) -> None:
    """Precision and run steps are the paper study's TrainConfig values of that run."""
    seed = study.seeds[0]
    for row in smoke["rows"]:
        paper = study.train_config(study.find_run(row["family"], row["config"], row["model"], seed))
        assert row["precision"] == paper.precision, row
        assert row["steps"] == paper.steps, row


def test_trainer_ran_under_one_rank_ddp_with_accumulation(smoke: dict) -> None:
    """A world of one under DistributedDataParallel; density runs accumulate 2 micro-batches of 2,
    the VAE (micro_batch_size null: batch / GPUs) one; the step counts are the command line's."""
    for row in smoke["rows"]:
        assert row["ddp"] is True and row["world_size"] == 1, row
        assert row["timed_steps"] == 2 and row["warmup"] == 1 and row["micro_batch"] == 2, row
        assert row["accumulation"] == (2 if row["family"] == "density" else 1), row
        assert row["global_batch"] == row["micro_batch"] * row["accumulation"] * row["world_size"], row
        assert row["params"] > 0 and math.isfinite(row["loss"]), row


def test_every_phase_ran_and_the_checkpoint_resumed(smoke: dict) -> None:
    """Density runs measure all five phases, the VAE train and sampling; every run resumed its checkpoint;
    fp16 skips are counted (at most every step) and fp32 runs skip none."""
    for row in smoke["rows"]:
        measured = {phase for phase, gib in row["memory_gib"].items() if gib is not None}
        expected = set(paper_smoke.PHASES) if row["family"] == "density" else {"train", "sampling"}
        assert measured == expected, row
        assert all(gib > 0 for gib in row["memory_gib"].values() if gib is not None), row
        assert row["resumed"] is True, row
        assert 0 <= row["fp16_skipped"] <= row["warmup"] + 2 + row["timed_steps"], row  # + resumed + untimed first
        if row["precision"] != "fp16":
            assert row["fp16_skipped"] == 0, row


def test_times_throughput_and_gpu_hours_are_consistent(smoke: dict) -> None:
    """Positive finite step times; images/s per GPU and GPU-hours recomputed from the row's own fields."""
    for row in smoke["rows"]:
        step_s = row["step_s"]
        assert math.isfinite(step_s) and step_s > 0, row
        assert row["images_per_s"] == pytest.approx(row["global_batch"] / row["world_size"] / step_s)
        assert row["gpu_hours"] == pytest.approx(row["steps"] * step_s * row["world_size"] / 3600)
        assert row["memory"] == "rss"


def test_full_size_needs_twenty_warmup_steps() -> None:
    """At full size fewer than 20 warm-up steps are refused before anything is built."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cpu", "--no-tiny", "--warmup", "5"])
    assert exit_info.value.code == 2


def test_cuda_without_gpu_exits_2_with_a_message() -> None:
    """``--device cuda`` on a machine without CUDA fails fast (exit 2), before building anything."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "CUDA is not available" in proc.stderr
    assert proc.stdout == ""


def test_a_failing_run_is_reported_and_the_others_still_run(tmp_path, monkeypatch) -> None:
    """``--configs`` picks datasets; every run is attempted, failures land in the JSON, exit 1."""
    def fail(study, run, *args):
        raise RuntimeError(f"boom {run.model}")

    monkeypatch.setattr(paper_smoke, "smoke_run", fail)
    threads = torch.get_num_threads()
    try:
        code = main(["--device", "cpu", "--configs", "shapes3d", "--json", str(tmp_path / "out.json")])
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "out.json").read_text())
    assert code == 1 and report["rows"] == []
    assert [(f["config"], f["model"], f["error"]) for f in report["failed"]] == [
        ("shapes3d", "cnn", "RuntimeError: boom cnn"), ("shapes3d", "sdn", "RuntimeError: boom sdn")]
