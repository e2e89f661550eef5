"""``GroundTruthData`` for datasets rendered on demand from factor indices, with an LRU cache."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


def subsample_grid(sizes: Sequence[int], num: int, seed: int) -> np.ndarray:
    """``num`` distinct grid points (int64 (num, K), sorted by flat index) drawn with ``seed``."""
    total = int(np.prod(sizes))
    if not isinstance(num, int) or not 0 < num <= total:
        raise ValueError(f"num must be an int in 1..{total}, got {num!r}")
    flat = np.random.default_rng(seed).choice(total, size=num, replace=False)
    return np.stack(np.unravel_index(np.sort(flat), tuple(sizes)), axis=1).astype(np.int64)


def check_factors(factors: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """``factors`` as int64 (N, K), or ValueError unless each column k lies in [0, sizes[k])."""
    factors = np.asarray(factors)
    if factors.ndim != 2 or factors.shape[1] != len(sizes):
        raise ValueError(f"factors must be (N, {len(sizes)}), got shape {factors.shape}")
    if not np.issubdtype(factors.dtype, np.integer):
        raise ValueError(f"factors must be integer indices, got dtype {factors.dtype}")
    factors = factors.astype(np.int64, copy=False)
    if ((factors < 0) | (factors >= np.asarray(sizes))).any():
        raise ValueError(f"factor indices must lie in [0, n) for n in {tuple(sizes)}")
    return factors


class RenderedFactorData:
    """Observations rendered exactly from factors by ``render_fn``; recently used ones are cached."""

    def __init__(
        self,
        factor_names: Sequence[str],
        factor_sizes: Sequence[int],
        observation_shape: tuple[int, int, int],
        render_fn: Callable[[np.ndarray], np.ndarray],
        cache_size: int = 8192,
    ):
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self._names = tuple(factor_names)
        self._sizes = tuple(int(s) for s in factor_sizes)
        self._shape = tuple(observation_shape)
        self._render = render_fn
        self.cache_size = cache_size
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    @property
    def factor_names(self) -> Sequence[str]:
        return self._names

    @property
    def factors_num_values(self) -> Sequence[int]:
        return self._sizes

    @property
    def observation_shape(self) -> tuple[int, int, int]:
        return self._shape  # type: ignore[return-value]

    def __len__(self) -> int:
        return int(np.prod(self._sizes))

    def sample_factors(self, num: int, random_state: np.random.RandomState) -> np.ndarray:
        """Uniform factor vectors over the grid, int64 (num, K)."""
        return np.stack(
            [random_state.randint(0, size, size=num) for size in self._sizes], axis=1
        ).astype(np.int64)

    def sample_observations_from_factors(
        self, factors: np.ndarray, random_state: np.random.RandomState | None = None
    ) -> np.ndarray:
        """uint8 (num, C, H, W): the rendered image of each factor vector (deterministic)."""
        factors = check_factors(factors, self._sizes)
        keys = np.ravel_multi_index(tuple(factors.T), self._sizes).tolist()
        out = np.empty((len(keys), *self._shape), dtype=np.uint8)
        hit = np.array([key in self._cache for key in keys], dtype=bool)
        for i in np.flatnonzero(hit):  # read every hit before the cache changes
            out[i] = self._cache[keys[i]]
            self._cache.move_to_end(keys[i])
        miss = np.flatnonzero(~hit)
        if miss.size:
            out[miss] = self._render(factors[miss])
            if self.cache_size:
                for i in miss[-self.cache_size :]:
                    self._cache[keys[i]] = out[i].copy()
                    self._cache.move_to_end(keys[i])
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return out


class RenderedGrid(Dataset):
    """Every point of a factor grid as a dataset, rendered on demand (nothing is stored).

    Item i is (uint8 (C, H, W), int64 (K,)): the image and factor indices of the i-th grid point in
    C order, the same items a stored full grid would hold. Batches are rendered in one vectorised
    call (``__getitems__``, which torch's DataLoader uses), so training can sample the whole grid.
    """

    def __init__(self, factor_sizes: Sequence[int], render_fn: Callable[[np.ndarray], np.ndarray]):
        self.factor_sizes = tuple(int(s) for s in factor_sizes)
        self._render = render_fn

    def __len__(self) -> int:
        return int(np.prod(self.factor_sizes))

    def factors(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Factor indices int64 (N, K) of grid points ``indices`` (C order, last factor fastest)."""
        flat = np.asarray(indices, dtype=np.int64).reshape(-1)
        if ((flat < 0) | (flat >= len(self))).any():
            raise IndexError(f"grid index out of range 0..{len(self) - 1}")
        return np.stack(np.unravel_index(flat, self.factor_sizes), axis=1).astype(np.int64)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        factors = self.factors(indices)
        images = self._render(factors)
        return [(torch.from_numpy(images[k]), torch.from_numpy(factors[k])) for k in range(len(factors))]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([index])[0]
