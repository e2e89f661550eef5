"""Training checkpoints: atomic writes, RNG state capture/restore, and loading weights for evaluation.

A checkpoint is one ``torch.save`` dict (loadable with ``weights_only=True``) holding the model, EMA,
optimizer and scheduler states, every rank's RNG states and the data position (epoch, batch index).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def checkpoint_file(checkpoint_dir: str | os.PathLike[str]) -> Path:
    """The path of the (single, always latest) checkpoint in ``checkpoint_dir``."""
    return Path(checkpoint_dir) / CHECKPOINT_NAME


def config_fingerprint(config: Any) -> str:
    """A short stable hash of a JSON-able run configuration (dict keys sorted)."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_checkpoint_dir(root: str | os.PathLike[str], config: Any) -> Path:
    """The checkpoint directory of one run configuration: ``root/checkpoints/<fingerprint>``.

    Keying checkpoints by the full configuration means a resumed run can only ever continue from a
    checkpoint of the same configuration; a changed hyper-parameter starts a fresh directory.
    """
    return Path(root) / "checkpoints" / config_fingerprint(config)


def remove_other_checkpoints(keep: str | os.PathLike[str]) -> list[Path]:
    """Delete sibling checkpoint directories of ``keep`` (stale configurations); return them."""
    keep = Path(keep)
    removed = [p for p in keep.parent.iterdir() if p.is_dir() and p != keep] if keep.parent.is_dir() else []
    for path in removed:
        shutil.rmtree(path)
    return removed


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temporary file in the same directory, fsync, then ``os.replace``, so a
    crash mid-write never leaves a truncated checkpoint at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    try:  # persist the rename itself
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def capture_rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Python, NumPy, torch CPU and (if ``device`` is CUDA) that device's RNG states."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda" else None,
    }


def restore_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state(
        (npst["name"], npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint dict onto the CPU (``weights_only``), checking its format version."""
    path = Path(path)
    if path.is_dir():
        path = checkpoint_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a version-{FORMAT_VERSION} training checkpoint of sdn.training")
    return state


def load_checkpoint(
    path: str | os.PathLike[str], model: nn.Module, ema: bool = True, strict: bool = True
) -> dict[str, Any]:
    """Load weights from a checkpoint (file or directory) into ``model``, the EMA weights by default
    (the raw weights when the run had no EMA or ``ema=False``).

    Returns the metadata: ``step``, ``finished``, ``metrics``, ``config`` and ``used_ema``.
    """
    state = read_checkpoint(path)
    used_ema = ema and state.get("ema") is not None
    weights = state["ema"]["module"] if used_ema else state["model"]
    model.load_state_dict(weights, strict=strict)
    return {
        "step": state["step"],
        "finished": state["finished"],
        "metrics": state["metrics"],
        "config": state["config"],
        "used_ema": used_ema,
    }
