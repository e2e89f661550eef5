"""Params validation: the shipped studies are valid; bad params fail before training, naming the key."""

from __future__ import annotations

import copy
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from pipelines import study as study_mod
from pipelines.study import StudyError, validate

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.fixture(scope="module")
def embedded() -> dict:
    return _load("params.yaml")


def test_embedded_study_is_valid_and_expands_like_dvc(embedded):
    s = validate(embedded)
    assert s.name == "embedded"
    assert s.datasets("density") == ["patches32"] and s.models("density") == ["sdn", "cnn", "cnn_matched"]
    assert s.datasets("disentanglement") == ["dsprites_procedural"] and s.models("disentanglement") == ["cnn", "sdn"]
    runs = s.runs()
    assert len(runs) == (3 + 2) * len(s.seeds)
    assert runs[0].stage_suffix == "patches32-sdn"  # one stage per model runs every seed
    # The run's seed drives the trainer and the VAE's weight init.
    run = s.find_run("disentanglement", "dsprites_procedural", "sdn", 2)
    assert s.train_config(run).seed == 2 and s.model_config(run).seed == 2


def test_paper_study_is_valid_and_every_config_builds_on_meta():
    from sdn.models import count_parameters

    s = validate(_load("params-paper.yaml"))
    assert s.datasets("density") == ["cifar10", "imagenet32", "celebahq256"]
    assert s.datasets("disentanglement") == ["shapes3d"]
    assert s.section(s.runs("density")[0]).eval.iw_samples == 1024
    assert s.validated.fid.num_samples == 50_000
    counts = {}
    for run in s.runs():
        if run.seed != s.seeds[0]:
            continue
        model = s.build_model(run, device="meta")
        assert all(p.device.type == "meta" for p in model.parameters())
        counts[(run.dataset, run.model)] = count_parameters(model)
    # The paper's SDN model is much larger than its CNN baseline; cnn_matched closes the gap (5%).
    assert counts[("cifar10", "sdn")] > 2 * counts[("cifar10", "cnn")]
    assert abs(counts[("cifar10", "cnn_matched")] / counts[("cifar10", "sdn")] - 1) < 0.05
    tc = s.train_config(s.find_run("density", "cifar10", "sdn", 0))
    assert (tc.lr, tc.batch_size, tc.ema_decay) == (0.002, 256, 0.999)  # the paper's table
    # precision as the official scripts: --amp (fp16 + GradScaler) except CIFAR's CNN line and 3DShapes
    precision = {(r.dataset, r.model): s.train_config(r).precision for r in s.runs()}
    assert precision[("cifar10", "sdn")] == "fp16" and precision[("cifar10", "cnn")] == "fp32"
    assert {precision[("imagenet32", m)] for m in ("sdn", "cnn")} == {"fp16"}
    assert {precision[("celebahq256", m)] for m in ("sdn", "cnn")} == {"fp16"}
    assert {precision[("shapes3d", m)] for m in ("sdn", "cnn")} == {"fp32"}
    # selection on a validation split held out of the training data, length in official epochs
    for dataset in s.datasets("density"):
        cfg = s.train_config(s.find_run("density", dataset, "sdn", 0))
        assert cfg.keep_best == "elbo_bpd" and cfg.eval_every and s.holdout(dataset).size > 0
    assert tc.steps == -(-1000 * 50_000 // 256)  # 1,000 official epochs at the global batch 256
    assert s.section(s.find_run("density", "cifar10", "sdn", 0)).samples.temperatures == [0.6, 0.7, 0.85, 1.0]


def _bad(embedded: dict, edit) -> str:
    params = copy.deepcopy(embedded)
    edit(params)
    with pytest.raises(StudyError) as info:
        validate(params)
    return str(info.value)


def test_unknown_names_list_the_allowed_values(embedded):
    msg = _bad(embedded, lambda p: p["study"]["density"]["datasets"].append("mnist"))
    assert "study.density.datasets" in msg and "mnist" in msg and "patches32" in msg and "cifar10" in msg
    msg = _bad(embedded, lambda p: p["study"]["density"]["models"].append("pixelcnn"))
    assert "study.density.models" in msg and "pixelcnn" in msg and "cnn_matched" in msg
    msg = _bad(embedded, lambda p: p["study"]["disentanglement"]["models"].append("cnn_matched"))
    assert "study.disentanglement.models" in msg and "['cnn', 'sdn']" in msg
    msg = _bad(embedded, lambda p: p["disentanglement"]["dsprites_procedural"]["metrics"].update(metrics=["mig", "irs"]))
    assert "disentanglement.dsprites_procedural.metrics.metrics" in msg and "irs" in msg and "'sap'" in msg
    msg = _bad(embedded, lambda p: p["density"]["patches32"].update(config="cifar100"))
    assert "density.patches32.config" in msg and "cifar10" in msg and "embedded" in msg


def test_missing_keys_are_named(embedded):
    msg = _bad(embedded, lambda p: p["density"]["patches32"].pop("train"))
    assert "density.patches32" in msg and "train" in msg
    msg = _bad(embedded, lambda p: p["density"]["patches32"]["models"].pop("cnn"))
    assert "density.patches32.models.cnn" in msg
    msg = _bad(embedded, lambda p: p["density"]["patches32"]["train"].pop("steps"))
    assert "density.patches32.train" in msg and "steps" in msg
    msg = _bad(embedded, lambda p: p.pop("fid"))
    assert "fid" in msg
    msg = _bad(embedded, lambda p: p["data"].pop("patches32"))
    assert "data" in msg and "patches32" in msg


def test_type_errors_are_named(embedded):
    msg = _bad(embedded, lambda p: p["density"]["patches32"]["train"].update(lr="fast"))
    assert "density.patches32.train.lr" in msg and "'fast'" in msg
    msg = _bad(embedded, lambda p: p["density"]["patches32"]["train"].update(steps=True))
    assert "density.patches32.train.steps" in msg and "True" in msg
    msg = _bad(embedded, lambda p: p["density"]["patches32"]["overrides"].update(h_size=1.5))
    assert "density.patches32.overrides.h_size" in msg and "1.5" in msg
    msg = _bad(embedded, lambda p: p["density"]["patches32"]["overrides"].update(width=3))
    assert "density.patches32.overrides" in msg and "width" in msg and "h_size" in msg
    msg = _bad(embedded, lambda p: p["study"].update(seeds=[0, "1"]))
    assert "study.seeds" in msg
    msg = _bad(embedded, lambda p: p["density"]["patches32"]["eval"].update(iw_samples=None))
    assert "density.patches32.eval.iw_samples" in msg and "None" in msg
    msg = _bad(embedded, lambda p: p["disentanglement"]["dsprites_procedural"]["metrics"].update(num_tran=5))
    assert "disentanglement.dsprites_procedural.metrics" in msg and "num_train" in msg


def test_consistency_rules(embedded):
    msg = _bad(embedded, lambda p: p["study"].update(downloads=["cifar10"]))
    assert "study.downloads" in msg
    msg = _bad(embedded, lambda p: p["study"].update(embedded=["patches32"]))
    assert "study.embedded" in msg and "dsprites_procedural" in msg
    msg = _bad(embedded, lambda p: p["density"]["patches32"]["train"].update(seed=3))
    assert "density.patches32.train.seed" in msg and "study.seeds" in msg
    msg = _bad(embedded, lambda p: p["study"].update(seeds=[0, 0]))
    assert "study.seeds" in msg
    msg = _bad(embedded, lambda p: p["data"]["patches32"].update(out="elsewhere"))  # paths are dvc.yaml's
    assert "data.patches32" in msg and "'out'" in msg and "options" in msg
    msg = _bad(embedded, lambda p: p["study"].update(launcher="torchrun --standalone --nproc_per_node=2",
                                                     runs_at_once=2))
    assert "study.runs_at_once" in msg and "torchrun" in msg
    msg = _bad(embedded, lambda p: p["study"].update(runs_at_once="all"))
    assert "study.runs_at_once" in msg
    msg = _bad(embedded, lambda p: p["study"].update(runs_at_once=0))
    assert "study.runs_at_once" in msg
    msg = _bad(embedded, lambda p: p["study"].update(threads_per_run=0))
    assert "study.threads_per_run" in msg
    msg = _bad(embedded, lambda p: p["density"]["patches32"].update(tuned="lr"))
    assert "density.patches32.tuned" in msg and "list" in msg
    # A value the config itself rejects is reported with the section it came from.
    msg = _bad(embedded, lambda p: p["density"]["patches32"]["models"]["sdn"].update(sdn_num_dirs=7))
    assert "density.patches32" in msg and "sdn_num_dirs" in msg


def test_train_stage_fails_before_training(embedded, tmp_path, monkeypatch):
    """pipelines/train.py validates the params before it builds data, models or the trainer."""
    params = copy.deepcopy(embedded)
    params["density"]["patches32"]["train"]["lr"] = "fast"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    module = importlib.import_module("pipelines.train")
    called = []
    monkeypatch.setattr(module, "train", lambda *a, **k: called.append(1))
    monkeypatch.setattr(study_mod.Study, "dataset", lambda *a, **k: called.append(2))
    dirs = [a for kind in ("models", "samples", "train-metrics", "curves") for a in (f"--{kind}", str(tmp_path / kind))]
    with pytest.raises(StudyError, match="density.patches32.train.lr"):
        module.main(["--family", "density", "--dataset", "patches32", "--model", "sdn", "--seed", "0",
                     "--params", str(tmp_path / "params.yaml"), *dirs])
    assert called == []
    with pytest.raises(StudyError, match="not in the study"):
        module.main(["--family", "density", "--dataset", "patches32", "--model", "sdn", "--seed", "7",
                     "--params", str(ROOT / "params.yaml"), *dirs])
    assert not any((tmp_path / kind).exists() for kind in ("models", "samples", "train-metrics", "curves"))
    assert called == []


@pytest.mark.slow
def test_paper_dag_resolves(tmp_path):
    """The paper study's DAG (same dvc.yaml, params-paper.yaml) resolves in a temporary copy."""
    dvc = Path(shutil.which("dvc") or ROOT / ".venv" / "bin" / "dvc")
    for name in ("dvc.yaml", "params-paper.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copy(ROOT / "params-paper.yaml", tmp_path / "params.yaml")
    env = {"DVC_NO_ANALYTICS": "1", "PATH": f"{dvc.parent}:/usr/bin:/bin", "HOME": str(tmp_path)}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(dvc), "init", "-q"], cwd=tmp_path, check=True, env=env)
    subprocess.run([str(dvc), "config", "core.site_cache_dir", str(tmp_path / ".site")], cwd=tmp_path,
                   check=True, env=env)
    out = subprocess.run([str(dvc), "stage", "list"], cwd=tmp_path, check=True, env=env,
                         capture_output=True, text=True).stdout
    stages = {line.split()[0] for line in out.splitlines() if line.strip()}
    s = validate(_load("params-paper.yaml"))
    expected = {f"download@{d}" for d in s.validated.study.downloads}
    expected |= {f"prepare@{d}" for d in s.validated.study.downloads}
    expected |= {f"fid_stats@{d}" for d in s.datasets("density")}
    for run in s.runs():
        expected |= {f"train_{run.family}@{run.stage_suffix}", f"evaluate_{run.family}@{run.stage_suffix}"}
        if run.family == "density":
            expected.add(f"fid@{run.stage_suffix}")
    expected |= {"validate", "report"}
    expected |= {f"download_fid_weights@{x}" for x in s.validated.study.fid_downloads}
    assert stages == expected
    dag = subprocess.run([str(dvc), "dag", "--dot"], cwd=tmp_path, check=True, env=env,
                         capture_output=True, text=True).stdout
    # The edges follow the data: download -> prepare -> train -> evaluate/fid -> report.
    assert '"download@cifar10" -> "prepare@cifar10"' in dag
    assert '"prepare@cifar10" -> "train_density@cifar10-sdn"' in dag
    assert '"train_density@cifar10-sdn" -> "evaluate_density@cifar10-sdn"' in dag
    assert '"fid_stats@cifar10" -> "fid@cifar10-sdn"' in dag
    assert '"evaluate_disentanglement@shapes3d-sdn" -> "report"' in dag


