"""The disentanglement metric registry: ``compute_all`` gives the numbers of the direct calls with the
arguments the study used before the registry, the declarations (headline, direction, chance level) are
those the report hard-coded before, a bad metric file or metric name is named, and the example metric of
docs/extending.md runs as written."""

from __future__ import annotations

import copy
import importlib
import sys

import numpy as np
import pytest
import yaml

import pipeline_harness as harness
from pipelines.study import StudyError, validate
from sdn.metrics.disentanglement import (chance_level, compute_all, compute_beta_vae, compute_dci, compute_factor_vae,
                                         compute_mig, compute_sap, headline_scores, higher_is_better, registry)
from test_disentanglement_metrics import TinyFactors, decode

pytestmark = [pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning"),
              pytest.mark.filterwarnings("ignore:disentanglement metrics use reduced sample counts")]

MIXING = np.array([[1.0, 0.3, 0.0, -0.5], [0.0, -2.0, 0.1, 0.0], [0.2, 0.0, 0.5, 1.0]])  # 3 factors -> 4 codes


def mixed(images: np.ndarray) -> np.ndarray:
    """Four codes, each a fixed linear mix of the three factors."""
    return decode(images) @ MIXING


def test_compute_all_reproduces_the_direct_calls_bit_for_bit():
    data, seed, n, e, b, enc = TinyFactors([3, 4, 5]), 3, 120, 60, 8, 16
    direct = {  # the keyword arguments compute_all passed before the registry, written out
        "beta_vae": compute_beta_vae(data, mixed, seed, batch_size=b, num_train=n, num_eval=e, encode_batch_size=enc),
        "factor_vae": compute_factor_vae(data, mixed, seed, batch_size=b, num_train=n, num_eval=e,
                                         num_variance_estimate=n, encode_batch_size=enc),
        "mig": compute_mig(data, mixed, seed, num_train=n, batch_size=enc),
        "dci": compute_dci(data, mixed, seed, num_train=n, num_test=e, batch_size=enc),
        "sap": compute_sap(data, mixed, seed, num_train=n, num_test=e, batch_size=enc),
    }
    expected = {f"{name}.{key}": float(value) for name, scores in direct.items() for key, value in scores.items()}
    expected.update({"settings.num_train": n, "settings.num_eval": e, "settings.batch_size": b,
                     "settings.encode_batch_size": enc})
    got = compute_all(data, mixed, seed, num_train=n, num_eval=e, batch_size=b, encode_batch_size=enc)
    assert list(got) == list(expected) and got == expected
    # without encode_batch_size the sample-based metrics draw in batches of batch_size
    only_mig = compute_all(data, mixed, seed, num_train=n, num_eval=e, batch_size=b, metrics=["mig"])
    assert only_mig["mig.discrete_mig"] == compute_mig(data, mixed, seed, num_train=n, batch_size=b)["discrete_mig"]


def _chance_before_the_registry(key: str, num_factors: int | None) -> float | None:
    """``pipelines/reporting/claims.chance_level`` as it was written before the registry."""
    if key.startswith(("beta_vae.", "factor_vae.")) and key.endswith("accuracy"):
        return 1.0 / num_factors if num_factors else None
    if key in ("mig.discrete_mig", "sap.SAP_score", "dci.disentanglement", "dci.completeness"):
        return 0.0
    return None


def test_declarations_are_what_the_study_used_before_the_registry():
    specs = registry.metrics()
    assert tuple(specs) == ("beta_vae", "factor_vae", "mig", "dci", "sap") == registry.PAPER_METRICS
    assert headline_scores() == ("beta_vae.eval_accuracy", "factor_vae.eval_accuracy", "mig.discrete_mig",
                                 "dci.disentanglement", "dci.completeness", "dci.informativeness_test",
                                 "sap.SAP_score")
    keys = [f"{name}.{score}" for name, spec in specs.items() for score in spec.scores]
    assert all(higher_is_better(key) for key in keys)
    for key in [*keys, "iw_bpd", "active_units.count", "nope.score"]:
        for num_factors in (None, 4, 5):
            assert chance_level(key, num_factors) == _chance_before_the_registry(key, num_factors), (key, num_factors)
    with pytest.raises(KeyError, match="nope.score"):
        higher_is_better("nope.score")


