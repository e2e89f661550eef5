"""DVC stage ``report``: tables (markdown + CSV), figures and ``index.md`` of the study.

Reads the DVC metrics files, training curves and sample grids of every run under ``--root``, and the
paper's values from ``reports/paper_results.yaml``; writes into ``report.dir`` (``reports/`` by default).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's sdn/

import yaml  # noqa: E402

from pipelines.reporting.index import build_report  # noqa: E402
from pipelines.study import load_study  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--paper", default="reports/paper_results.yaml")
    parser.add_argument("--root", default=".", help="workspace whose results/<study>/ holds the runs")
    args = parser.parse_args(argv)
    params = load_study(args.params).params
    paper = yaml.safe_load(Path(args.paper).read_text()) or {}
    cfg = params["report"]
    files = build_report(params, paper, Path(cfg["dir"]), Path(args.root), confidence=float(cfg["confidence"]))
    print(f"report: {len(files)} files in {cfg['dir']}/ (start at {cfg['dir']}/index.md)")


if __name__ == "__main__":
    main()
