"""Shared outputs through a DVC remote (docs/team.md): clone A trains the tiny study and pushes to a
local-folder remote; clone B pulls, `dvc status` is clean, `dvc repro` reruns nothing and the report
is byte-identical without training. A missing or corrupt object in the remote is an error naming it
(`dvc status --cloud` names the output), and costs no local file."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

import pipeline_harness as harness

pytestmark = pytest.mark.slow

UP_TO_DATE = "Data and pipelines are up to date."
SAMPLE = "results/embedded/samples/patches32/sdn/seed0.png"


def _tracked_files(ws: Path) -> dict[str, bytes]:
    """Every file of the study's outputs (results/, reports/, data/prepared/)."""
    return {str(p.relative_to(ws)): p.read_bytes() for top in ("results", "reports", "data")
            for p in sorted((ws / top).rglob("*")) if p.is_file()}


def _object(remote: Path, file: Path) -> Path:
    """The remote's object of one file (DVC 3 layout: files/md5/<2>/<30>)."""
    digest = hashlib.md5(file.read_bytes()).hexdigest()
    return remote / "files" / "md5" / digest[:2] / digest[2:]


def _dir_object(ws: Path, remote: Path, output: str) -> Path:
    """The remote's ``.dir`` object (the listing) of a folder output, from dvc.lock."""
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    digest = next(out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])
                  if out["path"] == output)
    return remote / "files" / "md5" / digest[:2] / digest[2:]


def _clone(source: Path, dest: Path) -> Path:
    harness.git(source.parent, "clone", "-q", str(source), str(dest))
    harness.dvc(dest, "config", "--local", "core.site_cache_dir", str(dest / ".dvc" / "site"))
    return dest


@pytest.fixture(scope="module")
def pushed(tiny_study, tmp_path_factory) -> tuple[Path, Path]:
    """Clone A (the session's built tiny study, committed) with a local-folder remote, pushed."""
    built, _ = tiny_study
    root = tmp_path_factory.mktemp("remote")
    a = harness.committed_copy(built, root / "a")
    remote = root / "shared-remote"
    harness.dvc(a, "remote", "add", "-d", "shared", str(remote))
    harness.dvc(a, "remote", "modify", "shared", "verify", "true")  # pulled objects are re-hashed
    harness.git(a, "add", ".dvc/config")
    harness.git(a, "commit", "-q", "-m", "the team's remote")
    harness.dvc(a, "push")
    return a, remote


def test_pull_then_repro_reruns_nothing_and_the_report_is_identical(pushed, tmp_path):
    a, remote = pushed
    b = _clone(a, tmp_path / "b")
    assert not (b / SAMPLE).exists()  # nothing but git's files before the pull
    harness.dvc(b, "pull")
    assert harness.dvc(b, "status").stdout.strip() == UP_TO_DATE
    result = harness.dvc(b, "repro")
    assert harness.ran_stages(result.stdout + result.stderr) == set(), result.stdout
    assert _tracked_files(b) == _tracked_files(a)  # report, metrics, models: byte-identical
    assert harness.git(b, "status", "--porcelain") == ""
    assert not (b / "mlflow.db").exists()  # nothing trained, nothing tracked


def test_missing_or_corrupt_remote_object_is_named_and_costs_nothing_locally(pushed, tmp_path):
    a, remote = pushed
    b = _clone(a, tmp_path / "b")
    harness.dvc(b, "pull")
    before = _tracked_files(b)
    missing = _object(remote, a / SAMPLE)
    corrupt = _object(remote, a / "results/embedded/models/patches32/sdn/seed0/eval_weights.pt")
    listings = [_dir_object(a, remote, f"results/embedded/{f}/patches32/sdn") for f in ("samples", "models")]
    saved = {path: path.read_bytes() for path in (missing, corrupt, *listings)}
    try:
        missing.unlink()
        corrupt.write_bytes(b"not the weights")
        # A clone that has everything: pulling again changes nothing.
        harness.dvc(b, "pull")
        assert _tracked_files(b) == before and harness.dvc(b, "status").stdout.strip() == UP_TO_DATE
        # A fresh clone: the pull fails naming the missing object; `dvc status --cloud` names its output.
        c = _clone(a, tmp_path / "c")
        pulled = harness.dvc(c, "pull", check=False)
        message = pulled.stdout + pulled.stderr
        print(message.strip().splitlines()[-3:])
        assert pulled.returncode != 0 and str(missing) in message
        cloud = harness.dvc(c, "status", "--cloud").stdout
        assert "deleted:" in cloud and "results/embedded/samples/patches32/sdn" in cloud, cloud
        missing.write_bytes(saved[missing])
        # Only the corrupt object left: verify = true re-hashes it and the error names its output.
        pulled = harness.dvc(c, "pull", check=False)
        message = pulled.stdout + pulled.stderr
        print(message.strip().splitlines()[-4:])
        assert pulled.returncode != 0 and "results/embedded/models/patches32/sdn" in message
        assert not (c / "results/embedded/models/patches32/sdn/seed0/eval_weights.pt").exists()
        # Repair: remove the bad objects and their folders' listings (`.dir`: with it DVC takes the
        # whole folder as present) from the remote, and the owner pushes again.
        corrupt.unlink()
        for listing in listings:
            listing.unlink()
        harness.dvc(a, "push")
        harness.dvc(c, "pull")
        assert _tracked_files(c) == before
    finally:
        for path, data in saved.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
