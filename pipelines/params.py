"""Read and validate the whole params file once: one typed schema (``pipelines.schema``) plus the
rules that tie sections together. Every problem is a :class:`StudyError` naming the dotted key
(``density.patches32.train.lr``) and what is allowed."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import BaseModel, ValidationError, create_model

from pipelines.families import Family, families
from pipelines.schema import ClaimRule, DataSection, Fid, FamilyRuns, Report, Section, StudySection

FID_STATS_DEP = "pipelines/fid_stats.py"  # fid.weights.dvc_dep when no stage downloads the weights
PRECISION_KEY = "precision"


class StudyError(ValueError):
    """A params problem, found before anything runs; the message names the key and what is allowed."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that ``1e6`` and ``2E-3`` are floats (YAML 1.2), not strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(path: str | Path) -> Any:
    """The parsed YAML file (floats like ``1e6`` as numbers); StudyError naming a missing file."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"params file {path} does not exist")
    with path.open() as handle:
        return yaml.load(handle, Loader=_Loader)


@dataclasses.dataclass(frozen=True)
class Params:
    """The validated params: typed sections, plus the raw mapping (for MLflow and the report)."""

    raw: Mapping[str, Any]
    study: StudySection
    data: Mapping[str, DataSection]
    sections: Mapping[str, Mapping[str, Any]]  # family -> dataset -> that family's section model
    fid: Fid
    report: Report



def _schema() -> type[BaseModel]:
    """The top-level schema: fixed sections plus ``study.<family>``, ``report.claims.<family>`` and
    ``<family>`` for every family."""
    fams = families()
    study = create_model("Study", __base__=StudySection, **{name: (FamilyRuns, ...) for name in fams})
    claims = create_model("ReportClaims", __base__=Section, **{name: (ClaimRule, ...) for name in fams})
    report = create_model("Report", __base__=Report, claims=(claims, ...))
    fields: dict[str, Any] = {"study": (study, ...), "data": (dict[str, DataSection], ...),
                              "fid": (Fid, ...), "report": (report, ...)}
    fields.update({name: (dict[str, fam.section], ...) for name, fam in fams.items()})
    return create_model("Params", __base__=Section, **fields)


def _key(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def _fields_at(model: Any, loc: tuple) -> list[str]:
    """The keys allowed at ``loc`` of the schema (for 'unknown key' messages)."""
    for part in loc:
        model = _unwrap(model)
        if isinstance(model, type) and issubclass(model, BaseModel):
            model = model.model_fields[part].annotation if part in model.model_fields else None
        elif typing.get_origin(model) is dict:
            model = typing.get_args(model)[1]
        else:
            return []
    model = _unwrap(model)
    return sorted(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _unwrap(hint: Any) -> Any:
    while typing.get_origin(hint) in (typing.Union, typing.Annotated) or str(typing.get_origin(hint)) == "types.UnionType":
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0]
    return hint


def explain(error: ValidationError, prefix: str = "", schema: Any = None) -> StudyError:
    """One line for the first problem pydantic found: the dotted key, what is wrong, what is allowed."""
    first = error.errors()[0]
    loc = tuple(p for p in ((prefix,) if prefix else ()) + tuple(first["loc"]))
    key = _key(loc)
    if first["type"] == "missing":
        return StudyError(f"missing key {key}")
    if first["type"] == "list_type":
        got = first.get("input")
        return StudyError(f"{key}: must be a YAML list, e.g. [{got}] or [a, b], got {got!r} ({type(got).__name__})")
    if first["type"] == "extra_forbidden":
        allowed = _fields_at(schema, tuple(first["loc"])[:-1]) if schema is not None else []
        return StudyError(f"{_key(loc[:-1])}: unknown key {loc[-1]!r}" + (f"; allowed: {allowed}" if allowed else ""))
    message = first["msg"].removeprefix("Value error, ")
    return StudyError(f"{key}: {message}, got {first.get('input')!r} ({type(first.get('input')).__name__})")


def _names(key: str, values: list[str], allowed: typing.Iterable[str], what: str) -> None:
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise StudyError(f"{key}: unknown {what} {unknown}; allowed: {sorted(allowed)}")
    if len(set(values)) != len(values):
        raise StudyError(f"{key} has duplicates: {values}")


def library_config(key: str, build: typing.Callable[[], Any]) -> Any:
    """``build()`` with a library config's errors reported under ``key``."""
    try:
        return build()
    except ValidationError as err:
        raise explain(err, key) from err
    except (TypeError, ValueError) as err:
        first = str(err).split("; ")[0]
        field = re.match(r"^[A-Za-z]\w*\.([\w.]+): (.*)$", first)  # the library's "Class.field: problem"
        raise StudyError(f"{key}.{field[1]}: {field[2]}" if field else f"{key}: {err}") from err


