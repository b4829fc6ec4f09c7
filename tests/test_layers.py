"""Steering inside the encoder (METHOD.md §8) on a real all-token store of the bundled model.

The reference for every check is the real open_clip forward pass over the images, with
forward hooks that change a block's output the way the method says; the Evaluator must
reach the same logits from the cached tokens of that block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from vs2ray import steering
from vs2ray.config import config_with, load_config
from vs2ray.data import get_dataset
from vs2ray.evaluate import Evaluator, Grid
from vs2ray.models import encode_images, load_clip
from vs2ray.sae import ActivationRows, SparseAutoencoder
from vs2ray.stages import build_evaluator, evaluation_splits, prepare_data

NUM_BLOCKS = 4  # vs2ray-tiny


@pytest.fixture(scope="module")
def world(ray_session, tmp_path_factory):
    """Stores of 300 train / 300 test images with every token of every block, and the test images' pixels."""
    config = load_config(
        None,
        [
            f"storage.root={tmp_path_factory.mktemp('layers')}",
            "dataset.sizes={train: 300, test: 300}",
            "extraction.layers=[0, 1, 2, 3]",
            "extraction.tokens=all",
            "sae.layer={choice: [1, 3]}",
            "sae.tokens=all",  # every block's tokens are loaded
            "steering.methods=[zero_shot, sae_rec_final, vs2, sae_rec_all]",
        ],
    )
    data = prepare_data(config)
    bundle = load_clip(config.model, device="cpu")
    dataset = get_dataset(config.dataset)
    pixels = torch.stack([bundle.preprocess(dataset.load_image("test", r.ref)) for r in dataset.records("test")])
    return config, data, bundle, pixels


def random_sae(seed: int, d: int = 128, k: int = 16) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(d, 4 * d, k)
    with torch.no_grad():
        sae.b_pre.normal_(0, 0.5)
    return sae.eval()


def identity_sae(d: int = 128) -> SparseAutoencoder:
    """An SAE whose reconstruction is x exactly: latents ±e_i, k = d keeps every positive part."""
    sae = SparseAutoencoder(d, 2 * d, d)
    with torch.no_grad():
        eye = torch.eye(d)
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_pre.zero_()
    return sae.eval()