def test_side_by_side_runs_respect_the_limit_the_threads_and_report_failures(tmp_path):
    """At most ``at_once`` commands overlap (checked from their own start/end stamps), each sees
    the thread limit in its environment, and failing ones are named while the rest still run."""
    import sys

    script = tmp_path / "job.py"
    script.write_text(
        "import os, sys, time\n"
        "key, out = sys.argv[1], sys.argv[2]\n"
        "start = time.monotonic(); time.sleep(0.3)\n"
        "open(out + '/' + key, 'w').write(f\"{start} {time.monotonic()} {os.environ['OMP_NUM_THREADS']}\")\n"
        "sys.exit(3 if key in ('1', '4') else 0)\n"
    )
    commands = {k: [sys.executable, str(script), str(k), str(tmp_path)] for k in range(5)}
    failed = study_mod.run_side_by_side(commands, at_once=2, threads=1)
    assert failed == [1, 4]
    stamps = [tuple(map(float, (tmp_path / str(k)).read_text().split())) for k in range(5)]
    assert all(threads == 1 for _, _, threads in stamps)
    for start, _, _ in stamps:  # runs in progress at each start, itself included
        assert sum(1 for a, b, _ in stamps if a <= start < b) <= 2
    assert any(a2 < b1 and a1 < b2 for i, (a1, b1, _) in enumerate(stamps) for (a2, b2, _) in stamps[i + 1:])


