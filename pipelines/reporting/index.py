"""``build_report``: every table and figure of a study and ``index.md``, the page that opens them.

Input: the validated params (params.yaml's layout), the paper's values, the output folder and the
study's results folder (dvc.yaml's ``results/<study>``) that holds the runs' metrics, curves and
sample grids. Each family's part comes from its ``FamilyReport`` (``pipelines.families``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

import pandas as pd

from pipelines.families import families
from pipelines.provenance import package_versions
from pipelines.reporting import Records
from pipelines.reporting.claims import claims_section
from pipelines.reporting.figures import copy_grid, write_plot_data
from pipelines.runs import experiment_name, results_paths
from pipelines.study import Study, validate

PAPER_FID_SAMPLES = 50_000


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else None


def collect_records(study: Study, results: Path) -> list[dict[str, Any]]:
    """One record per run of the study from its DVC metrics files under ``results`` (missing files:
    empty metrics)."""
    records = []
    for run in study.runs():
        paths = results_paths(results, run)
        train = _read_json(paths.train_metrics) or {}
        metrics = {k: v for k, v in (_read_json(paths.eval_metrics) or {}).items() if not k.startswith("settings.")}
        records.append({
            "family": run.family, "dataset": run.dataset, "model": run.model, "seed": run.seed,
            "num_params": train.get("num_params"), "train": train, "metrics": metrics,
            "fid": _read_json(paths.fid_metrics), "curve": paths.curve,
            "samples": paths.samples, "reconstructions": paths.reconstructions,
        })
    return records


SUMMARY = "summary.json"


def summary_metrics(records: Records, reports: Mapping[str, Any]) -> dict[str, float]:
    """``<dataset>.<model>.<metric>`` -> mean over seeds of each family's summary metrics: one
    short, unique key per number, so ``dvc exp show`` / ``dvc metrics diff`` columns stay narrow."""
    rows = [{"dataset": r["dataset"], "model": r["model"], "metric": k, "value": float(r["metrics"][k])}
            for r in records for k in reports[r["family"]].summary
            if isinstance(r["metrics"].get(k), (int, float))]
    if not rows:
        return {}
    means = pd.DataFrame(rows).groupby(["dataset", "model", "metric"], sort=True)["value"].mean()
    return {f"{d}.{m}.{k}": float(v) for (d, m, k), v in means.items()}


def _samples(records: Records, params: Mapping[str, Any], figures: Path) -> list[str]:
    """The lowest seed's sample grids (each temperature) and reconstructions of every model."""
    index = ["## Samples (lowest seed of each model)\n"]
    for family in families():
        for dataset in params["study"][family]["datasets"]:
            cfg = params[family][dataset]["samples"]
            for model in params["study"][family]["models"]:
                seeds = sorted((r for r in records if r["dataset"] == dataset and r["model"] == model),
                               key=lambda r: r["seed"])
                name = f"samples_{dataset}_{model}.png"
                if copy_grid([r["samples"] for r in seeds], figures / name):
                    index.append(f"**{dataset} / {model}**\n\n![samples {dataset} {model}](figures/{name})\n")
                for t in (t for t in cfg.get("temperatures", []) if float(t) != float(cfg["temperature"])):
                    name = f"samples_{dataset}_{model}_t{t:g}.png"
                    if copy_grid([r["samples"].with_name(f"{r['samples'].stem}_t{t:g}.png") for r in seeds], figures / name):
                        index.append(f"Temperature {t:g}:\n\n![samples {dataset} {model} t{t:g}](figures/{name})\n")
                name = f"reconstructions_{dataset}_{model}.png"
                if copy_grid([r["reconstructions"] for r in seeds], figures / name):
                    index.append(f"Reconstructions (top: inputs, bottom: decoded posterior means):\n\n"
                                 f"![reconstructions {dataset} {model}](figures/{name})\n")
    return index


def _plot_data(records: Records, params: Mapping[str, Any], plots: Path) -> None:
    """``plots/<dataset>.csv``: every run's curves of each dataset in one long table, which dvc.yaml's
    top-level ``plots`` draws as one chart per dataset with the models overlaid (docs/dvc.md)."""
    shutil.rmtree(plots, ignore_errors=True)
    for family, spec in families().items():
        metrics = dict(spec.plot_metrics)
        for dataset in params["study"][family]["datasets"]:
            write_plot_data([r for r in records if r["family"] == family], dataset,
                            list(params["study"][family]["models"]), metrics, plots / f"{dataset}.csv")


