"""Feature suppression (`ablate`) on a planted case with a known answer."""

from __future__ import annotations

import math

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
