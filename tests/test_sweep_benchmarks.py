"""The sweep benchmarks run (tiny shapes on CPU) and the launch count of the CIFAR step holds."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_sweep_gpu_script_runs_tiny_on_cpu():
    out = _run("benchmarks/sweep_gpu.py", "--tiny")
    assert re.search(r"^plain\s+fp32 .*\|", out, re.M)
    assert re.search(r"^tiny sdn-plain-sweep|^tiny sdn ", out, re.M)
    assert "tiny cnn" in out


@pytest.mark.slow
def test_cifar_step_launches_within_target():
    """One CIFAR-10 SDN step with the fast path: at most 5,000 operator launches (issue 22)."""
    out = _run("benchmarks/launches.py", "--configs", "cifar10", "--models", "sdn", "cnn",
               "--sweeps", "triton")
    counts = dict(re.findall(r"^cifar10 (\S+) launches_per_step=(\d+)", out, re.M))
    assert int(counts["sdn"]) <= 5000, out
    assert int(counts["cnn"]) < int(counts["sdn"]), out
