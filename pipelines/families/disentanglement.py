"""The disentanglement family: the vanilla VAE with a CNN or SDN decoder on a factor dataset,
scored by the disentanglement_lib metrics and the count of active latent dimensions."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from pydantic import field_validator
from torch import nn

from pipelines.families import EVAL_SEED, Family
from pipelines.reporting.disentanglement import REPORT
from pipelines.schema import FamilySection, PositiveInt, Section
from sdn.images import save_image_grid
from sdn.metrics.disentanglement import METRIC_NAMES

DECODERS = ("cnn", "sdn")  # the vanilla VAE's decoder kinds
RECONSTRUCTED = 8  # inputs shown above their reconstructions (the same grid points for every run)


class MetricsSection(Section):
    """``disentanglement.<dataset>.metrics``: keyword arguments of ``sdn.metrics.disentanglement.compute_all``."""

    num_train: Optional[PositiveInt] = None
    num_eval: Optional[PositiveInt] = None
    batch_size: PositiveInt = 64
    encode_batch_size: Optional[PositiveInt] = None
    metrics: list[str] = list(METRIC_NAMES)

    @field_validator("metrics")
    @classmethod
    def _known(cls, metrics: list[str]) -> list[str]:
        unknown = [m for m in metrics if m not in METRIC_NAMES]
        if unknown or not metrics:
            raise ValueError(f"{f'unknown metric(s) {unknown}' if unknown else 'no metric'}; allowed: "
                             f"{list(METRIC_NAMES)} (the metric files of sdn/metrics/disentanglement)")
        return metrics


class DisentanglementSection(FamilySection):
    """``disentanglement.<dataset>``."""

    metrics: MetricsSection


class Disentanglement(Family):
    """The vanilla VAE of the paper's disentanglement experiments (``sdn.models.vanilla_vae``)."""

    name = "disentanglement"
    has_factors = True
    stages = ("train", "evaluate")
    mlflow_text = ("Disentanglement: one run per trained (dataset, model, seed) of the `disentanglement` "
                   "section. `train/*` is the training curve (step = optimizer step), `test/*` the evaluate "
                   "stage's disentanglement metrics of the encoder mean and the active latent dimensions.")
    plot_metrics = {"loss": "train loss"}
    report = REPORT
    section = DisentanglementSection

    def model_names(self) -> tuple[str, ...]:
        return DECODERS

    def presets(self) -> Mapping[str, Any]:
        from sdn.models.vanilla_vae import PRESETS

        return PRESETS

    def config_fields(self) -> tuple[str, ...]:
        import dataclasses

        from sdn.models.vanilla_vae import VAEConfig

        return tuple(f.name for f in dataclasses.fields(VAEConfig))

    def model_config(self, preset: str, overrides: Mapping[str, Any]) -> Any:
        from sdn.models.vanilla_vae import get_config

        return get_config(preset, **overrides)

    def build(self, config: Any, model: str, device: Optional[str] = None) -> nn.Module:
        from contextlib import nullcontext

        from sdn.models.vanilla_vae import build_vanilla_vae

        with torch.device(device) if device is not None else nullcontext():
            return build_vanilla_vae(config, model)

    def write_extras(self, study, run, model: nn.Module, paths) -> list[Path]:
        """``RECONSTRUCTED`` training inputs (top row) above their decoded posterior means (bottom
        row); the inputs are a fixed draw, so runs can be compared image by image."""
        dataset = study.dataset(run.dataset, "train")
        indices = np.random.default_rng(0).choice(len(dataset), RECONSTRUCTED, replace=False)
        inputs = torch.stack([dataset[int(i)][0] for i in indices])
        recons = model.reconstruct(inputs)
        save_image_grid(torch.cat([inputs, recons]), paths.reconstructions, nrow=RECONSTRUCTED, padding=1)
        return [paths.reconstructions]

    def evaluate(self, study, run, model: nn.Module, device: Any) -> dict[str, Any]:
        """The configured disentanglement metrics of the posterior mean, with the settings used, and the
        active-dimension count that tells a collapsed model from a disentangled one."""
        from sdn.metrics.active_units import compute_active_units
        from sdn.metrics.disentanglement import compute_all

        def representation(images: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model.encode_mean(torch.from_numpy(np.ascontiguousarray(images)).to(device)).cpu().numpy()

        cfg = study.section(run).metrics.model_dump(exclude_unset=True)
        data = study.ground_truth(run.dataset)
        scores = compute_all(data, representation, seed=EVAL_SEED, **cfg)
        scores.update(compute_active_units(data, representation, seed=EVAL_SEED,
                                           num_points=max(2, cfg.get("num_train") or 10000),
                                           batch_size=cfg.get("encode_batch_size") or cfg.get("batch_size", 64)))
        return scores


DISENTANGLEMENT = Disentanglement()
