"""DVC stage ``validate``: check the whole params file once, before any other stage runs.

DVC deletes a stage's outputs before it runs the stage's command, so a params problem found inside a
stage (``train``, ``report``) costs that stage's outputs. Every other stage of dvc.yaml depends on
this stage's output, so ``dvc repro`` runs this first and stops here on a bad params file, having
touched no result or report. The check is ``pipelines.study.load_study`` (``pipelines.params``):
names, keys, types, cross-section rules and buildable configs; a problem prints one line
``error: <params file>: <dotted key>: <what is allowed>`` and exits 1.

The output (``--out``) holds the same text whenever the params are valid and no values: DVC hashes
it, and the other stages see it unchanged, so editing one model's params reruns only that model's
stages (and this one), not the whole study. It is a persistent output: DVC leaves it in place while
this stage runs, and it is only written (never deleted) here, so a refused params file touches nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

VALID_TEXT = "The params file passed pipelines/validate.py (no values here: see dvc.lock).\n"


def check(params: str | Path) -> None:
    """StudyError naming the first bad key of ``params`` (also a misnamed baseline file)."""
    from pipelines.study import load_study

    load_study(params)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="the params file (default params.yaml)")
    parser.add_argument("--out", type=Path, help="file written (constant text) when the params are valid")
    args = parser.parse_args(argv)
    from pipelines.params import StudyError

    try:
        check(args.params)
    except StudyError as err:
        print(f"error: {args.params}: {err}", file=sys.stderr)
        return 1
    if args.out is not None and not (args.out.is_file() and args.out.read_text() == VALID_TEXT):
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(VALID_TEXT)
        tmp.replace(args.out)
    print(f"validate: {args.params} is valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
