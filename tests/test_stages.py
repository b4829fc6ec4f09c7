"""Stage functions shared by the CLI and the trials: the SAE cache key, the steering grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vs2ray.config import ConfigError, load_config
from vs2ray.stages import TrainSplit, blocks_to_load, get_or_train_sae, sae_params, steering_grid
from vs2ray.store import Activations, train_val_split

MANIFEST = {"classes": ["a", "b", "c"], "model": {"num_layers": 4}, "columns": {"cls_3": [16], "tokens_3": [5, 16]}}


def small_split(tmp_path: Path, val_fraction: float, seed: int = 0) -> TrainSplit:
    """A train split of 600 planted activations (5 tokens each) with its validation rows carved as the stages do."""
    rng = np.random.default_rng(0)
    ids = np.arange(600)
    tokens = rng.normal(size=(600, 5, 16)).astype(np.float32)
    acts = Activations(
        ids=ids,
        labels=rng.integers(3, size=600).astype(np.int32),
        columns={"cls_3": tokens[:, 0], "tokens_3": tokens},
        manifest=MANIFEST,
    )
    train, val = train_val_split(ids, val_fraction, seed)
    return TrainSplit(tmp_path / "activations" / "store-key", acts, train, val)


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


def test_an_all_token_sae_trains_on_every_token_of_the_training_images_only(tmp_path):
    common = [f"storage.root={tmp_path}", "sae.k=4", "sae.expansion=2", "sae.steps=5", "sae.batch_size=64"]
    tokens_config = load_config(None, [*common, "extraction.tokens=all", "sae.tokens=all"])
    split = small_split(tmp_path, 0.1)
    logs: list[str] = []
    trained = get_or_train_sae(tokens_config, sae_params(tokens_config), split, logs.append)
    assert "tokens_3: 2700 of 3000 rows (300 held out)" in logs[0]  # 540 training images × 5 tokens
    cls_config = load_config(None, common)
    cls_trained = get_or_train_sae(cls_config, sae_params(cls_config), split, lambda _: None)
    assert trained.directory != cls_trained.directory and not cls_trained.cache_hit
    assert trained.sae.load(trained.directory).config["column"] == "tokens_3"


def test_blocks_to_load_follow_the_layers_searched_and_refuse_a_store_that_cannot_serve_them():
    manifest = {"model": {"num_layers": 4}}
    last_only = load_config(None, [])
    assert blocks_to_load(last_only, manifest) == ([3], [])
    layers = ["extraction.layers=[0, 1, -1]", "extraction.tokens=all", "sae.layer={choice: [1, -1]}"]
    assert blocks_to_load(load_config(None, layers), manifest) == ([1, 3], [1])  # the last block needs no tokens
    every = load_config(None, [*layers, "steering.methods=[vs2, sae_rec_all]"])
    with pytest.raises(ConfigError, match=r"sae.layer / sae_rec_all: block 2 is not in extraction.layers"):
        blocks_to_load(every, manifest)
    with pytest.raises(ConfigError, match=r"sae.layer / sae_rec_all: block 2 is not in extraction.layers"):
        blocks_to_load(load_config(None, [*layers, "sae.layer=-2"]), manifest)
    every = load_config(
        None, ["extraction.layers=[0, 1, 2, 3]", "extraction.tokens=all", "steering.methods=[sae_rec_all]"]
    )
    assert blocks_to_load(every, manifest) == ([0, 1, 2, 3], [0])
    without_tokens = load_config(None, ["extraction.layers=[1, -1]", "sae.layer=1"])
    with pytest.raises(
        ConfigError, match=r"steering at block\(s\) \[1\] before the last \(3\) .* extraction.tokens: all"
    ):
        blocks_to_load(without_tokens, manifest)


def test_steering_grid_grids_both_rules_and_spreads_distributions():
    config = load_config(None, ["steering.gamma={uniform: [1.0, 3.0]}", "steering.lambda=2.0"])
    grid = steering_grid(config)
    assert list(grid.positive_rules) == ["query", "majority"] and list(grid.gammas) == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert list(grid.lambdas) == [2.0]
    searched = steering_grid(load_config(None, ["retrieval.positive_rule={choice: [majority]}"]))
    assert list(searched.positive_rules) == ["majority"]


def test_an_official_validation_split_selects_on_its_own_store_and_keys_the_sae_apart(tmp_path):
    """dataset.val_split: every train image trains, the validation rows are the val store's, and the SAE key
    says so (an SAE trained with val_fraction rows held out is not reused)."""
    from test_store import _small_store

    from vs2ray.stages import load_train_split

    train_store, val_store = _small_store(tmp_path / "train", 300), _small_store(tmp_path / "val", 120)
    common = [
        f"storage.root={tmp_path}",
        "extraction.layers=[1]",
        "extraction.tokens=all",
        "sae.layer=1",
        "sae.tokens=all",
    ]
    common += ["sae.k=4", "sae.expansion=2", "sae.steps=5", "sae.batch_size=64"]
    official = load_config(None, [*common, "dataset.val_split=val"])
    split = load_train_split(official, store=train_store, val_store=val_store)
    assert split.train_mask.all() and not split.val_mask.any()
    val_acts, images = split.val_source()
    assert val_acts is split.val_acts and images.all() and len(images) == 120
    np.testing.assert_array_equal(split.val_rows("tokens_1").take(np.arange(17)).numpy(), val_acts["tokens_1"][0])
    logs: list[str] = []
    trained = get_or_train_sae(official, sae_params(official), split, logs.append)
    assert "tokens_1: 5100 of 5100 rows (2040 held out)" in logs[0]  # 300 and 120 images × 17 tokens
    assert trained.sae.load(trained.directory).config["val_split"] == "val"
    carved_config = load_config(None, common)
    carved_split = load_train_split(carved_config, store=train_store)
    carved = get_or_train_sae(carved_config, sae_params(carved_config), carved_split, lambda _: None)
    assert carved.directory != trained.directory and not carved.cache_hit


def test_the_validation_split_cannot_be_the_train_or_test_split():
    with pytest.raises(ConfigError, match=r"dataset\.val_split: 'test' is the train or the test split"):
        load_config(None, ["dataset.val_split=test"])


def test_a_patch_sae_trains_on_every_token_but_cls_and_keys_apart_from_an_all_token_one(tmp_path):
    common = [f"storage.root={tmp_path}", "sae.k=4", "sae.expansion=2", "sae.steps=5", "sae.batch_size=64"]
    split = small_split(tmp_path, 0.1)
    logs: list[str] = []
    patches_config = load_config(None, [*common, "extraction.tokens=all", "sae.tokens=patches"])
    patches = get_or_train_sae(patches_config, sae_params(patches_config), split, logs.append)
    assert "tokens_3: 2160 of 2400 rows (240 held out)" in logs[0]  # 540 training images × 4 patch tokens
    every_config = load_config(None, [*common, "extraction.tokens=all", "sae.tokens=all"])
    every = get_or_train_sae(every_config, sae_params(every_config), split, lambda _: None)
    assert every.directory != patches.directory and not every.cache_hit
    rows = split.rows("tokens_3", split.train_mask, "patches")
    first = int(np.flatnonzero(split.train_mask)[0])
    np.testing.assert_array_equal(rows.take(np.arange(4)).numpy(), split.acts["tokens_3"][first, 1:])
    with pytest.raises(ConfigError, match="patches steers the patch tokens"):
        blocks_to_load(load_config(None, ["extraction.tokens=all", "sae.tokens=patches"]), MANIFEST)


def test_sae_from_steers_with_an_imported_sae_measured_on_the_split_and_trains_nothing(tmp_path):
    from vs2ray.interop import export_sae

    common = [f"storage.root={tmp_path}", "sae.k=4", "sae.expansion=2", "sae.steps=5", "sae.batch_size=64"]
    config = load_config(None, common)
    split = small_split(tmp_path, 0.1)
    trained = get_or_train_sae(config, sae_params(config), split, lambda _: None)
    exported = export_sae(trained.directory, tmp_path / "export")
    from_config = load_config(None, [*common, f"sae.from={exported}"])
    logs: list[str] = []
    imported = get_or_train_sae(from_config, sae_params(from_config), split, logs.append)
    assert logs == [f"steering with vs2ray SAE {exported} (topk, 32 latents)"]
    assert torch.equal(imported.sae.W_dec, trained.sae.W_dec)
    assert imported.metrics["fvu"] == pytest.approx(trained.metrics["fvu"], rel=1e-5)  # measured again, the same rows
    assert imported.metrics["val_fvu"] == pytest.approx(trained.metrics["val_fvu"], rel=1e-5)
    with pytest.raises(ConfigError, match=r"sae\.from: one SAE cannot be every block's"):
        load_config(None, [f"sae.from={exported}", "extraction.tokens=all", "extraction.layers=[0, 1, 2, 3]",
                           "steering.methods=[zero_shot, sae_rec_all]"])  # fmt: skip


def test_a_value_the_sae_kind_does_not_read_may_stay_a_distribution():
    relu_l1 = load_config(None, ["sae.kind=relu_l1", "sae.k={choice: [8, 16]}", "sae.l0_coef={choice: [0.1, 1]}"])
    assert sae_params(relu_l1).key_dict() == sae_params(load_config(None, ["sae.kind=relu_l1"])).key_dict()
    with pytest.raises(ConfigError, match=r"sae\.l1_coef: is a search distribution here"):
        sae_params(load_config(None, ["sae.kind=relu_l1", "sae.l1_coef={choice: [0.1, 1]}"]))
    with pytest.raises(ConfigError, match=r"sae\.k: is a search distribution here"):
        sae_params(load_config(None, ["sae.kind=batchtopk", "sae.k={choice: [8, 16]}"]))
