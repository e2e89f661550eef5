"""The study report (DVC stage ``report``, ``pipelines/report.py``): it reads the params layout and
judges the numbers by the paper's protocol, so it lives in the study layer, not in ``sdn``.

- ``tables``: statistics over seeds (pandas, scipy) and markdown/CSV tables
- ``figures``: curves, bars and the sample grids
- ``claims``: the paper's claims, the verdict rule and the run checks section
- ``outliers``: the run checks' outlier rule (scaled MAD over seeds)
- ``density``, ``disentanglement``: each family's claims, run checks, tables, figures and reductions
  (a ``FamilyReport``); ``index.FAMILIES`` selects them by family name
- ``index``: ``build_report``, the index page
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

Records = Sequence[Mapping[str, Any]]  # one dict per run: family, dataset, model, seed, metrics, ... (index.py)


class FamilyReport(NamedTuple):
    """What one family contributes to the report."""

    claims: Callable[[Records], list]  # the paper's claims its runs can test (``claims.Claim``)
    num_factors: Callable[[Any], dict[str, int]]  # Study -> dataset -> ground-truth factor count
    run_checks: Callable[[Records], list[dict[str, Any]]]  # one row per run, ``failed`` lists what it fails
    check_text: str  # what the run checks test, for the report
    check_tables: Callable[[list[dict[str, Any]]], list[str]]  # markdown of its run checks
    section: Callable[..., list[str]]  # (records, params, paper, confidence, out_dir) -> index.md lines; writes its files
    reductions: Callable[[Mapping[str, Any]], list[str]]  # params -> what differs from the paper's protocol
    summary: tuple[str, ...] = ()  # eval metrics whose seed means go to summary.json (a DVC metric)
    outlier_curve: tuple[str, str] = ("bpd", "train bpd")  # curve column and label shown for a flagged run
