"""The typed shapes of the params file's sections (pydantic), shared by the families and the loader.

Strict: a bool is not an int and "3" is not a number (but ``1e6`` is: ``pipelines.params`` reads
YAML floats without a dot); unknown keys are errors. Cross-section rules live in ``pipelines.params``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
PRECISIONS = ("fp32", "fp16", "bf16")


class Section(BaseModel):
    """A params mapping: typed keys, no unknown ones, values kept as read."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class FamilyRuns(Section):
    """``study.<family>``: which datasets and models of the family the study runs."""

    datasets: list[str]
    models: list[str]


class Holdout(Section):
    """``data.<dataset>.validation``: training images held out for model selection."""

    size: PositiveInt
    seed: NonNegativeInt


class DataSection(Section):
    """``data.<dataset>``: where an archived dataset comes from (embedded ones: only ``options``)."""

    url: Optional[str] = None
    md5: Optional[str] = None
    sha256: Optional[str] = None
    timeout: Optional[PositiveFloat] = None
    retries: Optional[NonNegativeInt] = None
    options: dict[str, Any] = {}
    validation: Optional[Holdout] = None


class Samples(Section):
    """``<family>.<dataset>.samples``: the sample grid FID uses, and extra grids at other temperatures."""

    num: PositiveInt
    temperature: PositiveFloat
    temperatures: list[PositiveFloat] = []


class ModelSection(BaseModel):
    """``<family>.<dataset>.models.<model>``: config overrides of one model, and its precision."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    precision: Optional[Literal["fp32", "fp16", "bf16"]] = None

    @property
    def overrides(self) -> dict[str, Any]:
        """The config fields this model changes."""
        return dict(self.model_extra or {})


class FamilySection(Section):
    """``<family>.<dataset>``: the architecture preset and overrides, per-model sections, trainer
    settings (``sdn.training.TrainConfig`` fields but the seed), samples, and what was tuned."""

    config: str
    overrides: dict[str, Any] = {}
    models: dict[str, ModelSection]
    train: dict[str, Any]
    samples: Samples
    tuned: list[str] = []


class StudySection(Section):
    """``study``: name, launcher, seeds, parallelism and the stages' item lists (families are added
    by ``pipelines.params``)."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_]+$")]
    launcher: str
    seeds: Annotated[list[NonNegativeInt], Field(min_length=1)]
    runs_at_once: Union[PositiveInt, Literal["auto"]]  # auto: one per core, at most one per seed
    threads_per_run: Optional[PositiveInt]
    downloads: list[str]
    fid_downloads: list[Literal["inception"]]
    embedded: list[str]

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        return seeds

    @field_validator("launcher")
    @classmethod
    def _python_or_torchrun(cls, launcher: str) -> str:
        words = launcher.split()
        if words != ["python"] and not any(word.rsplit("/", 1)[-1] == "torchrun" for word in words):
            raise ValueError("must be 'python' or a command that runs torchrun (e.g. 'torchrun --standalone "
                             "--nproc_per_node=8', or 'srun … torchrun --nnodes=… --rdzv_endpoint=…' on a "
                             "cluster: docs/pipeline.md)")
        return launcher


class FidWeights(Section):
    """``fid.weights``: the Inception weights file and its checksum (sha256 prefix, torch.hub style)."""

    url: Annotated[str, Field(pattern=r"^https?://")]
    sha256_prefix: Optional[Annotated[str, Field(pattern=r"^[0-9a-fA-F]{8,64}$")]]
    sha256: Optional[Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]]
    dvc_dep: str


class Kid(Section):
    """``fid.kid``: torch-fidelity KID settings."""

    subsets: PositiveInt
    subset_size: Annotated[int, Field(ge=2)]
    reference_features: PositiveInt
    seed: NonNegativeInt


class Fid(Section):
    """``fid``: FID/KID of the density models' samples."""

    weights_path: str
    num_samples: PositiveInt
    batch_size: PositiveInt
    weights: FidWeights
    kid: Kid


class ClaimRule(Section):
    """``report.claims.<family>``: the verdict rule's margin δ and the CI half-width target of the
    family's claims, in the unit of their metric (bpd, score)."""

    margin: PositiveFloat  # a CI of sdn − baseline inside (−δ, +δ): "no difference beyond ±δ"
    half_width_target: PositiveFloat  # claim rows whose CI half-width exceeds it are marked


class Report(Section):
    """``report``: where the report goes, the confidence level of its intervals and the verdict
    rule's settings per family (``pipelines.params`` requires one ``claims`` entry per family)."""

    dir: str
    confidence: Annotated[float, Field(gt=0, lt=1)]
    claims: dict[str, ClaimRule]


NAME = re.compile(r"^[A-Za-z0-9_]+$")