@contextlib.contextmanager
def edit_blocks(bundle, edits: dict[int, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """Replace the output tokens (n, T, d) of each block in `edits` by edit(tokens) during forwards."""
    blocks = bundle.model.visual.transformer.resblocks
    handles = [blocks[b].register_forward_hook(lambda _m, _i, out, f=f: f(out)) for b, f in edits.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def model_logits(world, edits) -> torch.Tensor:
    """Zero-shot logits of the real model over the test images with `edits` applied inside it."""
    _, data, bundle, pixels = world
    with edit_blocks(bundle, edits), torch.no_grad():
        embeddings = encode_images(bundle, pixels)
    return steering.logits_from_embeddings(embeddings, torch.from_numpy(data.text_classifier))


def evaluator_at(world, layer: int, sae: SparseAutoencoder, tokens: str = "cls", saes_by_block=None) -> Evaluator:
    config, data, _, _ = world
    config = config_with(config, {"sae.layer": layer, "sae.tokens": tokens})
    return build_evaluator(config, data, sae, saes_by_block=saes_by_block)


def vs2_rows(sae: SparseAutoencoder, gamma: float, lam: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda rows: steering.vs2(sae, rows, gamma, lam)


def test_each_block_of_the_runner_turns_stored_tokens_into_the_next_blocks_stored_tokens(world):
    _, data, _, _ = world
    evaluator = evaluator_at(world, 1, random_sae(0))
    run_block = evaluator.encoder.run_block
    _, _, test = evaluation_splits(data, 1, token_blocks=(0, 1, 2, 3))
    tokens = test.rows(0, len(test.labels)).tokens  # read from the store's host rows
    for block in range(1, NUM_BLOCKS):
        torch.testing.assert_close(run_block(tokens[block - 1], block), tokens[block], atol=2e-5, rtol=0)


def test_final_block_steering_is_exactly_the_cached_path_and_the_real_model(world):
    sae = random_sae(1)
    at_last = evaluator_at(world, -1, sae)
    assert at_last.encoder.run_block is None  # the last block needs no encoder: the cached path
    cached = Evaluator(sae, at_last.head, at_last.classifier, at_last.pool, at_last.val, at_last.test, None, None)
    grid = Grid(gammas=(1.5, 3.0), lambdas=(0.5, 2.1))
    for method in ("zero_shot", "sae_rec_final", "vs2"):
        assert at_last.evaluate(method, grid).test_top1 == cached.evaluate(method, grid).test_top1
    steered, _ = at_last.logits("vs2", at_last.test, {"gamma": 3.0, "lambda": 2.1})
    cls_vs2 = vs2_rows(sae, 3.0, 2.1)
    expected = model_logits(world, {3: lambda out: steering.with_cls(out, cls_vs2(out[:, 0]))})
    torch.testing.assert_close(steered, expected, atol=2e-3, rtol=0)
    assert (steered.argmax(1) != at_last.logits("zero_shot", at_last.test, {})[0].argmax(1)).any()


@pytest.mark.parametrize("tokens", ["cls", "all", "patches"])
def test_mid_block_steering_equals_the_real_model_steered_at_that_block(world, tokens):
    sae = random_sae(2)
    evaluator = evaluator_at(world, 1, sae, tokens)
    steered, _ = evaluator.logits("vs2", evaluator.test, {"gamma": 3.0, "lambda": 2.1})
    rows = vs2_rows(sae, 3.0, 2.1)
    if tokens == "all":
        edit = lambda out: rows(out.reshape(-1, out.shape[-1])).reshape(out.shape)  # noqa: E731
    elif tokens == "patches":  # [CLS] as it was, every other token steered

        def edit(out: torch.Tensor) -> torch.Tensor:
            patches = out[:, 1:]
            return steering.with_patches(out, rows(patches.reshape(-1, out.shape[-1])).reshape(patches.shape))

    else:
        edit = lambda out: steering.with_cls(out, rows(out[:, 0]))  # noqa: E731
    torch.testing.assert_close(steered, model_logits(world, {1: edit}), atol=2e-3, rtol=0)
    zero_shot, _ = evaluator.logits("zero_shot", evaluator.test, {})
    torch.testing.assert_close(zero_shot, model_logits(world, {}), atol=2e-3, rtol=0)
    assert (steered.argmax(1) != zero_shot.argmax(1)).float().mean() > 0.02  # the edit did reach the output


def test_sae_rec_all_with_identity_saes_is_zero_shot_and_otherwise_the_real_model_reconstructed(world):
    evaluator = evaluator_at(world, -1, random_sae(3), saes_by_block=[identity_sae()] * NUM_BLOCKS)
    reconstructed, _ = evaluator.logits("sae_rec_all", evaluator.test, {})
    zero_shot, _ = evaluator.logits("zero_shot", evaluator.test, {})
    torch.testing.assert_close(reconstructed, zero_shot, atol=2e-3, rtol=0)
    assert torch.equal(reconstructed.argmax(1), zero_shot.argmax(1))

    saes = [random_sae(10 + block) for block in range(NUM_BLOCKS)]
    evaluator = evaluator_at(world, -1, saes[-1], saes_by_block=saes)
    edits = {b: lambda out, s=sae: steering.with_cls(out, s(out[:, 0]).reconstruction) for b, sae in enumerate(saes)}
    reconstructed, _ = evaluator.logits("sae_rec_all", evaluator.test, {})
    torch.testing.assert_close(reconstructed, model_logits(world, edits), atol=2e-3, rtol=0)
    assert not torch.equal(reconstructed.argmax(1), zero_shot.argmax(1))


def test_a_split_evaluated_part_by_part_gives_the_whole_splits_figures(world, monkeypatch):
    sae = random_sae(4)
    grid = Grid(gammas=(3.0,), lambdas=(2.1,), gate_quantiles=(0.5, 0.9))
    whole = evaluator_at(world, 1, sae, "all")
    assert len(list(whole.parts(whole.test))) == 1  # the small world's test split fits one part
    expected = {method: whole.evaluate(method, grid) for method in ("vs2", "vs2_gated")}
    monkeypatch.setitem(Evaluator.PART_BYTES, "cpu", 40 * 17 * 128 * 4)  # 40 images a part
    parted = evaluator_at(world, 1, sae, "all")
    assert len(list(parted.parts(parted.test))) == -(-len(parted.test.labels) // 40) > 2
    for method, result in expected.items():
        again = parted.evaluate(method, grid)
        for field in ("val_top1", "test_top1", "test_top5"):
            np.testing.assert_allclose(getattr(again, field), getattr(result, field), atol=1e-9, err_msg=method)
        np.testing.assert_allclose(
            [c or 0.0 for c in again.coverage], [c or 0.0 for c in result.coverage], atol=1e-9, err_msg=method
        )
        # nothing of a finished part stays memoised: its SAE pass over every token included
        memos = [parted._sae_passes, parted._token_rows, parted._zero_shot, parted._neighbours]
        assert not [key for memo in memos for key in memo if "[" in str(key)], method


def test_feature_cards_show_each_latents_top_images_of_the_store_with_patch_heatmaps(world):
    from vs2ray.features import feature_cards, read_cards

    _, data, _, _ = world
    store = data.split.store_dir
    sae = random_sae(20)
    directory = store.parent.parent / "saes" / "cards-test"
    sae.save(directory, {"activation_key": store.name, "column": "tokens_1", "tokens": "all"}, {})
    reasons = {7: "ablate removed it"}
    cards = feature_cards(directory, latents=[3], per_latent=5, max_classes=4, log=lambda _: None, reasons=reasons)
    whys = {card.latent: card.why for card in cards.cards}
    assert whys[3].endswith("named") and whys[7].endswith("ablate removed it")
    assert len(cards.cards) == len(set(whys)) and len(cards.cards) in (5, 6)  # 4 classes', the trial's, the named
    # brute force over every image of the store: an image's activation is its largest over its tokens
    tokens = torch.from_numpy(np.array(data.split.acts.stored("tokens_1"))).float()
    codes = sae.dense_codes(*sae.encode(tokens.reshape(-1, tokens.shape[-1]))).detach()
    per_image = codes.reshape(tokens.shape[0], tokens.shape[1], -1)[:, :, 3].amax(dim=1)
    card = cards.cards[-1]
    torch.testing.assert_close(torch.tensor(card.top_values), per_image.topk(5).values, atol=1e-5, rtol=0)
    assert card.top_rows == per_image.topk(5).indices.tolist()
    assert card.frequency == pytest.approx(float((codes[:, 3] != 0).float().mean()))
    assert card.name == "" and card.amplified == card.ablated == []  # block 1 is not the last: no head reads it
    assert (cards.directory / card.image).read_bytes().startswith(b"\x89PNG")
    stamp = (cards.directory / "cards.json").stat().st_mtime_ns
    again = feature_cards(directory, latents=[3], log=lambda _: None)  # complete: read back, nothing redone
    assert (cards.directory / "cards.json").stat().st_mtime_ns == stamp and again.cards[-1].top_rows == card.top_rows
    assert read_cards(directory / "nothing") is None
    more = feature_cards(directory, latents=[11], per_latent=5, max_classes=4, log=lambda _: None)
    assert 11 in {c.latent for c in more.cards} and (cards.directory / "cards.json").stat().st_mtime_ns != stamp


def test_steering_effects_switch_a_class_latent_on_for_every_image_and_ablate_it_from_its_own():
    from vs2ray.features import largest_changes, steering_effects

    d, classes = 16, 4
    sae = identity_sae(d)  # latent i: coordinate i's positive part
    head = {"ln_post.weight": torch.ones(d), "ln_post.bias": torch.zeros(d), "proj": torch.eye(d)}
    text_classifier = torch.eye(d)[:classes]
    labels = np.repeat(np.arange(classes), 5)
    rows = 3.0 * torch.eye(d)[labels]  # each image on its class's coordinate: all right unsteered
    assert (steering.classify(rows, head, text_classifier).argmax(dim=1).numpy() == labels).all()
    on, ablated = steering_effects(
        sae, ActivationRows(rows), labels, head, text_classifier, [1, 10], torch.tensor([9.0, 9.0])
    )
    # latent 1 on everywhere: every image reads as class 1, which was right already; ablated: class 1 is lost
    torch.testing.assert_close(on[0], torch.tensor([-100.0, 0.0, -100.0, -100.0]))
    torch.testing.assert_close(ablated[0], torch.tensor([0.0, -100.0, 0.0, 0.0]))
    assert ablated[1].abs().max() == 0  # latent 10 never fires: ablating it changes nothing
    assert on[1].abs().max() == 0  # on at coordinate 10, which no class reads
    assert largest_changes(ablated[0], ["a", "b", "c", "d"]) == [("b", -100.0)]
    assert largest_changes(ablated[1], ["a", "b", "c", "d"]) == []
