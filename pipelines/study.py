"""The study's params (``params.yaml``) checked and resolved before any stage trains anything.

``load_study(path)`` validates every section the stage scripts read: unknown dataset or model names,
missing keys and wrongly typed values raise :class:`StudyError` naming the key (e.g.
``density.patches32.train.lr``) and the allowed values. The stage scripts then ask the returned
:class:`Study` for resolved configs instead of reading the raw mapping themselves.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import yaml

FAMILIES = ("density", "disentanglement")
DISENTANGLEMENT_MODELS = ("cnn", "sdn")  # the vanilla VAE's decoder kinds
DENSITY_EVAL_KEYS = {"batch_size": int, "iw_samples": int, "max_examples": Optional[int]}
SAMPLE_KEYS = {"num": int, "temperature": float}
SAMPLE_OPTIONAL_KEYS = {"temperatures": list[float]}  # extra grids, as the paper shows them
HOLDOUT_KEYS = {"size": int, "seed": int}
PRECISION_KEY = "precision"  # in models.<model>: that run's precision (the official script's), over train.precision
FID_KEYS = {"weights_path": str, "num_samples": int, "batch_size": int, "weights": Mapping, "kid": Mapping}
FID_WEIGHTS_KEYS = {"url": str, "sha256_prefix": Optional[str], "sha256": Optional[str], "dvc_dep": str}
FID_KID_KEYS = {"subsets": int, "subset_size": int, "reference_features": int, "seed": int}
FID_DOWNLOADS = ("inception",)  # study.fid_downloads: the download_fid_weights stage's items
REPORT_KEYS = {"dir": str, "confidence": float}
DISENTANGLEMENT_METRIC_KEYS = {"num_train": Optional[int], "num_eval": Optional[int], "batch_size": int,
                               "encode_batch_size": Optional[int], "metrics": list[str]}
_NAME = re.compile(r"^[A-Za-z0-9_]+$")


class StudyError(ValueError):
    """A params problem, found before training; the message names the key and what is allowed."""


def archived_datasets() -> tuple[str, ...]:
    """Datasets fetched by a download stage (``sdn.data.DATASETS`` entries that are not embedded)."""
    from sdn.data import DATASETS

    return tuple(sorted(n for n, info in DATASETS.items() if not info.embedded))


def embedded_datasets() -> tuple[str, ...]:
    """Datasets built by their prepare stage from installed packages (no download stage)."""
    from sdn.data import DATASETS

    return tuple(sorted(n for n, info in DATASETS.items() if info.embedded))


def dataset_names(family: str) -> tuple[str, ...]:
    """Datasets a family may use: factor datasets for disentanglement, the others for density."""
    from sdn.data import DATASETS

    want_factors = family == "disentanglement"
    return tuple(sorted(n for n, info in DATASETS.items() if info.has_factors == want_factors))


def model_names(family: str) -> tuple[str, ...]:
    """Density models are the registered baselines; disentanglement models are decoder kinds."""
    if family == "density":
        from baselines import available_baselines

        return tuple(available_baselines())
    return DISENTANGLEMENT_MODELS


# -- generic type checks --------------------------------------------------------------------------

def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if origin in (tuple, list, Sequence):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return f"list of {_type_name(args[0]) if args else 'values'}"
    if origin in (dict, Mapping):
        return "mapping"
    return getattr(hint, "__name__", str(hint))


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin in (tuple, list, Sequence):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value) if args else isinstance(value, (list, tuple))
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return isinstance(value, Mapping)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def check_value(path: str, value: Any, hint: Any) -> None:
    """Raise :class:`StudyError` unless ``value`` has type ``hint`` (int is not bool; float accepts int)."""
    if not _matches(value, hint):
        raise StudyError(f"{path} must be {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def check_mapping(path: str, value: Any, schema: Mapping[str, Any], required: bool = True) -> None:
    """``value`` must be a mapping with keys from ``schema`` (all of them if ``required``), typed as given."""
    if not isinstance(value, Mapping):
        raise StudyError(f"{path} must be a mapping, got {value!r}")
    unknown = sorted(set(value) - set(schema))
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(schema)}")
    if required:
        missing = sorted(set(schema) - set(value))
        if missing:
            raise StudyError(f"{path}: missing key(s) {missing}")
    for key, hint in schema.items():
        if key in value:
            check_value(f"{path}.{key}", value[key], hint)


def dataclass_schema(cls: type) -> dict[str, Any]:
    """Field name -> resolved type hint of a dataclass (for checking params overrides)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def required_fields(cls: type) -> set[str]:
    """Fields of a dataclass without a default."""
    return {
        f.name for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    }


