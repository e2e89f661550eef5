"""``make compare``: which `dvc metrics diff --json` entries are beyond the tolerance."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.compare import out_of_tolerance  # noqa: E402


def test_seventh_digit_changes_pass_and_real_changes_fail():
    diff = {
        "results/embedded/metrics/eval/a.json": {
            "elbo_bpd": {"old": 7.42057253, "new": 7.42057357, "diff": 1.04e-06},   # another CPU
            "iw_bpd": {"old": 5.10, "new": 5.20, "diff": 0.1},                        # a real change
        },
        "results/embedded/metrics/train/b.json": {
            "steps": {"old": 400, "new": None},                                       # gone in the rerun
            "zero": {"old": 0.0, "new": 5e-7, "diff": 5e-7},                          # within atol
        },
    }
    bad = out_of_tolerance(diff, rtol=1e-4, atol=1e-6)
    assert len(bad) == 2
    assert bad[0].startswith("results/embedded/metrics/eval/a.json:iw_bpd: committed 5.1, rerun 5.2")
    assert "steps" in bad[1] and "rerun None" in bad[1]


def test_tolerance_bounds_are_the_ones_given():
    diff = {"m.json": {"x": {"old": 1.0, "new": 1.001}}}
    assert out_of_tolerance(diff, rtol=1e-4, atol=0.0)
    assert not out_of_tolerance(diff, rtol=1e-2, atol=0.0)
    assert not out_of_tolerance({}, rtol=0.0, atol=0.0)