def test_precision_is_per_model_over_the_dataset_default(embedded):
    params = copy.deepcopy(embedded)
    params["density"]["patches32"]["models"]["cnn"] = {"precision": "bf16"}
    s = validate(params)
    cnn, sdn = (s.find_run("density", "patches32", m, 0) for m in ("cnn", "sdn"))
    assert s.train_config(cnn).precision == "bf16"
    assert s.train_config(sdn).precision == "fp32"  # train.precision
    assert s.model_config(cnn) == s.model_config(sdn)
    msg = _bad(embedded, lambda p: p["density"]["patches32"]["models"]["cnn"].update(precision="fp8"))
    assert "density.patches32.models.cnn.precision" in msg and "fp16" in msg


def test_validation_holdout_and_selection_params_are_checked(embedded):
    msg = _bad(embedded, lambda p: p["data"]["patches32"].update(validation={"size": 10}))
    assert "data.patches32.validation" in msg and "seed" in msg
    msg = _bad(embedded, lambda p: p["density"]["patches32"]["train"].update(keep_best="elbo_bpd", eval_every=None))
    assert "keep_best" in msg
    paper = _load("params-paper.yaml")
    msg = _bad(paper, lambda p: p["data"]["cifar10"].pop("validation"))
    assert "density.cifar10.train.eval_every" in msg and "data.cifar10.validation" in msg


