"""Report statistics against hand computations and scipy's test; tables and figures on tiny records."""

from __future__ import annotations

import csv
import math
import statistics

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from pipelines.reporting import figures, tables
from pipelines.reporting import index as report


def test_summarize_matches_statistics_module():
    values = [2.91, 2.87, 3.02, float("nan")]
    s = tables.summarize(values)
    assert s.n == 3
    assert s.mean == pytest.approx(statistics.mean(values[:3]), rel=1e-12)
    assert s.std == pytest.approx(statistics.stdev(values[:3]), rel=1e-12)
    one = tables.summarize([1.5])
    assert (one.mean, one.n) == (1.5, 1) and math.isnan(one.std)
    assert tables.summarize([]).n == 0


def test_welch_hand_computed_case():
    # a = [1, 2, 3], b = [4, 6, 8]: s_a^2 = 1, s_b^2 = 4, se^2 = 1/3 + 4/3 = 5/3,
    # df = (5/3)^2 / ((1/3)^2/2 + (4/3)^2/2) = 50/17, t = -4 / sqrt(5/3).
    c = tables.welch([1, 2, 3], [4, 6, 8])
    assert c.diff == pytest.approx(-4.0)
    assert c.df == pytest.approx(50 / 17)
    assert c.t == pytest.approx(-4 / math.sqrt(5 / 3))
    assert (c.n_a, c.n_b) == (3, 3)
    # Two-sided p-value of t with 50/17 df, straight from the t distribution.
    assert c.p_value == pytest.approx(2 * stats.t.sf(4 / math.sqrt(5 / 3), 50 / 17), rel=1e-10)


def test_welch_matches_scipy_and_ci_inverts_the_test():
    rng = np.random.default_rng(0)
    a, b = rng.normal(2.9, 0.05, 5), rng.normal(3.0, 0.2, 4)
    c = tables.welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert c.t == pytest.approx(ref.statistic, rel=1e-12)
    assert c.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    assert c.diff == pytest.approx(a.mean() - b.mean(), rel=1e-12)
    # The CI by the textbook formula: diff ± t_{0.975, ν} · se, Welch–Satterthwaite ν.
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert c.df == pytest.approx(df, rel=1e-12)
    assert (c.ci_low, c.ci_high) == pytest.approx((c.diff - half, c.diff + half), rel=1e-12)
    # The 95% CI bounds are exactly the shifts at which Welch's test has p = 0.05.
    for bound in (c.ci_low, c.ci_high):
        assert stats.ttest_ind(a - bound, b, equal_var=False).pvalue == pytest.approx(0.05, rel=1e-8)
    assert c.ci_low < c.diff < c.ci_high


def test_welch_too_few_seeds_gives_nan_test_but_a_difference():
    c = tables.welch([1.0], [2.0, 3.0])
    assert c.diff == pytest.approx(-1.5)
    assert math.isnan(c.p_value) and math.isnan(c.ci_low)
    same = tables.welch([2.0, 2.0], [2.0, 2.0, 2.0])  # no spread: the CI is the difference itself
    assert (same.diff, same.ci_low, same.ci_high) == (0.0, 0.0, 0.0) and math.isnan(same.p_value)
    with pytest.raises(ValueError, match="confidence"):
        tables.welch([1, 2], [3, 4], confidence=1.5)


def _records():
    recs = []
    for model, base, params in (("sdn", 3.0, 1000), ("cnn", 3.2, 400)):
        for seed, noise in enumerate((0.01, -0.02, 0.03)):
            recs.append({"dataset": "cifar10", "model": model, "seed": seed, "num_params": params,
                         "metrics": {"elbo_bpd": base + noise + 0.05, "iw_bpd": base + noise}})
    return recs


