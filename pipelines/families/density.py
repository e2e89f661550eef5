"""The density family: the hierarchical VAE with a registered decoder-block set (``baselines/``),
scored by ELBO and importance-weighted bits/dim, with validation bpd on the training curve."""

from __future__ import annotations

from typing import Annotated, Any, Mapping, Optional

import numpy as np
from pydantic import Field
from torch import nn
from torch.utils.data import Subset

from pipelines.families import EVAL_SEED, Family
from pipelines.reporting.density import REPORT
from pipelines.schema import FamilySection, PositiveInt, Samples, Section


class DensityEval(Section):
    """``density.<dataset>.eval``: test scoring (K = ``iw_samples`` of the IW bound). ``batch_size``
    images are encoded at a time (their posterior features stay alive while their samples run);
    ``iw_chunk_size`` bounds the (image x sample) pairs of one forward pass (the memory of the IW
    and validation passes)."""

    batch_size: PositiveInt
    iw_samples: PositiveInt
    max_examples: Optional[Annotated[int, Field(ge=1)]]
    iw_chunk_size: PositiveInt = 256


class DensitySamples(Samples):
    """``density.<dataset>.samples``: also the per-GPU batch of the FID samples (``batch_size``,
    default ``fid.batch_size``, the Inception batch); sample batch j is drawn with a generator seeded
    by (seed, j), so the samples depend on it but not on the number of ranks."""

    batch_size: Optional[PositiveInt] = None


class DensitySection(FamilySection):
    """``density.<dataset>``."""

    eval: DensityEval
    samples: DensitySamples


class Density(Family):
    """The hierarchical VAE of the paper's density experiments (``sdn.models.hvae``)."""

    name = "density"
    has_factors = False
    stages = ("train", "evaluate", "fid")
    mlflow_text = ("Density estimation: one run per trained (dataset, model, seed) of the `density` section. "
                   "`train/*` is the training curve (step = optimizer step), `validation/*` the validation "
                   "evaluations during training, `test/*` the evaluate stage's test metrics, `fid/*` FID and "
                   "KID of the model's samples.")
    plot_metrics = {"bpd": "train bpd", "val_elbo_bpd": "validation bpd"}
    report = REPORT
    section = DensitySection

    def model_names(self) -> tuple[str, ...]:
        import baselines  # noqa: F401  (each file registers its decoder blocks)
        from sdn.models.blocks import registered_blocks

        return tuple(registered_blocks())

    def presets(self) -> Mapping[str, Any]:
        from sdn.models.hvae import PRESETS

        return PRESETS

    def config_fields(self) -> tuple[str, ...]:
        import dataclasses

        from sdn.models.hvae import HVAEConfig

        return tuple(f.name for f in dataclasses.fields(HVAEConfig))

    def model_config(self, preset: str, overrides: Mapping[str, Any]) -> Any:
        from sdn.models.hvae import get_config

        return get_config(preset, **overrides)

    def build(self, config: Any, model: str, device: Optional[str] = None) -> nn.Module:
        import baselines  # noqa: F401  (each file registers its decoder blocks)
        from sdn.models.hvae import build_hvae

        return build_hvae(config, model, device=device)

    def validation_fn(self, study, run):
        """ELBO bits/dim of the whole validation split (one posterior sample per image, noise seeded
        per image), so the curve shows held-out progress and ``keep_best: elbo_bpd`` can select on
        it. Called on every rank under torchrun: the split is sharded over the ranks."""
        from sdn.scores import evaluate_bpd

        cfg = study.section(run).eval
        validation = study.dataset(run.dataset, "validation")

        def evaluate(model: nn.Module) -> dict[str, float]:
            scores = evaluate_bpd(model, validation, batch_size=cfg.batch_size, num_samples=1,
                                  chunk_size=cfg.iw_chunk_size, seed=0, progress=False)
            return {"elbo_bpd": float(scores["elbo_bpd"])}

        return evaluate

    def evaluate(self, study, run, model: nn.Module, device: Any) -> dict[str, Any]:
        """ELBO and IW bits/dim of the test split (or its first ``max_examples`` images), and the ELBO
        of as many training images (a fixed draw, no augmentation) for the train − test gap.
        Under torchrun every rank calls this: the images are sharded over the ranks."""
        from sdn.scores import evaluate_bpd

        cfg = study.section(run).eval
        test = study.dataset(run.dataset, "test")
        if cfg.max_examples is not None and cfg.max_examples < len(test):
            test = Subset(test, range(cfg.max_examples))
        scores = evaluate_bpd(model, test, batch_size=cfg.batch_size, num_samples=cfg.iw_samples,
                              chunk_size=cfg.iw_chunk_size, seed=EVAL_SEED, device=device, progress=False)
        train = study.dataset(run.dataset, "train")
        picked = np.sort(np.random.default_rng(EVAL_SEED).choice(len(train), min(len(test), len(train)),
                                                                 replace=False))
        train_scores = evaluate_bpd(model, Subset(train, picked.tolist()), batch_size=cfg.batch_size,
                                    num_samples=1, chunk_size=cfg.iw_chunk_size, seed=EVAL_SEED,
                                    device=device, progress=False)
        return {"elbo_bpd": float(scores["elbo_bpd"]), "iw_bpd": float(scores["iw_bpd"]),
                "iw_samples": int(scores["num_samples"]), "num_examples": int(scores["num_images"]),
                "train_elbo_bpd": float(train_scores["elbo_bpd"]),
                "train_examples": int(train_scores["num_images"])}


DENSITY = Density()
