"""The validated study and what the stage scripts ask of it: runs, datasets, configs, models.

``load_study(path)`` validates the whole params file once (``pipelines.params``); the stage scripts
then ask the returned :class:`Study` for resolved configs instead of reading the raw mapping.
Paths are not here: dvc.yaml passes every stage its directories (``run_stage``), and
``pipelines.runs.RunPaths`` only names the files of one seed inside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from pipelines.families import Family, families
from pipelines.runs import Run, RunPaths, StageDirs
from pipelines.params import PRECISION_KEY, Params, StudyError, library_config, load_params, tuples
from pipelines.params import validate as validate_params

__all__ = ["Run", "RunPaths", "Study", "StudyError", "load_study", "validate", "run_stage", "run_side_by_side",
           "protected_outputs", "STAGED_KINDS"]

# The output folders of a per-model stage that are written to a staging folder and swapped in only
# when every run of the stage succeeded (dvc.yaml marks them persist: DVC does not delete them first).
STAGED_KINDS = ("samples", "train_metrics", "curves", "eval_metrics", "fid_metrics")
# Set for the seed processes of a stage whose outputs the parent process stages: they write where told.
STAGED_ENV = "SDN_OUTPUTS_STAGED"


@dataclass(frozen=True)
class Study:
    """The validated params and the resolved objects the stage scripts need.

    ``data_dirs`` maps a dataset to its prepared folder (dvc.yaml's ``--data``); an embedded dataset
    without one is built in memory.
    """

    validated: Params
    data_dirs: Mapping[str, Path] = dataclasses.field(default_factory=dict)

    @property
    def params(self) -> Mapping[str, Any]:
        """The params mapping as read (for MLflow and the report)."""
        return self.validated.raw

    @property
    def name(self) -> str:
        return self.validated.study.name

    @property
    def seeds(self) -> list[int]:
        return list(self.validated.study.seeds)

    @property
    def runs_at_once(self) -> int:
        """How many runs (seeds) of one stage execute side by side, each in its own process; ``auto``:
        one per core this process may use, at most one per seed, and 1 under a launcher other than
        ``python`` (there one run spans the launcher's processes)."""
        wanted = self.validated.study.runs_at_once
        if wanted != "auto":
            return wanted
        if self.validated.study.launcher != "python":
            return 1
        return max(1, min(len(self.seeds), len(os.sched_getaffinity(0))))

    @property
    def threads_per_run(self) -> Optional[int]:
        """torch threads of each run (None: torch's default, every core)."""
        return self.validated.study.threads_per_run

    @staticmethod
    def family(name: str) -> Family:
        return families()[name]

    def datasets(self, family: str) -> list[str]:
        return list(getattr(self.validated.study, family).datasets)

    def models(self, family: str) -> list[str]:
        return list(getattr(self.validated.study, family).models)

    def runs(self, family: Optional[str] = None) -> list[Run]:
        """Every (dataset, model, seed) of one family (or all), in the DVC matrix's order."""
        names = list(families()) if family is None else [family]
        return [Run(f, d, m, s) for f in names for d in self.datasets(f) for m in self.models(f) for s in self.seeds]

    def section(self, run: Run) -> Any:
        """The typed ``<family>.<dataset>`` section of ``run``."""
        return self.validated.sections[run.family][run.dataset]

    def with_data(self, dataset: str, directory: Optional[Path]) -> "Study":
        """This study reading ``dataset`` from its prepared ``directory``."""
        if directory is None:
            return self
        return dataclasses.replace(self, data_dirs={**self.data_dirs, dataset: Path(directory)})

    def holdout(self, dataset: str):
        """``data.<dataset>.validation`` ({size, seed}): images held out of the training split for
        model selection, or None when the dataset's own validation split is used."""
        return self.validated.data[dataset].validation

    def dataset(self, dataset: str, split: str):
        """The ``split`` ("train", "validation" or "test") of ``dataset``.

        "test" is the prepared test split (Glow's "validation" where there is no test split). With a
        hold-out (``data.<dataset>.validation``) "validation" is that many training images and
        "train" the rest; otherwise "validation" is the dataset's own split, held out from test.
        """
        from sdn.data import DATASETS
        from sdn.data.holdout import split_holdout

        info = DATASETS[dataset]
        holdout = self.holdout(dataset)
        if split == "test":
            prepared = "test" if "test" in info.splits else "validation"
        elif split == "validation" and holdout is None:
            prepared = "validation"
        else:
            prepared = "train"
        data = self.prepared(dataset, prepared)
        if holdout is not None and split in ("train", "validation"):
            train, validation = split_holdout(data, holdout.size, holdout.seed)
            return train if split == "train" else validation
        return data

    def prepared(self, dataset: str, split: str):
        """The prepared ``split`` of ``dataset`` as built (no hold-out), with the params' options.

        A damaged prepared folder (a file cut short, a corrupt meta.json) raises the library's
        ``PreparedDataError`` naming the file, with the DVC command that rebuilds it added."""
        from sdn.data import DATASETS, PreparedDataError, get_dataset

        info = DATASETS[dataset]
        options = dict(self.validated.data[dataset].options) if info.embedded else {}
        root = self.data_dirs.get(dataset)
        if root is None and not info.embedded:
            raise StudyError(f"{dataset} is read from its prepared folder: pass --data <the prepare stage's output>")
        try:
            return get_dataset(dataset, split, root=root, **options)
        except PreparedDataError as error:
            stage = f"prepare_embedded@{dataset}" if info.embedded else f"prepare@{dataset}"
            raise error.with_hint(f"rebuild it with: dvc repro -f {stage}") from error

    def ground_truth(self, dataset: str):
        """The ``GroundTruthData`` of a factor dataset, for the disentanglement metrics."""
        from sdn.data import DATASETS, get_ground_truth

        root = None if DATASETS[dataset].embedded else self.data_dirs.get(dataset)
        return get_ground_truth(dataset, root=root)

    def model_config(self, run: Run) -> Any:
        """The architecture config of ``run``: the named preset with the dataset's then the model's
        overrides, and the run's seed as the weight-initialisation seed (seeds are replicates)."""
        sec = self.section(run)
        overrides = tuples({**sec.overrides, **sec.models[run.model].overrides, "seed": int(run.seed)})
        return self.family(run.family).model_config(sec.config, overrides)

    def build_model(self, run: Run, device: Optional[str] = None):
        """The untrained model of ``run``."""
        return self.family(run.family).build(self.model_config(run), run.model, device=device)

    def train_config(self, run: Run, **changes):
        """The trainer config of ``run``: the params ``train`` section, the model's precision where
        set, and the seed from ``study.seeds``."""
        from sdn.training import TrainConfig

        sec = self.section(run)
        precision = sec.models[run.model].precision
        values = {**sec.train, **({PRECISION_KEY: precision} if precision else {}), "seed": int(run.seed), **changes}
        return library_config(f"{run.family}.{run.dataset}.train", lambda: TrainConfig.from_dict(values))

    def find_run(self, family: str, dataset: str, model: str, seed: int) -> Run:
        """The study's run with these fields; StudyError naming the allowed values otherwise."""
        if family not in families():
            raise StudyError(f"family must be one of {list(families())}, got {family!r}")
        run = Run(family, dataset, model, int(seed))
        if run not in self.runs(family):
            raise StudyError(
                f"{family} run ({dataset}, {model}, seed {seed}) is not in the study: datasets "
                f"{self.datasets(family)}, models {self.models(family)}, seeds {self.seeds}"
            )
        return run

    def resolved(self, run: Run) -> dict[str, Any]:
        """Everything that defines ``run`` (for MLflow params and the resolved-config artifact)."""
        sec = self.section(run)
        return {
            "study": self.name, "family": run.family, "dataset": run.dataset, "model": run.model,
            "seed": run.seed, "config_name": sec.config,
            "model_config": dataclasses.asdict(self.model_config(run)),
            "train": self.train_config(run).to_dict(),
            "data": dict(self.params["data"][run.dataset]),
            **{k: self.params[run.family][run.dataset][k] for k in ("eval", "metrics", "samples")
               if k in self.params[run.family][run.dataset]},
        }


def validate(raw: Mapping[str, Any]) -> Study:
    """The Study of a params mapping (StudyError naming the first bad key)."""
    return Study(validate_params(raw))


def load_study(path: str | Path = "params.yaml") -> Study:
    """Read and validate a params file."""
    return Study(load_params(path))


def run_stage(description: str, module: str, run_one: Callable[[Study, Run, RunPaths], None],
              argv: Optional[list[str]] = None, family: Optional[str] = None,
              side_by_side: Callable[[Study], bool] = lambda study: True,
              dirs: tuple[str, ...] = (), resumable: tuple[str, ...] = ()) -> None:
    """The CLI of a per-model stage: ``--family --dataset --model [--seed] [--params] [--data]`` and
    one ``--<kind> DIR`` per directory kind in ``dirs`` (dvc.yaml passes its outs).

    Validates the whole study, then calls ``run_one(study, run, paths)`` for the stage's runs: the one
    ``--seed``, or every seed of the study. ``study.runs_at_once`` > 1 runs the seeds side by side,
    each as ``python -m <module> … --seed s`` in its own process with ``study.threads_per_run`` threads
    (two one-thread runs use two cores best: benchmarks/parallelism.py); otherwise they run one after
    the other in this process (so a ``torchrun`` launcher spans every seed), as they also do when
    ``side_by_side(study)`` says the work is too small to pay for extra processes. A failed seed
    does not stop the others; the stage then fails naming it.

    Before anything is touched the MLflow store is checked (``pipelines.tracking.check_store``): a
    damaged or unreachable store stops the stage with one line naming it. The stage's outputs are
    protected (:func:`protected_outputs`): a stage that fails, for any reason, leaves them as they
    were. ``resumable`` names the persistent folders (the models) whose checkpoints a rerun resumes.
    """
    parser = argparse.ArgumentParser(description=description)
    if family is None:
        parser.add_argument("--family", required=True, choices=list(families()))
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--seed", type=int, help="run this seed only (default: every seed of the study)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", type=Path, help="the dataset's prepared folder (embedded: optional)")
    for kind in dirs:
        parser.add_argument(f"--{kind.replace('_', '-')}", type=Path, required=True, help=f"{kind} (dvc.yaml's path)")
    args = parser.parse_args(argv)
    study = load_study(args.params).with_data(args.dataset, args.data)  # everything validated before anything runs
    stage_dirs = StageDirs(**{kind: getattr(args, kind) for kind in dirs})
    seeds = study.seeds if args.seed is None else [args.seed]
    runs = [study.find_run(family or args.family, args.dataset, args.model, seed) for seed in seeds]
    from pipelines.tracking import StoreError, check_store, prepare_store

    try:
        check_store()  # a damaged or unreachable store is named before anything is touched
    except StoreError as error:
        raise SystemExit(f"error: {error}; nothing was run") from None
    with protected_outputs(stage_dirs, whole=args.seed is None, resumable=resumable) as out_dirs:
        if len(runs) == 1 or study.runs_at_once == 1 or not side_by_side(study):
            if study.threads_per_run is not None:
                import torch

                torch.set_num_threads(study.threads_per_run)
            for run in runs:
                run_one(study, run, RunPaths(out_dirs, run.seed))
            return
        prepare_store()  # create (and migrate) the store once, before the runs race to do it
        argv = _with_dirs(list(sys.argv[1:] if argv is None else argv), stage_dirs, out_dirs)
        failed = run_side_by_side(
            {run.seed: [sys.executable, "-m", module, *argv, "--seed", str(run.seed)] for run in runs},
            study.runs_at_once, study.threads_per_run, extra_env={STAGED_ENV: "1"})
        if failed:
            raise SystemExit(f"{module} {args.dataset} {args.model}: seed(s) {failed} failed (see above); "
                             f"the stage's previous outputs are kept")


def _with_dirs(argv: list[str], before: StageDirs, after: StageDirs) -> list[str]:
    """``argv`` with each ``--<kind> DIR`` of ``before`` pointing at ``after``'s folder instead."""
    flags = {f"--{kind.replace('_', '-')}": getattr(after, kind) for kind in STAGED_KINDS
             if getattr(before, kind) is not None and getattr(after, kind) != getattr(before, kind)}
    out, i = [], 0
    while i < len(argv):
        flag, _, value = argv[i].partition("=")
        if flag in flags and value:
            out.append(f"{flag}={flags[flag]}")
        elif flag in flags and i + 1 < len(argv):
            out += [flag, str(flags[flag])]
            i += 1
        else:
            out.append(argv[i])
        i += 1
    return out


def _sibling(folder: Path, what: str, pid: Optional[int] = None) -> Path:
    return folder.parent / f".{folder.name}.{what}-{os.getpid() if pid is None else pid}"


def _leftovers(folder: Path, what: str) -> list[Path]:
    return sorted(folder.parent.glob(f".{folder.name}.{what}-*")) if folder.parent.is_dir() else []


def _recover(folder: Path) -> None:
    """Undo what a stage killed mid-way (SIGKILL) left beside ``folder``: a half-written staging
    folder is dropped, an output folder moved aside but not yet replaced is moved back, and the
    files of a model folder set aside are put back."""
    for stale in _leftovers(folder, "staging"):
        shutil.rmtree(stale)
    for old in _leftovers(folder, "old"):
        if folder.exists():
            shutil.rmtree(old)
        else:
            old.rename(folder)
    for backup in _leftovers(folder, "backup"):
        _restore_files(backup, folder)


def _top_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def _backup_files(folder: Path, backup: Path) -> None:
    """Copy the files directly in each ``folder/<seed>`` (not its checkpoint folders) to ``backup``."""
    for run_dir in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        target = backup / run_dir.name
        target.mkdir(parents=True, exist_ok=True)
        for file in _top_files(run_dir):
            shutil.copy2(file, target / file.name)
    backup.mkdir(parents=True, exist_ok=True)


def _restore_files(backup: Path, folder: Path) -> None:
    """Put the files of ``backup`` back in ``folder/<seed>``, dropping files the failed stage added,
    also in seed folders it created (their checkpoint folders stay: they are the resume point)."""
    run_dirs = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    for run_dir in run_dirs:
        saved = backup / run_dir.name
        kept = {p.name for p in _top_files(saved)}
        for file in _top_files(run_dir):
            if file.name not in kept:
                file.unlink()
    for saved in sorted(p for p in backup.iterdir() if p.is_dir()):
        run_dir = folder / saved.name
        for file in _top_files(saved):
            run_dir.mkdir(parents=True, exist_ok=True)
            os.replace(file, run_dir / file.name)
    shutil.rmtree(backup)


@contextmanager
def protected_outputs(dirs: StageDirs, whole: bool, resumable: tuple[str, ...] = ()) -> Iterator[StageDirs]:
    """The folders the stage's runs write to, such that a failing stage leaves its outputs as they were.

    Each output folder of :data:`STAGED_KINDS` is replaced by an empty staging folder beside it
    (``.<name>.staging-<pid>``); when the body succeeds the staging folder replaces the output
    folder (``whole``: the stage made every file of it) or its files are moved in (one ``--seed``),
    and when it fails it is dropped. A ``resumable`` folder (the models: checkpoints a rerun resumes
    from) is written in place; the files directly in its per-seed folders (the evaluation
    weights) are copied aside first and put back if the body fails. Leftovers of a stage that was
    killed are undone first. Inside the seed processes of a staged stage, and on ranks other than 0
    (which write no outputs), the folders are used as given.
    """
    if os.environ.get(STAGED_ENV) or os.environ.get("RANK", "0") != "0":
        yield dirs
        return
    staged = {kind: getattr(dirs, kind) for kind in STAGED_KINDS if getattr(dirs, kind) is not None}
    kept = {kind: getattr(dirs, kind) for kind in resumable if getattr(dirs, kind) is not None}
    for folder in [*staged.values(), *kept.values()]:
        _recover(folder)
    staging = {kind: _sibling(folder, "staging") for kind, folder in staged.items()}
    backups = {kind: _sibling(folder, "backup") for kind, folder in kept.items()}
    try:
        for kind, folder in staging.items():
            folder.mkdir(parents=True)
        for kind, backup in backups.items():
            _backup_files(kept[kind], backup)
        yield dataclasses.replace(dirs, **staging)
    except BaseException:
        for kind, backup in backups.items():
            _restore_files(backup, kept[kind])
        for folder in staging.values():
            shutil.rmtree(folder, ignore_errors=True)
        raise
    for kind, folder in staged.items():
        _swap_in(staging[kind], folder, whole)
    for backup in backups.values():
        shutil.rmtree(backup)


def _swap_in(staging: Path, folder: Path, whole: bool) -> None:
    """Make ``staging`` the content of ``folder``: replace it (``whole``) or move its files in."""
    if whole:
        old = _sibling(folder, "old")
        if folder.exists():
            folder.rename(old)
        staging.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
        return
    for file in sorted(p for p in staging.rglob("*") if p.is_file()):
        target = folder / file.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, target)
    shutil.rmtree(staging)


def run_side_by_side(commands: Mapping[int, list[str]], at_once: int, threads: Optional[int],
                     extra_env: Optional[Mapping[str, str]] = None) -> list[int]:
    """Run ``commands`` (key -> argv), ``at_once`` at a time, each limited to ``threads`` threads
    (and with ``extra_env`` added to the environment); return the keys of those that failed."""
    env = {**os.environ, **(extra_env or {})}
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
