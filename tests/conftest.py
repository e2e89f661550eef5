"""Suite-wide test settings: no telemetry, no network beyond the loopback interface, and under
pytest-xdist (``make test``) each worker's fair share of the cores for torch's own threads."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")


def _share_cores_between_workers() -> None:
    """Two workers with two torch threads each on two cores oversubscribe them (OpenMP threads spin
    while waiting for each other): each worker gets cores / workers threads instead."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))


_share_cores_between_workers()


def _is_local(address) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX paths and the like
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True, scope="session")
def _forbid_network():
    """Fail loudly if any test (or library under test) tries to reach a non-loopback host."""
    original = socket.socket.connect

    def guarded_connect(self, address):
        if not _is_local(address):
            raise RuntimeError(f"tests must not use the network: connect to {address!r}")
        return original(self, address)

    socket.socket.connect = guarded_connect
    yield
    socket.socket.connect = original


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory) -> tuple[Path, str]:
    """The tiny study after one full `dvc repro` and that repro's output (built once per session,
    shared by the xdist workers: ``pipeline_harness.built_workspace``). Copy it before changing it."""
    import pipeline_harness

    return pipeline_harness.built_workspace(tmp_path_factory.getbasetemp())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the first test file that needs the tiny study first and the other such files last, so that
    one worker builds the study while the others run what does not need it. Under ``make test``
    xdist's file scheduler then reorders the files by their number of tests (largest first; this order
    only breaks its ties): ``--no-loadscope-reorder`` would keep this one (not measured yet)."""
    needs = {item.path for item in items if "tiny_study" in getattr(item, "fixturenames", ())}
    first = next((item.path for item in items if item.path in needs), None)
    items.sort(key=lambda item: 0 if item.path == first else 2 if item.path in needs else 1)  # stable
