"""The validation hold-out: disjoint, complete, seeded, and the subsets read the right items."""

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from sdn.data.holdout import holdout_indices, split_holdout


def test_holdout_is_a_disjoint_cover_of_the_requested_size():
    keep, held = holdout_indices(1000, 50, seed=3)
    assert len(held) == 50 and len(keep) == 950
    assert sorted(keep + held) == list(range(1000))
    assert keep == sorted(keep) and held == sorted(held)


def test_holdout_is_the_seeded_numpy_draw():
    _, held = holdout_indices(100, 7, seed=11)
    assert held == sorted(np.random.default_rng(11).choice(100, 7, replace=False).tolist())
    assert holdout_indices(100, 7, seed=11) == holdout_indices(100, 7, seed=11)
    assert holdout_indices(100, 7, seed=12)[1] != held


@pytest.mark.parametrize("size", [0, 100, -1])
def test_holdout_rejects_sizes_that_leave_nothing(size):
    with pytest.raises(ValueError, match="0 < size < 100"):
        holdout_indices(100, size, seed=0)


def test_split_holdout_subsets_read_the_selected_items():
    data = TensorDataset(torch.arange(20))
    train, validation = split_holdout(data, 5, seed=0)
    got_train = [int(train[i][0]) for i in range(len(train))]
    got_val = [int(validation[i][0]) for i in range(len(validation))]
    assert sorted(got_train + got_val) == list(range(20)) and not set(got_train) & set(got_val)
    assert got_val == holdout_indices(20, 5, 0)[1]
