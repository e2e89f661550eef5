"""Disentanglement metrics after disentanglement_lib: BetaVAE, FactorVAE, MIG, DCI, SAP, and any other
metric file of this package (one file each, found by file name: ``registry``; docs/extending.md).

Each ``compute_<metric>(ground_truth_data, representation_fn, seed, **counts)`` samples from a
``GroundTruthData`` with ``np.random.RandomState(seed)``, encodes the uint8 observations with
``representation_fn`` (N, C, H, W) -> (N, D), and returns ``dict[str, float]`` scores.
"""

from sdn.metrics.disentanglement.all_metrics import compute_all
from sdn.metrics.disentanglement.beta_vae import compute_beta_vae
from sdn.metrics.disentanglement.dci import compute_dci
from sdn.metrics.disentanglement.factor_vae import compute_factor_vae
from sdn.metrics.disentanglement.mig import compute_mig
from sdn.metrics.disentanglement.registry import (MetricSpec, SampleCounts, Score, chance_level, headline_scores,
                                                  higher_is_better, metrics)
from sdn.metrics.disentanglement.sap import compute_sap

METRIC_NAMES: tuple[str, ...] = tuple(metrics())  # every registered metric, in the registry's order

__all__ = [
    "METRIC_NAMES",
    "MetricSpec",
    "SampleCounts",
    "Score",
    "chance_level",
    "compute_all",
    "compute_beta_vae",
    "compute_dci",
    "compute_factor_vae",
    "compute_mig",
    "compute_sap",
    "headline_scores",
    "higher_is_better",
    "metrics",
]