def _configuration(study: Study, params: Mapping[str, Any]) -> list[str]:
    """What the study ran: seeds, per-dataset configs and budgets, FID, what was tuned, versions."""
    s = params["study"]
    index = ["## Configuration\n",
             f"- study `{s['name']}`, seeds {list(s['seeds'])} "
             f"({'as many as cores' if s['runs_at_once'] == 'auto' else s['runs_at_once']} at a time, "
             f"{s['threads_per_run'] or 'default'} thread(s) each), MLflow experiments "
             + ", ".join(f"`{experiment_name(study.name, family)}`" for family in families())]
    for family in families():
        models = list(s[family]["models"])
        for dataset in s[family]["datasets"]:
            train = study.train_config(study.find_run(family, dataset, models[0], s["seeds"][0]))
            index.append(f"- {family} `{dataset}`: config `{params[family][dataset]['config']}`, models {models}, "
                         f"{train.steps} steps, global batch {train.batch_size}, lr {train.lr} ({train.lr_schedule})")
    fid, kid = params["fid"], params["fid"].get("kid") or {}
    weights = (f"`{fid['weights_path']}`" + ("" if Path(fid["weights_path"]).is_file() else " (not present: FID n/a)")
               if fid["weights_path"] else "none (FID n/a)")
    index.append(f"- FID and KID: {fid['num_samples']} samples, weights {weights}"
                 + (f"; KID {kid['subsets']} subsets of {kid['subset_size']}, {kid['reference_features']} "
                    f"reference features (seed {kid['seed']})" if kid else "") + "\n")
    index += ["## Choices made on validation data (never on test data)\n", *validation_choices(study, params), ""]
    index += ["## Versions\n", *(f"- {k} {v}" for k, v in package_versions().items())]
    return index


def validation_choices(study: Study, params: Mapping[str, Any]) -> list[str]:
    """Every choice made on validation data, from the params: each run's weight selection
    (``train.keep_best``) and the choices made before the study (``<family>.<dataset>.tuned``); the
    parameter-matched baseline's size, which no data chooses, is named as such."""
    s, lines = params["study"], []
    for family in families():
        models = list(s[family]["models"])
        for dataset in s[family]["datasets"]:
            train = study.train_config(study.find_run(family, dataset, models[0], s["seeds"][0]))
            if train.keep_best is not None:
                lines.append(f"- {family} `{dataset}`, in every run: the weights evaluated on the test split are the "
                             f"EMA weights of the validation evaluation (every {train.eval_every} steps) with the "
                             f"lowest `{train.keep_best}` (`train.keep_best`)")
            lines += [f"- {family} `{dataset}`, before this study: {line}"
                      for line in params[family][dataset].get("tuned", [])]
            if "cnn_matched" in models:
                lines.append(f"- {family} `{dataset}`: `cnn_matched`'s hidden width is solved from `sdn`'s parameter "
                             "count (`baselines/cnn_matched.py`), not chosen on data")
    return lines or ["- none: every setting is fixed in the params file before any run"]


def reductions(params: Mapping[str, Any]) -> list[str]:
    """What this study changes from the paper's protocol, one sentence each (empty: the paper's)."""
    out = [line for family in families().values() for line in family.report.reductions(params)]
    if params["fid"]["num_samples"] < PAPER_FID_SAMPLES:
        out.append(f"FID from {params['fid']['num_samples']} samples (paper convention: {PAPER_FID_SAMPLES})")
    return out


def build_report(params: Mapping[str, Any], paper: Mapping[str, Any], out_dir: Path, results: Path,
                 confidence: float = 0.95) -> list[Path]:
    """Write tables (md + csv), figures (PNG) and ``index.md`` of the study whose runs are under
    ``results``; return the files in ``out_dir``."""
    study, out_dir = validate(params), Path(out_dir)
    reports = {name: family.report for name, family in families().items()}
    figures = out_dir / "figures"
    shutil.rmtree(figures, ignore_errors=True)
    figures.mkdir(parents=True)
    records = collect_records(study, Path(results))
    factors = {d: n for family in reports.values() for d, n in family.num_factors(study).items()}
    index = [f"# SDN study `{params['study']['name']}`: results\n",
             "Generated by `pipelines/report.py` from the DVC metrics files; do not edit.\n",
             *claims_section(records, reports, factors, confidence, out_dir, params["report"]["claims"])]
    for name, family in reports.items():
        index += family.section([r for r in records if r["family"] == name], params, paper, confidence, out_dir)
    index += _samples(records, params, figures) + _configuration(study, params)
    _plot_data(records, params, out_dir / "plots")
    index += ["\n## Reduced from the paper\n", *(f"- {r}" for r in reductions(params) or ["nothing: the paper's protocol"]),
              "\nPaper values come from `reports/paper_results.yaml` (source and verified flag per value).\n"]
    (out_dir / "index.md").write_text("\n".join(index) + "\n")
    (out_dir / SUMMARY).write_text(json.dumps(summary_metrics(records, reports), indent=2, sort_keys=True) + "\n")
    return sorted(p for p in out_dir.rglob("*") if p.is_file())