def _get(mapping: Any, path: str, key: str) -> Any:
    if not isinstance(mapping, Mapping):
        raise StudyError(f"{path} must be a mapping, got {mapping!r}")
    if key not in mapping:
        raise StudyError(f"missing key {path + '.' if path else ''}{key}")
    return mapping[key]


def _names(path: str, value: Any, allowed: Sequence[str], what: str) -> list[str]:
    check_value(path, value, list[str])
    unknown = [v for v in value if v not in allowed]
    if unknown:
        raise StudyError(f"{path}: unknown {what} {unknown}; allowed: {sorted(allowed)}")
    if len(set(value)) != len(value):
        raise StudyError(f"{path} has duplicates: {value}")
    return list(value)


# -- the study --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """One (family, dataset, model, seed) entry of the study."""

    family: str
    dataset: str
    model: str
    seed: int

    @property
    def stage_suffix(self) -> str:
        """The DVC matrix suffix of this run's stages (``dataset-model``: one stage per model
        trains, evaluates or scores every seed)."""
        return f"{self.dataset}-{self.model}"


@dataclass(frozen=True)
class RunPaths:
    """Where a run's outputs live (relative to the repository root, as in dvc.yaml)."""

    model_dir: Path  # trainer checkpoint + final eval weights (DVC cache)
    samples: Path  # sample grid PNG (DVC cache)
    reconstructions: Path  # inputs above their reconstructions, PNG (DVC cache; VAE runs)
    train_metrics: Path  # DVC metrics (git)
    curve: Path  # DVC plots (git)
    eval_metrics: Path
    fid_metrics: Path

    @property
    def weights(self) -> Path:
        """The weights evaluation uses (EMA when enabled), saved by the train stage."""
        return self.model_dir / "eval_weights.pt"


