"""The trainer's reporting interface: callbacks receive metrics, so trackers (e.g. MLflow in
``pipelines/tracking.py``) can log live without the library importing them; plus a training-curve writer.

Callbacks run on rank 0 only. An exception raised in a callback stops training.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


class Callback:
    """Base class; override the hooks you need. ``metrics`` values are Python floats."""

    def on_train_start(self, info: dict[str, Any]) -> None:
        """Called once; ``info`` has ``start_step`` (> 0 when resuming), ``steps``, ``config``, ..."""

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        """Called every ``log_every`` steps (and at the last) with means over the steps since the
        previous call (``lr`` is the rate used at ``step``)."""

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Called after the evaluation function ran on the EMA model at ``step``."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """Called after a checkpoint for ``step`` was written to ``path``."""

    def on_train_end(self, summary: dict[str, Any]) -> None:
        """Called once when training finished normally (not after an error)."""


class CallbackList(Callback):
    """Fans every hook out to several callbacks, in order."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)
        for callback in self.callbacks:
            if not isinstance(callback, Callback):
                raise ValueError(f"callbacks must be sdn.callbacks.Callback instances, got {type(callback).__name__}")

    def on_train_start(self, info: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_train_start(info)

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        for callback in self.callbacks:
            callback.on_step_end(step, metrics)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        for callback in self.callbacks:
            callback.on_eval(step, metrics)

    def on_checkpoint(self, step: int, path: Path) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint(step, path)

    def on_train_end(self, summary: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_train_end(summary)


DEFAULT_CURVE_COLUMNS = ("step", "loss", "bpd", "lr", "grad_norm", "val_elbo_bpd")
EVAL_PREFIX = "val_"  # evaluation metrics (``on_eval``) land in columns named val_<metric>


class CurveWriter(Callback):
    """Writes the training curve for DVC plots: CSV (``.csv``), TSV (``.tsv``) or JSON lines (``.jsonl``).

    CSV/TSV have the fixed ``columns`` (missing metrics stay empty); JSON lines hold every metric.
    On resume, rows after the resumed step (written before the interruption) are dropped first, so
    the file never repeats a step. Evaluations (``on_eval``) are rows of their own whose metrics
    are named ``val_<metric>`` (e.g. ``val_elbo_bpd``), so one file holds both curves.
    """

    def __init__(self, path: str | os.PathLike[str], columns: Sequence[str] = DEFAULT_CURVE_COLUMNS) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in (".csv", ".tsv", ".jsonl"):
            raise ValueError(f"curve path must end in .csv, .tsv or .jsonl, got {self.path.name!r}")
        if "step" not in columns:
            raise ValueError(f"columns must include 'step', got {tuple(columns)}")
        self.format = suffix[1:]
        self.columns = tuple(columns)

    def on_train_start(self, info: dict[str, Any]) -> None:
        start = int(info.get("start_step", 0))
        kept = [row for row in self._read_rows() if int(float(row["step"])) <= start] if start > 0 else []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as handle:
            if self.format == "jsonl":
                for row in kept:
                    handle.write(json.dumps(row) + "\n")
            else:
                writer = self._csv_writer(handle)
                writer.writeheader()
                writer.writerows(kept)
        os.replace(tmp, self.path)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.on_step_end(step, {f"{EVAL_PREFIX}{k}": v for k, v in metrics.items()})

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        row: dict[str, Any] = {"step": step, **metrics}
        with self.path.open("a", newline="") as handle:
            if self.format == "jsonl":
                clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in row.items()}
                handle.write(json.dumps(clean) + "\n")
            else:
                self._csv_writer(handle).writerow({k: row.get(k, "") for k in self.columns})

    def _csv_writer(self, handle: Any) -> csv.DictWriter:
        delimiter = "\t" if self.format == "tsv" else ","
        return csv.DictWriter(handle, fieldnames=self.columns, delimiter=delimiter, extrasaction="ignore")

    def _read_rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as handle:
            if self.format == "jsonl":
                return [json.loads(line) for line in handle if line.strip()]
            delimiter = "\t" if self.format == "tsv" else ","
            return list(csv.DictReader(handle, delimiter=delimiter))
