"""Shared by the end-to-end tests: a tiny copy of the repository where `dvc repro` runs offline.

The copy holds this checkout's dvc.yaml, pipelines/, sdn/, baselines/ and a TINY params.yaml
(one seed, few steps, narrow models); stage scripts import the copy's code (PYTHONPATH), and
MLflow writes to the copy's own mlflow.db. The first finished workspace is cached per session (and
shared by the pytest-xdist workers) so the other end-to-end tests start from a copy of it instead of
running the whole pipeline again.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COPIED = ("dvc.yaml", "params.yaml", "pipelines", "sdn", "baselines", "reports/paper_results.yaml")

TOY_BASELINE = '''"""``toy``: a throw-away baseline for the add-a-baseline test (1x1 convs, transposed conv to upsample)."""

from torch import nn

from sdn.models.blocks import check_block_request, plain_conv, register_blocks


class ToyBlockFactory:
    def __call__(self, role, in_ch, out_ch, scale, upsample):
        check_block_request(role, in_ch, out_ch, scale, upsample)
        return plain_conv(in_ch, out_ch, True) if upsample else nn.Conv2d(in_ch, out_ch, 1)


@register_blocks("toy")
def build_toy(config):
    return ToyBlockFactory()
'''

_BUILT: dict[str, Any] = {}


def tiny_params(params: dict[str, Any]) -> dict[str, Any]:
    """The embedded study shrunk to seconds per stage: 2 seeds, 2 models per family, 4 steps."""
    p = yaml.safe_load(yaml.safe_dump(params))
    p["study"]["seeds"] = [0, 1]  # two seeds side by side, as in the embedded study
    p["study"]["density"]["models"] = ["sdn", "cnn"]
    p["data"]["dsprites_procedural"]["options"] = {"num": 256, "seed": 0}
    p["data"]["patches32"]["options"] = {"patch_size": 8, "region": 16, "levels": 2, "validation_fraction": 0.05,
                                         "test_fraction": 0.05, "seed": 0}
    d = p["density"]["patches32"]
    d["overrides"] = {"image_size": 8, "sdn_max_scale": 8, "h_size": 8, "depth": 2, "ds_list": [0, 1],
                      "sdn_nfeat_0": 8, "iaf_context": 8, "mixtures": 2}
    d["models"] = {"sdn": {}, "cnn": {"precision": "bf16"}}  # a per-model precision, as the paper profile
    d["train"].update(steps=4, batch_size=8, log_every=2, checkpoint_every=4)
    d["train"].update(eval_every=2, keep_best="elbo_bpd")  # selection on validation, as the paper profile
    d["samples"]["temperatures"] = [0.6, 1.0]
    d["eval"] = {"batch_size": 16, "iw_samples": 4, "max_examples": 16}
    d["samples"]["num"] = 4
    q = p["disentanglement"]["dsprites_procedural"]
    q["overrides"] = {"sdn_features": 8}
    q["train"].update(steps=4, batch_size=16, log_every=2, checkpoint_every=4)
    q["metrics"] = {"num_train": 60, "num_eval": 30, "batch_size": 8, "encode_batch_size": 32,
                    "metrics": ["beta_vae", "factor_vae", "mig", "dci", "sap"]}
    q["samples"]["num"] = 4
    p["fid"]["num_samples"] = 10
    return p


def env(workspace: Path) -> dict[str, str]:
    """Environment of the stage commands: this venv, the copy's code, no telemetry, no network."""
    out = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "SDN_REPO_ROOT", "DVC_ROOT", "PYTHONPATH")}
    out.update({
        "PATH": f"{BIN}:{out.get('PATH', '/usr/bin:/bin')}", "PYTHONPATH": str(workspace),
        "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONWARNINGS": "ignore",
    })
    return out


def dvc(workspace: Path, *args: str, check: bool = True,
        extra_env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "dvc"), *args], cwd=workspace, env={**env(workspace), **(extra_env or {})},
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def ran_stages(output: str) -> set[str]:
    """Names of the stages `dvc repro` ran (from its "Running stage 'x':" lines)."""
    return set(re.findall(r"Running stage '([^']+)'", output))