def _model_names(key: str, fam: Family) -> tuple[str, ...]:
    """The family's registered model names; a model file that cannot be imported (``baselines/``: a
    file not named after the name it registers, a missing import) as a StudyError under ``key``."""
    try:
        return fam.model_names()
    except ImportError as err:
        raise StudyError(f"{key}: the model files could not be imported: {err}") from err


def validate(raw: Any) -> Params:
    """Check the whole params mapping (names, keys, types, cross-section rules, buildable configs)."""
    from sdn.data import DATASETS

    if not isinstance(raw, Mapping):
        raise StudyError(f"params must be a mapping, got {type(raw).__name__}")
    schema = _schema()
    try:
        parsed = schema.model_validate(raw)
    except ValidationError as err:
        raise explain(err, schema=schema) from err
    fams = families()
    study = parsed.study
    if study.runs_at_once != "auto" and study.runs_at_once > 1 and study.launcher != "python":
        raise StudyError("study.runs_at_once > 1 runs seeds as separate single-process runs; with "
                         f"study.launcher {study.launcher!r} (one run across processes) set it to 1")
    used: list[str] = []
    for name, fam in fams.items():
        runs = getattr(study, name)
        allowed = sorted(d for d, info in DATASETS.items() if info.has_factors == fam.has_factors)
        _names(f"study.{name}.datasets", runs.datasets, allowed, "dataset(s)")
        _names(f"study.{name}.models", runs.models, _model_names(f"study.{name}.models", fam), "model(s)")
        if runs.datasets and not runs.models:
            raise StudyError(f"study.{name}.models is empty but datasets {runs.datasets} are listed")
        used += runs.datasets
    both = sorted({d for d in used if used.count(d) > 1})
    if both:
        raise StudyError(f"datasets {both} are listed under more than one family in study")
    archived = sorted(d for d, info in DATASETS.items() if not info.embedded)
    embedded = sorted(d for d, info in DATASETS.items() if info.embedded)
    for key, allowed, values in (("downloads", archived, study.downloads), ("embedded", embedded, study.embedded)):
        _names(f"study.{key}", values, allowed, "dataset(s)")
        need = sorted(d for d in used if d in allowed)
        if sorted(values) != need:
            raise StudyError(f"study.{key} must list exactly the {'archived' if key == 'downloads' else 'embedded'} "
                             f"datasets of the study {need}, got {values}")
    for dataset in used:
        if dataset not in parsed.data:
            raise StudyError(f"missing key data.{dataset}")
        if dataset in archived and not parsed.data[dataset].url:
            raise StudyError(f"missing key data.{dataset}.url (the archive's address)")
    sections: dict[str, dict[str, Any]] = {}
    for name, fam in fams.items():
        sections[name] = {}
        for dataset in getattr(study, name).datasets:
            if dataset not in getattr(parsed, name):
                raise StudyError(f"missing key {name}.{dataset}")
            sections[name][dataset] = _check_family_section(fam, dataset, getattr(parsed, name)[dataset],
                                                            getattr(study, name).models, parsed, study.seeds[0])
    _check_fid(parsed.fid, study.fid_downloads)
    return Params(raw=raw, study=study, data=parsed.data, sections=sections, fid=parsed.fid, report=parsed.report)


