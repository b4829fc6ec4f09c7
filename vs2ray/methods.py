"""The one registry of steering methods: name, table label, kind, grid parameters and function.

Everything that lists, labels, dispatches or grids the methods reads `METHODS`: the config's
allowed values, the Evaluator, the result tables. A method's function maps one evaluation
split to steered [CLS] tokens of the steering block (kind "token": the Evaluator finishes the
forward and classifies through the head), to the last block's [CLS] tokens (kind "final"), or
to CLIP embeddings (kind "embedding"), plus its coverage (the share of rows it steered, or None) and,
for the neighbour-group methods, the share of queries whose S− was empty (METHOD.md §4).
A "rowwise" token method treats each row alone, so with an all-token SAE inside the encoder the
Evaluator hands it every token of the block as rows.
It reads what it needs from a `Context` (the Evaluator), which shares the expensive parts
between settings: one SAE pass per split, neighbours per (split, N), VS2++'s W_dec Δ per
(split, method, rule, N).

Adding a method: write its maths in `steering.py`, then one `Method(...)` entry below whose
function calls it (see docs/development.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import torch

from vs2ray import steering
from vs2ray.sae import SparseAutoencoder

Setting = dict[str, Any]


class Steered(NamedTuple):
    """What a method function returns."""

    rows: torch.Tensor  # steered tokens or embeddings (n, ·)
    coverage: float | None = None  # share of rows steered; None: every row
    empty_negatives: float | None = None  # share of queries whose S− was empty (VS2++ and CLIP-space steering)


GRID_PARAMS = ("rule", "gamma", "lambda", "quantile", "a", "n_neighbors", "score", "n_latents")  # the listing order


class Split(Protocol):
    """One evaluation split (evaluate.SplitData)."""

    name: str
    cls: torch.Tensor  # (n, width)
    embedding: torch.Tensor  # (n, embed)
    labels: torch.Tensor  # (n,)
    attributes: torch.Tensor | None  # (n,) the nuisance attribute, on datasets with groups
    groups: torch.Tensor | None  # (n,) class × attribute
    retrieval: torch.Tensor | None  # (n, r) neighbour-search vectors; None: the embeddings
    tokens: dict[int, torch.Tensor]  # block -> (n, T, width), for steering inside the encoder


class PoolColumn(Protocol):
    """A column of the pool's rows (evaluate.PoolRows), read by gathers."""

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """The rows at `index` (any shape) -> (*index.shape, d)."""

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        """Every row in order, `size` at a time."""


class Pool(Protocol):
    """The neighbour pool (evaluate.PoolData): the SAE's training rows."""

    name: str
    labels: torch.Tensor  # (n,)

    @property
    def embedding(self) -> PoolColumn: ...  # (n, embed)


class Context(Protocol):
    """What method functions may ask of the Evaluator (shared, memoised computations)."""

    @property
    def sae(self) -> SparseAutoencoder: ...

    @property
    def pool(self) -> Pool: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def empty_negatives(self) -> steering.EmptyNegatives:
        """What an empty S− becomes: the pool's mean, or no steering."""

    def sae_pass(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_dec c (n, d), per-sample FVU (n,)) of a split."""

    def gate_threshold(self, quantile: float) -> float:
        """τ: the quantile of per-sample FVU on the calibration (pool) rows."""

    def neighbours(self, split: Split, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cosine similarities, pool row positions), each (n, k)."""

    def zero_shot_labels(self, split: Split | Pool) -> torch.Tensor:
        """Zero-shot predictions (n,) of a split (the pool's are the neighbours' pseudo-labels)."""

    def code_difference(
        self, split: Split, k: int, key: tuple[Any, ...], positives_of: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_dec (mean S+ codes − mean S− codes) (n, d), steered (n,), S− empty (n,)), memoised per (split, k, key)."""

    def pool_mean_embedding(self) -> torch.Tensor:
        """The pool's mean CLIP embedding (embed,): an empty S−'s mean in CLIP-space steering."""

    def reconstruct_every_block(self, split: Split) -> torch.Tensor:
        """The last block's [CLS] (n, d) with every block's output replaced by its SAE's reconstruction."""

    def latent_scores(self, score: steering.AssociationScore) -> torch.Tensor:
        """Each latent's association with the nuisance attribute on the labelled pool rows (latents,)."""


