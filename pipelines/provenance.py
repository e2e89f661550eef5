"""The installed versions that determine a study's results: one list for MLflow tags and the report."""

from __future__ import annotations

import platform
from importlib import metadata

# Everything that computes a number of the study: training and scoring, FID/KID, the report's tables.
PACKAGES = ("sdn-repro", "torch", "torchvision", "numpy", "scipy", "scikit-learn", "mlflow", "dvc", "torch-fidelity",
            "pandas")


def package_versions() -> dict[str, str]:
    """``python`` and each of ``PACKAGES`` -> installed version (``"absent"`` if not installed)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions
