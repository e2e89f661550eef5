"""Run the registered disentanglement metrics with one call and return flat ``metric.score`` keys.

Each metric gets its own ``np.random.RandomState(seed)``, as in disentanglement_lib (evaluation
seed 0). ``num_train`` / ``num_eval`` scale every metric's sample counts down (or up) together so
that a small study can afford them (each metric's ``MetricSpec.arguments`` says how it uses them);
the counts used are returned under ``settings.*`` and a warning says when they are below the
library defaults, since scores are then not comparable with published numbers.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

from sdn.data.ground_truth import GroundTruthData, RepresentationFn
from sdn.metrics.disentanglement.registry import SampleCounts, metrics as registered
from sdn.metrics.disentanglement.utils import check_positive_int

DEFAULT_NUM_TRAIN = 10000  # every metric's training sample (and FactorVAE's variance estimate)
DEFAULT_NUM_EVAL = 5000  # BetaVAE/FactorVAE num_eval, DCI/SAP num_test


def compute_all(
    ground_truth_data: GroundTruthData,
    representation_fn: RepresentationFn,
    seed: int,
    num_train: int | None = None,
    num_eval: int | None = None,
    batch_size: int = 64,
    metrics: Optional[Sequence[str]] = None,
    encode_batch_size: int | None = None,
) -> dict[str, float]:
    """The requested metrics (default: every registered one) as ``{"<metric>.<score>": value}``, in the
    registry's order, plus the ``settings.*`` used.

    ``num_train`` (default 10000) sets every metric's training sample and FactorVAE's variance
    estimate; ``num_eval`` (default 5000) sets BetaVAE/FactorVAE ``num_eval`` and DCI/SAP
    ``num_test``. ``batch_size`` is BetaVAE/FactorVAE's observations per training point;
    ``encode_batch_size`` (default: ``batch_size``) is how many observations the encoder gets at
    once, and the batch in which MIG/DCI/SAP draw their samples (which only splits the random
    stream differently).
    """
    specs = registered()
    chosen = list(specs) if metrics is None else list(metrics)
    if not chosen or any(name not in specs for name in chosen):
        raise ValueError(f"metrics must be a non-empty subset of {list(specs)}, got {chosen}")
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
    counts = SampleCounts(num_train=num_train, num_eval=num_eval, batch_size=batch_size, encode_batch_size=encode)
    results: dict[str, float] = {}
    for name, spec in specs.items():
        if name in chosen:
            scores = spec.compute(ground_truth_data, representation_fn, seed, **spec.arguments(counts))
            if set(scores) != set(spec.scores):
                raise ValueError(f"metric {name!r} returned scores {list(scores)} but its METRIC declares "
                                 f"{list(spec.scores)} (sdn/metrics/disentanglement/{name}.py)")
            results.update({f"{name}.{key}": float(value) for key, value in scores.items()})
    results["settings.num_train"] = float(num_train)
    results["settings.num_eval"] = float(num_eval)
    results["settings.batch_size"] = float(batch_size)
    results["settings.encode_batch_size"] = float(encode)
    return results