def test_metric_rows_and_paper_difference():
    paper = {"density": {"cifar10": {"sdn": {"iw_bpd": {"value": 2.87, "source": "paper T1", "verified": False}}}}}
    rows = tables.metric_rows(_records(), ["elbo_bpd", "iw_bpd"], "density", paper, paper_metric="iw_bpd")
    by_model = {r["model"]: r for r in rows.to_dict("records")}
    sdn = by_model["sdn"]
    iw = [3.01, 2.98, 3.03]
    assert sdn["iw_bpd_mean"] == pytest.approx(np.mean(iw))
    assert sdn["iw_bpd_std"] == pytest.approx(np.std(iw, ddof=1))
    assert sdn["seeds"] == 3 and sdn["num_params"] == 1000
    assert sdn["paper"] == 2.87 and "unverified" in sdn["paper_source"]
    assert sdn["diff_vs_paper"] == pytest.approx(np.mean(iw) - 2.87)
    assert by_model["cnn"]["paper"] is None and by_model["cnn"]["diff_vs_paper"] is None
    assert sdn["iw_bpd_pm"] == f"{np.mean(iw):.3f} ± {np.std(iw, ddof=1):.3f}"


def test_comparison_rows_are_candidate_minus_other():
    rows = tables.comparison_rows(_records(), ["iw_bpd"])
    assert len(rows) == 1
    row = rows.iloc[0]
    a = [3.01, 2.98, 3.03]
    b = [3.21, 3.18, 3.23]
    assert row["comparison"] == "sdn − cnn"
    assert row["diff"] == pytest.approx(np.mean(a) - np.mean(b))
    assert row["p_value"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-10)


def test_markdown_and_csv(tmp_path):
    rows = [{"model": "sdn", "x": 1.23456, "n": 3, "p": 12_345_678}, {"model": "c|nn", "x": float("nan"), "n": 1}]
    md = tables.markdown_table(rows, ["model", "x", "n", "p"], ["model", "x", "seeds", "params"])
    assert md.splitlines()[:2] == ["| model | x | seeds | params |", "|---|---|---|---|"]
    assert "| sdn | 1.235 | 3 | 12,345,678 |" in md and "| c\\|nn | n/a | 1 | n/a |" in md
    tables.write_csv(rows, ["model", "x", "n", "p", "absent"], tmp_path / "t.csv")
    text = (tmp_path / "t.csv").read_text()
    assert text.splitlines()[:2] == ["model,x,n,p,absent", "sdn,1.23456,3,12345678,"]  # integers stay whole
    with (tmp_path / "t.csv").open() as handle:
        back = list(csv.DictReader(handle))
    assert back[1] == {"model": "c|nn", "x": "", "n": "1", "p": "", "absent": ""}
    tables.write_csv([], ["a", "b"], tmp_path / "empty.csv")
    assert (tmp_path / "empty.csv").read_text() == "a,b\n"


def test_figures_are_pngs(tmp_path):
    steps = np.arange(0, 50, 10)
    curves = {"sdn": [(steps, 5 - 0.01 * steps), (steps, 5.1 - 0.01 * steps)], "cnn": [(steps, 6 - 0.01 * steps)]}
    figures.plot_curves(curves, tmp_path / "c.png", "curves")
    rows = tables.metric_rows(_records(), ["elbo_bpd", "iw_bpd"], "density", {})
    figures.plot_bars(rows, ["elbo_bpd", "iw_bpd"], tmp_path / "b.png", "bars")
    for name in ("c.png", "b.png"):
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG" and img.size[0] > 100