@dataclass(frozen=True)
class Study:
    """The validated params and the resolved objects the stage scripts need."""

    params: Mapping[str, Any]

    @property
    def name(self) -> str:
        return self.params["study"]["name"]

    @property
    def experiment(self) -> str:
        """MLflow experiment of this study."""
        return f"sdn-{self.name}"

    @property
    def seeds(self) -> list[int]:
        return list(self.params["study"]["seeds"])

    @property
    def runs_at_once(self) -> int:
        """How many runs (seeds) of one stage execute side by side, each in its own process."""
        return int(self.params["study"]["runs_at_once"])

    @property
    def threads_per_run(self) -> Optional[int]:
        """torch threads of each run (None: torch's default, every core)."""
        return self.params["study"]["threads_per_run"]

    def datasets(self, family: str) -> list[str]:
        return list(self.params["study"][family]["datasets"])

    def models(self, family: str) -> list[str]:
        return list(self.params["study"][family]["models"])

    def runs(self, family: Optional[str] = None) -> list[Run]:
        """Every (dataset, model, seed) of one family (or both), in the DVC matrix's order."""
        fams = FAMILIES if family is None else (family,)
        return [Run(f, d, m, s) for f in fams for d in self.datasets(f) for m in self.models(f) for s in self.seeds]

    def paths(self, run: Run) -> RunPaths:
        """Output paths of ``run`` (must match dvc.yaml)."""
        base, rel, seed = Path("results") / self.name, Path(run.dataset) / run.model, f"seed{run.seed}"
        return RunPaths(
            model_dir=base / "models" / rel / seed,
            samples=base / "samples" / rel / f"{seed}.png",
            reconstructions=base / "samples" / rel / f"{seed}_reconstructions.png",
            train_metrics=base / "metrics" / "train" / rel / f"{seed}.json",
            curve=base / "curves" / rel / f"{seed}.csv",
            eval_metrics=base / "metrics" / "eval" / rel / f"{seed}.json",
            fid_metrics=base / "metrics" / "fid" / rel / f"{seed}.json",
        )

    @staticmethod
    def data_dir(dataset: str) -> Path:
        """The prepare stage's output directory of ``dataset``."""
        return Path("data") / "prepared" / dataset

    @staticmethod
    def fid_stats_dir(dataset: str) -> Path:
        return Path("data") / "fid_stats" / dataset

    def holdout(self, dataset: str) -> Optional[Mapping[str, int]]:
        """``data.<dataset>.validation`` ({size, seed}): images held out of the training split for
        model selection, or None when the dataset's own validation split is used."""
        return self.params["data"][dataset].get("validation")

    def dataset(self, dataset: str, split: str):
        """The ``split`` ("train", "validation" or "test") of ``dataset``.

        "test" is the prepared test split (Glow's "validation" where there is no test split). With a
        hold-out (``data.<dataset>.validation``) "validation" is that many training images and
        "train" the rest; otherwise "validation" is the dataset's own split, held out from test.
        """
        from sdn.data import DATASETS, get_dataset
        from sdn.data.holdout import split_holdout

        info = DATASETS[dataset]
        options = dict(self.params["data"][dataset].get("options") or {}) if info.embedded else {}
        holdout = self.holdout(dataset)
        if split == "test":
            prepared = "test" if "test" in info.splits else "validation"
        elif split == "validation" and holdout is None:
            if not {"validation", "test"} <= set(info.splits):
                raise StudyError(f"{dataset} has no validation split apart from its test split "
                                 f"(splits {list(info.splits)}): set data.{dataset}.validation (size, seed)")
            prepared = "validation"
        else:
            prepared = "train"
        data = get_dataset(dataset, prepared, root=self.data_dir(dataset), **options)
        if holdout is not None and split in ("train", "validation"):
            train, validation = split_holdout(data, holdout["size"], holdout["seed"])
            return train if split == "train" else validation
        return data

    def ground_truth(self, dataset: str):
        """The ``GroundTruthData`` of a factor dataset, for the disentanglement metrics."""
        from sdn.data import DATASETS, get_ground_truth

        root = None if DATASETS[dataset].embedded else self.data_dir(dataset)
        return get_ground_truth(dataset, root=root)

    def build_model(self, run: Run):
        """The untrained model of ``run`` (density: HVAE with the baseline's blocks; else the VAE).

        The density model's initial weights come from torch's global RNG: seed it first.
        """
        config = self.model_config(run.family, run.dataset, run.model, run.seed)
        if run.family == "density":
            from sdn.configs import build_model

            return build_model(config, run.model)
        from sdn.models.vanilla_vae import build_vanilla_vae

        return build_vanilla_vae(config, run.model)

    def find_run(self, family: str, dataset: str, model: str, seed: int) -> Run:
        """The study's run with these fields; StudyError naming the allowed values otherwise."""
        if family not in FAMILIES:
            raise StudyError(f"family must be one of {FAMILIES}, got {family!r}")
        run = Run(family, dataset, model, int(seed))
        if run not in self.runs(family):
            raise StudyError(
                f"{family} run ({dataset}, {model}, seed {seed}) is not in the study: datasets "
                f"{self.datasets(family)}, models {self.models(family)}, seeds {self.seeds}"
            )
        return run

    def section(self, family: str, dataset: str) -> Mapping[str, Any]:
        return self.params[family][dataset]

    def model_config(self, family: str, dataset: str, model: str, seed: Optional[int] = None):
        """The architecture config: the named config with the dataset's then the model's overrides.

        With ``seed`` the config's own ``seed`` (the VAE's weight-init seed) is the run's seed, so
        seeds are independent replicates.
        """
        sec = self.section(family, dataset)
        overrides = {**sec["overrides"], **{k: v for k, v in sec["models"][model].items() if k != PRECISION_KEY}}
        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        if seed is not None:
            overrides["seed"] = int(seed)
        if family == "density":
            from sdn.configs import get_config

            return get_config(sec["config"], **overrides)
        from sdn.models.vanilla_vae import get_vae_config

        return get_vae_config(sec["config"], **overrides)

    def train_config(self, family: str, dataset: str, seed: int, model: Optional[str] = None, **changes):
        """The trainer config of one run: params ``train`` over defaults taken from the model config
        (lr, lr decay, EMA, global batch), and the seed from ``study.seeds``."""
        from sdn.training import TrainConfig

        cfg = self.model_config(family, dataset, model or self.models(family)[0])
        if family == "density":
            defaults = {"lr": cfg.lr, "lr_decay": cfg.lr_decay, "ema_decay": cfg.ema,
                        "batch_size": cfg.batch_size * cfg.num_devices}
        else:
            defaults = {"lr": cfg.lr, "batch_size": cfg.batch_size}
        sec = self.section(family, dataset)
        precision = sec["models"][model or self.models(family)[0]].get(PRECISION_KEY)
        values = {**defaults, **sec["train"], **({PRECISION_KEY: precision} if precision else {}),
                  "seed": int(seed), **changes}
        return TrainConfig.from_dict(values)

    def resolved(self, run: Run) -> dict[str, Any]:
        """Everything that defines ``run`` (for MLflow params and the resolved-config artifact)."""
        sec = self.section(run.family, run.dataset)
        model_cfg = dataclasses.asdict(self.model_config(run.family, run.dataset, run.model, run.seed))
        return {
            "study": self.name, "family": run.family, "dataset": run.dataset, "model": run.model,
            "seed": run.seed, "config_name": sec["config"], "model_config": model_cfg,
            "train": self.train_config(run.family, run.dataset, run.seed, run.model).to_dict(),
            "data": dict(self.params["data"][run.dataset]),
            **{k: sec[k] for k in ("eval", "metrics", "samples") if k in sec},
        }


