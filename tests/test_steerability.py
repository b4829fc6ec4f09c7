"""Steerability S_f on a constructed case with a known answer."""

from __future__ import annotations

import math

import pytest
import torch
from test_suppression import HEAD, NUISANCE, SHAPE, WIDTH

from vs2ray import steering
from vs2ray.evaluate import Evaluator, SplitData
from vs2ray.sae import SparseAutoencoder
from vs2ray.steerability import SteerabilitySettings, format_steerability, measure_steerability


def test_steerability_scores_a_latent_along_a_concept_high_and_one_orthogonal_to_every_concept_low():
    third = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, -1.0]) / math.sqrt(2)
    orthogonal = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0, 0.0]) / 2  # zero mean, orthogonal to every concept
    concepts = torch.stack([SHAPE, NUISANCE, third])  # the vocabulary's text embeddings (proj is the identity)
    sae = SparseAutoencoder(WIDTH, 2, k=2, init="tied", encoder_bias=False)
    with torch.no_grad():
        sae.W_dec.copy_(torch.stack([SHAPE, orthogonal]))
        sae.W_enc.copy_(sae.W_dec)

    def noise(name: str, n: int, seed: int) -> SplitData:
        cls = 0.1 * torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed))
        return SplitData(name, cls, steering.apply_head(cls, HEAD), torch.zeros(n, dtype=torch.long))

    evaluator = Evaluator(sae, HEAD, concepts[:2], noise("pool", 2000, 5), noise("val", 200, 6), noise("test", 10, 7))
    # vs2ray's earlier score: the top concept's gain, a clamp relative to the on-level, amplify or suppress
    settings = SteerabilitySettings(
        probe_images=200, units=8, score="top_gain", clamp="relative", strength=20.0, direction="both", threshold=0.2
    )
    result = measure_steerability(evaluator, concepts, ["shape", "nuisance", "third"], settings)

    latents = {u.unit: u for u in result.of("latent")}
    assert set(latents) == {0, 1} and len(result.of("neuron")) == WIDTH  # `units` caps the sample at what exists
    # Amplifying the SHAPE latent makes nearly every probe image's output "shape": S ≈ 1 − its default share.
    default_share = torch.softmax(100 * evaluator.val.embedding @ concepts.T, 1)[:, 0].mean()
    assert latents[0].concepts == ["shape"] and latents[0].direction == "amplify"
    assert abs(latents[0].score - (1 - default_share)) < 0.05
    # Amplifying the orthogonal latent only flattens every distribution; no concept gains much.
    assert latents[1].score < 0.2 < latents[0].score
    assert result.share("latent") == 0.5
    assert "shape (+" in format_steerability(result)


def test_the_authors_s_f_of_a_latent_along_one_concept_is_the_value_computed_from_its_definition():
    """S_f = Σ_c (Δ̄p_c)², p = softmax(100 · e · Vᵀ), the latent set to 150 (amplify only), steerable when > 0.1."""
    import torch.nn.functional as F

    third = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, -1.0]) / math.sqrt(2)
    concepts = torch.stack([SHAPE, NUISANCE, third])
    sae = SparseAutoencoder(WIDTH, 2, k=2, init="tied", encoder_bias=False)
    with torch.no_grad():
        sae.W_dec.copy_(torch.stack([SHAPE, third]))
        sae.W_enc.copy_(sae.W_dec)
    probe = 0.1 * torch.randn(50, WIDTH, generator=torch.Generator().manual_seed(6))
    val = SplitData("val", probe, steering.apply_head(probe, HEAD), torch.zeros(50, dtype=torch.long))
    pool = SplitData("pool", probe.clone(), val.embedding.clone(), val.labels.clone())
    evaluator = Evaluator(sae, HEAD, concepts[:2], pool, val, val)
    settings = SteerabilitySettings(probe_images=50, units=2)  # the defaults: the authors' protocol
    result = measure_steerability(evaluator, concepts, ["shape", "nuisance", "third"], settings)

    def probabilities(x: torch.Tensor) -> torch.Tensor:  # the definition, written out again
        e = F.layer_norm(x, (WIDTH,), eps=1e-5)
        return torch.softmax(100 * (e / e.norm(dim=1, keepdim=True)) @ concepts.T, dim=1)

    for latent, direction in enumerate((SHAPE, third)):
        on = (probe @ direction).clamp_min(0)  # the latent's current activation (both latents are in the top-2)
        steered = probe + (150.0 - on)[:, None] * direction
        shift = (probabilities(steered) - probabilities(probe)).mean(dim=0)
        unit = next(u for u in result.of("latent") if u.unit == latent)
        assert unit.score == pytest.approx(float(shift.pow(2).sum()), abs=1e-5)
        assert unit.sum_squares == unit.score and unit.power == pytest.approx(float(shift.max()), abs=1e-5)
        assert unit.direction == "amplify" and unit.concepts == [["shape", "nuisance", "third"][int(shift.argmax())]]
        assert unit.steerable == (unit.score > 0.1)
    assert result.share("latent") == 1.0 and result.distinct_concepts("latent") == 2  # "shape" and "third"
    # neurons: one coordinate of the residual stream set to 150
    neuron = next(u for u in result.of("neuron") if u.unit == 4)
    steered = probe.clone()
    steered[:, 4] = 150.0
    shift = (probabilities(steered) - probabilities(probe)).mean(dim=0)
    assert neuron.score == pytest.approx(float(shift.pow(2).sum()), abs=1e-5)
    metrics = result.metrics()
    assert metrics["steerable_latents_low"] < metrics["steerable_latents"] <= metrics["steerable_latents_high"]


def test_wilson_interval_of_a_share():
    from vs2ray.steerability import wilson_interval

    low, high = wilson_interval(5, 10)  # the textbook case: 0.5 ± about 0.263
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and 0 < wilson_interval(0, 20)[1] < 0.2
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_clamping_sets_exactly_one_unit_and_keeps_the_rest():
    from test_suppression import planted_sae

    sae = planted_sae()
    x = torch.randn(32, WIDTH, generator=torch.Generator().manual_seed(3))
    clamped = steering.clamp_latent(sae, x, 2, 5.0)
    dense_before = sae.dense_codes(*sae.encode(x))
    dense_after = sae.dense_codes(*sae.encode(clamped))
    # the code's entry is replaced (other latents and the error term kept): x moves along the latent's decoder row
    assert torch.allclose(clamped - x, (5.0 - dense_before[:, 2:3]) * NUISANCE, atol=1e-5)
    opposite_off = dense_before[:, 3] == 0  # latent 3 is −NUISANCE: where it was off, re-encoding reads 5 back
    assert opposite_off.sum() > 5 and torch.allclose(dense_after[opposite_off, 2], torch.tensor(5.0), atol=1e-5)
    neuron = steering.clamp_neuron(x, 4, -1.0)
    assert (neuron[:, 4] == -1.0).all() and torch.equal(neuron[:, :4], x[:, :4]) and torch.equal(neuron[:, 5], x[:, 5])