def test_build_report_from_metrics_files(tmp_path):
    """The report of a study whose metrics files hold hand-picked numbers (no training)."""
    import json as _json
    from pathlib import Path

    import yaml

    from pipelines.runs import results_paths
    from pipelines.study import validate

    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["study"]["seeds"] = [0, 1, 2]
    study = validate(params)
    iw = {"sdn": [3.10, 3.05, 3.12], "cnn": [3.30, 3.28, 3.41], "cnn_matched": [3.20, 3.22, 3.19]}
    for run in study.runs():
        paths = results_paths(tmp_path / "results", run)
        for p in (paths.train_metrics, paths.eval_metrics, paths.curve, paths.fid_metrics):
            p.parent.mkdir(parents=True, exist_ok=True)
        paths.train_metrics.write_text(_json.dumps({"num_params": 1000 + len(run.model)}))
        paths.curve.write_text("step,loss,bpd,lr,grad_norm,val_elbo_bpd\n10,9,5.0,0.002,1,5.1\n20,8,4.0,0.002,1,4.1\n")
        if run.family == "density":
            v = iw[run.model][run.seed]
            paths.eval_metrics.write_text(_json.dumps({"elbo_bpd": v + 0.1, "iw_bpd": v}))
            paths.fid_metrics.write_text(_json.dumps({"fid": "n/a", "available": False, "value": None,
                                                      "reason": "no Inception weights: set fid.weights_path"}))
        else:
            score = 0.5 + 0.1 * (run.model == "sdn") + 0.01 * run.seed
            paths.eval_metrics.write_text(_json.dumps({"mig.discrete_mig": score, "settings.num_train": 10.0}))
    paper = {"density": {"patches32": {"sdn": {"iw_bpd": {"value": 3.0, "source": "test", "verified": True}}}}}
    report.build_report(params, paper, tmp_path / "reports", tmp_path / "results")
    with (tmp_path / "reports" / "density.csv").open() as handle:
        rows = {r["model"]: r for r in csv.DictReader(handle)}
    assert float(rows["sdn"]["iw_bpd_mean"]) == pytest.approx(np.mean(iw["sdn"]), rel=1e-5)
    assert float(rows["cnn"]["iw_bpd_std"]) == pytest.approx(np.std(iw["cnn"], ddof=1), rel=1e-5)
    assert float(rows["sdn"]["diff_vs_paper"]) == pytest.approx(np.mean(iw["sdn"]) - 3.0, rel=1e-5)
    with (tmp_path / "reports" / "density_comparison.csv").open() as handle:
        comp = {(r["comparison"], r["metric"]): r for r in csv.DictReader(handle)}
    row = comp[("sdn − cnn", "iw_bpd")]
    assert float(row["p_value"]) == pytest.approx(stats.ttest_ind(iw["sdn"], iw["cnn"], equal_var=False).pvalue, rel=1e-5)
    with (tmp_path / "reports" / "disentanglement.csv").open() as handle:
        dis = {r["model"]: r for r in csv.DictReader(handle)}
    assert float(dis["sdn"]["mig.discrete_mig_mean"]) == pytest.approx(0.61)
    assert "settings.num_train_mean" not in dis["sdn"]
    index = (tmp_path / "reports" / "index.md").read_text()
    k = params["density"]["patches32"]["eval"]["iw_samples"]
    assert f"K = {k} (paper: 1024)" in index and f"FID from {params['fid']['num_samples']} samples" in index
    assert "## Versions" in index and "## Reduced from the paper" in index
    assert "n/a (no Inception weights: set fid.weights_path)" in (tmp_path / "reports" / "fid.md").read_text()
    assert (tmp_path / "reports" / "figures" / "curves_patches32.png").is_file()
    summary = _json.loads((tmp_path / "reports" / "summary.json").read_text())  # the DVC metric of the report
    assert summary["patches32.sdn.iw_bpd"] == pytest.approx(np.mean(iw["sdn"]), rel=1e-12)
    assert summary["patches32.cnn.elbo_bpd"] == pytest.approx(np.mean(iw["cnn"]) + 0.1, rel=1e-12)
    assert summary["dsprites_procedural.sdn.mig.discrete_mig"] == pytest.approx(0.61)
    assert not any("settings" in k or "num_train" in k for k in summary)
    # cnn seed 2 (3.41 against 3.30, 3.28: 0.11 / (1.4826 · 0.02) = 3.7 scaled MADs) is flagged, not dropped
    with (tmp_path / "reports" / "run_checks.csv").open() as handle:
        checks = {(r["model"], r["seed"]): r["failed"] for r in csv.DictReader(handle) if r["dataset"] == "patches32"}
    assert [k for k, failed in checks.items() if "outlier" in failed] == [("cnn", "2")]
    assert "outlier: iw_bpd 3.410 lies 3.7 × the scaled MAD" in checks[("cnn", "2")]
    assert "### Flagged runs' learning curves" in index and "(figures/outlier_patches32_cnn_seed2.png)" in index
    with Image.open(tmp_path / "reports" / "figures" / "outlier_patches32_cnn_seed2.png") as img:
        assert img.format == "PNG"
    with (tmp_path / "reports" / "claims.csv").open() as handle:
        claim = next(r for r in csv.DictReader(handle) if r["comparison"] == "sdn − cnn")
    assert (claim["margin"], claim["half_width_target"]) == ("0.05", "0.05")
    assert claim["half_width_exceeds_target"] == str(float(claim["half_width"]) > 0.05)
    assert "δ (`report.claims.<family>.margin`): density 0.05 bpd; disentanglement 0.05" in index
    assert "## Choices made on validation data (never on test data)" in index


