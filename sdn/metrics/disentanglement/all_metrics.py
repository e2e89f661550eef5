"""Run all five disentanglement metrics with one call and return flat ``metric.score`` keys.

Each metric gets its own ``np.random.RandomState(seed)``, as in disentanglement_lib (evaluation
seed 0). ``num_train`` / ``num_eval`` scale every metric's sample counts down (or up) together so
that a small study can afford them; the counts used are returned under ``settings.*`` and a
warning says when they are below the library defaults, since scores are then not comparable with
published numbers.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

from sdn.data.ground_truth import GroundTruthData, RepresentationFn
from sdn.metrics.disentanglement.beta_vae import compute_beta_vae
from sdn.metrics.disentanglement.dci import compute_dci
from sdn.metrics.disentanglement.factor_vae import compute_factor_vae
from sdn.metrics.disentanglement.mig import compute_mig
from sdn.metrics.disentanglement.sap import compute_sap
from sdn.metrics.disentanglement.utils import check_positive_int

METRIC_NAMES: list[str] = ["beta_vae", "factor_vae", "mig", "dci", "sap"]

METRIC_FUNCTIONS: dict[str, Callable[..., dict[str, float]]] = {
    "beta_vae": compute_beta_vae,
    "factor_vae": compute_factor_vae,
    "mig": compute_mig,
    "dci": compute_dci,
    "sap": compute_sap,
}

DEFAULT_NUM_TRAIN = 10000  # every metric's training sample (and FactorVAE's variance estimate)
DEFAULT_NUM_EVAL = 5000  # BetaVAE/FactorVAE num_eval, DCI/SAP num_test


def compute_all(
    ground_truth_data: GroundTruthData,
    representation_fn: RepresentationFn,
    seed: int,
    num_train: int | None = None,
    num_eval: int | None = None,
    batch_size: int = 64,
    metrics: Sequence[str] = METRIC_NAMES,
    encode_batch_size: int | None = None,
) -> dict[str, float]:
    """All requested metrics as ``{"<metric>.<score>": value}`` plus the ``settings.*`` used.

    ``num_train`` (default 10000) sets every metric's training sample and FactorVAE's variance
    estimate; ``num_eval`` (default 5000) sets BetaVAE/FactorVAE ``num_eval`` and DCI/SAP
    ``num_test``. ``batch_size`` is BetaVAE/FactorVAE's observations per training point;
    ``encode_batch_size`` (default: ``batch_size``) is how many observations the encoder gets at
    once, and the batch in which MIG/DCI/SAP draw their samples (which only splits the random
    stream differently).
    """
    unknown = [name for name in metrics if name not in METRIC_FUNCTIONS]
    if unknown or not metrics:
        raise ValueError(
            f"metrics must be a non-empty subset of {METRIC_NAMES}, got {list(metrics)}"
        )
    num_train = DEFAULT_NUM_TRAIN if num_train is None else num_train
    num_eval = DEFAULT_NUM_EVAL if num_eval is None else num_eval
    num_train = check_positive_int(num_train, "num_train", minimum=2)
    num_eval = check_positive_int(num_eval, "num_eval")
    if num_train < DEFAULT_NUM_TRAIN or num_eval < DEFAULT_NUM_EVAL:
        warnings.warn(
            f"disentanglement metrics use reduced sample counts (num_train={num_train}, "
            f"num_eval={num_eval}; library defaults {DEFAULT_NUM_TRAIN}/{DEFAULT_NUM_EVAL}): "
            "scores are noisier and not comparable with published numbers",
            stacklevel=2,
        )
    encode = check_positive_int(batch_size if encode_batch_size is None else encode_batch_size, "encode_batch_size")
    kwargs = {
        "beta_vae": dict(batch_size=batch_size, num_train=num_train, num_eval=num_eval,
                         encode_batch_size=encode),
        "factor_vae": dict(
            batch_size=batch_size, num_train=num_train, num_eval=num_eval,
            num_variance_estimate=num_train, encode_batch_size=encode,
        ),
        "mig": dict(num_train=num_train, batch_size=encode),
        "dci": dict(num_train=num_train, num_test=num_eval, batch_size=encode),
        "sap": dict(num_train=num_train, num_test=num_eval, batch_size=encode),
    }
    results: dict[str, float] = {}
    for name in METRIC_NAMES:
        if name in metrics:
            metric = METRIC_FUNCTIONS[name]
            scores = metric(ground_truth_data, representation_fn, seed, **kwargs[name])
            results.update({f"{name}.{key}": float(value) for key, value in scores.items()})
    results["settings.num_train"] = float(num_train)
    results["settings.num_eval"] = float(num_eval)
    results["settings.batch_size"] = float(batch_size)
    results["settings.encode_batch_size"] = float(encode)
    return results
