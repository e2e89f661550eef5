"""Suite-wide test settings: no telemetry, and no network beyond the loopback interface."""

from __future__ import annotations

import ipaddress
import os
import socket

import pytest

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")


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
