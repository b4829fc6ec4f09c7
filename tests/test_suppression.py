"""Feature suppression (`ablate`) on a planted case with a known answer."""

from __future__ import annotations

import math

import pytest
import torch

from vs2ray import steering
from vs2ray.evaluate import Evaluator, Grid, SplitData
from vs2ray.sae import SparseAutoencoder

WIDTH = 6
# Two zero-mean directions (ln_post's mean subtraction leaves them alone): the class's and the nuisance's.
SHAPE = torch.tensor([1.0, 0.0, -1.0, 0.0, 0.0, 0.0]) / math.sqrt(2)
NUISANCE = torch.tensor([0.0, 1.0, 0.0, -1.0, 0.0, 0.0]) / math.sqrt(2)
HEAD = {"ln_post.weight": torch.ones(WIDTH), "ln_post.bias": torch.zeros(WIDTH), "proj": torch.eye(WIDTH)}


def planted_sae() -> SparseAutoencoder:
    """An SAE whose latents are ±SHAPE (0, 1) and ±NUISANCE (2, 3), with an encoder equal to its decoder."""
    sae = SparseAutoencoder(WIDTH, 4, k=2, init="tied", encoder_bias=False)
    with torch.no_grad():
        sae.W_dec.copy_(torch.stack([SHAPE, -SHAPE, NUISANCE, -NUISANCE]))
        sae.W_enc.copy_(sae.W_dec)
    return sae.eval()


def spurious_split(name: str, n: int, agreement: float, seed: int) -> SplitData:
    """Class y sets the sign along SHAPE, attribute z the sign along NUISANCE; z = y with probability `agreement`."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, (n,), generator=g)
    agrees = torch.rand(n, generator=g) < agreement
    attributes = torch.where(agrees, labels, 1 - labels)
    shape = (2 * labels - 1) * (0.5 + torch.rand(n, generator=g))
    nuisance = (2 * attributes - 1) * (1.0 + torch.rand(n, generator=g))
    cls = shape[:, None] * SHAPE + nuisance[:, None] * NUISANCE
    cls[:, 4:] = 0.05 * torch.randn(n, 2, generator=g)
    return SplitData(
        name, cls, steering.apply_head(cls, HEAD), labels, attributes=attributes, groups=2 * labels + attributes
    )


def test_suppressing_the_planted_nuisance_latents_restores_worst_group_accuracy():
    # A zero-shot head that reads the nuisance three times as strongly as the shape: it follows the colour.
    text = torch.nn.functional.normalize(torch.stack([-(0.3 * SHAPE + NUISANCE), 0.3 * SHAPE + NUISANCE]), dim=1)
    pool = spurious_split("pool", 4000, 0.95, 1)
    val, test = spurious_split("val", 800, 0.95, 2), spurious_split("test", 2000, 0.5, 3)
    evaluator = Evaluator(planted_sae(), HEAD, text, pool, val, test, num_groups=4, select_by="worst_group")
    grid = Grid(ablate_scores=("within_class", "correlation"), ablate_counts=(1, 2))

    zero_shot = evaluator.evaluate("zero_shot", grid).summary()
    assert zero_shot["test_worst_group_zero_shot"] < 0.05  # the minority groups are nearly all wrong
    assert 0.4 < zero_shot["test_top1_zero_shot"] < 0.6

    # Holding the class fixed, only the nuisance latents vary with the attribute; across the pool, where the
    # attribute agrees with the class 95% of the time, the shape latents correlate with it as much.
    within = evaluator.latent_scores("within_class")
    assert set(within.topk(2).indices.tolist()) == {2, 3}
    assert within[:2].max() < 0.2 * within[2:].min()
    correlation = evaluator.latent_scores("correlation")
    assert correlation[:2].min() > 0.8 * correlation[2:].max()

    ablated = evaluator.evaluate("ablate", grid)
    summary = ablated.summary()
    assert summary["selected_score_ablate"] == "within_class" and summary["selected_n_latents_ablate"] == 2
    assert set(summary["latents_ablate"].split(",")) == {"2", "3"}  # the nuisance latents, for the feature cards
    assert summary["test_worst_group_ablate"] > 0.95
    assert summary["val_worst_group_ablate"] == max(ablated.val_worst)
    # one nuisance latent fixes one attribute value only: the other value's minority group stays wrong
    one = ablated.settings.index({"score": "within_class", "n_latents": 1})
    assert ablated.test_worst[one] < 0.1


def test_ablating_no_latent_changes_nothing_and_ablating_removes_exactly_the_latents_share():
    sae = planted_sae()
    x = spurious_split("x", 64, 0.5, 4).cls
    assert torch.allclose(steering.ablate(sae, x, torch.tensor([], dtype=torch.long)), x)
    without_nuisance = steering.ablate(sae, x, torch.tensor([2, 3]))
    assert torch.allclose(without_nuisance @ NUISANCE, torch.zeros(64), atol=1e-5)
    assert torch.allclose(without_nuisance @ SHAPE, x @ SHAPE, atol=1e-5)


# ---------------------------------------------------------------- a typographic attack (issue 28's planted case)

CLASSES = 3
# six orthonormal zero-mean directions in 12 dimensions (ln_post's mean subtraction leaves them alone): each
# class's object, and its name written on the image
_RANDOM = torch.randn(12, 2 * CLASSES, generator=torch.Generator().manual_seed(0))
OBJECT, WORD = torch.linalg.qr(_RANDOM - _RANDOM.mean(dim=0))[0].T.split(CLASSES)
TYPO_HEAD = {"ln_post.weight": torch.ones(12), "ln_post.bias": torch.zeros(12), "proj": torch.eye(12)}


def written_word_split(name: str, n: int, attacked_only: bool, seed: int) -> SplitData:
    """Object y along OBJECT[y]; the word w written on the image along WORD[w] (the attribute: a class index).
    Unless `attacked_only`, a third of the images carry their own class's name, the rest another's."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLASSES, (n,), generator=g)
    other = (labels + torch.randint(1, CLASSES, (n,), generator=g)) % CLASSES
    own = torch.zeros(n, dtype=torch.bool) if attacked_only else torch.rand(n, generator=g) < 1 / 3
    words = torch.where(own, labels, other)
    seen = (1.0 + 0.5 * torch.rand(n, 1, generator=g)) * OBJECT[labels]
    written = (1.0 + 0.5 * torch.rand(n, 1, generator=g)) * WORD[words]
    cls = seen + written + 0.01 * torch.randn(n, 12, generator=g)
    return SplitData(name, cls, steering.apply_head(cls, TYPO_HEAD), labels, attributes=words,
                     groups=labels * CLASSES + words)  # fmt: skip