def validate(params: Mapping[str, Any]) -> Study:
    """Check ``params`` completely (names, keys, types, buildable configs) and return the Study."""
    from sdn.configs import CONFIGS, HVAEConfig
    from sdn.models.vanilla_vae import VAE_CONFIGS, VAEConfig
    from sdn.training import PRECISIONS, TrainConfig

    if not isinstance(params, Mapping):
        raise StudyError(f"params must be a mapping, got {type(params).__name__}")
    study = _get(params, "", "study")
    check_mapping("study", study, {"name": str, "launcher": str, "seeds": list[int], "runs_at_once": int,
                                   "threads_per_run": Optional[int], "downloads": list[str],
                                   "fid_downloads": list[str],
                                   "embedded": list[str], "density": Mapping, "disentanglement": Mapping})
    launcher = study["launcher"].split()
    if launcher != ["python"] and not any(Path(word).name == "torchrun" for word in launcher):
        raise StudyError(f"study.launcher must be 'python' or a command that runs torchrun (e.g. 'torchrun "
                         f"--standalone --nproc_per_node=8', or 'srun … torchrun --nnodes=… --rdzv_endpoint=…' "
                         f"on a cluster: docs/pipeline.md), got {study['launcher']!r}")
    if study["runs_at_once"] < 1:
        raise StudyError(f"study.runs_at_once must be an int >= 1, got {study['runs_at_once']!r}")
    if study["runs_at_once"] > 1 and study["launcher"] != "python":
        raise StudyError("study.runs_at_once > 1 runs seeds as separate single-process runs; with "
                         f"study.launcher {study['launcher']!r} (one run across processes) set it to 1")
    if study["threads_per_run"] is not None and study["threads_per_run"] < 1:
        raise StudyError(f"study.threads_per_run must be null or an int >= 1, got {study['threads_per_run']!r}")
    if not _NAME.match(study["name"]):
        raise StudyError(f"study.name must match {_NAME.pattern}, got {study['name']!r}")
    seeds = study["seeds"]
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise StudyError(f"study.seeds must be a non-empty list of distinct non-negative ints, got {seeds!r}")

    used: list[str] = []
    for family in FAMILIES:
        fam = study[family]
        check_mapping(f"study.{family}", fam, {"datasets": list[str], "models": list[str]})
        datasets = _names(f"study.{family}.datasets", fam["datasets"], dataset_names(family), "dataset(s)")
        _names(f"study.{family}.models", fam["models"], model_names(family), "model(s)")
        if datasets and not fam["models"]:
            raise StudyError(f"study.{family}.models is empty but datasets {datasets} are listed")
        used += datasets
    dup = sorted({d for d in used if used.count(d) > 1})
    if dup:
        raise StudyError(f"datasets {dup} are listed in both study.density and study.disentanglement")
    need_download = sorted(d for d in used if d in archived_datasets())
    downloads = _names("study.downloads", study["downloads"], archived_datasets(), "dataset(s)")
    if sorted(downloads) != need_download:
        raise StudyError(
            f"study.downloads must list exactly the archived datasets of the study {need_download} "
            f"(embedded datasets {list(embedded_datasets())} have no download stage), got {downloads}"
        )

    embedded = _names("study.embedded", study["embedded"], embedded_datasets(), "dataset(s)")
    need_embedded = sorted(d for d in used if d in embedded_datasets())
    if sorted(embedded) != need_embedded:
        raise StudyError(f"study.embedded must list exactly the embedded datasets of the study {need_embedded}, "
                         f"got {embedded}")

    data = _get(params, "", "data")
    for dataset in used:
        sec = _get(data, "data", dataset)
        check_value(f"data.{dataset}", sec, Mapping)
        out = _get(sec, f"data.{dataset}", "out")
        if Path(out) != Study.data_dir(dataset):
            raise StudyError(f"data.{dataset}.out must be {Study.data_dir(dataset)} (the prepare stage's output "
                             f"in dvc.yaml), got {out!r}")
        if dataset in need_download:
            archive = Path(str(_get(sec, f"data.{dataset}", "archive")))
            if archive.parent != Path("data") / "raw" / dataset:
                raise StudyError(f"data.{dataset}.archive must be a file in data/raw/{dataset}/ (the download "
                                 f"stage's output in dvc.yaml), got {str(archive)!r}")
        if "options" in sec:
            check_value(f"data.{dataset}.options", sec["options"], Mapping)
        if "validation" in sec:
            check_mapping(f"data.{dataset}.validation", sec["validation"], HOLDOUT_KEYS)

    hvae_schema, vae_schema = dataclass_schema(HVAEConfig), dataclass_schema(VAEConfig)
    train_schema = {k: v for k, v in dataclass_schema(TrainConfig).items() if k != "seed"}
    for family in FAMILIES:
        schema, configs = (hvae_schema, CONFIGS) if family == "density" else (vae_schema, VAE_CONFIGS)
        schema = {k: v for k, v in schema.items() if k not in ("name", "seed")}
        extra = {"eval": Mapping} if family == "density" else {"metrics": Mapping}
        for dataset in study[family]["datasets"]:
            path = f"{family}.{dataset}"
            sec = _get(_get(params, "", family), family, dataset)
            check_mapping(path, {k: v for k, v in sec.items() if k != "tuned"} if isinstance(sec, Mapping) else sec,
                          {"config": str, "overrides": Mapping, "models": Mapping, "train": Mapping,
                           "samples": Mapping, **extra})
            if "tuned" in sec:  # optional: what was chosen on validation data, listed by the report
                check_value(f"{path}.tuned", sec["tuned"], list[str])
            if sec["config"] not in configs:
                raise StudyError(f"{path}.config: unknown config {sec['config']!r}; allowed: {sorted(configs)}")
            check_mapping(f"{path}.overrides", sec["overrides"], schema, required=False)
            for model in study[family]["models"]:
                section = _get(sec["models"], f"{path}.models", model)
                check_mapping(f"{path}.models.{model}", section, {**schema, PRECISION_KEY: str}, required=False)
                if PRECISION_KEY in section and section[PRECISION_KEY] not in PRECISIONS:
                    raise StudyError(f"{path}.models.{model}.{PRECISION_KEY} must be one of {list(PRECISIONS)}, "
                                     f"got {section[PRECISION_KEY]!r}")
            train = sec["train"]
            if isinstance(train, Mapping) and "seed" in train:
                raise StudyError(f"{path}.train.seed is not allowed: the seed comes from study.seeds")
            check_mapping(f"{path}.train", train, train_schema, required=False)
            missing = sorted(required_fields(TrainConfig) - set(train) - {"batch_size"})
            if missing:
                raise StudyError(f"{path}.train: missing key(s) {missing}")
            check_mapping(f"{path}.samples", {k: v for k, v in sec["samples"].items() if k not in SAMPLE_OPTIONAL_KEYS}
                          if isinstance(sec["samples"], Mapping) else sec["samples"], SAMPLE_KEYS)
            for key, hint in SAMPLE_OPTIONAL_KEYS.items():
                if isinstance(sec["samples"], Mapping) and key in sec["samples"]:
                    check_value(f"{path}.samples.{key}", sec["samples"][key], hint)
            if family == "density" and train.get("eval_every") is not None:
                from sdn.data import DATASETS

                if "validation" not in data[dataset] and not {"validation", "test"} <= set(DATASETS[dataset].splits):
                    raise StudyError(f"{path}.train.eval_every needs a validation split: {dataset} has none apart "
                                     f"from its test split, so set data.{dataset}.validation (size, seed)")
            if family == "density":
                check_mapping(f"{path}.eval", sec["eval"], DENSITY_EVAL_KEYS)
            else:
                check_mapping(f"{path}.metrics", sec["metrics"], DISENTANGLEMENT_METRIC_KEYS, required=False)
    check_mapping("fid", _get(params, "", "fid"), FID_KEYS)
    _check_fid(params["fid"], _names("study.fid_downloads", study["fid_downloads"], FID_DOWNLOADS, "item(s)"))
    check_mapping("report", _get(params, "", "report"), REPORT_KEYS)

    result = Study(params)
    # Build every config once, so value errors (e.g. a negative width) surface now with their key.
    for family in FAMILIES:
        for dataset in result.datasets(family):
            for model in result.models(family):
                try:
                    result.model_config(family, dataset, model, seeds[0])
                    result.train_config(family, dataset, seeds[0], model)
                except ValueError as err:
                    raise StudyError(f"{family}.{dataset} (model {model}): {err}") from err
    return result