METHOD_METRICS = ("val_top1", "val_top5", "test_top1", "test_top5", "test_oracle_top1")  # reported per method
GROUP_METRICS = ("val_worst_group", "test_worst_group")  # reported per method too, on datasets with groups
# and on typographic attacks: on the attacked images, the share predicted as the class whose name is written
# on them and the true-label top-1; top-1 on the images without a word (where a dataset has them)
TYPOGRAPHIC_METRICS = ("val_typographic", "test_typographic", "test_attacked_top1", "test_clean_top1")


def metric_name(kind: str, method: str) -> str:
    """A method's reported metric, e.g. ('val_top1', 'vs2') -> 'val_top1_vs2' (also 'selected_gamma', 'coverage')."""
    return f"{kind}_{method}"


def method_of(column: str, kind: str) -> str | None:
    """The method a metric column belongs to (the inverse of `metric_name`), or None if it is not a `kind` column."""
    prefix = f"{kind}_"
    return column.removeprefix(prefix) if column.startswith(prefix) else None


@dataclass(frozen=True)
class Method:
    """One steering method."""

    name: str
    label: str  # its name in tables (the paper's)
    kind: Literal["token", "final", "embedding"]
    params: tuple[str, ...]  # grid parameters, a subset of GRID_PARAMS
    steer: Callable[[Context, Split, Setting], Steered] | None  # None: not available yet
    uses_sae: bool = True  # False: its result does not depend on the SAE
    unavailable: str = ""  # why `steer` is None
    rowwise: bool = True  # each row is steered alone (no neighbours), so any token may be a row
    # the SAE latents it acts on at a setting, reported as `latents_<method>` (feature cards show them)
    units: Callable[[Context, Setting], list[int]] | None = None

    @property
    def uses_neighbours(self) -> bool:
        return "n_neighbors" in self.params


# ---------------------------------------------------------------- method functions


def _zero_shot(ctx: Context, split: Split, s: Setting) -> Steered:
    return Steered(split.cls)


def _sae_rec_final(ctx: Context, split: Split, s: Setting) -> Steered:
    return Steered(steering.sae_rec_final(ctx.sae, split.cls))


def _sae_rec_all(ctx: Context, split: Split, s: Setting) -> Steered:
    return Steered(ctx.reconstruct_every_block(split))


def _sae_rec_amplified(ctx: Context, split: Split, s: Setting) -> Steered:
    return Steered(steering.sae_rec_amplified(ctx.sae, split.cls, s["gamma"]))


def _vs2(ctx: Context, split: Split, s: Setting) -> Steered:
    direction, _ = ctx.sae_pass(split)  # one SAE pass serves the whole (γ, λ) grid
    return Steered(steering.vs2_from_direction(split.cls, direction, s["gamma"], s["lambda"]))


def _vs2_gated(ctx: Context, split: Split, s: Setting) -> Steered:
    direction, fvu = ctx.sae_pass(split)
    steered = steering.vs2_from_direction(split.cls, direction, s["gamma"], s["lambda"])
    return Steered(*steering.gated(split.cls, steered, fvu, ctx.gate_threshold(s["quantile"])))


def _centroid_shift(ctx: Context, split: Split, s: Setting) -> Steered:
    return Steered(
        steering.centroid_shift(split.cls, steering.sae_centroid(ctx.sae, split.cls), s["lambda"] * (s["gamma"] - 1))
    )


def _ablated_latents(ctx: Context, s: Setting) -> list[int]:
    """The `n_latents` latents most associated with the nuisance attribute under `score`, strongest first."""
    return ctx.latent_scores(s["score"]).topk(int(s["n_latents"])).indices.tolist()


def _ablate(ctx: Context, split: Split, s: Setting) -> Steered:
    return Steered(steering.ablate(ctx.sae, split.cls, torch.tensor(_ablated_latents(ctx, s))))


def _pseudo_positives(ctx: Context, split: Split, rows: torch.Tensor, s: Setting) -> torch.Tensor:
    """S+ by `rule` over zero-shot labels of the query and of its neighbours (deployable)."""
    neighbour_labels = ctx.zero_shot_labels(ctx.pool)[rows]
    return steering.positive_mask(ctx.zero_shot_labels(split), neighbour_labels, s["rule"], ctx.num_classes)


