"""Frozen, validated config dataclasses (pydantic) shared by the model and trainer configs.

``@config_dataclass`` makes a frozen, hashable pydantic dataclass that is strict (a bool is not an
int, a string is not coerced to a number; an int is accepted for a float) and whose validation
errors are ``ValueError``\\ s naming the field as ``Class.field``. Constraints live in the field
types (``PositiveInt``, ``Annotated[float, Field(gt=0)]``, ``OneOf``); cross-field rules are
pydantic ``model_validator``\\ s. ``ConfigBase`` adds ``replace``, ``from_dict`` and ``to_dict``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

import pydantic
from pydantic import AfterValidator, ConfigDict, Field

__all__ = ["ConfigBase", "FiniteFloat", "NonNegInt", "OneOf", "PositiveInt", "config_dataclass"]

PositiveInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


def OneOf(*allowed: Any) -> AfterValidator:  # noqa: N802 (reads as a type constraint)
    """Field constraint: the value must be one of ``allowed``."""

    def check(value: Any) -> Any:
        if value not in allowed:
            raise ValueError(f"must be one of {allowed}")
        return value

    return AfterValidator(check)


C = TypeVar("C", bound="ConfigBase")


class ConfigBase:
    """Methods shared by the config dataclasses (all fields are dataclass fields)."""

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated); unknown names are a ``ValueError``."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})  # type: ignore[arg-type]
        if unknown:
            raise ValueError(f"unknown {type(self).__name__} fields: {unknown}")
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
        """Build from a mapping (e.g. a ``params.yaml`` section); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


def _message(name: str, error: pydantic.ValidationError) -> str:
    parts = []
    for item in error.errors(include_url=False):
        msg = item["msg"].removeprefix("Value error, ")
        loc = ".".join(str(part) for part in item["loc"])
        parts.append(f"{name}.{loc}: {msg}, got {item['input']!r}" if loc else msg)
    return "; ".join(parts)


def config_dataclass(cls: type[C]) -> type[C]:
    """Class decorator: a frozen, strict pydantic dataclass raising ``ValueError("Cls.field: ...")``."""
    made = pydantic.dataclasses.dataclass(frozen=True, config=ConfigDict(strict=True, extra="forbid"))(cls)
    validating_init = made.__init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            validating_init(self, *args, **kwargs)
        except pydantic.ValidationError as err:
            raise ValueError(_message(made.__name__, err)) from None

    __init__.__doc__ = validating_init.__doc__
    made.__init__ = __init__  # type: ignore[method-assign]
    return made
