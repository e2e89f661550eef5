"""The ``validate`` stage (pipelines/validate.py): the whole params file is checked once, first, and
a bad one is refused with one line before DVC deletes any other stage's outputs; the report's long
plot data and the DVC plot template (docs/dvc.md).

The fast tests call the stage in this process (or a subprocess for a misnamed baseline file, whose
import would register blocks in this process). The slow one runs `dvc repro` in the harness
workspace with each bad edit and checks that nothing under results/ and reports/ changed.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import pipeline_harness as harness
from pipelines import validate as stage
from pipelines.params import read_yaml

ROOT = Path(__file__).resolve().parents[1]
VALID_OUT = "results/params.valid"

# Each bad edit of the embedded params and what its one-line error must say.
BAD_EDITS = {
    "typo only the report reads": (lambda p: p["density"]["patches32"].update(trian={}),
                                   "density.patches32: unknown key 'trian'; allowed: ['config', 'eval'"),
    "negative steps": (lambda p: p["density"]["patches32"]["train"].update(steps=-5),
                       "density.patches32.train.steps: Input should be greater than or equal to 1, got -5"),
    "seeds not a list": (lambda p: p["study"].update(seeds=0),
                         "study.seeds: must be a YAML list, e.g. [0] or [a, b], got 0 (int)"),
    "lr a word": (lambda p: p["density"]["patches32"]["train"].update(lr="fast"),
                  "density.patches32.train.lr: Input should be a valid number, got 'fast'"),
    "unknown model": (lambda p: p["study"]["density"]["models"].append("cnn_matchd"),
                      "study.density.models: unknown model(s) ['cnn_matchd']; allowed: ['cnn', 'cnn_matched', 'sdn']"),
    "negative margin": (lambda p: p["report"]["claims"]["density"].update(margin=-0.05),
                        "report.claims.density.margin: Input should be greater than 0, got -0.05 (float)"),
    "a family without a verdict rule": (lambda p: p["report"]["claims"].pop("disentanglement"),
                                        "missing key report.claims.disentanglement"),
    "report typo": (lambda p: p["report"].update(confidenc=0.9),
                    "report: unknown key 'confidenc'; allowed: ['claims', 'confidence', 'dir']"),
}


def _write(path: Path, params) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.mark.parametrize("case", sorted(BAD_EDITS))
def test_bad_params_one_line_and_no_output(case, tmp_path, capsys):
    edit, message = BAD_EDITS[case]
    params = copy.deepcopy(read_yaml(ROOT / "params.yaml"))
    edit(params)
    out = tmp_path / "results" / "params.valid"
    assert stage.main(["--params", str(_write(tmp_path / "params.yaml", params)), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path / 'params.yaml'}: ")
    assert message in err, err
    assert not out.exists()


def test_valid_params_write_the_same_text_whatever_the_values(tmp_path, capsys):
    """DVC hashes the output: it must not change with the values, or every stage would rerun."""
    out = tmp_path / "params.valid"
    assert stage.main(["--params", str(ROOT / "params.yaml"), "--out", str(out)]) == 0
    first = out.read_bytes()
    mtime = out.stat().st_mtime_ns
    params = read_yaml(ROOT / "params.yaml")
    params["density"]["patches32"]["train"]["lr"] = 0.02
    params["study"]["seeds"] = [5]
    assert stage.main(["--params", str(_write(tmp_path / "other.yaml", params)), "--out", str(out)]) == 0
    assert out.read_bytes() == first == stage.VALID_TEXT.encode()
    assert out.stat().st_mtime_ns == mtime  # same text: not rewritten
    assert b"0.02" not in first and b"0.01" not in first
    assert "is valid" in capsys.readouterr().out


def test_the_paper_params_are_valid(tmp_path):
    assert stage.main(["--params", str(ROOT / "params-paper.yaml"), "--out", str(tmp_path / "ok")]) == 0


def test_misnamed_baseline_file_is_a_study_error(tmp_path):
    """A file whose name differs from the name it registers: one line saying what to rename, not
    the library's ImportError traceback (run in a subprocess: the import registers blocks)."""
    shutil.copytree(ROOT / "baselines", tmp_path / "baselines", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "baselines" / "toy2.py").write_text(harness.TOY_BASELINE)  # registers "toy"
    env = harness.env(ROOT)
    env["PYTHONPATH"] = f"{tmp_path}:{ROOT}"  # this copy of baselines/ first
    result = subprocess.run([sys.executable, "-m", "pipelines.validate", "--params", str(ROOT / "params.yaml"),
                             "--out", str(tmp_path / "ok")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: ") and "study.density.models: the model files could not be imported" in lines[0]
    assert "rename the file to baselines/toy.py" in lines[0]
    assert not (tmp_path / "ok").exists()


def _dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def test_every_stage_depends_on_the_validate_stage():
    stages = _dvc_yaml()["stages"]
    first = next(iter(stages))
    assert first == "validate"
    val = stages["validate"]
    assert val["params"] == [{"params.yaml": None}]  # the whole file
    assert val["outs"] == [{VALID_OUT: {"cache": False, "persist": True}}]
    assert VALID_OUT in val["cmd"]
    for code in ("pipelines/params.py", "pipelines/schema.py", "pipelines/study.py", "pipelines/families",
                 "baselines", "pipelines/validate.py"):
        assert code in val["deps"]
    for name, definition in stages.items():
        if name != "validate":
            body = definition.get("do", definition)
            assert body["deps"][0] == VALID_OUT, name


def test_top_level_plots_use_the_report_plot_data_and_template():
    dvc = _dvc_yaml()
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in dvc["stages"]["report"]["outs"]]
    assert "${report.dir}/plots" in outs
    (plot,) = dvc["plots"]
    (path, props), = plot.items()
    assert path == "${report.dir}/plots" and (props["x"], props["y"]) == ("step", "value")
    template = json.loads((ROOT / props["template"]).read_text())
    text = json.dumps(template)
    for anchor in ("<DVC_METRIC_DATA>", "<DVC_METRIC_X>", "<DVC_METRIC_Y>"):
        assert anchor in text
    assert '"field": "model"' in text  # models told apart by colour


def test_plot_data_is_long_format_with_every_run(tmp_path):
    from pipelines.reporting.figures import PLOT_DATA_FIELDS, write_plot_data

    records = []
    for model in ("sdn", "cnn"):
        for seed in (1, 0):
            curve = tmp_path / f"{model}{seed}.csv"
            curve.write_text("step,loss,bpd,val_elbo_bpd\n2,10.5,3.25,\n4,9.0,3.0,3.5\n")
            records.append({"dataset": "patches32", "model": model, "seed": seed, "curve": curve})
    records.append({"dataset": "other", "model": "sdn", "seed": 0, "curve": tmp_path / "missing.csv"})
    path = tmp_path / "plots" / "patches32.csv"
    n = write_plot_data(records, "patches32", ["sdn", "cnn"], {"bpd": "train bpd", "val_elbo_bpd": "validation bpd"},
                        path)
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert n == len(rows) == 2 * 2 * 3  # models x seeds x (two train points + one validation point)
    assert tuple(rows[0]) == PLOT_DATA_FIELDS
    assert rows[0] == {"dataset": "patches32", "model": "sdn", "seed": "0", "metric": "train bpd", "step": "2",
                       "value": "3.25"}
    assert {r["metric"] for r in rows if r["step"] == "2"} == {"train bpd"}
    assert not list(path.parent.glob("*.tmp"))


# ---- slow: the real `dvc repro` in the harness workspace --------------------------------------------


def _snapshot(ws: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under results/ and reports/ (and the validate output)."""
    out = {}
    for top in ("results", "reports"):
        for path in sorted((ws / top).rglob("*")):
            if path.is_file():
                out[str(path.relative_to(ws))] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return out


@pytest.mark.slow
def test_dvc_repro_stops_at_validate_and_touches_nothing(tiny_study, tmp_path):
    built, output = tiny_study
    assert "validate" in harness.ran_stages(output)
    ws = tmp_path / "ws"
    shutil.copytree(built, ws, symlinks=True)
    original = (ws / "params.yaml").read_text()
    before = _snapshot(ws)
    assert VALID_OUT in before and len(before) > 20
    cases = {name: (edit, message) for name, (edit, message) in BAD_EDITS.items()}
    cases["misnamed baseline file"] = (None, "rename the file to baselines/toy.py")
    for name, (edit, message) in cases.items():
        if edit is None:
            (ws / "baselines" / "toy2.py").write_text(harness.TOY_BASELINE)
        else:
            harness.edit_params(ws, edit)
        result = harness.dvc(ws, "repro", check=False)
        both = result.stdout + result.stderr
        assert result.returncode != 0, (name, both)
        assert harness.ran_stages(result.stdout) == {"validate"}, (name, both)
        errors = [line for line in both.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0], (name, both)
        assert "Traceback" not in both, (name, both)
        assert _snapshot(ws) == before, name
        (ws / "params.yaml").write_text(original)
        (ws / "baselines" / "toy2.py").unlink(missing_ok=True)
    # Valid again: nothing to run (the validate stage's lock entry was never replaced).
    assert "up to date" in harness.dvc(ws, "status").stdout
    # A valid edit of one model's section reruns validate but leaves its output as it was.
    harness.edit_params(ws, lambda p: p["density"]["patches32"]["models"]["cnn"].update(h_size=12))
    status = json.loads(harness.dvc(ws, "status", "--json").stdout)
    assert set(status) == {"validate", "train_density@patches32-cnn", "evaluate_density@patches32-cnn",
                           "fid@patches32-cnn", "report"}
    harness.dvc(ws, "repro", "validate")
    status = json.loads(harness.dvc(ws, "status", "--json").stdout)
    assert "validate" not in status and "train_density@patches32-sdn" not in status


@pytest.mark.slow
def test_dvc_plots_overlay_the_models_of_each_dataset(tiny_study):
    ws, _ = tiny_study
    plots = json.loads(harness.dvc(ws, "plots", "show", "--json").stdout)["data"]
    entry = plots["reports/plots/patches32.csv"][0]
    spec = json.dumps(entry["content"])
    assert '"facet"' in spec and "train bpd" in spec and "validation bpd" in spec
    values = entry["content"]["data"]["values"]
    assert {v["model"] for v in values} == {"sdn", "cnn"} and {v["seed"] for v in values} == {"0", "1"}
    dis = plots["reports/plots/dsprites_procedural.csv"][0]["content"]["data"]["values"]
    assert {v["metric"] for v in dis} == {"train loss"} and {v["model"] for v in dis} == {"cnn", "sdn"}
