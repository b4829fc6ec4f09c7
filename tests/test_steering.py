"""Steering methods: Proposition 3.1, identities, the FVU gate, and VS2++ on a hand-built case."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vs2ray import steering
from vs2ray.sae import SAETrainParams, SparseAutoencoder, train_sae
from vs2ray.sae import per_sample_fvu as fvu_of_reconstruction
from vs2ray.steering import (
    centroid_shift,
    classify,
    clip_steer,
    code_direction,
    gate_threshold,
    gated,
    group_mean_difference,
    norm_preserving,
    positive_mask,
    sae_rec_amplified,
    sae_rec_final,
    steerable_queries,
    vs2,
    vs2_from_direction,
    vs2pp,
    vs2pp_direction,
    weighted_rag,
)

D, EMBED, CLASSES = 24, 8, 5


def per_sample_fvu(sae: SparseAutoencoder, x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    return fvu_of_reconstruction(x, sae(x).reconstruction, mu)


@pytest.fixture(scope="module")
def world():
    """A trained SAE on structured data, plus a random head and text classifier (float64 for exactness)."""
    g = torch.Generator().manual_seed(0)
    atoms = F.normalize(torch.randn(48, D, generator=g), dim=1)
    chosen = torch.stack([torch.randperm(48, generator=g)[:3] for _ in range(4000)])
    x = (atoms[chosen] * (torch.rand(4000, 3, 1, generator=g) + 0.5)).sum(1) + 0.05 * torch.randn(4000, D, generator=g)
    x = x + 2.0
    sae = train_sae(x, SAETrainParams(k=3, expansion=2, steps=300, batch_size=256, lr=2e-3, warmup_steps=20)).sae
    sae = sae.double()
    head = {
        "ln_post.weight": 1 + 0.1 * torch.randn(D, generator=g, dtype=torch.float64),
        "ln_post.bias": 0.1 * torch.randn(D, generator=g, dtype=torch.float64),
        "proj": torch.randn(D, EMBED, generator=g, dtype=torch.float64),
    }
    classifier = F.normalize(torch.randn(CLASSES, EMBED, generator=g, dtype=torch.float64), dim=1)
    return sae, x.double(), head, classifier


def test_proposition_3_1_closed_form_and_error_bound(world):
    sae, x, _, _ = world
    x = x[:500]
    gamma, lam = 1.5, 2.1
    alpha = lam * (gamma - 1)
    values, indices = sae.encode(x)
    v = sae.decode(gamma * values, indices) - sae.decode(values, indices)  # D(γc) − D(c), as the paper writes it
    epsilon = sae.decode(values, indices) - x  # ε(x) = D(c) − x
    # x + λv = x + α(x − b_pre) + α ε(x): the centroid in the closed form is the SAE's b_pre
    torch.testing.assert_close(x + lam * v, x + alpha * (x - sae.b_pre) + alpha * epsilon, atol=1e-10, rtol=1e-10)
    # ‖α ε(x)‖ = α sqrt(FVU(x)) ‖x − μ‖ with μ the data mean used in the per-sample FVU
    mu = x.mean(dim=0)
    bound = alpha * per_sample_fvu(sae, x, mu).sqrt() * (x - mu).norm(dim=1)
    torch.testing.assert_close((alpha * epsilon).norm(dim=1), bound, atol=1e-10, rtol=1e-10)
    # and the library's VS2 is exactly that update, rescaled to ‖x‖
    torch.testing.assert_close(vs2(sae, x, gamma, lam), norm_preserving(x, lam * v), atol=1e-10, rtol=1e-10)


def test_gamma_one_or_lambda_zero_is_zero_shot_and_norm_is_kept(world):
    sae, x, head, classifier = world
    x = x[:300]
    zero_shot = classify(x, head, classifier)
    for gamma, lam in ((1.0, 3.0), (2.0, 0.0)):
        steered = vs2(sae, x, gamma, lam)
        torch.testing.assert_close(classify(steered, head, classifier), zero_shot, atol=1e-9, rtol=0)
    steered = vs2(sae, x, 2.5, 3.0)
    torch.testing.assert_close(steered.norm(dim=1), x.norm(dim=1), atol=1e-10, rtol=0)
    assert not torch.allclose(steered, x)


def test_one_code_direction_serves_the_whole_grid(world):
    sae, x, _, _ = world
    x = x[:200]
    direction = code_direction(sae, x)
    for gamma, lam in [(1.5, 2.1), (2.0, 1.0), (3.0, 0.5), (1.0, 4.0)]:
        torch.testing.assert_close(vs2_from_direction(x, direction, gamma, lam), vs2(sae, x, gamma, lam))


def test_reconstruction_baselines(world):
    sae, x, _, _ = world
    values, indices = sae.encode(x[:50])
    torch.testing.assert_close(sae_rec_final(sae, x[:50]), sae.decode(values, indices))
    amplified = sae_rec_amplified(sae, x[:50], 1.5)
    torch.testing.assert_close(amplified - sae.b_pre, 1.5 * (sae.decode(values, indices) - sae.b_pre))


def test_centroid_shift_is_vs2_without_the_sae_error_term(world):
    sae, x, _, _ = world
    x = x[:100]
    alpha = 0.8
    # with μ = b_pre and ε removed, VS2's closed form reduces to the centroid shift
    epsilon = sae_rec_final(sae, x) - x
    expected = norm_preserving(x, alpha * (x - sae.b_pre) + alpha * epsilon)
    torch.testing.assert_close(vs2(sae, x, 1 + alpha, 1.0), expected, atol=1e-10, rtol=1e-10)
    shifted = centroid_shift(x, sae.b_pre, alpha)
    torch.testing.assert_close(shifted, norm_preserving(x, alpha * (x - sae.b_pre)), atol=1e-12, rtol=0)


def test_gate_coverage_extremes_and_monotone_in_q(world):
    sae, x, _, _ = world
    calibration, queries = x[:2000], x[2000:2600]
    mu = calibration.mean(dim=0)
    fvu_queries = per_sample_fvu(sae, queries, mu)
    steered = vs2(sae, queries, 1.5, 2.0)
    _, nothing = gated(queries, steered, fvu_queries, fvu_queries.min().item() - 1e-9)
    out, everything = gated(queries, steered, fvu_queries, fvu_queries.max().item())
    assert nothing == 0.0 and everything == 1.0
    torch.testing.assert_close(out, steered)
    calibration_fvu = per_sample_fvu(sae, calibration, mu)
    coverages = [gated(queries, steered, fvu_queries, gate_threshold(calibration_fvu, q))[1] for q in (0.5, 0.9, 0.99)]
    assert coverages == sorted(coverages) and coverages[0] < coverages[-1]
    kept, _ = gated(queries, steered, fvu_queries, gate_threshold(calibration_fvu, 0.5))
    unsteered = fvu_queries > gate_threshold(calibration_fvu, 0.5)
    torch.testing.assert_close(kept[unsteered], queries[unsteered])


def test_gate_threshold_is_torch_quantiles_linear_interpolation():
    fvu = torch.rand(1001, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.3, 0.9, 0.95, 0.995, 1.0):
        expected = torch.quantile(fvu.double(), q).item()
        assert gate_threshold(fvu, q) == pytest.approx(expected, abs=1e-12)
        assert gate_threshold(fvu.sort().values, q, is_sorted=True) == pytest.approx(expected, abs=1e-12)
    unsorted = torch.arange(10, dtype=torch.float32).flip(0)
    assert gate_threshold(unsorted, 0.25) == 2.25 and gate_threshold(unsorted[:1], 0.7) == 9.0


def test_positive_rules():
    query = torch.tensor([0, 2])
    neighbours = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 2, 2, 2]])
    assert positive_mask(query, neighbours, "query", 3).tolist() == [
        [True, False, False, True, False],
        [False, False, True, True, True],
    ]
    assert positive_mask(query, neighbours, "majority", 3).tolist() == [
        [False, True, True, False, True],
        [False, False, True, True, True],
    ]
    with pytest.raises(ValueError, match="positive_rule"):
        positive_mask(query, neighbours, "best", 3)


def test_vs2pp_direction_on_a_hand_built_case(world):
    sae, x, _, _ = world
    n_latents = sae.n_latents
    codes = torch.zeros(2, 3, n_latents, dtype=torch.float64)
    codes[0, 0, 1], codes[0, 1, 1], codes[0, 1, 4], codes[0, 2, 7] = 2.0, 4.0, 6.0, 5.0
    codes[1, :, 2] = torch.tensor([1.0, 2.0, 3.0])
    positives = torch.tensor([[True, True, False], [True, True, True]])  # query 2 has no negatives
    gamma = 1.5
    # by hand: S+ mean = 3·e1 + 3·e4, S− mean = 5·e7; for query 2, S+ mean = 2·e2, S− empty -> 0
    expected_codes = torch.zeros(2, n_latents, dtype=torch.float64)
    expected_codes[0, 1], expected_codes[0, 4], expected_codes[0, 7] = 3.0, 3.0, -5.0
    expected_codes[1, 2] = 2.0
    expected = (gamma - 1) * expected_codes @ sae.W_dec
    torch.testing.assert_close(vs2pp_direction(sae, codes, positives, gamma), expected)
    # no positives at all: the positive mean counts as 0
    none = group_mean_difference(codes[:1], torch.zeros(1, 3, dtype=torch.bool))
    torch.testing.assert_close(none, -codes[0].mean(dim=0, keepdim=True))
    steered = vs2pp(x[:2], expected, 2.0)
    torch.testing.assert_close(steered.norm(dim=1), x[:2].norm(dim=1))
    # with the pool's mean code, query 2's empty S− takes it: 2·e2 − pool mean; query 1 keeps its S−
    pool_mean = torch.zeros(n_latents, dtype=torch.float64)
    pool_mean[2], pool_mean[9] = 0.5, 1.0
    expected_codes[1] -= pool_mean
    expected = (gamma - 1) * expected_codes @ sae.W_dec
    torch.testing.assert_close(vs2pp_direction(sae, codes, positives, gamma, pool_mean), expected)
    assert steerable_queries(positives, "pool_mean").tolist() == [True, True]
    assert steerable_queries(positives, "skip").tolist() == [True, False]
    no_positives = torch.zeros(1, 3, dtype=torch.bool)  # an empty S+ is never steered
    assert not steerable_queries(no_positives, "pool_mean").any() and not steerable_queries(no_positives, "skip").any()
    with pytest.raises(ValueError, match="empty_negatives"):
        steerable_queries(positives, "zero")


def test_clip_steer_takes_the_pool_mean_embedding_for_an_empty_s_minus():
    q = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), dim=1)
    neighbours = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    positives = torch.tensor([[True, True], [True, False]])
    pool_mean = torch.tensor([0.2, 0.2, 0.2])
    moved = clip_steer(q, neighbours, positives, 2.0, pool_mean)
    unanimous = q[0] + 2.0 * (torch.tensor([0.0, 0.5, 0.5]) - pool_mean)  # S− empty: the pool mean instead
    by_hand = torch.stack([unanimous, q[1] + 2.0 * torch.tensor([1.0, 0.0, -1.0])])
    torch.testing.assert_close(moved, F.normalize(by_hand, dim=1))


def test_weighted_rag_weights_by_similarity():
    q = F.normalize(torch.tensor([[1.0, 0.0]]), dim=1)
    neighbours = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    similarities = torch.tensor([[3.0, 1.0]])
    mixed = weighted_rag(q, neighbours, similarities, a=0.5)
    expected = F.normalize(0.5 * q + 0.5 * torch.tensor([[0.25, 0.75]]), dim=1)
    torch.testing.assert_close(mixed, expected)
    torch.testing.assert_close(weighted_rag(q, neighbours, similarities, a=1.0), q)


def test_weighted_rag_with_no_positive_similarity_weighs_neighbours_equally():
    q = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), dim=1)
    neighbours = torch.tensor([[[0.0, 1.0], [1.0, 1.0]], [[0.0, 1.0], [1.0, 1.0]]])
    mixed = weighted_rag(q, neighbours, torch.tensor([[-0.2, -0.5], [0.0, -1.0]]), a=0.5)
    assert torch.isfinite(mixed).all()
    expected = F.normalize(0.5 * q + 0.5 * neighbours.mean(dim=1), dim=1)  # equal weights, not 0/0
    torch.testing.assert_close(mixed, expected)
    # a negative similarity counts as 0 beside a positive one
    one_positive = weighted_rag(q[:1], neighbours[:1], torch.tensor([[-0.3, 0.6]]), a=0.0)
    torch.testing.assert_close(one_positive, F.normalize(neighbours[:1, 1], dim=1))


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "matryoshka", "jumprelu", "relu_l1"])
@pytest.mark.parametrize("normalize", ["none", "layer_norm"])
def test_every_steering_function_reads_codes_of_any_kind_consistently(kind, normalize):
    # the identities every method relies on, whatever makes the code: VS2's direction and the SAE pass agree with
    # the SAE's own reconstruction; ablating every firing latent leaves the error term and b_pre; a latent clamped
    # to its own value changes nothing, and clamped elsewhere moves x along its decoder row only
    torch.manual_seed(0)
    sae = SparseAutoencoder(16, 64, 6, kind=kind, normalize=normalize)
    with torch.no_grad():
        sae.b_pre.normal_(0, 0.3)
        if kind == "batchtopk" or kind == "matryoshka":
            sae.threshold.fill_(0.2)
        if kind == "jumprelu":
            sae.jump_threshold.fill_(0.2)
    x = torch.randn(12, 16) * 2 + 0.5
    values, indices = sae.encode(x)
    assert (values >= 0).all() and ((values != 0).sum(dim=1) > 0).any()
    direction, reconstruction = steering.direction_and_reconstruction(sae, x)
    torch.testing.assert_close(reconstruction, sae(x).reconstruction)
    torch.testing.assert_close(steering.code_direction(sae, x), direction)
    centroid = steering.sae_centroid(sae, x)
    torch.testing.assert_close(reconstruction - centroid, direction, atol=1e-5, rtol=1e-5)  # x̂ = centroid + W_dec c
    everything = torch.arange(sae.n_latents)
    torch.testing.assert_close(steering.ablate(sae, x, everything), x - direction, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(steering.ablate(sae, x, everything[:0]), x)
    latent = int(indices[values != 0][0])
    current = (values * (indices == latent)).sum(dim=1, keepdim=True)
    moved = steering.clamp_latent(sae, x, latent, 5.0)
    row = sae.W_dec[latent] / sae.W_dec[latent].norm()
    residual = (moved - x) - ((moved - x) @ row)[:, None] * row
    assert residual.abs().max() < 1e-4 and ((moved - x) @ row).abs().gt(0).any()
    torch.testing.assert_close(steering.clamp_latent(sae, x[:1], latent, float(current[0].detach())), x[:1])