def _check_fid(fid: Mapping[str, Any], downloads: list[str]) -> None:
    """The ``fid.weights`` / ``fid.kid`` blocks, and the weights path against ``study.fid_downloads``."""
    check_mapping("fid.weights", fid["weights"], FID_WEIGHTS_KEYS)
    check_mapping("fid.kid", fid["kid"], FID_KID_KEYS)
    weights, path = fid["weights"], fid["weights_path"]
    if not re.match(r"^https?://", weights["url"]):
        raise StudyError(f"fid.weights.url must start with http:// or https://, got {weights['url']!r}")
    for key, pattern, what in (("sha256_prefix", r"[0-9a-fA-F]{8,64}", "8 to 64 hex digits"),
                               ("sha256", r"[0-9a-fA-F]{64}", "64 hex digits")):
        if weights[key] is not None and not re.fullmatch(pattern, weights[key]):
            raise StudyError(f"fid.weights.{key} must be null or {what}, got {weights[key]!r}")
    for key in ("subsets", "subset_size", "reference_features"):
        if fid["kid"][key] < (2 if key == "subset_size" else 1):
            raise StudyError(f"fid.kid.{key} must be an int >= {2 if key == 'subset_size' else 1}, got {fid['kid'][key]!r}")
    # DVC has no optional dependencies: the fid_stats stages depend on fid.weights.dvc_dep, the weights
    # file where a stage downloads it, else a file they depend on anyway.
    if downloads:
        if weights["sha256_prefix"] is None and weights["sha256"] is None:
            raise StudyError("study.fid_downloads is set: pin fid.weights.sha256_prefix or fid.weights.sha256")
        if Path(path).is_absolute() or ".." in Path(path).parts or Path(path).parts[:3] != ("data", "raw", "fid"):
            raise StudyError(f"fid.weights_path must be a file in data/raw/fid/ (the download_fid_weights stage's "
                             f"output in dvc.yaml) when study.fid_downloads is set, got {path!r}")
        if weights["dvc_dep"] != path:
            raise StudyError(f"fid.weights.dvc_dep must be fid.weights_path ({path!r}) when study.fid_downloads "
                             f"is set, got {weights['dvc_dep']!r}")
    elif weights["dvc_dep"] != FID_STATS_SCRIPT:
        raise StudyError(f"fid.weights.dvc_dep must be {FID_STATS_SCRIPT!r} when study.fid_downloads is empty (no "
                         f"stage makes the weights file), got {weights['dvc_dep']!r}")


