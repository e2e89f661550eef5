"""``GroundTruthData`` over stored images whose factors form a full grid (3DShapes, dSprites).

Row lookup: the flat factor index ``ravel_multi_index(factors, sizes)`` maps to the row holding
that combination (the identity for the official files, which enumerate the grid in C order).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def factor_indices(values: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Integer factor indices (N, K) int64 and the sorted distinct values of each column."""
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"expected factor values (N, K), got shape {values.shape}")
    indices = np.empty(values.shape, dtype=np.int64)
    uniques = []
    for k in range(values.shape[1]):
        unique, inverse = np.unique(values[:, k], return_inverse=True)
        indices[:, k] = inverse.reshape(-1)
        uniques.append(unique)
    return indices, uniques


def grid_lookup(factors: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Row of each flat grid index; ValueError unless every combination occurs exactly once."""
    factors = np.asarray(factors, dtype=np.int64)
    sizes = tuple(int(s) for s in sizes)
    if factors.ndim != 2 or factors.shape[1] != len(sizes):
        raise ValueError(f"factors must be (N, {len(sizes)}), got shape {factors.shape}")
    total = int(np.prod(sizes))
    if len(factors) != total:
        raise ValueError(
            f"a full factor grid {sizes} has {total} combinations, the data has {len(factors)} rows"
        )
    flat = np.ravel_multi_index(tuple(factors.T), sizes)
    lookup = np.full(total, -1, dtype=np.int64)
    lookup[flat] = np.arange(len(factors))
    if (lookup < 0).any():
        raise ValueError(f"factor grid {sizes} has missing (hence duplicated) combinations")
    return lookup


class FactorGridData:
    """Observations stored as an array (N, C, H, W) uint8 over a complete factor grid."""

    def __init__(
        self,
        images: np.ndarray,
        factors: np.ndarray,
        factor_names: Sequence[str],
        factor_sizes: Sequence[int],
    ):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
        if len(factor_names) != len(factor_sizes):
            raise ValueError("factor_names and factor_sizes must have the same length")
        self._images = images
        self._names = tuple(factor_names)
        self._sizes = tuple(int(s) for s in factor_sizes)
        self._lookup = grid_lookup(factors, self._sizes)
        # The official files enumerate the grid in C order: then no lookup table is needed.
        self._identity = bool(np.array_equal(self._lookup, np.arange(len(self._lookup))))
        if len(images) != len(self._lookup):
            raise ValueError(f"{len(images)} images but {len(self._lookup)} factor rows")

    @property
    def factor_names(self) -> Sequence[str]:
        return self._names

    @property
    def factors_num_values(self) -> Sequence[int]:
        return self._sizes

    @property
    def observation_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self._images.shape[1:])  # type: ignore[return-value]

    def sample_factors(self, num: int, random_state: np.random.RandomState) -> np.ndarray:
        """Uniform factor vectors, int64 (num, K)."""
        return np.stack(
            [random_state.randint(0, size, size=num) for size in self._sizes], axis=1
        ).astype(np.int64)

    def rows(self, factors: np.ndarray) -> np.ndarray:
        """Storage row of each factor vector (ValueError for out-of-range factors)."""
        factors = np.asarray(factors, dtype=np.int64)
        if factors.ndim != 2 or factors.shape[1] != len(self._sizes):
            raise ValueError(f"factors must be (num, {len(self._sizes)}), got {factors.shape}")
        if ((factors < 0) | (factors >= np.array(self._sizes))).any():
            raise ValueError(f"factor values must lie in [0, n) for n in {self._sizes}")
        flat = np.ravel_multi_index(tuple(factors.T), self._sizes)
        return flat if self._identity else self._lookup[flat]

    def sample_observations_from_factors(
        self, factors: np.ndarray, random_state: np.random.RandomState
    ) -> np.ndarray:
        """uint8 (num, C, H, W): the stored image of each factor combination."""
        rows = self.rows(factors)
        order = np.argsort(rows, kind="stable")  # sorted reads are fast on a memory map
        out = np.empty((len(rows), *self._images.shape[1:]), dtype=np.uint8)
        out[order] = self._images[rows[order]]
        return out
