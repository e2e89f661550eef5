"""The disentanglement metrics, found by file name: each metric module of this package declares a ``METRIC``.

A metric is one file ``sdn/metrics/disentanglement/<name>.py`` holding its compute function and, beside
it, ``METRIC = MetricSpec(name="<name>", ...)``: how the shared sample counts become its keyword
arguments, the scores it returns (direction, chance level) and which of them are headline scores.
Every module of the package except :data:`SUPPORT_MODULES` (and ``_private`` ones) is a metric; nothing
else lists metrics (docs/extending.md). Scores are keyed ``"<metric>.<score>"`` outside the metric.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

PACKAGE = "sdn.metrics.disentanglement"
SUPPORT_MODULES = ("all_metrics", "registry", "utils")  # the package's modules that are not metrics
PAPER_METRICS = ("beta_vae", "factor_vae", "mig", "dci", "sap")  # the paper's order; other metrics follow, A-Z


@dataclass(frozen=True)
class SampleCounts:
    """The sample counts that ``compute_all`` shares among the metrics of one evaluation (validated)."""

    num_train: int  # every metric's training sample
    num_eval: int  # held-out points (BetaVAE/FactorVAE num_eval, DCI/SAP num_test)
    batch_size: int  # observations per training point of BetaVAE / FactorVAE
    encode_batch_size: int  # observations per encoder call, and the draw batch of the sample-based metrics


def zero(num_factors: Optional[int]) -> float:
    """Chance level of a gap or an entropy-based score: an uninformative code scores 0."""
    return 0.0


def uniform_guess(num_factors: Optional[int]) -> Optional[float]:
    """Chance level of a classifier that guesses which of ``num_factors`` factors was fixed: 1/K."""
    return 1.0 / num_factors if num_factors else None


@dataclass(frozen=True)
class Score:
    """One score a metric returns: its direction and its chance level (the score of a representation
    carrying no information) as a function of the ground-truth factor count, None where not known."""

    higher_is_better: bool = True
    chance: Optional[Callable[[Optional[int]], Optional[float]]] = None


@dataclass(frozen=True)
class MetricSpec:
    """Everything the project knows about one metric, declared beside its compute function."""

    name: str  # the file name, and the prefix of its scores' keys
    compute: Callable[..., Mapping[str, float]]  # compute(ground_truth_data, representation_fn, seed, **arguments)
    arguments: Callable[[SampleCounts], Mapping[str, Any]]  # the shared counts as ``compute``'s keyword arguments
    scores: Mapping[str, Score]  # every score ``compute`` returns, in its order
    headline: tuple[str, ...]  # the scores the report's tables show and its claims judge

    def problems(self) -> list[str]:
        """What makes this spec unusable (empty when it is valid)."""
        out = []
        if not (isinstance(self.name, str) and self.name.isidentifier()):
            out.append(f"name must be a Python identifier (the file name), got {self.name!r}")
        for field in ("compute", "arguments"):
            if not callable(getattr(self, field)):
                out.append(f"{field} must be callable, got {getattr(self, field)!r}")
        if not isinstance(self.scores, Mapping) or not self.scores or not all(
                isinstance(k, str) and isinstance(v, Score) for k, v in self.scores.items()):
            out.append(f"scores must be a non-empty mapping of score name -> Score, got {self.scores!r}")
        elif not isinstance(self.headline, tuple) or not set(self.headline) <= set(self.scores):
            out.append(f"headline must be a tuple of its scores {list(self.scores)}, got {self.headline!r}")
        return out


def _file(name: str) -> str:
    return f"{PACKAGE.replace('.', '/')}/{name}.py"


def _load(name: str) -> MetricSpec:
    """The valid ``METRIC`` of module ``name``; an ImportError naming the file otherwise."""
    try:
        module = importlib.import_module(f"{PACKAGE}.{name}")
    except (TypeError, ValueError) as error:
        raise ImportError(f"{_file(name)}: its metric spec could not be built: {error}") from error
    spec = getattr(module, "METRIC", None)
    if not isinstance(spec, MetricSpec):
        raise ImportError(f"{_file(name)} is not a valid metric: it must define METRIC = MetricSpec(name={name!r}, "
                          f"...) (docs/extending.md), got METRIC = {spec!r}; helpers that are no metric belong in "
                          f"utils.py")
    problems = spec.problems()
    if spec.name != name:
        problems.append(f"name is {spec.name!r}, but a metric's file is named after it: rename the file to "
                        f"{_file(spec.name)} or name the metric {name!r}")
    if problems:
        raise ImportError(f"{_file(name)}: invalid METRIC: " + "; ".join(problems))
    return spec


@functools.cache
def metrics() -> Mapping[str, MetricSpec]:
    """Every metric of the package by name: :data:`PAPER_METRICS` in the paper's order, then the others A-Z."""
    package = importlib.import_module(PACKAGE)
    names = [i.name for i in pkgutil.iter_modules(package.__path__)
             if i.name not in SUPPORT_MODULES and not i.name.startswith("_")]
    names.sort(key=lambda n: (PAPER_METRICS.index(n) if n in PAPER_METRICS else len(PAPER_METRICS), n))
    return MappingProxyType({name: _load(name) for name in names})


def _score(key: str) -> Optional[Score]:
    """The declared ``Score`` of ``"<metric>.<score>"``, None for any other key."""
    metric, _, score = key.partition(".")
    spec = metrics().get(metric)
    return spec.scores.get(score) if spec is not None else None


def headline_scores() -> tuple[str, ...]:
    """The headline ``"<metric>.<score>"`` keys of every metric, in the metrics' order."""
    return tuple(f"{name}.{score}" for name, spec in metrics().items() for score in spec.headline)


def higher_is_better(key: str) -> bool:
    """Direction of the score ``"<metric>.<score>"`` (a KeyError for a key no metric declares)."""
    score = _score(key)
    if score is None:
        raise KeyError(f"{key!r} is not a declared disentanglement score (<metric>.<score> of {list(metrics())})")
    return score.higher_is_better


def chance_level(key: str, num_factors: Optional[int]) -> Optional[float]:
    """The declared chance level of ``"<metric>.<score>"`` with ``num_factors`` ground-truth factors;
    None for a score without one, an unknown key, or a level that needs the unknown factor count."""
    score = _score(key)
    return None if score is None or score.chance is None else score.chance(num_factors)

