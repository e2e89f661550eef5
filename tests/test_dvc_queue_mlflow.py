"""Two queued DVC experiments run in parallel (`dvc queue start -j 2`) on the tiny workspace: every
MLflow run of each experiment holds exactly that experiment's numbers (its own DVC metrics files,
value for value), and is found by its DVC experiment's name. The experiment whose params equal the tiny
study's reproduces it in a fresh workspace: every stage it ran has the same dvc.lock entry, hash for
hash, as the session's built tiny study (no output holds a run id, a time or a path)."""

from __future__ import annotations

import json
import subprocess
import time

import yaml

import pytest

import pipeline_harness as harness

pytestmark = pytest.mark.slow

STEPS = {"steps-4": 4, "steps-6": 6}
TARGETS = ("evaluate_density@patches32-sdn", "fid@patches32-sdn")
RUN_DIR = "results/embedded/{kind}/patches32/sdn/seed{seed}.json"


def _git(ws, *args):
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=ws,
                   check=True, capture_output=True)


def _wait_for_queue(ws, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = harness.dvc(ws, "queue", "status").stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
        assert time.monotonic() < deadline, f"queue did not finish:\n{status}"
        time.sleep(2)


def _exp_metrics(ws) -> dict[str, dict[str, dict]]:
    """{experiment name: {metrics file path: its values}} from `dvc exp show --json`."""
    out = {}
    for baseline in json.loads(harness.dvc(ws, "exp", "show", "--json").stdout):
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev.get("data") or {}
                files = {path: entry["data"] for path, entry in (data.get("metrics") or {}).items()
                         if "data" in entry}  # the other models' folders: not made by these targets
                out[rev.get("name") or exp.get("name")] = files
    return out


def _exp_lock(ws, name: str) -> dict:
    """The dvc.lock of the DVC experiment ``name`` (from its git ref, refs/exps/.../<name>)."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=ws, check=True,
                          capture_output=True, text=True).stdout.split()
    (ref,) = [r for r in refs if r.endswith(f"/{name}")]
    return yaml.safe_load(subprocess.run(["git", "show", f"{ref}:dvc.lock"], cwd=ws, check=True,
                                         capture_output=True, text=True).stdout)


def test_two_queued_experiments_in_parallel_log_their_own_numbers(tmp_path, tiny_study):
    from mlflow import MlflowClient

    ws = harness.make_workspace(tmp_path / "ws")
    harness.edit_params(ws, lambda p: p["study"].update(seeds=[0, 1]))
    _git(ws, "add", "-A")
    _git(ws, "commit", "-q", "-m", "baseline")
    for name, steps in STEPS.items():
        harness.dvc(ws, "exp", "run", "--queue", "--name", name,
                    "-S", f"density.patches32.train.steps={steps}", *TARGETS)
    started = time.monotonic()
    harness.dvc(ws, "queue", "start", "-j", "2")
    status = _wait_for_queue(ws, timeout=420)  # ~2.5 min on 2 idle cores
    elapsed = time.monotonic() - started
    assert "Failed" not in status, status + "\n" + "\n".join(
        harness.dvc(ws, "queue", "logs", name, check=False).stdout[-3000:] for name in STEPS)
    print(f"two queued experiments finished in {elapsed:.0f} s")

    exps = _exp_metrics(ws)
    assert set(STEPS) <= set(exps), exps.keys()
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sdn-embedded-density")
    seen = {}
    for name, steps in STEPS.items():
        runs = client.search_runs([exp.experiment_id], f"tags.dvc_experiment = '{name}'")
        assert sorted((r.data.tags["model"], r.data.tags["seed"]) for r in runs) == [("sdn", "0"), ("sdn", "1")]
        for run in runs:
            seed = run.data.tags["seed"]
            files = exps[name]
            evaluation = files[RUN_DIR.format(kind="metrics/eval", seed=seed)]
            train = files[RUN_DIR.format(kind="metrics/train", seed=seed)]
            metrics = run.data.metrics
            assert train["steps"] == steps and run.data.params["train.steps"] == str(steps)
            numeric = {k: v for k, v in evaluation.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            assert numeric and {k: metrics[f"test/{k}"] for k in numeric} == numeric
            assert {k.removeprefix("test/") for k in metrics if k.startswith("test/")} == set(numeric)
            assert metrics["train/loss"] == train["train_loss"] and metrics["num_params"] == train["num_params"]
            assert run.info.status == "FINISHED" and run.data.tags["complete"] == "true"
            assert run.data.tags["git_dirty"] == "true"  # params differ from the baseline commit
            seen[(name, seed)] = metrics["test/iw_bpd"]
    assert seen[("steps-4", "0")] != seen[("steps-6", "0")]

    # steps-4 is the tiny study's own value: its stages reproduce the built study's lock entries exactly.
    built, _ = tiny_study
    reference = yaml.safe_load((built / "dvc.lock").read_text())["stages"]
    again = _exp_lock(ws, "steps-4")["stages"]
    assert {"train_density@patches32-sdn", "evaluate_density@patches32-sdn", "fid@patches32-sdn"} <= set(again)
    differing = sorted(out["path"] for name, stage in again.items() for out in stage.get("outs", [])
                       if out not in reference[name]["outs"])
    assert differing == [], f"outputs whose hash differs between two identical runs: {differing}"
    assert {name: reference[name] for name in again} == again  # deps (code, params, outputs) too