def test_holdout_split_replaces_train_and_validation_but_not_test(embedded):
    from sdn.data import get_dataset
    from sdn.data.holdout import holdout_indices

    params = copy.deepcopy(embedded)
    options = {"patch_size": 8, "region": 16, "levels": 1, "validation_fraction": 0.1, "test_fraction": 0.1, "seed": 0}
    params["data"]["patches32"]["options"] = options
    plain = validate(copy.deepcopy(params))
    params["data"]["patches32"]["validation"] = {"size": 40, "seed": 5}
    s = validate(params)
    full_train = get_dataset("patches32", "train", **options)
    keep, held = holdout_indices(len(full_train), 40, 5)
    # no --data: built in memory
    train, validation, test = (s.dataset("patches32", k) for k in ("train", "validation", "test"))
    own_validation = plain.dataset("patches32", "validation")
    assert len(train) == len(full_train) - 40 and len(validation) == 40
    assert torch.equal(validation[3][0], full_train[held[3]][0]) and torch.equal(train[0][0], full_train[keep[0]][0])
    assert len(test) == len(get_dataset("patches32", "test", **options))  # the test split is untouched
    assert len(own_validation) == len(get_dataset("patches32", "validation", **options))


def test_launcher_is_python_or_a_torchrun_command(embedded):
    for launcher in ("torchrun --standalone --nproc_per_node=2",
                     "srun --nodes=$SLURM_NNODES --ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES "
                     "--nproc_per_node=4 --rdzv_id=$SLURM_JOB_ID --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500"):
        params = copy.deepcopy(embedded)
        params["study"].update(launcher=launcher, runs_at_once=1)
        assert validate(params).validated.study.launcher == launcher
    msg = _bad(embedded, lambda p: p["study"].update(launcher="torchrn --nproc_per_node=2", runs_at_once=1))
    assert "study.launcher" in msg and "torchrn" in msg


