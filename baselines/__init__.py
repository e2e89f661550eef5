"""Registry of top-down block factories: every density-model variant is a name here.

A registered *builder* takes an ``HVAEConfig`` and returns a fresh block factory
(``sdn.models.blocks.BlockFactory``) for one model. Every module in this package is imported on
first use, so a new baseline is one file that decorates its builder with ``@register_baseline``
(see ``docs/baselines.md``).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

BASELINES: dict[str, Callable] = {}
_loaded = False


def register_baseline(name: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``builder(config) -> block factory`` under ``name`` (names are unique)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"baseline name must be a non-empty string, got {name!r}")

    def decorate(builder: Callable) -> Callable:
        if name in BASELINES and BASELINES[name] is not builder:
            raise ValueError(f"baseline {name!r} is already registered by {BASELINES[name].__module__}")
        BASELINES[name] = builder
        return builder

    return decorate


def load_all() -> None:
    """Import every module of this package so that each registers itself (idempotent)."""
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def available_baselines() -> list[str]:
    """Sorted names of all registered baselines."""
    load_all()
    return sorted(BASELINES)


def get_block_factory(name: str) -> Callable:
    """The builder registered as ``name``: call it with an ``HVAEConfig`` to get a block factory."""
    load_all()
    if name not in BASELINES:
        raise ValueError(f"unknown model/baseline {name!r}; expected one of {sorted(BASELINES)}")
    return BASELINES[name]