def test_suppressing_the_written_words_latents_restores_the_true_label_of_attacked_images():
    sae = SparseAutoencoder(12, 2 * CLASSES, k=2, init="tied", encoder_bias=False)
    with torch.no_grad():  # one latent per object and one per written word, the encoder equal to the decoder
        sae.W_dec.copy_(torch.cat([OBJECT, WORD]))
        sae.W_enc.copy_(sae.W_dec)
    # CLIP reads: a class's text embedding points at its written name more than at the object
    text = torch.nn.functional.normalize(0.4 * OBJECT + WORD, dim=1)
    pool, val = written_word_split("pool", 3000, False, 1), written_word_split("val", 600, False, 2)
    test = written_word_split("test", 900, True, 3)  # every test image carries a wrong class's name
    evaluator = Evaluator(sae.eval(), TYPO_HEAD, text, pool, val, test, num_groups=CLASSES**2, written_words=True)

    def typographic(logits: torch.Tensor) -> float:  # the written word predicted
        return (logits.argmax(dim=1) == test.attributes).float().mean().item()

    zero_shot, _ = evaluator.logits("zero_shot", test, {})
    assert typographic(zero_shot) > 0.95 and (zero_shot.argmax(dim=1) == test.labels).float().mean() < 0.05
    reported = evaluator.evaluate("zero_shot", Grid()).summary()
    assert reported["test_typographic_zero_shot"] == typographic(zero_shot)
    # a third of the val images carry their own class's name: zero-shot reads the word on every image
    assert reported["val_typographic_zero_shot"] > 0.95 and 0.25 < reported["val_top1_zero_shot"] < 0.45
    # within the true class only the written word's latents vary with the written word
    assert set(evaluator.latent_scores("within_class").topk(CLASSES).indices.tolist()) == {3, 4, 5}
    ablated = evaluator.evaluate("ablate", Grid(ablate_scores=("within_class",), ablate_counts=(1, 2, 3)))
    summary = ablated.summary()
    assert summary["selected_n_latents_ablate"] == 3 and set(summary["latents_ablate"].split(",")) == {"3", "4", "5"}
    assert summary["test_top1_ablate"] > 0.99  # the true label restored
    steered, _ = evaluator.logits("ablate", test, {"score": "within_class", "n_latents": 3})
    assert typographic(steered) == summary["test_typographic_ablate"] < 0.01
    # ablating no latent is the identity: the attack stands
    untouched = steering.ablate(sae, test.cls, torch.tensor([], dtype=torch.long))
    torch.testing.assert_close(untouched, test.cls, atol=1e-6, rtol=0)


