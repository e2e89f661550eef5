"""DVC stage ``report``: tables (markdown + CSV), figures and ``index.md`` of the study.

Reads the DVC metrics files, training curves and sample grids of every run under ``--results``
(dvc.yaml: ``results/<study>``) and the paper's values from ``--paper``; writes into ``report.dir``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from pipelines.reporting.index import build_report
from pipelines.study import load_study


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--paper", default="reports/paper_results.yaml")
    parser.add_argument("--results", type=Path, required=True, help="the study's results folder (dvc.yaml's)")
    args = parser.parse_args(argv)
    params = load_study(args.params).params
    paper = yaml.safe_load(Path(args.paper).read_text()) or {}
    cfg = params["report"]
    files = build_report(params, paper, Path(cfg["dir"]), args.results, confidence=float(cfg["confidence"]))
    print(f"report: {len(files)} files in {cfg['dir']}/ (start at {cfg['dir']}/index.md)")


if __name__ == "__main__":
    main()
