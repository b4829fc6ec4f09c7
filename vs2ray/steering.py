"""Steering methods as pure tensor functions over cached [CLS] tokens (METHOD.md §1, §3, §4). Torch only.

Every method maps [CLS] tokens x (n, d) of a block to steered tokens (or, for the
CLIP-space baselines, to embeddings), and every one ends in the same classification
step: `normalize(ln_post(x) @ proj)` with the store's head, then `100 · e @ Tᵀ` with the
store's text classifier T (classes, embed dim). Tokens steered at a block before the last
first run through the remaining blocks of the real encoder (`finish_forward`, METHOD.md §8).

VS2 with amplification γ and scale λ (α = λ(γ − 1)):

    v     = D(γc) − D(c) = (γ − 1) W_dec c
    x_hat = (x + λv) · ‖x‖ / ‖x + λv‖

Because x + λv = x + α·W_dec c depends on (γ, λ) only through α, a whole (γ, λ) grid is
evaluated by computing W_dec c once and one normalisation per distinct α.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from vs2ray.sae import SparseAutoencoder

if TYPE_CHECKING:  # shapes in the signatures; jaxtyping is only needed by the type checker
    from jaxtyping import Bool, Float, Int
    from torch import Tensor

PositiveRule = Literal["query", "majority"]
EmptyNegatives = Literal["pool_mean", "skip"]  # what an empty S− becomes in VS2++ (METHOD.md §4)


# ---------------------------------------------------------------- classification step


def apply_head(
    cls_tokens: Float[Tensor, "n width"], head: dict[str, Tensor], eps: float = 1e-5
) -> Float[Tensor, "n embed"]:
    """Finish CLIP's image forward from last-block [CLS] tokens: normalize(ln_post(x) @ proj).

    cls_tokens: (n, width) -> (n, embed_dim), rows unit-norm. `head` holds
    'ln_post.weight', 'ln_post.bias' (width,) and 'proj' (width, embed_dim).
    """
    width = cls_tokens.shape[-1]
    weight, bias = head["ln_post.weight"].to(cls_tokens), head["ln_post.bias"].to(cls_tokens)
    embedding = F.layer_norm(cls_tokens, (width,), weight, bias, eps) @ head["proj"].to(cls_tokens)
    return torch.div(embedding, embedding.norm(dim=-1, keepdim=True))


def logits_from_embeddings(
    embeddings: Float[Tensor, "n embed"], text_classifier: Float[Tensor, "classes embed"]
) -> Float[Tensor, "n classes"]:
    """Zero-shot logits 100 · e @ Tᵀ: (n, embed_dim), (classes, embed_dim) -> (n, classes)."""
    return 100.0 * embeddings @ text_classifier.to(embeddings).T


def classify(
    cls_tokens: Float[Tensor, "n width"], head: dict[str, Tensor], text_classifier: Float[Tensor, "classes embed"]
) -> Float[Tensor, "n classes"]:
    """Logits (n, classes) of [CLS] tokens (n, width) through the head and the text classifier."""
    return logits_from_embeddings(apply_head(cls_tokens, head), text_classifier)


RunBlock = Callable[[torch.Tensor, int], torch.Tensor]  # (tokens (n, T, d), block) -> that block's output


def finish_forward(
    tokens_ntd: Float[Tensor, "n T d"], start: int, stop: int, run_block: RunBlock
) -> Float[Tensor, "n T d"]:
    """Run blocks start … stop − 1 of the encoder on tokens (n, T, d); at start == stop, the tokens themselves."""
    for block in range(start, stop):
        tokens_ntd = run_block(tokens_ntd, block)
    return tokens_ntd


def with_cls(tokens_ntd: Float[Tensor, "n T d"], cls_tokens: Float[Tensor, "n d"]) -> Float[Tensor, "n T d"]:
    """A copy of tokens (n, T, d) whose [CLS] token (position 0) is `cls_tokens` (n, d)."""
    replaced = tokens_ntd.clone()
    replaced[:, 0] = cls_tokens
    return replaced


def with_patches(tokens_ntd: Float[Tensor, "n T d"], patches: Float[Tensor, "n P d"]) -> Float[Tensor, "n T d"]:
    """A copy of tokens (n, T, d) whose tokens after [CLS] are `patches` (n, T − 1, d)."""
    replaced = tokens_ntd.clone()
    replaced[:, 1:] = patches
    return replaced


TokenSet = Literal["cls", "all", "patches"]


def reconstruct_tokens(
    sae: SparseAutoencoder, tokens_ntd: Float[Tensor, "n T d"], token_set: TokenSet
) -> Float[Tensor, "n T d"]:
    """Tokens (n, T, d) with the `token_set` ones ([CLS], every token, or the patches) replaced by their
    reconstruction and the others kept."""
    width = tokens_ntd.shape[-1]
    if token_set == "cls":
        return with_cls(tokens_ntd, sae.forward(tokens_ntd[:, 0]).reconstruction)
    if token_set == "patches":
        patches = tokens_ntd[:, 1:]
        return with_patches(tokens_ntd, sae.forward(patches.reshape(-1, width)).reconstruction.reshape(patches.shape))
    return sae.forward(tokens_ntd.reshape(-1, width)).reconstruction.reshape(tokens_ntd.shape)


# ---------------------------------------------------------------- SAE-based methods


def norm_preserving(x: Float[Tensor, "n d"], shift: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
    """(x + shift) rescaled to the norm of x, row by row: (n, d), (n, d) -> (n, d)."""
    moved = x + shift
    return torch.mul(moved, torch.div(x.norm(dim=-1, keepdim=True), moved.norm(dim=-1, keepdim=True)))


def sae_rec_final(sae: SparseAutoencoder, x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
    """SAE_REC^F: x replaced by its reconstruction D(c): (n, d) -> (n, d)."""
    return sae.forward(x).reconstruction


def sae_rec_every_block(
    first_tokens: Float[Tensor, "n T d"], saes: Sequence[SparseAutoencoder], run_block: RunBlock, token_set: TokenSet
) -> Float[Tensor, "n d"]:
    """SAE_REC^A: block 0's output tokens (n, T, d) through the whole encoder with every block's output
    replaced by the reconstruction of that block's SAE (`saes[b]`, one per block, in order) on its token set
    (`reconstruct_tokens`). Returns the last block's [CLS] tokens (n, d)."""
    tokens = first_tokens
    for block, sae in enumerate(saes):
        if block > 0:
            tokens = run_block(tokens, block)
        tokens = reconstruct_tokens(sae, tokens, token_set)
    return tokens[:, 0]


