"""``make plots``: the study's DVC plots as HTML pages that open without network.

``dvc plots show`` writes a page that loads Vega, Vega-Lite and Vega-Embed from a CDN, so offline it
opens blank. This takes the same filled Vega-Lite specs (``dvc plots show --json``: DVC fills the
templates of dvc.yaml's ``plots`` with the data) and renders each with vl-convert, which bundles the
Vega libraries into the page: ``<out>/<plot>.html`` per plot and ``<out>/index.html`` showing them.
By default only dvc.yaml's top-level plots (one chart per dataset, its models overlaid); ``--all``
adds every train stage's per-run curves.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

import vl_convert
import yaml

OVERLAY_NOTE = "one chart per dataset: its models overlaid (mean over seeds, min–max band)"


def top_level_plot_ids(dvc_yaml: Path) -> list[str]:
    """The ids of dvc.yaml's top-level ``plots`` (with ``${report.dir}`` and the like left to DVC)."""
    entries = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("plots") or []
    return [next(iter(e)) if isinstance(e, dict) else str(e) for e in entries]


def filled_specs(only: Iterable[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """``dvc plots show --json`` as {plot file: [Vega-Lite spec, ...]}, optionally only the files under
    the ``only`` paths (DVC fills each plot definition's template with its data)."""
    result = subprocess.run(["dvc", "plots", "show", "--json"], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"plots: `dvc plots show --json` failed:\n{result.stderr.strip()}")
    shown = json.loads(result.stdout).get("data") or {}
    prefixes = None if only is None else [p.rstrip("/") for p in only]
    return {name: [entry["content"] for entry in entries if entry.get("type") == "vega"]
            for name, entries in shown.items()
            if prefixes is None or any(name == p or name.startswith(p + "/") for p in prefixes)}


def _vl_version(spec: dict[str, Any]) -> str | None:
    """vl-convert's name for the spec's Vega-Lite version (``v5_x``), from its ``$schema``."""
    found = re.search(r"vega-lite/v(\d+)(?:\.(\d+))?", spec.get("$schema", ""))
    if not found:
        return None
    major, minor = found.group(1), found.group(2)
    available = [v for v in vl_convert.get_vegalite_versions() if v.startswith(f"{major}.")]
    if minor is not None and f"{major}.{minor}" in available:
        return f"v{major}_{minor}"
    return f"v{available[-1].replace('.', '_')}" if available else None


def write_pages(specs: dict[str, list[dict[str, Any]]], out: Path) -> list[Path]:
    """One self-contained page per plot and an index; return the pages."""
    out.mkdir(parents=True, exist_ok=True)
    pages = []
    for name, renders in sorted(specs.items()):
        for i, spec in enumerate(renders):
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + (f"_{i}" if len(renders) > 1 else "")
            page = out / f"{stem}.html"
            page.write_text(vl_convert.vegalite_to_html(spec, vl_version=_vl_version(spec), bundle=True))
            pages.append(page)
    items = "\n".join(f'<h2>{html.escape(p.stem)}</h2>\n<iframe src="{p.name}" style="width:100%;height:560px;'
                      f'border:0"></iframe>' for p in pages)
    (out / "index.html").write_text(f"<!doctype html>\n<meta charset='utf-8'>\n<title>DVC plots (offline)</title>\n"
                                    f"<h1>DVC plots (offline)</h1>\n{items}\n")
    return pages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("dvc_plots/offline"), help="folder of the pages")
    parser.add_argument("--all", action="store_true", help="also every train stage's per-run curves")
    parser.add_argument("--report-dir", default="reports", help="params' report.dir (in dvc.yaml's plot paths)")
    args = parser.parse_args(argv)
    only = None if args.all else [t.replace("${report.dir}", args.report_dir) for t in top_level_plot_ids(Path("dvc.yaml"))]
    pages = write_pages(filled_specs(only), args.out)
    if not pages:
        print("plots: DVC showed no plots (run `make repro` first?)", file=sys.stderr)
        return 1
    print(f"plots: {len(pages)} page(s), open {args.out / 'index.html'} ({OVERLAY_NOTE if not args.all else 'all plots'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