def test_small_sample_grids_are_enlarged_pixel_for_pixel(tmp_path):
    """A grid narrower than the minimum figure width is scaled by a whole factor, each pixel a block;
    a wide one is copied unchanged; missing seeds are skipped."""
    small = np.random.default_rng(0).integers(0, 256, (5, 10, 3), dtype=np.uint8)
    Image.fromarray(small).save(tmp_path / "small.png")
    assert figures.copy_grid([tmp_path / "missing.png", tmp_path / "small.png"], tmp_path / "out.png")
    out = np.asarray(Image.open(tmp_path / "out.png"))
    factor = -(-figures.MIN_FIGURE_WIDTH // 10)
    assert out.shape == (5 * factor, 10 * factor, 3)
    np.testing.assert_array_equal(out, small.repeat(factor, axis=0).repeat(factor, axis=1))
    wide = np.zeros((4, figures.MIN_FIGURE_WIDTH + 1, 3), dtype=np.uint8)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    figures.copy_grid([tmp_path / "wide.png"], tmp_path / "wide_out.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "wide_out.png")), wide)
    assert not figures.copy_grid([tmp_path / "missing.png"], tmp_path / "none.png")


def test_every_family_brings_its_report():
    from pipelines.families import families
    from pipelines.reporting import FamilyReport, density, disentanglement

    assert {name: family.report for name, family in families().items()} == {
        "density": density.REPORT, "disentanglement": disentanglement.REPORT}
    assert all(isinstance(family.report, FamilyReport) for family in families().values())


def test_package_versions_cover_the_union_of_lists():
    from importlib import metadata

    from pipelines.provenance import PACKAGES, package_versions

    versions = package_versions()
    assert list(versions) == ["python", *PACKAGES] and len(set(PACKAGES)) == len(PACKAGES)
    assert versions["scipy"] == metadata.version("scipy") and "torch-fidelity" in versions


def test_the_library_imports_no_study_layer():
    import re
    from pathlib import Path

    sdn = Path(__file__).resolve().parents[1] / "sdn"
    importing = [p for p in sdn.rglob("*.py") if re.search(r"^\s*(from|import)\s+pipelines\b", p.read_text(), re.M)]
    assert not importing


def test_validation_choices_are_generated_from_the_params():
    from pathlib import Path

    import yaml

    from pipelines.study import validate

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    tuned = params["density"]["patches32"]["tuned"]
    params["density"]["patches32"]["train"].update(keep_best="elbo_bpd", eval_every=150)
    lines = report.validation_choices(validate(params), params)
    assert ("- density `patches32`, in every run: the weights evaluated on the test split are the EMA weights of "
            "the validation evaluation (every 150 steps) with the lowest `elbo_bpd` (`train.keep_best`)") in lines
    assert f"- density `patches32`, before this study: {tuned[0]}" in lines
    assert any("`cnn_matched`'s hidden width is solved from `sdn`'s parameter count" in line for line in lines)
    for family in ("density", "disentanglement"):
        for section in params[family].values():
            section.pop("tuned", None)
            section["train"].pop("keep_best", None)
    params["study"]["density"]["models"] = ["sdn", "cnn"]
    params["density"]["patches32"]["models"].pop("cnn_matched")
    assert report.validation_choices(validate(params), params) == [
        "- none: every setting is fixed in the params file before any run"]
