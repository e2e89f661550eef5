"""Compare a rerun's DVC metrics with the committed study, within a tolerance (``make compare``).

Runs ``dvc metrics diff --json <rev>`` (workspace against ``rev``, default HEAD) and fails (exit 1)
when any metric differs by more than ``--rtol`` relative plus ``--atol`` absolute, or appears on one
side only. The same machine with the same thread count reproduces every metric bit for bit; another
CPU model changes one forward pass in about the 7th significant digit (other oneDNN/MKL kernels),
which training amplifies like a change of seed (measured: up to 0.075 bpd per run between an AVX2
and an AVX-512 machine, README "Reproducibility"): across CPU models compare means and CIs, or
pass a larger ``--rtol`` to list the runs that moved most.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Mapping
from typing import Any


def out_of_tolerance(diff: Mapping[str, Any], rtol: float, atol: float) -> list[str]:
    """Lines naming every metric of a ``dvc metrics diff --json`` result beyond the tolerance."""
    bad = []
    for path, metrics in sorted(diff.items()):
        for key, entry in sorted(metrics.items()):
            old, new = entry.get("old"), entry.get("new")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (old, new)):
                bad.append(f"{path}:{key}: committed {old!r}, rerun {new!r}")
            elif not math.isclose(float(new), float(old), rel_tol=rtol, abs_tol=atol):
                bad.append(f"{path}:{key}: committed {old!r}, rerun {new!r} (diff {float(new) - float(old):+.3g})")
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", nargs="?", default="HEAD", help="git revision holding the committed study")
    parser.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance (default 1e-4)")
    parser.add_argument("--atol", type=float, default=1e-6, help="absolute tolerance (default 1e-6)")
    args = parser.parse_args(argv)
    result = subprocess.run(["dvc", "metrics", "diff", "--json", args.rev], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"compare: `dvc metrics diff` failed:\n{result.stderr}", file=sys.stderr)
        return 2
    diff = json.loads(result.stdout or "{}")
    changed = sum(len(m) for m in diff.values())
    bad = out_of_tolerance(diff, args.rtol, args.atol)
    for line in bad:
        print(line)
    print(f"compare: {changed} metric values differ from {args.rev}; {len(bad)} beyond rtol={args.rtol:g}, "
          f"atol={args.atol:g}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