def _oracle_positives(ctx: Context, split: Split, rows: torch.Tensor, s: Setting) -> torch.Tensor:
    """S+ = neighbours whose true label is the query's true label (the paper's upper bound)."""
    return ctx.pool.labels[rows] == split.labels[:, None]


def _true_neighbour_positives(ctx: Context, split: Split, rows: torch.Tensor, s: Setting) -> torch.Tensor:
    """S+ by `rule` over the neighbours' true labels against the query's zero-shot label."""
    return steering.positive_mask(ctx.zero_shot_labels(split), ctx.pool.labels[rows], s["rule"], ctx.num_classes)


def _vs2pp_with(
    positives: Callable[[Context, Split, torch.Tensor, Setting], torch.Tensor],
) -> Callable[[Context, Split, Setting], Steered]:
    """A VS2++ method whose S+ comes from `positives`; a query with an empty S+ stays unsteered, and one with an
    empty S− is steered against the pool's mean code (or left unsteered, by `ctx.empty_negatives`)."""

    def steer(ctx: Context, split: Split, s: Setting) -> Steered:
        key = (positives.__name__, s.get("rule"))
        difference, steerable, no_negatives = ctx.code_difference(
            split, int(s["n_neighbors"]), key, lambda rows: positives(ctx, split, rows, s)
        )
        moved = steering.vs2pp(split.cls, (s["gamma"] - 1) * difference, s["lambda"])
        return Steered(*steering.steer_where(split.cls, moved, steerable), no_negatives.float().mean().item())

    return steer


def _weighted_rag(ctx: Context, split: Split, s: Setting) -> Steered:
    similarities, rows = ctx.neighbours(split, int(s["n_neighbors"]))
    return Steered(steering.weighted_rag(split.embedding, ctx.pool.embedding.take(rows), similarities, s["a"]))


def _clip_steer(ctx: Context, split: Split, s: Setting) -> Steered:
    _, rows = ctx.neighbours(split, int(s["n_neighbors"]))
    positives = _pseudo_positives(ctx, split, rows, s)
    pool_mean = ctx.pool_mean_embedding() if ctx.empty_negatives == "pool_mean" else None
    moved = steering.clip_steer(split.embedding, ctx.pool.embedding.take(rows), positives, s["lambda"], pool_mean)
    steerable = steering.steerable_queries(positives, ctx.empty_negatives)
    no_negatives = steering.lacks_negatives(positives).float().mean().item()
    return Steered(*steering.steer_where(split.embedding, moved, steerable), no_negatives)


_VS2PP = ("rule", "gamma", "lambda", "n_neighbors")
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("zero_shot", "zero-shot CLIP", "token", (), _zero_shot, uses_sae=False),
        Method("sae_rec_final", "SAE_REC^F", "token", (), _sae_rec_final),
        Method("sae_rec_all", "SAE_REC^A", "final", (), _sae_rec_all, rowwise=False),
        Method("sae_rec_amplified", "SAE_REC^{F+γ}", "token", ("gamma",), _sae_rec_amplified),
        Method("vs2", "VS2", "token", ("gamma", "lambda"), _vs2),
        Method("vs2_gated", "VS2 + FVU gate", "token", ("gamma", "lambda", "quantile"), _vs2_gated),
        Method("vs2pp", "VS2++ (pseudo-labels)", "token", _VS2PP, _vs2pp_with(_pseudo_positives), rowwise=False),
        Method(
            "vs2pp_oracle",
            "VS2++ (oracle: query's true label)",
            "token",
            ("gamma", "lambda", "n_neighbors"),
            _vs2pp_with(_oracle_positives),
            rowwise=False,
        ),
        Method(
            "vs2pp_oracle_neighbours",
            "VS2++ (true neighbour labels, zero-shot query)",
            "token",
            _VS2PP,
            _vs2pp_with(_true_neighbour_positives),
            rowwise=False,
        ),
        Method("weighted_rag", "weighted RAG", "embedding", ("a", "n_neighbors"), _weighted_rag, uses_sae=False),
        Method(
            "clip_steer",
            "CLIP-space steering",
            "embedding",
            ("rule", "lambda", "n_neighbors"),
            _clip_steer,
            uses_sae=False,
        ),
        Method("centroid_shift", "centroid shift (ours)", "token", ("gamma", "lambda"), _centroid_shift),
        Method("ablate", "feature suppression", "token", ("score", "n_latents"), _ablate, units=_ablated_latents),
    )
}