def _check_family_section(fam: Family, dataset: str, sec: Any, models: list[str], parsed: Any, seed: int) -> Any:
    """The rules of ``<family>.<dataset>`` beyond its types: a known preset, override and trainer keys
    the library takes, one section per model, and configs that build."""
    from sdn.data import DATASETS
    from sdn.training import TrainConfig

    path = f"{fam.name}.{dataset}"
    _names(f"{path}.config", [sec.config], fam.presets(), "config")
    fields = fam.config_fields()
    for key, overrides in [(f"{path}.overrides", sec.overrides)] + [
            (f"{path}.models.{m}", sec.models[m].overrides) for m in sec.models]:
        unknown = sorted(set(overrides) - set(fields) | set(overrides) & {"name", "seed"})
        if unknown:
            raise StudyError(f"{key}: unknown key(s) {unknown}; allowed: {sorted(set(fields) - {'name', 'seed'})}")
    for model in models:
        if model not in sec.models:
            raise StudyError(f"missing key {path}.models.{model}")
    if "seed" in sec.train:
        raise StudyError(f"{path}.train.seed is not allowed: the seed comes from study.seeds")
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"seed"}
    unknown = sorted(set(sec.train) - train_fields)
    if unknown:
        raise StudyError(f"{path}.train: unknown key(s) {unknown}; allowed: {sorted(train_fields)}")
    if sec.train.get("eval_every") is not None:
        if parsed.data[dataset].validation is None and not {"validation", "test"} <= set(DATASETS[dataset].splits):
            raise StudyError(f"{path}.train.eval_every needs a validation split: {dataset} has none apart "
                             f"from its test split, so set data.{dataset}.validation (size, seed)")
    library_config(f"{path}.overrides", lambda: fam.model_config(sec.config, {**tuples(sec.overrides), "seed": seed}))
    for model in models:
        library_config(f"{path}.models.{model}", lambda: fam.model_config(
            sec.config, {**tuples(sec.overrides), **tuples(sec.models[model].overrides), "seed": seed}))
        library_config(f"{path}.train", lambda: TrainConfig.from_dict(
            {**sec.train, **_precision(sec, model), "seed": seed}))
    return sec


def tuples(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """YAML lists as the tuples the library configs hold."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}


def _precision(sec: Any, model: str) -> dict[str, str]:
    """``models.<model>.precision`` where set (the official script's), over ``train.precision``."""
    precision = sec.models[model].precision
    return {PRECISION_KEY: precision} if precision else {}


def _check_fid(fid: Fid, downloads: list[str]) -> None:
    """The weights path against ``study.fid_downloads`` (DVC has no optional dependencies: the
    fid_stats stages depend on ``fid.weights.dvc_dep``, the weights file where a stage downloads it,
    else a file they depend on anyway)."""
    weights, path = fid.weights, fid.weights_path
    if downloads:
        if weights.sha256_prefix is None and weights.sha256 is None:
            raise StudyError("study.fid_downloads is set: pin fid.weights.sha256_prefix or fid.weights.sha256")
        if Path(path).is_absolute() or ".." in Path(path).parts or Path(path).parts[:3] != ("data", "raw", "fid"):
            raise StudyError(f"fid.weights_path must be a file in data/raw/fid/ (the download_fid_weights stage's "
                             f"output in dvc.yaml) when study.fid_downloads is set, got {path!r}")
        if weights.dvc_dep != path:
            raise StudyError(f"fid.weights.dvc_dep must be fid.weights_path ({path!r}) when study.fid_downloads "
                             f"is set, got {weights.dvc_dep!r}")
    elif weights.dvc_dep != FID_STATS_DEP:
        raise StudyError(f"fid.weights.dvc_dep must be {FID_STATS_DEP!r} when study.fid_downloads is empty (no "
                         f"stage makes the weights file), got {weights.dvc_dep!r}")


def dataset_section(path: str | Path, name: str) -> DataSection:
    """The typed ``data.<name>`` section alone, for the download and prepare stages, which run before
    the rest of the study is needed (StudyError naming the key)."""
    raw = read_yaml(path)
    section = ((raw or {}).get("data") or {}).get(name) if isinstance(raw, Mapping) else None
    if not isinstance(section, Mapping):
        raise StudyError(f"{path}: missing key data.{name}")
    try:
        return DataSection.model_validate(section)
    except ValidationError as err:
        raise explain(err, f"data.{name}", schema=DataSection) from err


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file."""
    return validate(read_yaml(path))
