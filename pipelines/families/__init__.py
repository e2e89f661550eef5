"""The study's model families behind one small interface, so stages dispatch on it, not on strings.

A family (density, disentanglement) says which datasets and models it takes, how its params section
looks, how a config is resolved and a model built, what its runs write besides the common outputs,
and how a trained model is scored, which DVC stages a run goes through, what its MLflow runs hold and
which curves its plots draw. A new family is one module here plus one entry in ``families()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from pydantic import BaseModel
from torch import nn

EVAL_SEED = 0  # every model is scored with the same seed (disentanglement_lib does the same)

if TYPE_CHECKING:
    from pipelines.reporting import FamilyReport
    from pipelines.runs import Run, RunPaths


class Family:
    """What the stages need from a model family; subclasses fill in every method."""

    name: str
    has_factors: bool  # factor datasets (disentanglement) or plain image datasets (density)
    section: type[BaseModel]  # the params section ``<family>.<dataset>``
    report: "FamilyReport"  # its tables, figures, claims and run checks in the study report
    stages: tuple[str, ...] = ("train", "evaluate")  # the per-run DVC stages: all done = MLflow run complete
    # What its MLflow runs hold, for the experiment's description (pipelines.tracking.experiment_description).
    mlflow_text: str = "one run per trained (dataset, model, seed); `train/*` is the training curve."
    # Curve columns the DVC plots draw (``reports/plots/<dataset>.csv``), with their labels.
    plot_metrics: Mapping[str, str] = {"loss": "train loss"}

    def model_names(self) -> tuple[str, ...]:
        """The model names the study may list under ``study.<family>.models``."""
        raise NotImplementedError

    def presets(self) -> Mapping[str, Any]:
        """Named architecture configs (``<family>.<dataset>.config``)."""
        raise NotImplementedError

    def model_config(self, preset: str, overrides: Mapping[str, Any]) -> Any:
        """The preset with ``overrides`` applied (the library config validates the values)."""
        raise NotImplementedError

    def config_fields(self) -> tuple[str, ...]:
        """Names that ``overrides`` may set."""
        raise NotImplementedError

    def build(self, config: Any, model: str, device: Optional[str] = None) -> nn.Module:
        """The untrained model, initialised from ``config.seed`` (``device="meta"``: no memory)."""
        raise NotImplementedError

    def validation_fn(self, study: Any, run: "Run") -> Optional[Callable[[nn.Module], dict[str, float]]]:
        """The trainer's ``eval_fn`` (validation scores on the curve, for ``keep_best``), or None."""
        return None

    def write_extras(self, study: Any, run: "Run", model: nn.Module, paths: "RunPaths") -> list[Path]:
        """Outputs of a finished training run besides samples and metrics (logged as artifacts)."""
        return []

    def evaluate(self, study: Any, run: "Run", model: nn.Module, device: Any) -> dict[str, Any]:
        """The test metrics of a trained model."""
        raise NotImplementedError


def families() -> dict[str, Family]:
    """Every family by name, in the study's order."""
    from pipelines.families.density import DENSITY
    from pipelines.families.disentanglement import DISENTANGLEMENT

    return {family.name: family for family in (DENSITY, DISENTANGLEMENT)}
