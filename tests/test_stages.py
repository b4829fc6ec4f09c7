"""Stage functions shared by the CLI and the trials: the SAE cache key, the steering grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vs2ray.config import load_config
from vs2ray.stages import TrainSplit, get_or_train_sae, sae_params, steering_grid
from vs2ray.store import Activations, train_val_split


def small_split(tmp_path: Path, val_fraction: float, seed: int = 0) -> TrainSplit:
    """A train split of 600 planted activations with its validation rows carved as the stages carve them."""
    rng = np.random.default_rng(0)
    ids = np.arange(600)
    acts = Activations(
        ids=ids,
        labels=rng.integers(3, size=600).astype(np.int32),
        columns={"cls_3": rng.normal(size=(600, 16)).astype(np.float32)},
        manifest={"classes": ["a", "b", "c"]},
    )
    train, val = train_val_split(ids, val_fraction, seed)
    return TrainSplit(tmp_path / "activations" / "store-key", acts, "cls_3", train, val)


def test_sae_cache_key_holds_the_validation_share(tmp_path):
    # A changed dataset.val_fraction changes which rows the SAE trains on: it must not reuse the old SAE.
    common = [f"storage.root={tmp_path}", "sae.k=4", "sae.expansion=2", "sae.steps=5", "sae.batch_size=64"]
    first_config = load_config(None, [*common, "dataset.val_fraction=0.1"])
    first = get_or_train_sae(first_config, sae_params(first_config), small_split(tmp_path, 0.1), lambda _: None)
    again = get_or_train_sae(first_config, sae_params(first_config), small_split(tmp_path, 0.1), lambda _: None)
    assert not first.cache_hit and again.cache_hit and again.directory == first.directory
    other_config = load_config(None, [*common, "dataset.val_fraction=0.3"])
    other = get_or_train_sae(other_config, sae_params(other_config), small_split(tmp_path, 0.3), lambda _: None)
    assert not other.cache_hit and other.directory != first.directory
    assert other.sae.load(other.directory).config["val_fraction"] == 0.3


def test_steering_grid_grids_both_rules_and_spreads_distributions():
    config = load_config(None, ["steering.gamma={uniform: [1.0, 3.0]}", "steering.lambda=2.0"])
    grid = steering_grid(config)
    assert list(grid.positive_rules) == ["query", "majority"] and list(grid.gammas) == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert list(grid.lambdas) == [2.0]
    searched = steering_grid(load_config(None, ["retrieval.positive_rule={choice: [majority]}"]))
    assert list(searched.positive_rules) == ["majority"]
