"""The density evaluation keys: ``eval.iw_chunk_size`` (default 256) and ``samples.batch_size``
(default: ``fid.batch_size``) are optional, typed, and a bad value fails naming the dotted key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pipelines.study import StudyError, validate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def embedded() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def _section(params: dict):
    study = validate(params)
    return study.section(study.runs("density")[0])


def test_defaults_and_given_values(embedded):
    params = copy.deepcopy(embedded)
    for key in ("iw_chunk_size",):
        params["density"]["patches32"]["eval"].pop(key, None)
    params["density"]["patches32"]["samples"].pop("batch_size", None)
    section = _section(params)
    assert section.eval.iw_chunk_size == 256 and section.samples.batch_size is None
    params["density"]["patches32"]["eval"]["iw_chunk_size"] = 32
    params["density"]["patches32"]["samples"]["batch_size"] = 8
    section = _section(params)
    assert section.eval.iw_chunk_size == 32 and section.samples.batch_size == 8


@pytest.mark.parametrize("where,key,value", [("eval", "iw_chunk_size", 0), ("eval", "iw_chunk_size", "8"),
                                             ("samples", "batch_size", 0), ("samples", "batch_size", 2.5)])
def test_bad_values_name_the_key(embedded, where, key, value):
    params = copy.deepcopy(embedded)
    params["density"]["patches32"][where][key] = value
    with pytest.raises(StudyError) as info:
        validate(params)
    assert f"density.patches32.{where}.{key}" in str(info.value)
