"""Training checkpoints: atomic writes, RNG state capture/restore, and loading weights for evaluation.

A checkpoint is one ``torch.save`` dict (loadable with ``weights_only=True``) holding the model, EMA,
optimizer and scheduler states, every rank's RNG states and the data position (epoch, batch index).

A run's directory holds the newest checkpoint (``checkpoint.pt``) and, while the run is unfinished,
the one before it (``checkpoint.prev.pt``): :func:`save_checkpoint` writes the new file completely
(fsynced) before it rotates the old one to ``.prev``, so a crash or a truncated file never loses
both. A file that cannot be read raises :class:`CorruptCheckpointError` naming it; the trainer then
falls back to the previous checkpoint (``sdn.training``).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import random
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"
FORMAT_VERSION = 1


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read (truncated or corrupt); ``path`` names it."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        try:
            size = f"{self.path.stat().st_size} bytes"
        except OSError:
            size = "size unknown"
        super().__init__(f"checkpoint {self.path} is truncated or corrupt ({size}): {reason}")


def checkpoint_file(checkpoint_dir: str | os.PathLike[str]) -> Path:
    """The path of the newest checkpoint in ``checkpoint_dir``."""
    return Path(checkpoint_dir) / CHECKPOINT_NAME


def previous_checkpoint_file(checkpoint_dir: str | os.PathLike[str]) -> Path:
    """The path of the checkpoint before the newest (kept while a run is unfinished)."""
    return Path(checkpoint_dir) / PREVIOUS_NAME


def has_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> bool:
    """Whether ``checkpoint_dir`` holds a checkpoint file (newest or previous) to resume from."""
    return checkpoint_file(checkpoint_dir).is_file() or previous_checkpoint_file(checkpoint_dir).is_file()


def config_fingerprint(config: Any) -> str:
    """A short stable hash of a JSON-able run configuration (dict keys sorted)."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def source_fingerprint(files: Iterable[str | os.PathLike[str]], root: str | os.PathLike[str]) -> str:
    """A short hash of what the Python ``files`` compute: their syntax trees without docstrings, so an
    edit to comments, docstrings or formatting keeps the hash and any other edit changes it."""
    digest = hashlib.sha256()
    for path in sorted(Path(f) for f in files):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                    and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + ast.dump(tree).encode() + b"\0")
    return digest.hexdigest()[:16]


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


def atomic_save(obj: Any, path: str | os.PathLike[str], previous: str | os.PathLike[str] | None = None) -> Path:
    """``torch.save`` to a temporary file in the same directory, fsync, then ``os.replace``, so a
    crash mid-write never leaves a truncated checkpoint at ``path``.

    With ``previous``, an existing ``path`` is first moved there (after the new file is complete),
    so the directory always holds at least one whole checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if previous is not None and path.is_file():
            os.replace(path, previous)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # persist the renames themselves
    return path


def save_checkpoint(state: dict[str, Any], checkpoint_dir: str | os.PathLike[str], finished: bool = False) -> Path:
    """Write ``state`` as the newest checkpoint of ``checkpoint_dir``, keeping the one it replaces
    as ``checkpoint.prev.pt``; a ``finished`` run keeps only its final checkpoint."""
    path = atomic_save(state, checkpoint_file(checkpoint_dir), previous=previous_checkpoint_file(checkpoint_dir))
    if finished:
        previous_checkpoint_file(checkpoint_dir).unlink(missing_ok=True)
        _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


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
    """Load a checkpoint dict onto the CPU (``weights_only``), checking its format version.

    ``path`` is a file or a run directory (its newest checkpoint, no fallback). Raises
    FileNotFoundError when there is none, :class:`CorruptCheckpointError` naming a file that
    cannot be read (truncated, corrupt) and ValueError for a file that is no training checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        path = checkpoint_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (PermissionError, FileNotFoundError):
        raise
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, KeyError, IndexError, OSError) as error:
        text = str(error).strip()
        first = text.splitlines()[0].split(". ")[0] if text else "unexpected end of file"
        raise CorruptCheckpointError(path, f"{type(error).__name__}: {first}") from error
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
