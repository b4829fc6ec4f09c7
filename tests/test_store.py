"""The store's keys and the deterministic validation split."""

from __future__ import annotations

import numpy as np


def test_validation_split_is_deterministic_and_disjoint():
    from vs2ray.store import train_val_split

    ids = np.arange(1000)
    train, val = train_val_split(ids, 0.1, seed=0)
    assert val.sum() == 100 and not (train & val).any() and (train | val).all()
    shuffled = np.random.default_rng(5).permutation(ids)
    _, val_shuffled = train_val_split(shuffled, 0.1, seed=0)
    assert set(shuffled[val_shuffled]) == set(ids[val])  # depends on the ids, not their order
    assert set(ids[train_val_split(ids, 0.1, seed=1)[1]]) != set(ids[val])