def make_workspace(dest: Path) -> Path:
    """A fresh git + DVC repository at ``dest`` with this checkout's pipeline and tiny params
    (whatever an earlier, failed attempt left at ``dest`` is removed first)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in COPIED:
        src, dst = ROOT / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=ignore)
        else:
            shutil.copy(src, dst)
    params = tiny_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    dvc(dest, "init", "-q")
    dvc(dest, "config", "core.site_cache_dir", str(dest / ".dvc" / "site"))
    return dest


def edit_params(workspace: Path, edit) -> None:
    path = workspace / "params.yaml"
    params = yaml.safe_load(path.read_text())
    edit(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def add_toy_baseline(workspace: Path) -> None:
    """Exactly what docs/pipeline.md tells a user: one file in baselines/, its name in the study."""
    (workspace / "baselines" / "toy.py").write_text(TOY_BASELINE)

    def edit(p):
        p["study"]["density"]["models"].append("toy")
        for section in p["density"].values():
            section["models"]["toy"] = {}

    edit_params(workspace, edit)


def documented_example(doc: str, section: str) -> str:
    """The first ```python block after the heading ``section`` of ``docs/<doc>``, as written."""
    text = (ROOT / "docs" / doc).read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(section):], re.S).group(1)


def add_documented_metric(workspace: Path) -> str:
    """docs/extending.md's example metric as its one file, and its name in the study's metrics; its name."""
    (workspace / "sdn" / "metrics" / "disentanglement" / f"{DOCUMENTED_METRIC}.py").write_text(
        documented_example("extending.md", "## Add a disentanglement metric"))
    edit_params(workspace, lambda p: [section["metrics"]["metrics"].append(DOCUMENTED_METRIC)
                                      for section in p["disentanglement"].values()])
    return DOCUMENTED_METRIC


DOCUMENTED_METRIC = "max_correlation"  # the metric of docs/extending.md's example


def built_workspace(tmp_root: Path) -> tuple[Path, str]:
    """A workspace after one full `dvc repro` (cached for the session) and that repro's output.

    Under pytest-xdist (``make test``) the workers share one build: the first to get here builds it
    in the session's common folder (the parent of each worker's ``tmp_root``), the others wait on a
    file lock and reuse it. Tests copy it before changing anything in it."""
    if "workspace" not in _BUILT:
        root = tmp_root.parent if os.environ.get("PYTEST_XDIST_WORKER") else tmp_root
        ws, log = root / "built", root / "built.repro-output"
        with FileLock(str(root / "built.lock")):
            if not log.exists():
                # No pre-migrated store: the first stage's seeds start side by side on a fresh mlflow.db,
                # as on a fresh clone (the stage must create the store before its runs race to).
                make_workspace(ws)
                result = dvc(ws, "repro")
                log.write_text(result.stdout + result.stderr)
        _BUILT["workspace"] = (ws, log.read_text())
    return _BUILT["workspace"]


# What a clone of the study keeps out of git (the repository's .gitignore, run state).
RUN_STATE_IGNORED = "mlflow.db\nmlflow.db-*\nmlartifacts/\n/.dvc/site/\n"


def git(workspace: Path, *args: str) -> str:
    """``git <args>`` in ``workspace`` as a test user; its stdout."""
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
                          cwd=workspace, check=True, capture_output=True, text=True).stdout


def committed_copy(built: Path, dest: Path) -> Path:
    """A copy of a built workspace at ``dest`` with everything committed (run state ignored), so that
    `git status` and `dvc status` are clean there."""
    shutil.copytree(built, dest, symlinks=True)
    (dest / ".gitignore").write_text(RUN_STATE_IGNORED)
    dvc(dest, "config", "core.site_cache_dir", str(dest / ".dvc" / "site"))
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "tiny study")
    return dest


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def mlflow_server(root: Path, log: Path, env: Mapping[str, str], backend: str | None = None) -> Iterator[str]:
    """`mlflow server` on ``root``'s store (or the ``backend`` store URI, e.g. a PostgreSQL database,
    with artifacts under ``root/mlartifacts``), started in ``root`` as `make ui` does; yields its
    base URL and stops the server's whole process group afterwards."""
    port = free_port()
    store = ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"] if backend is None else [
        "--backend-store-uri", backend, "--artifacts-destination", str(root / "mlartifacts")]
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", *store, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=root, env=dict(env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "mlflow server did not come up"
                time.sleep(0.5)
            yield base
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:  # the server had already exited (its log says why)
                pass
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
