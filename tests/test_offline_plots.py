"""``make plots``: dvc.yaml's top-level plots as pages that need no network (Vega bundled in)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_the_overlay_plot_renders_to_a_self_contained_page(tmp_path, monkeypatch):
    from pipelines import plots

    (tmp_path / "reports" / "plots").mkdir(parents=True)
    (tmp_path / "pipelines" / "reporting").mkdir(parents=True)
    shutil.copy(ROOT / "pipelines/reporting/dvc_curves.json", tmp_path / "pipelines/reporting/dvc_curves.json")
    rows = ["dataset,model,seed,metric,step,value"] + [
        f"toy,{m},{s},train bpd,{step},{5.0 - 0.001 * step + 0.01 * s + (0.3 if m == 'cnn' else 0)}"
        for m in ("sdn", "cnn") for s in (0, 1) for step in range(50, 501, 50)]
    (tmp_path / "reports/plots/toy.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "curve.csv").write_text("step,bpd\n1,5\n2,4\n")
    top = ("plots:\n  - ${report.dir}/plots:\n      template: pipelines/reporting/dvc_curves.json\n"
                       "      x: step\n      y: value\n")
    (tmp_path / "params.yaml").write_text("report:\n  dir: reports\n")
    (tmp_path / "dvc.yaml").write_text(top + "stages:\n  s:\n    cmd: 'true'\n    plots:\n      - curve.csv:\n"
                                       "          cache: false\n          x: step\n          y: bpd\n")
    env = {"DVC_NO_ANALYTICS": "1", "HOME": str(tmp_path)}
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)

    assert plots.top_level_plot_ids(Path("dvc.yaml")) == ["${report.dir}/plots"]
    assert plots.main(["--out", "offline"]) == 0
    pages = sorted(p.name for p in Path("offline").iterdir())
    assert pages == ["index.html", "reports_plots_toy.csv.html"]  # the overlay only; --all adds curve.csv
    page = Path("offline/reports_plots_toy.csv.html").read_text()
    assert not re.search(r"<script[^>]+src=[\"']https?:", page)  # nothing fetched from a CDN
    assert "vegaEmbed" in page and len(page) > 100_000  # the libraries themselves are in the page
    assert '"model":"cnn"' in page.replace(" ", "") and '"seed":"1"' in page.replace(" ", "")  # every run's rows
    assert 'src="reports_plots_toy.csv.html"' in Path("offline/index.html").read_text()
    assert plots.main(["--out", "all", "--all"]) == 0
    assert sorted(p.name for p in Path("all").iterdir()) == ["curve.csv.html", "index.html", "reports_plots_toy.csv.html"]