@pytest.fixture
def add_metric_file(tmp_path, monkeypatch):
    """Adds a module file to the metric package (through a second package folder) and forgets it after."""
    package = importlib.import_module(registry.PACKAGE)
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    added = []

    def add(name: str, text: str) -> None:
        (tmp_path / f"{name}.py").write_text(text)
        added.append(name)
        importlib.invalidate_caches()
        registry.metrics.cache_clear()

    yield add
    registry.metrics.cache_clear()
    for name in added:
        sys.modules.pop(f"{registry.PACKAGE}.{name}", None)
        if hasattr(package, name):
            delattr(package, name)


SPEC = ('from sdn.metrics.disentanglement.registry import MetricSpec, Score\n'
        'METRIC = MetricSpec(name={name!r}, compute=lambda *a, **k: {{"s": 1.0}}, arguments=lambda c: {{}},\n'
        '                    scores={{"s": Score()}}, headline={headline!r})\n')


@pytest.mark.parametrize("file, text, match", [
    ("helper", "TWO = 2\n", r"sdn/metrics/disentanglement/helper\.py is not a valid metric: it must define METRIC"),
    ("mine", SPEC.format(name="other", headline=("s",)),
     r"sdn/metrics/disentanglement/mine\.py: invalid METRIC: name is 'other'.*rename the file"),
    ("mine", SPEC.format(name="mine", headline=("t",)),
     r"sdn/metrics/disentanglement/mine\.py: invalid METRIC: headline must be a tuple of its scores \['s'\]"),
    ("mine", "raise ValueError('no spec')\n", r"sdn/metrics/disentanglement/mine\.py: .*no spec"),
])
def test_a_bad_metric_file_is_named(add_metric_file, file, text, match):
    add_metric_file(file, text)
    with pytest.raises(ImportError, match=match):
        registry.metrics()


def test_an_unknown_metric_in_params_names_the_key_and_the_metrics():
    params = copy.deepcopy(yaml.safe_load((harness.ROOT / "params.yaml").read_text()))
    params["disentanglement"]["dsprites_procedural"]["metrics"]["metrics"] = ["mig", "mgi"]
    with pytest.raises(StudyError) as error:
        validate(params)
    assert "disentanglement.dsprites_procedural.metrics.metrics: unknown metric(s) ['mgi']" in str(error.value)
    assert "['beta_vae', 'factor_vae', 'mig', 'dci', 'sap']" in str(error.value)
    with pytest.raises(ValueError, match=r"non-empty subset of \['beta_vae'.*got \['mgi'\]"):
        compute_all(TinyFactors([3, 4]), decode, 0, metrics=["mgi"])


def test_the_documented_example_runs_as_written(add_metric_file):
    """docs/extending.md's metric file is found, ordered after the paper's, declared, and its score equals
    a naive Pearson computation on the same draw (1 for a code that is an affine map of each factor)."""
    name = harness.DOCUMENTED_METRIC
    add_metric_file(name, harness.documented_example("extending.md", "## Add a disentanglement metric"))
    assert tuple(registry.metrics()) == (*registry.PAPER_METRICS, name)
    assert headline_scores()[-1] == f"{name}.score" and chance_level(f"{name}.score", 5) == 0.0
    data = TinyFactors([3, 4, 5])
    scores = compute_all(data, mixed, 0, num_train=200, num_eval=50, batch_size=8, metrics=["mig", name])
    assert list(scores)[:2] == ["mig.discrete_mig", f"{name}.score"]
    assert scores["mig.discrete_mig"] == compute_mig(data, mixed, 0, num_train=200, batch_size=8)["discrete_mig"]

    random_state = np.random.RandomState(0)  # the metric's draw: 25 batches of 8 factor vectors
    factors = np.concatenate([data.sample_factors(8, random_state) for _ in range(25)]).astype(np.float64)
    codes = factors @ MIXING

    def pearson(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a - a.mean(), b - b.mean()
        return float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))

    naive = np.mean([max(abs(pearson(codes[:, d], factors[:, k])) for d in range(4)) for k in range(3)])
    assert scores[f"{name}.score"] == pytest.approx(naive, rel=1e-12)
    affine = compute_all(data, lambda x: decode(x)[:, ::-1] * [2.0, -1.0, 0.5] + 1.0, 0, num_train=200,
                         batch_size=8, metrics=[name])
    assert affine[f"{name}.score"] == pytest.approx(1.0, abs=1e-12)