def sae_rec_amplified(sae: SparseAutoencoder, x: Float[Tensor, "n d"], gamma: float) -> Float[Tensor, "n d"]:
    """SAE_REC^{F+γ}: x replaced by D(γc) (back in x's space): (n, d) -> (n, d)."""
    values, indices = sae.encode(x)
    return sae.from_sae_space(sae.decode(gamma * values, indices), x)


def direction_and_reconstruction(
    sae: SparseAutoencoder, x: Float[Tensor, "n d"]
) -> tuple[Float[Tensor, "n d"], Float[Tensor, "n d"]]:
    """From one SAE pass over x (n, d): u = W_dec c in x's space (σ(x) · W_dec c under a layer-norm SAE) and
    the reconstruction D(c) in x's space, each (n, d)."""
    values, indices = sae.encode(x)
    direction = sae.decode_without_bias(values, indices)
    return direction * sae.input_scale(x), sae.from_sae_space(direction + sae.b_pre, x)


def code_direction(sae: SparseAutoencoder, x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
    """u = W_dec c (without b_pre, in x's space): the direction VS2 amplifies, v = (γ − 1) u. (n, d) -> (n, d)."""
    return direction_and_reconstruction(sae, x)[0]


def sae_centroid(sae: SparseAutoencoder, x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"] | Float[Tensor, " d"]:
    """The SAE's centroid b_pre in the space of x (n, d): b_pre itself (d,), or per row (n, d) under a
    layer-norm SAE."""
    return sae.b_pre if sae.normalize == "none" else sae.from_sae_space(sae.b_pre.expand_as(x), x)


def vs2_from_direction(
    x: Float[Tensor, "n d"], direction: Float[Tensor, "n d"], gamma: float, lam: float
) -> Float[Tensor, "n d"]:
    """VS2 given u = `code_direction(sae, x)`: x + λ(γ − 1) u, rescaled to ‖x‖. (n, d), (n, d) -> (n, d).

    A (γ, λ) grid computes u once and calls this per setting.
    """
    return norm_preserving(x, lam * (gamma - 1) * direction)


def vs2(sae: SparseAutoencoder, x: Float[Tensor, "n d"], gamma: float, lam: float) -> Float[Tensor, "n d"]:
    """VS2: x + λ(γ − 1) W_dec c, rescaled to ‖x‖. (n, d) -> (n, d)."""
    return vs2_from_direction(x, code_direction(sae, x), gamma, lam)


def centroid_shift(
    x: Float[Tensor, "n d"], centroid: Float[Tensor, " d"] | Float[Tensor, "n d"], alpha: float
) -> Float[Tensor, "n d"]:
    """Our ablation: x + α(x − b_pre) rescaled to ‖x‖, with the SAE's centroid b_pre (d,) or (n, d)
    (`sae_centroid`) and no sparse code.

    It is VS2's closed form (METHOD.md §3, Proposition 3.1) without the SAE's error term α·ε(x):
    VS2's unnormalised shift minus this one is exactly α·(D(c) − x).
    """
    return norm_preserving(x, alpha * (x - centroid))


# ---------------------------------------------------------------- FVU gate


def gate_threshold(calibration_fvu: Float[Tensor, " m"], quantile: float, is_sorted: bool = False) -> float:
    """τ = the q-quantile of per-sample FVU on unlabeled calibration activations (m,): torch.quantile's linear
    interpolation between the two order statistics around q·(m-1), read off `calibration_fvu` when it
    `is_sorted` (ascending), else found by two selections. (torch.quantile sorts a float64 copy, and a
    selection copies the values with int64 positions: hundreds of MB for the 16M tokens of an 8 GB pool.)"""
    rank = quantile * (len(calibration_fvu) - 1)
    below, above = math.floor(rank), math.ceil(rank)

    def order_statistic(position: int) -> float:
        if is_sorted:
            return calibration_fvu[position].item()
        return calibration_fvu.kthvalue(position + 1).values.item()

    low = order_statistic(below)
    high = low if above == below else order_statistic(above)
    return low + (high - low) * (rank - below)


def steer_where(
    x: Float[Tensor, "n f"], steered: Float[Tensor, "n f"], steer: Bool[Tensor, " n"]
) -> tuple[Float[Tensor, "n f"], float]:
    """Rows of `steered` where `steer` (n,) holds and of x elsewhere; returns them and the coverage (share steered)."""
    return torch.where(steer[:, None], steered, x), steer.float().mean().item()


def gated(
    x: Float[Tensor, "n d"], steered: Float[Tensor, "n d"], fvu: Float[Tensor, " n"], threshold: float
) -> tuple[Float[Tensor, "n d"], float]:
    """Keep `steered` where FVU(x) <= τ and x elsewhere; returns the tokens and the coverage (share steered)."""
    return steer_where(x, steered, fvu <= threshold)


# ---------------------------------------------------------------- VS2++ and the retrieval baselines


def positive_mask(
    query_labels: Int[Tensor, " n"], neighbour_labels: Int[Tensor, "n N"], rule: PositiveRule, num_classes: int
) -> Bool[Tensor, "n N"]:
    """Which neighbours are positives: (n,), (n, N) -> (n, N) bool.

    'query': same (pseudo-)label as the query. 'majority': the most frequent label among the
    query's N neighbours (ties go to the smallest label).
    """
    if rule == "query":
        reference = query_labels
    elif rule == "majority":
        counts = F.one_hot(neighbour_labels, num_classes).sum(dim=1)  # (n, classes)
        reference = counts.argmax(dim=1)
    else:
        raise ValueError(f"retrieval.positive_rule must be 'query' or 'majority', got {rule!r}")
    return neighbour_labels == reference[:, None]


def has_both_groups(positives: Bool[Tensor, "n N"]) -> Bool[Tensor, " n"]:
    """(n, N) bool -> (n,): whether a query has at least one positive and one negative neighbour."""
    return positives.any(dim=1) & (~positives).any(dim=1)


def lacks_negatives(positives: Bool[Tensor, "n N"]) -> Bool[Tensor, " n"]:
    """(n, N) bool -> (n,): queries whose S+ holds every neighbour (a unanimous neighbourhood, S− empty)."""
    return positives.all(dim=1)


def steerable_queries(positives: Bool[Tensor, "n N"], empty_negatives: EmptyNegatives) -> Bool[Tensor, " n"]:
    """(n, N) bool -> (n,): the queries VS2++ steers (METHOD.md §4).

    An empty S+ leaves a query unsteered: there is nothing to steer toward. An empty S− takes the
    pool's mean in its place ('pool_mean'), or leaves the query unsteered too ('skip').
    """
    if empty_negatives == "pool_mean":
        return positives.any(dim=1)
    if empty_negatives == "skip":
        return has_both_groups(positives)
    raise ValueError(f"retrieval.empty_negatives must be 'pool_mean' or 'skip', got {empty_negatives!r}")


def group_mean_difference(
    features: Float[Tensor, "n N f"], positives: Bool[Tensor, "n N"], pool_mean: Float[Tensor, " f"] | None = None
) -> Float[Tensor, "n f"]:
    """mean over S+ minus mean over S− of neighbour features (n, N, f) -> (n, f).

    An empty group's mean is 0, except an empty S−'s when `pool_mean` (f,) is given: then the pool's
    mean feature takes its place, so the difference points from the average image toward S+.
    """
    weights_pos = positives.to(features.dtype)
    weights_neg = 1.0 - weights_pos
    mean_pos = (weights_pos[..., None] * features).sum(1) / weights_pos.sum(1, keepdim=True).clamp_min(1.0)
    mean_neg = (weights_neg[..., None] * features).sum(1) / weights_neg.sum(1, keepdim=True).clamp_min(1.0)
    if pool_mean is not None:
        mean_neg = torch.where(lacks_negatives(positives)[:, None], pool_mean.to(features.dtype), mean_neg)
    return mean_pos - mean_neg


def vs2pp_direction(
    sae: SparseAutoencoder,
    neighbour_codes: Float[Tensor, "n N latents"],
    positives: Bool[Tensor, "n N"],
    gamma: float,
    pool_mean_code: Float[Tensor, " latents"] | None = None,
) -> Float[Tensor, "n d"]:
    """v̄ = (γ − 1) W_dec (mean_{S+} c − mean_{S−} c) from dense neighbour codes (n, N, n_latents) -> (n, d).

    With `pool_mean_code` (n_latents,), an empty S−'s mean code is the pool's mean code.
    """
    return (gamma - 1) * (group_mean_difference(neighbour_codes, positives, pool_mean_code) @ sae.W_dec)


def vs2pp(x: Float[Tensor, "n d"], direction: Float[Tensor, "n d"], lam: float) -> Float[Tensor, "n d"]:
    """VS2++: the norm-preserving update of VS2 with v̄ in place of v. (n, d) -> (n, d)."""
    return norm_preserving(x, lam * direction)


def weighted_rag(
    query_embeddings: Float[Tensor, "n e"],
    neighbour_embeddings: Float[Tensor, "n N e"],
    similarities: Float[Tensor, "n N"],
    a: float,
) -> Float[Tensor, "n e"]:
    """E = a·q + (1 − a) Σ_j w_j r_j with w_j = s_j / Σ s, renormalised: (n, e), (n, N, e), (n, N) -> (n, e).

    Negative similarities count as 0; a query whose similarities are all ≤ 0 weighs its neighbours equally
    (instead of dividing by a zero sum).
    """
    similarities = similarities.clamp_min(0)
    total = similarities.sum(dim=1, keepdim=True)
    weights = torch.where(total > 0, similarities / total.clamp_min(1e-12), 1.0 / similarities.shape[1])
    mixed = a * query_embeddings + (1 - a) * (weights[..., None] * neighbour_embeddings).sum(1)
    return torch.div(mixed, mixed.norm(dim=-1, keepdim=True))


def clip_steer(
    query_embeddings: Float[Tensor, "n e"],
    neighbour_embeddings: Float[Tensor, "n N e"],
    positives: Bool[Tensor, "n N"],
    strength: float,
    pool_mean_embedding: Float[Tensor, " e"] | None = None,
) -> Float[Tensor, "n e"]:
    """CLIP-space steering: q + strength·(mean_{S+} r − mean_{S−} r), renormalised: (n, e), (n, N, e) -> (n, e).

    With `pool_mean_embedding` (e,), an empty S−'s mean is the pool's mean embedding.
    """
    moved = query_embeddings + strength * group_mean_difference(neighbour_embeddings, positives, pool_mean_embedding)
    return torch.div(moved, moved.norm(dim=-1, keepdim=True))


# ---------------------------------------------------------------- feature suppression (METHOD.md §8)

AssociationScore = Literal["within_class", "correlation", "text_present"]


def mean_codes_per_image(codes: Float[Tensor, "rows latents"], per_image: int) -> Float[Tensor, "n latents"]:
    """Mean code of each image's consecutive `per_image` rows: (n·per_image, latents) -> (n, latents)."""
    return codes.reshape(-1, per_image, codes.shape[-1]).mean(dim=1)


def association_scores(
    codes: Float[Tensor, "n latents"],
    labels: Int[Tensor, " n"],
    attributes: Int[Tensor, " n"],
    score: AssociationScore,
    num_classes: int | None = None,
) -> Float[Tensor, " latents"]:
    """How strongly each latent tracks the nuisance attribute: codes (n, latents), labels (n,), attributes (n,)
    -> (latents,).

    'correlation': the largest |Pearson r| between a latent's activation and an attribute value's
    indicator (one value against the rest). On a spurious train split the attribute agrees with the
    class, so this also ranks the class's own latents high.
    'within_class': for each class and attribute value, the mean activation where the attribute
    takes that value minus where it does not, among that class's images only, over the latent's
    standard deviation; averaged over the classes that have both, then the largest |·| over values.
    Holding the class fixed leaves the attribute's own effect (the minority images carry the
    contrast). A latent that never varies scores 0.
    'text_present' (typographic images: the attribute is the class whose name is written, a value outside
    0 … num_classes − 1 where none is): 'within_class' over whether a word is written at all.
    """
    if score == "text_present":
        if num_classes is None:
            raise ValueError("the text_present score needs num_classes (which attribute values are no word)")
        attributes = ((attributes >= 0) & (attributes < num_classes)).long()
        if torch.unique(attributes).numel() < 2:
            raise ValueError("the text_present score needs images with and without a word written on them")
        score = "within_class"
    codes = codes.double()
    std = codes.std(dim=0)
    spread = std.clamp_min(1e-12)
    values = torch.unique(attributes)
    per_value = []
    for value in values:
        indicator = (attributes == value).double()
        if score == "correlation":
            centred_ind = indicator - indicator.mean()
            covariance = (centred_ind[:, None] * (codes - codes.mean(dim=0))).mean(dim=0)
            per_value.append(covariance / (spread * centred_ind.std().clamp_min(1e-12)))
        elif score == "within_class":
            differences = []
            for label in torch.unique(labels):
                in_class = labels == label
                with_value, without = in_class & (indicator > 0), in_class & (indicator == 0)
                if with_value.any() and without.any():
                    differences.append(codes[with_value].mean(dim=0) - codes[without].mean(dim=0))
            if differences:
                per_value.append(torch.stack(differences).mean(dim=0) / spread)
        else:
            raise ValueError(
                f"steering.ablate_score must be 'within_class', 'correlation' or 'text_present', got {score!r}"
            )
    if not per_value:
        return torch.zeros(codes.shape[1], dtype=torch.float32)
    scores = torch.stack(per_value).abs().amax(dim=0)
    return torch.where(std > 0, scores, torch.zeros_like(scores)).float()


def ablate(sae: SparseAutoencoder, x: Float[Tensor, "n d"], latents: Int[Tensor, " s"]) -> Float[Tensor, "n d"]:
    """Feature suppression: x with the selected latents' contribution Σ_{f∈S} c_f W_dec[f] removed. (n, d) -> (n, d).

    The SAE's error term and every other latent stay, so an empty `latents` leaves x unchanged.
    """
    values, indices = sae.encode(x)
    selected = torch.isin(indices, latents.to(indices.device))
    return x - sae.input_scale(x) * sae.decode_without_bias(values * selected, indices)


# ---------------------------------------------------------------- steerability (METHOD.md §8)


def clamp_latent(sae: SparseAutoencoder, x: Float[Tensor, "n d"], latent: int, value: float) -> Float[Tensor, "n d"]:
    """x with latent `latent`'s activation set to `value` (the rest of the code and the error term kept). (n, d).

    `value` is in the SAE's code space: under a layer-norm SAE the move in x's space is σ(x) times as long."""
    values, indices = sae.encode(x)
    current = (values * (indices == latent)).sum(dim=1, keepdim=True)  # 0 where the latent does not fire
    return x + sae.input_scale(x) * (value - current) * sae.W_dec[latent]


def clamp_neuron(x: Float[Tensor, "n d"], neuron: int, value: float) -> Float[Tensor, "n d"]:
    """x with coordinate `neuron` of the residual stream set to `value`. (n, d) -> (n, d)."""
    steered = x.clone()
    steered[:, neuron] = value
    return steered


def concept_shift(default_probs: Float[Tensor, "n V"], steered_probs: Float[Tensor, "n V"]) -> Float[Tensor, " V"]:
    """Mean change of the output distribution over the concept vocabulary: (n, V), (n, V) -> (V,)."""
    return (steered_probs - default_probs).mean(dim=0)


def sum_squared_shift(shift: Float[Tensor, " V"]) -> float:
    """The companion paper's S_f of one steered unit: Σ_c (Δ̄p_c)² over its concept shift Δ̄p (V,).

    Large when the mass moves onto few concepts (one concept gaining g scores about g², spread over m
    concepts g²/m), whatever the direction of each change."""
    return float(shift.double().pow(2).sum())


def shift_power(shift: Float[Tensor, " V"]) -> tuple[float, int]:
    """The companion paper's power P_f of one steered unit, max_c Δ̄p_c of its shift (V,), and that concept c."""
    gain, concept = shift.max(dim=0)
    return float(gain), int(concept)


def steerability(shift: Float[Tensor, " V"], top: int = 1) -> tuple[float, list[int]]:
    """S of one steered unit from its concept shift Δp (V,): the probability mass the `top` concepts gain,
    Σ of the `top` largest max(Δp_j, 0), with those concepts (by gain, largest first).

    Mass spread thinly over many concepts scores low; mass moved onto a few scores high: S measures how
    precisely the unit moves the output toward specific concepts, in probability units (0 … 1).
    """
    gains, concepts = shift.clamp_min(0).topk(min(top, shift.numel()))
    return float(gains.sum()), concepts.tolist()