FID_STATS_SCRIPT = "pipelines/fid_stats.py"


def dataset_params(params_path: str | Path, name: str) -> dict[str, Any]:
    """The ``data.<name>`` section of the params file, for the download and prepare stages, which
    run before the rest of the study is needed (ValueError if absent)."""
    with open(params_path) as handle:
        params = yaml.safe_load(handle) or {}
    section = (params.get("data") or {}).get(name)
    if not isinstance(section, dict):
        raise ValueError(f"{params_path}: no mapping 'data.{name}'")
    return section


def run_stage(description: str, script: str | Path, run_one: "Callable[[Study, Run], None]",
              argv: list[str] | None = None, family: str | None = None,
              side_by_side: "Callable[[Study], bool]" = lambda study: True) -> None:
    """The CLI of a per-model stage: ``--family --dataset --model [--seed] [--params]``.

    Validates the whole study, then calls ``run_one(study, run)`` for the stage's runs: the one
    ``--seed``, or every seed of the study. ``study.runs_at_once`` > 1 runs the seeds side by side,
    each as ``script --seed s`` in its own process with ``study.threads_per_run`` threads (two
    one-thread runs use two cores best: benchmarks/parallelism.py); otherwise they run one after the
    other in this process (so a ``torchrun`` launcher spans every seed), as they also do when
    ``side_by_side(study)`` says the work is too small to pay for extra processes. A failed seed
    does not stop the others; the stage then fails naming it.
    """
    parser = argparse.ArgumentParser(description=description)
    if family is None:
        parser.add_argument("--family", required=True, choices=FAMILIES)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--seed", type=int, help="run this seed only (default: every seed of the study)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    study = load_study(args.params)  # everything is validated before anything runs
    seeds = study.seeds if args.seed is None else [args.seed]
    runs = [study.find_run(family or args.family, args.dataset, args.model, seed) for seed in seeds]
    if len(runs) == 1 or study.runs_at_once == 1 or not side_by_side(study):
        if study.threads_per_run is not None:
            import torch

            torch.set_num_threads(study.threads_per_run)
        for run in runs:
            run_one(study, run)
        return
    from sdn.tracking import Tracker

    Tracker(study.experiment)  # create (and migrate) the store once, before the runs race to do it
    base = [sys.executable, str(script), "--dataset", args.dataset, "--model", args.model, "--params", args.params]
    if family is None:
        base += ["--family", args.family]
    failed = run_side_by_side({run.seed: [*base, "--seed", str(run.seed)] for run in runs},
                              study.runs_at_once, study.threads_per_run)
    if failed:
        raise SystemExit(f"{Path(script).stem} {args.dataset} {args.model}: seed(s) {failed} failed (see above)")


def run_side_by_side(commands: Mapping[int, list[str]], at_once: int, threads: Optional[int]) -> list[int]:
    """Run ``commands`` (key -> argv), ``at_once`` at a time, each limited to ``threads`` threads;
    return the keys of those that failed."""
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    pending, running, failed = list(commands.items()), {}, []
    while pending or running:
        while pending and len(running) < at_once:
            key, argv = pending.pop(0)
            running[key] = subprocess.Popen(argv, env=env)
        time.sleep(0.2)
        for key, proc in list(running.items()):
            if proc.poll() is not None:
                del running[key]
                if proc.returncode != 0:
                    failed.append(key)
    return sorted(failed)


def load_study(path: str | Path = "params.yaml") -> Study:
    """Read and validate a params file."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"params file {path} does not exist")
    with path.open() as handle:
        params = yaml.safe_load(handle)
    return validate(params)
