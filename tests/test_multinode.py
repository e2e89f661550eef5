"""Two "nodes" on loopback: the SLURM recipe of docs/pipeline.md, run on 127.0.0.1, trains like one process.

A tiny study's train stage (one seed of one density model, 2 steps, a validation and a checkpoint)
runs twice through `dvc repro --single-item`, as the recipe's sbatch script runs it: once as one
process (``study.launcher: python``), and once with the launcher of the cluster recipe, copied
verbatim from docs/pipeline.md (``srun … torchrun --nnodes=$SLURM_NNODES … --rdzv_backend=c10d
--rdzv_endpoint=$HEAD:$RDZV_PORT``). A stand-in ``srun`` on PATH starts that torchrun once per "node"
on this machine (as srun does once per node) with the variables of a two-node allocation, each node
one rank (gloo on CPU): two torchrun agents meeting through c10d rendezvous on 127.0.0.1. Both jobs
train on the same global batches with the same posterior noise and flips (drawn per image by the
trainer, tests/test_training_noise.py), so they must agree to float rounding: final weights,
checkpoint, metrics file; and the two-node job writes one MLflow run.

The tiny study trains the plain ELBO (``free_bits: 0``): free bits clamp each rank's batch-mean KL,
the one term of the objective that depends on how the global batch is split (as in the official code,
per GPU).
"""

from __future__ import annotations

import json
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
import yaml

import pipeline_harness as harness

DOCS = harness.ROOT / "docs" / "pipeline.md"
TEAM_DOCS = harness.ROOT / "docs" / "team.md"
RUN = ("patches32", "sdn", 0)
# srun's part of the recipe on one machine: the command once per node, with that node's SLURM
# variables, all at once; it fails if any node fails.
FAKE_SRUN = """#!/bin/bash
while [[ $1 == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""


def recipe_launcher() -> str:
    """``study.launcher`` of the SLURM recipe in docs/pipeline.md (its YAML block), as one line."""
    text = DOCS.read_text()
    section = text[text.index("### On a cluster (SLURM, several nodes)"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    return yaml.safe_load(block)["study"]["launcher"]


def tiny_study(workspace: Path) -> None:
    """One seed of one model, 2 steps with a validation and a checkpoint at step 2."""
    def edit(p):
        p["study"].update(seeds=[RUN[2]], runs_at_once=1)
        p["study"]["density"]["models"] = [RUN[1]]
        d = p["density"][RUN[0]]
        d["models"] = {RUN[1]: {}}
        d["overrides"]["free_bits"] = 0.0
        d["train"].update(steps=2, batch_size=8, log_every=1, checkpoint_every=2, eval_every=2, micro_batch_size=None)

    harness.edit_params(workspace, edit)


def outputs(workspace: Path) -> dict:
    """The run's final weights, its checkpoint's model weights, metrics file and MLflow runs."""
    from mlflow import MlflowClient

    dataset, model, seed = RUN
    results = workspace / "results" / "embedded"
    model_dir = results / "models" / dataset / model
    (checkpoint,) = model_dir.glob(f"seed{seed}/checkpoints/*/checkpoint.pt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sdn-embedded-density")
    return {
        "weights": torch.load(model_dir / f"seed{seed}" / "eval_weights.pt", map_location="cpu"),
        "checkpoint": {**{f"model.{k}": v for k, v in state["model"].items()},
                       **{f"ema.{k}": v for k, v in (state.get("ema") or {}).items()}},
        "metrics": json.loads((results / "metrics" / "train" / dataset / model / f"seed{seed}.json").read_text()),
        "world_size": state["world_size"],
        "runs": client.search_runs([experiment.experiment_id]),
    }


def leaves(tree, prefix: str = ""):
    """(dotted name, tensor or number) of every leaf of nested mappings (a checkpoint's state dicts)."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def with_launcher(base: Path, dest: Path, launcher: str) -> Path:
    """A copy of the prepared workspace ``base`` whose study runs under ``launcher``."""
    shutil.copytree(base, dest, symlinks=True)
    harness.dvc(dest, "config", "core.site_cache_dir", str(dest / ".dvc" / "site"))
    harness.edit_params(dest, lambda p: p["study"].update(launcher=launcher))
    return dest


def test_team_docs_show_the_recipes_launcher():
    """docs/team.md's cluster command is the launcher of the recipe the loopback test runs."""
    launcher = recipe_launcher()
    assert launcher.startswith("srun ") and "--rdzv_backend=c10d" in launcher, launcher
    assert f"{launcher} -m pipelines.train" in TEAM_DOCS.read_text()


@pytest.mark.slow
def test_two_nodes_on_loopback_train_like_one_process(tmp_path):
    launcher = recipe_launcher()
    stage = f"train_density@{RUN[0]}-{RUN[1]}"
    base = harness.make_workspace(tmp_path / "base")
    tiny_study(base)
    harness.dvc(base, "repro", f"prepare_embedded@{RUN[0]}")  # validate and prepare once for both jobs

    # the reference: one process
    one_process = with_launcher(base, tmp_path / "one_process", "python")
    harness.dvc(one_process, "repro", "--single-item", stage)

    # two nodes: the sbatch script's command (docs/pipeline.md) in an allocation of two nodes
    nodes = with_launcher(base, tmp_path / "nodes", launcher)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    allocation = {"PATH": f"{bin_dir}:{harness.env(nodes)['PATH']}", "HEAD": "127.0.0.1",
                  "RDZV_PORT": str(harness.free_port()), "GPUS_PER_NODE": "1", "SLURM_NNODES": "2",
                  "SLURM_JOB_ID": "4242", "SDN_PG_TIMEOUT_S": "120"}  # a rank left alone fails, not hangs
    harness.dvc(nodes, "repro", "--single-item", stage, extra_env=allocation)

    want, got = outputs(one_process), outputs(nodes)
    assert (want["world_size"], got["world_size"]) == (1, 2)  # one job of two ranks, not two jobs of one
    # Adamax's first steps move each weight by about lr (0.01) in the direction of its gradient's sign,
    # so a gradient entry within rounding of 0 may move a few weights by up to ~1e-4 (7.5e-5, 1 of
    # ~10^5 measured): all but 1 in 10^4 agree to 1e-5, none by more than lr / 20 (other noise: ~lr).
    for kind in ("weights", "checkpoint"):
        assert got[kind].keys() == want[kind].keys() and want[kind]
        differing = total = 0
        got_leaves = dict(leaves(got[kind]))
        for key, value in leaves(want[kind]):
            diff = (torch.as_tensor(got_leaves[key]).double() - torch.as_tensor(value).double()).abs()
            assert float(diff.max()) <= 5e-4, f"{kind} {key}: {float(diff.max())}"
            differing, total = differing + int((diff > 1e-5).sum()), total + diff.numel()
        assert differing <= total / 10_000, f"{kind}: {differing} of {total} values differ by more than 1e-5"
    assert got["metrics"].keys() == want["metrics"].keys()
    assert got["metrics"] == pytest.approx(want["metrics"], rel=1e-5)

    assert len(got["runs"]) == 1  # written by rank 0 only
    run = got["runs"][0]
    assert run.info.status == "FINISHED"
    for key, value in got["metrics"].items():
        if key != "steps":
            name = f"train/{key.removeprefix('train_')}" if key.startswith("train_") else key
            assert run.data.metrics[name] == value, key