def test_the_text_present_score_ranks_the_latent_of_a_written_label_first_and_then_the_words():
    """shapes_typographic's case: a third of the images carry no word (the attribute: CLASSES, past the
    classes). A written word comes on a white label (one direction on every image with a word) and is read
    along its own direction. Within a class, the label's latent differs most between images with and without
    a word, the words' latents less (each is there on a third of the worded images), the objects' not at all."""
    directions = torch.randn(12, 2 * CLASSES + 1, generator=torch.Generator().manual_seed(3))
    objects, words, label = torch.linalg.qr(directions - directions.mean(dim=0))[0].T.split([CLASSES, CLASSES, 1])

    def split(name: str, n: int, seed: int) -> SplitData:
        g = torch.Generator().manual_seed(seed)
        labels, condition = torch.randint(CLASSES, (n,), generator=g), torch.randint(3, (n,), generator=g)
        other = (labels + torch.randint(1, CLASSES, (n,), generator=g)) % CLASSES
        written = torch.where(condition == 1, labels, other)
        worded = (condition > 0).float()[:, None]
        cls = (1.0 + 0.5 * torch.rand(n, 1, generator=g)) * objects[labels]
        cls = cls + worded * ((1.0 + 0.5 * torch.rand(n, 1, generator=g)) * words[written] + label)
        attributes = torch.where(condition > 0, written, CLASSES)
        return SplitData(name, cls, steering.apply_head(cls, TYPO_HEAD), labels, attributes=attributes,
                         groups=labels * (CLASSES + 1) + attributes)  # fmt: skip

    sae = SparseAutoencoder(12, 2 * CLASSES + 1, k=3, init="tied", encoder_bias=False)
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([objects, words, label]))
        sae.W_enc.copy_(sae.W_dec)
    text = torch.nn.functional.normalize(0.4 * objects + words, dim=1)
    pool, val, test = split("pool", 3000, 1), split("val", 600, 2), split("test", 900, 3)
    evaluator = Evaluator(sae.eval(), TYPO_HEAD, text, pool, val, test, num_groups=CLASSES * (CLASSES + 1),
                          written_words=True)  # fmt: skip
    ranked = evaluator.latent_scores("text_present").argsort(descending=True).tolist()
    assert ranked[0] == 2 * CLASSES and set(ranked[1:4]) == {3, 4, 5} and set(ranked[4:]) == {0, 1, 2}
    zero_shot = evaluator.evaluate("zero_shot", Grid()).summary()
    assert zero_shot["test_typographic_zero_shot"] > 0.95 and zero_shot["test_clean_top1_zero_shot"] > 0.99
    ablated = evaluator.evaluate("ablate", Grid(ablate_scores=("text_present",), ablate_counts=(1, 4))).summary()
    assert ablated["selected_n_latents_ablate"] == 4  # the label alone leaves the words to be read
    assert ablated["test_attacked_top1_ablate"] > 0.99 and ablated["test_typographic_ablate"] < 0.01
    assert ablated["test_clean_top1_ablate"] > 0.99  # nothing written, nothing removed
    every_image_worded = torch.ones(10, dtype=torch.long)  # RTA-100: a word on every image
    with pytest.raises(ValueError, match="text_present score needs images with and without a word"):
        steering.association_scores(torch.rand(10, 4), torch.zeros(10, dtype=torch.long), every_image_worded,
                                    "text_present", CLASSES)  # fmt: skip
