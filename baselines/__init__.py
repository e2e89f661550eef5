"""The study's density-model variants: one module per variant, each registering its decoder blocks
into the library's registry (``sdn.models.blocks.register_blocks``) under its own file name.

Importing this package imports every module in it, so ``import baselines`` makes all variants
buildable with ``sdn.models.hvae.build_hvae(config, name)``; a new baseline is one file
``baselines/<name>.py`` registering ``<name>`` (docs/baselines.md). The file name must equal the
registered name: the study's stages depend on ``baselines/<model>.py`` (dvc.yaml).
"""

from __future__ import annotations

import importlib
import pkgutil

from sdn.models.blocks import block_builder, registered_blocks


def _import_all() -> list[str]:
    """Import every module of this package and check that each registers only its own file name."""
    names = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        registered = [n for n in registered_blocks() if block_builder(n).__module__ == module.__name__]
        wrong = [n for n in registered if n != info.name]
        if wrong:
            raise ImportError(
                f"baselines/{info.name}.py registers decoder blocks {wrong}, but a baseline's file must be named "
                f"after the name it registers (dvc.yaml depends on baselines/<model>.py): rename the file to "
                f"baselines/{wrong[0]}.py or register it as {info.name!r}"
                + (" (one name per file)" if len(registered) > 1 else "")
            )
        names += registered
    return names


NAMES: tuple[str, ...] = tuple(_import_all())  # the variants registered by this package