def test_exponent_numbers_are_numbers_and_unknown_keys_list_the_allowed_ones(tmp_path):
    """PyYAML reads ``1e-3`` as a string; the study's loader reads it as the number it means."""
    from pipelines.params import read_yaml

    path = tmp_path / "p.yaml"
    path.write_text("a: 1e-3\nb: 2E6\nc: 1.5e+2\nd: '1e6'\ne: 1e\n")
    assert read_yaml(path) == {"a": 0.001, "b": 2e6, "c": 150.0, "d": "1e6", "e": "1e"}
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["density"]["patches32"]["trian"] = {}
    with pytest.raises(StudyError) as info:
        validate(raw)
    assert str(info.value).startswith("density.patches32: unknown key 'trian'; allowed: ['config', 'eval',")


def test_a_prepared_folder_built_with_other_options_is_refused_not_rewritten(tmp_path):
    """``get_dataset`` only reads: asked for options the folder was not built with, it names both and
    leaves the folder as it was (one stage must never rewrite another stage's output)."""
    from sdn.data import get_dataset, prepare

    small = {"num": 32, "seed": 0}
    prepare("dsprites_procedural", tmp_path / "d", progress=False, **small)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "d").iterdir()}
    assert len(get_dataset("dsprites_procedural", "train", root=tmp_path / "d", **small)) == 32
    with pytest.raises(ValueError, match="prepared with options .*'num': 32.*not .*'num': 64"):
        get_dataset("dsprites_procedural", "train", root=tmp_path / "d", num=64, seed=0)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "d").iterdir()} == before


def test_the_report_reads_the_runs_where_dvc_yaml_puts_them(embedded):
    """dvc.yaml names every stage's folders; the report finds each run's files under the study's
    results folder with ``results_paths``, which must be the same layout."""
    from pipelines.runs import results_paths

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    s = validate(embedded)
    for run in s.runs():
        paths = results_paths(Path("results") / s.name, run)

        def declared(stage: str, kind: str) -> set[Path]:
            entries = stages[f"{stage}_{run.family}" if stage != "fid" else "fid"].get(kind, [])
            names = [next(iter(e)) if isinstance(e, dict) else e for e in entries]
            return {Path(n.replace("${study.name}", s.name).replace("${item.dataset}", run.dataset)
                         .replace("${item.model}", run.model)) for n in names}

        assert {paths.dirs.models, paths.dirs.samples} == declared("train", "outs")
        assert declared("train", "metrics") == {paths.dirs.train_metrics}
        assert declared("train", "plots") == {paths.dirs.curves}
        assert declared("evaluate", "metrics") == {paths.dirs.eval_metrics}
        if run.family == "density":
            assert declared("fid", "metrics") == {paths.dirs.fid_metrics}


def test_runs_at_once_auto_is_one_per_core_at_most_one_per_seed(embedded, monkeypatch):
    import os

    for cores, seeds, launcher, want in ((2, [0, 1, 2, 3], "python", 2), (16, [0, 1, 2, 3], "python", 4),
                                         (1, [0, 1], "python", 1),
                                         (8, [0, 1, 2, 3], "torchrun --standalone --nproc_per_node=2", 1)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        params = copy.deepcopy(embedded)
        params["study"].update(runs_at_once="auto", seeds=seeds, launcher=launcher)
        assert validate(params).runs_at_once == want, (cores, seeds, launcher)
    params = copy.deepcopy(embedded)
    params["study"]["runs_at_once"] = 3
    assert validate(params).runs_at_once == 3
