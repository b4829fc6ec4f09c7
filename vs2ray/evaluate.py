"""Metrics for one SAE: every steering method of the registry over a grid of its parameters, on validation and test.

Selection follows METHOD.md §7: each method's parameters are chosen on the validation
rows carved from the train split (which the SAE did not train on), and the test figure
is reported at that point, beside the best test figure over the grid (the paper's way,
labelled `test_oracle_top1`: an optimistic number, not a result).

Neighbours for VS2++ and the retrieval baselines come from a `search(queries, k, key)`
callable, normally `vs2ray.retrieval.RetrievalIndex.search` (FAISS in Ray actors), over
the train rows that are not validation rows, so a validation query never finds itself.
Steering at a block L before the last (METHOD.md §8) changes block L's tokens and finishes the
forward through blocks L+1 … end of the real encoder (`Encoder.run_block`), then ln_post, proj
and the zero-shot head; at the last block the cached path of §1 is used, as before.

This module knows neither Ray nor the config: the caller builds the Evaluator and the Grid.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from vs2ray import steering
from vs2ray.devices import trim_heap
from vs2ray.methods import GRID_PARAMS, METHODS, TYPOGRAPHIC_METRICS, Pool, Setting, Split, Steered, metric_name
from vs2ray.sae import ActivationRows, SparseAutoencoder, per_sample_fvu

Search = Callable[[np.ndarray, int, str], tuple[np.ndarray, np.ndarray]]


@dataclass
class SplitData:
    """Cached activations of one evaluation split (rows sorted by id)."""

    name: str
    cls: torch.Tensor  # (n, width) [CLS] tokens at the steering block
    embedding: torch.Tensor  # (n, embed) CLIP embeddings
    labels: torch.Tensor  # (n,) int64
    retrieval: torch.Tensor | None = None  # (n, r) neighbour-search vectors; default: embedding
    tokens: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> (n, T, width): steering inside
    attributes: torch.Tensor | None = None  # (n,) int64 nuisance attribute, on datasets with groups
    groups: torch.Tensor | None = None  # (n,) int64 class × attribute group, on datasets with groups
    # block -> every token (n·T rows, an image's consecutive) left on the host and read a part of the split
    # at a time (Evaluator.parts): the largest arrays of a trial are never whole in memory
    token_source: dict[int, ActivationRows] = field(default_factory=dict)

    def rows(self, start: int, stop: int, name: str | None = None) -> SplitData:
        """Images `start:stop` of the split, with the tokens of `token_source` read onto the split's device."""
        device = self.cls.device
        tokens = {block: t[start:stop] for block, t in self.tokens.items()}
        for block, rows in self.token_source.items():
            per_image = len(rows) // max(1, len(self.labels))
            read = rows.take(np.arange(start * per_image, stop * per_image)).to(device)
            tokens[block] = read.reshape(stop - start, per_image, rows.width)

        def cut(values: torch.Tensor | None) -> torch.Tensor | None:
            return None if values is None else values[start:stop]

        return SplitData(
            name=name or f"{self.name}[{start}:{stop}]",
            cls=self.cls[start:stop],
            embedding=self.embedding[start:stop],
            labels=self.labels[start:stop],
            retrieval=cut(self.retrieval),
            tokens=tokens,
            attributes=cut(self.attributes),
            groups=cut(self.groups),
        )


class PoolRows:
    """One column of the pool's rows, (n, d): a tensor already on the trial's device (a GPU's), or rows read
    from the host store a chunk or a gather at a time (`sae.ActivationRows`, memory-mapped: the pool is the
    SAE's training split, the largest of a trial, never whole in host memory). Every read is on `device`."""

    def __init__(self, rows: torch.Tensor | ActivationRows, device: torch.device | str = "cpu") -> None:
        self.rows = rows
        # a tensor's reads stay where it is; host rows are read onto `device`
        self.device = rows.device if isinstance(rows, torch.Tensor) else torch.device(device)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return int(self.rows.shape[1]) if isinstance(self.rows, torch.Tensor) else self.rows.width

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """The rows at `index` (any shape) -> (*index.shape, d)."""
        if isinstance(self.rows, torch.Tensor):
            return self.rows[index]
        flat = index.reshape(-1).cpu().numpy()
        return self.rows.take(flat).to(self.device).reshape(*index.shape, self.width)

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        """Every row in order, `size` at a time, each (≤ size, d)."""
        if isinstance(self.rows, torch.Tensor):
            yield from torch.split(self.rows, size)
        else:
            yield from (chunk.to(self.device) for chunk in self.rows.chunks(size))

    def mean(self) -> torch.Tensor:
        """The rows' mean (d,)."""
        return self.rows.mean(dim=0) if isinstance(self.rows, torch.Tensor) else self.rows.mean().to(self.device)

    def host_rows(self) -> ActivationRows:
        """The rows as `ActivationRows` on the host (a copy of a device tensor)."""
        return ActivationRows(self.rows.cpu()) if isinstance(self.rows, torch.Tensor) else self.rows


@dataclass
class PoolData:
    """The neighbour and calibration pool (the SAE's training rows): what `SplitData` holds, with its [CLS]
    rows and embeddings as `PoolRows`."""

    name: str
    cls: PoolRows  # (n, width) [CLS] tokens at the steering block
    embedding: PoolRows  # (n, embed) CLIP embeddings
    labels: torch.Tensor  # (n,) int64
    attributes: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    token_source: dict[int, ActivationRows] = field(default_factory=dict)  # as SplitData's

    @property
    def device(self) -> torch.device:
        return self.labels.device

    @classmethod
    def of(cls, split: SplitData | PoolData) -> PoolData:
        """A split's rows as a pool, its tensors where they are."""
        if isinstance(split, PoolData):
            return split
        return cls(split.name, PoolRows(split.cls), PoolRows(split.embedding), split.labels,
                   split.attributes, split.groups, split.token_source)  # fmt: skip


@dataclass
class Encoder:
    """Where in the encoder the SAE steers, and how the rest of the forward pass runs."""

    block: int  # the steering block (index from 0)
    num_blocks: int
    run_block: steering.RunBlock | None = None  # None: only the last block, from the cache
    all_tokens: bool = False  # the SAE reads every token: row-wise methods steer every token of the block
    block_saes: Sequence[SparseAutoencoder] = ()  # one SAE per block, for SAE_REC^A
    patches_only: bool = False  # with all_tokens: the SAE reads the patch tokens, [CLS] stays as it is

    @property
    def token_set(self) -> steering.TokenSet:
        """The tokens the SAE reads and steers: 'cls', 'all' or 'patches'."""
        return ("patches" if self.patches_only else "all") if self.all_tokens else "cls"

    @property
    def at_last_block(self) -> bool:
        return self.block == self.num_blocks - 1


@dataclass
class Grid:
    """Steering parameters evaluated for every method that uses them."""

    gammas: Sequence[float] = (1.5,)
    lambdas: Sequence[float] = (2.1,)
    gate_quantiles: Sequence[float] = (0.9, 0.95, 0.99, 0.995)
    rag_alphas: Sequence[float] = (0.25, 0.5, 0.75)
    n_neighbors: int = 50
    positive_rules: Sequence[str] = ("query", "majority")
    ablate_scores: Sequence[str] = ("within_class", "correlation")
    ablate_counts: Sequence[int] = (1, 2, 4, 8, 16)

    def values(self, param: str) -> Sequence[Any]:
        """The values a grid parameter (methods.GRID_PARAMS) takes."""
        return {
            "rule": self.positive_rules,
            "gamma": self.gammas,
            "lambda": self.lambdas,
            "quantile": self.gate_quantiles,
            "a": self.rag_alphas,
            "n_neighbors": (self.n_neighbors,),
            "score": self.ablate_scores,
            "n_latents": self.ablate_counts,
        }[param]


@dataclass
class MethodResult:
    """One method's outcome: per-setting validation/test top-1 (and worst-group accuracy on datasets with groups)
    and the validation-selected point: best validation top-1, or best validation worst-group accuracy."""

    method: str
    settings: list[Setting]
    select_by: str = "top1"  # or "worst_group"
    val_top1: list[float] = field(default_factory=list)
    val_top5: list[float] = field(default_factory=list)
    test_top1: list[float] = field(default_factory=list)
    test_top5: list[float] = field(default_factory=list)
    coverage: list[float | None] = field(default_factory=list)
    empty_negatives: list[float | None] = field(default_factory=list)  # share of test queries with an empty S−
    per_class_test: list[list[float]] = field(default_factory=list, repr=False)
    test_predictions: list[np.ndarray] = field(default_factory=list, repr=False)  # (n_test,) each
    val_worst: list[float] = field(default_factory=list)  # empty without groups
    test_worst: list[float] = field(default_factory=list)
    per_group_test: list[list[float]] = field(default_factory=list, repr=False)
    # on typographic attacks (the attribute is the class whose name is written on the image): on the attacked
    # images (another class's name written), the share predicted as the written word and the true-label top-1;
    # on the images without a word (shapes_typographic), top-1. Empty elsewhere; None where a split has none
    val_typographic: list[float | None] = field(default_factory=list)
    test_typographic: list[float | None] = field(default_factory=list)
    test_attacked_top1: list[float | None] = field(default_factory=list)
    test_clean_top1: list[float | None] = field(default_factory=list)
    units: list[int] | None = None  # the latents it acts on at the selected setting (`Method.units`)

    @property
    def selected(self) -> int:
        return int(np.argmax(self.val_worst if self.select_by == "worst_group" else self.val_top1))

    def summary(self) -> dict[str, Any]:
        """Flat metrics: val/test at the validation-selected setting, and the test-oracle best."""
        i, m = self.selected, self.method
        out: dict[str, Any] = {
            metric_name("val_top1", m): self.val_top1[i],
            metric_name("val_top5", m): self.val_top5[i],
            metric_name("test_top1", m): self.test_top1[i],
            metric_name("test_top5", m): self.test_top5[i],
            metric_name("test_oracle_top1", m): max(self.test_top1),
        }
        if self.val_worst:
            out[metric_name("val_worst_group", m)] = self.val_worst[i]
            out[metric_name("test_worst_group", m)] = self.test_worst[i]
        for name in TYPOGRAPHIC_METRICS:
            values = getattr(self, name)
            if values and values[i] is not None:
                out[metric_name(name, m)] = values[i]
        out.update({metric_name(f"selected_{name}", m): value for name, value in self.settings[i].items()})
        if self.coverage[i] is not None:
            out[metric_name("coverage", m)] = self.coverage[i]
        if self.empty_negatives[i] is not None:
            out[metric_name("empty_negatives", m)] = self.empty_negatives[i]
        if self.units is not None:
            out[metric_name("latents", m)] = ",".join(map(str, self.units))  # a string: Tune flattens no lists
        return out


def accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[float, float, list[float]]:
    """top-1, top-5 and per-class top-1 of logits (n, classes) against labels (n,)."""
    tally = Tally(num_classes)
    tally.add(logits, labels)
    return tally.top1(), tally.top5(), tally.per_class()


_TYPOGRAPHIC_COUNTS = ("attacked", "attacked_hits", "written_hits", "clean", "clean_hits")


class Tally:
    """What a split's accuracies need for one setting, counted a part at a time: hits and images per class,
    top-5 hits, hits and images per group, on typographic images the hits of attacked and of clean images and
    the attacked images predicted as their written word, and (for the test split) the predictions.
    Nothing grows with the split but the kept predictions, so a validation split as large as the store's
    tenth costs no more than a small one."""

    def __init__(self, num_classes: int, num_groups: int = 0, keep_predictions: bool = False) -> None:
        self.num_classes, self.num_groups = num_classes, num_groups
        self.hits = torch.zeros(num_classes, dtype=torch.long)
        self.seen = torch.zeros(num_classes, dtype=torch.long)
        self.top5_hits = 0
        self.group_hits = torch.zeros(num_groups, dtype=torch.long)
        self.group_seen = torch.zeros(num_groups, dtype=torch.long)
        self.typographic_counts: dict[str, int] | None = None  # attacked / clean: images, true hits; written hits
        self.predictions: list[torch.Tensor] | None = [] if keep_predictions else None

    def add(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        groups: torch.Tensor | None = None,
        written: torch.Tensor | None = None,
    ) -> None:
        """Count one part's logits (n, classes) against its labels (n,), and where given its groups (n,) and
        the classes whose names are written on its images (n,): a value outside 0 … classes − 1 is no word,
        the label itself is no attack, any other class an attack."""
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
        predicted = ranked[:, 0]
        hit = predicted == labels
        self.hits += torch.bincount(labels[hit], minlength=self.num_classes).cpu()
        self.seen += torch.bincount(labels, minlength=self.num_classes).cpu()
        self.top5_hits += int((ranked == labels[:, None]).any(dim=1).sum())
        if self.num_groups and groups is not None:
            self.group_hits += torch.bincount(groups[hit], minlength=self.num_groups).cpu()
            self.group_seen += torch.bincount(groups, minlength=self.num_groups).cpu()
        if written is not None:
            self._count_typographic(predicted, labels, written)
        if self.predictions is not None:
            self.predictions.append(predicted.cpu())

    def _count_typographic(self, predicted: torch.Tensor, labels: torch.Tensor, written: torch.Tensor) -> None:
        counts = self.typographic_counts = self.typographic_counts or dict.fromkeys(_TYPOGRAPHIC_COUNTS, 0)
        clean = (written < 0) | (written >= self.num_classes)
        attacked = ~clean & (written != labels)
        hit = predicted == labels
        for name, value in (
            ("attacked", attacked.sum()),
            ("attacked_hits", (attacked & hit).sum()),
            ("written_hits", (attacked & (predicted == written)).sum()),
            ("clean", clean.sum()),
            ("clean_hits", (clean & hit).sum()),
        ):
            counts[name] += int(value)

    def _share(self, hits: str, images: str) -> float | None:
        counts = self.typographic_counts
        return None if counts is None or not counts[images] else counts[hits] / counts[images]

    @property
    def images(self) -> int:
        return int(self.seen.sum())

    def top1(self) -> float:
        return int(self.hits.sum()) / max(1, self.images)

    def top5(self) -> float:
        return self.top5_hits / max(1, self.images)

    def per_class(self) -> list[float]:
        """Top-1 within each class (classes,); 0 for a class with no images."""
        return (self.hits / self.seen.clamp_min(1)).tolist()

    def per_group(self) -> list[float] | None:
        """Top-1 within each group (groups,), NaN for a group with no images; None without groups."""
        if not self.num_groups or not int(self.group_seen.sum()):
            return None
        seen = self.group_seen.double()
        return torch.where(seen > 0, self.group_hits.double() / seen.clamp_min(1), torch.nan).tolist()

    def typographic(self) -> float | None:
        """The share of attacked images (another class's name written) predicted as the written class; None
        where no image is attacked."""
        return self._share("written_hits", "attacked")

    def attacked_top1(self) -> float | None:
        """Top-1 against the true label on the attacked images; None where no image is attacked."""
        return self._share("attacked_hits", "attacked")

    def clean_top1(self) -> float | None:
        """Top-1 on the images with no word written; None where every image has a word (RTA-100, PAINT)."""
        return self._share("clean_hits", "clean")


def worst_group(per_group: list[float]) -> float:
    """The lowest accuracy among the groups that have rows."""
    return min(a for a in per_group if not np.isnan(a))


def settings_for(method: str, grid: Grid) -> list[Setting]:
    """The parameter settings a method is evaluated at: the product of its grid parameters' values."""
    params = [p for p in GRID_PARAMS if p in METHODS[method].params]
    return [dict(zip(params, values, strict=True)) for values in itertools.product(*(grid.values(p) for p in params))]


class Evaluator:
    """Evaluates the registry's steering methods for one SAE on a validation and a test split.

    It is the `methods.Context` the method functions read: the SAE pass, the neighbours and
    VS2++'s code differences are computed once and shared by every setting that needs them.
    """

    def __init__(
        self,
        sae: SparseAutoencoder,
        head: dict[str, torch.Tensor],
        text_classifier: torch.Tensor,
        pool: SplitData | PoolData,
        val: SplitData,
        test: SplitData,
        search: Search | None = None,
        encoder: Encoder | None = None,
        num_groups: int = 0,
        select_by: str = "top1",
        empty_negatives: steering.EmptyNegatives = "pool_mean",
        written_words: bool = False,
    ) -> None:
        self.sae, self.head, self.classifier = sae.eval(), head, text_classifier
        self.empty_negatives = empty_negatives
        self.written_words = written_words  # the attribute is the class whose name is written on the image
        self.pool, self.val, self.test = PoolData.of(pool), val, test
        self.search = search
        self.encoder = encoder
        self.num_classes = text_classifier.shape[0]
        self.num_groups, self.select_by = num_groups, select_by
        if select_by == "worst_group" and not num_groups:
            raise ValueError("selection by worst-group accuracy needs group labels (num_groups > 0)")
        self._latent_scores: dict[str, torch.Tensor] = {}
        self._sae_passes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._zero_shot: dict[str, torch.Tensor] = {}
        self._neighbours: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._code_differences: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._pool_mean_code: torch.Tensor | None = None
        self._token_rows: dict[str, SplitData] = {}
        self._whole: dict[str, SplitData] = {}
        # the pool's per-sample FVUs, sorted ascending: every gate quantile is read off them
        if self._steers_every_token:
            self.mean, self.calibration_fvu = self._calibrate(self._pool_token_rows())
        else:
            self.mean = self.pool.cls.mean()
            self.calibration_fvu = self._cls_calibration_fvu()
        _sort_in_place(self.calibration_fvu)

    SAE_PASS_ROWS = 16384  # rows per SAE pass: the (rows, latents) pre-activations stay small
    # host tokens read per part of a split: steering holds several copies of a part's tokens at once
    PART_BYTES: ClassVar[dict[str, int]] = {"cpu": 4 * 2**20, "cuda": 256 * 2**20}

    def _pool_token_rows(self) -> ActivationRows:
        assert self.encoder is not None  # only an all-token SAE inside the encoder steers every token
        if self.encoder.block not in self.pool.token_source:
            raise ValueError("an all-token SAE inside the encoder calibrates on the pool's every token (token_source)")
        tokens = self.pool.token_source[self.encoder.block]
        return tokens.without_first() if self.encoder.patches_only else tokens

    def pool_steered_rows(self) -> ActivationRows:
        """The pool rows a row-wise method steers (every token of the block, or [CLS]), on the host."""
        return self._pool_token_rows() if self._steers_every_token else self.pool.cls.host_rows()

    def parts(self, split: SplitData) -> Iterator[SplitData]:
        """`split` in parts of about PART_BYTES (by device) of host tokens, each with its tokens on the device;
        the whole split (memoised, under its own name) when it has none on the host or fits in one part.
        What was memoised for a part is dropped once the next part is asked for."""
        if not split.token_source:
            yield split
            return
        n = len(split.labels)
        per_image = sum(4 * rows.width * len(rows) // max(1, n) for rows in split.token_source.values())
        budget = self.PART_BYTES["cuda" if split.cls.device.type == "cuda" else "cpu"]
        size = max(1, budget // max(1, per_image))
        if n <= size:
            yield self.whole(split)
            return
        for start in range(0, n, size):
            part = split.rows(start, min(n, start + size))
            yield part
            self._forget(part.name)
            trim_heap()  # a part's freed arrays would otherwise stay in the heap, and it grows part by part

    def whole(self, split: SplitData) -> SplitData:
        """`split` with every token of its host blocks on the device (memoised per split)."""
        if not split.token_source:
            return split
        if split.name not in self._whole:
            self._whole[split.name] = split.rows(0, len(split.labels), split.name)
        return self._whole[split.name]

    def _forget(self, name: str) -> None:
        """Drop what was memoised for the split (or part) called `name` and for its views (`name/tokens`)."""

        def of_name(key: str) -> bool:
            return key == name or key.startswith(f"{name}/")

        memos: list[dict[Any, Any]] = [self._sae_passes, self._zero_shot, self._token_rows]
        for memo in memos:
            for key in [key for key in memo if of_name(key)]:
                del memo[key]
        for keyed in (self._neighbours, self._code_differences):
            for key in [key for key in keyed if of_name(key[0])]:
                del keyed[key]

    @torch.no_grad()
    def _calibrate(self, rows: ActivationRows) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (d,), per-sample FVU (n,)) of host rows, read a batch at a time onto the SAE's device."""
        device = self.pool.device
        mean = rows.mean().to(device)
        fvus = torch.empty(len(rows), device=device)  # filled in place: no list of parts and their cat
        for start, x in zip(range(0, len(rows), self.SAE_PASS_ROWS), rows.chunks(self.SAE_PASS_ROWS), strict=True):
            x = x.to(device)
            fvus[start : start + len(x)] = per_sample_fvu(x, self.sae(x).reconstruction, mean)
        return mean, fvus

    @torch.no_grad()
    def _cls_calibration_fvu(self) -> torch.Tensor:
        """Per-sample FVU of the pool's [CLS] rows (n,), a pass at a time: the pool's W_dec c (n, d), which
        `sae_pass` would keep, is never needed."""
        return torch.cat(
            [
                per_sample_fvu(x, steering.direction_and_reconstruction(self.sae, x)[1], self.mean)
                for x in self.pool.cls.chunks(self.SAE_PASS_ROWS)
            ]
        )

    @property
    def _steers_every_token(self) -> bool:
        # at the last block only [CLS] reaches the head, so steering the other tokens changes nothing
        return self.encoder is not None and self.encoder.all_tokens and not self.encoder.at_last_block

    def _token_view(self, split: Split) -> SplitData:
        """`split` with every token of the steering block as a row (n·T rows), for row-wise methods."""
        if split.name not in self._token_rows:
            assert self.encoder is not None  # only an all-token SAE inside the encoder steers every token
            tokens = split.tokens[self.encoder.block]
            if self.encoder.patches_only:
                tokens = tokens[:, 1:]
            per_image = tokens.shape[1]

            def repeat(rows: torch.Tensor) -> torch.Tensor:
                return rows.repeat_interleave(per_image, dim=0)

            self._token_rows[split.name] = SplitData(
                name=f"{split.name}/tokens",
                cls=tokens.reshape(-1, tokens.shape[-1]),
                embedding=repeat(split.embedding),
                labels=repeat(split.labels),
                attributes=None if split.attributes is None else repeat(split.attributes),
                groups=None if split.groups is None else repeat(split.groups),
            )
        return self._token_rows[split.name]

    # ------------------------------------------------ methods.Context

    @torch.no_grad()
    def sae_pass(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        """W_dec c (n, d) and per-sample FVU (n,) of a split, from one SAE pass shared by every setting."""
        if split.name not in self._sae_passes:
            n = len(split.cls)
            direction = torch.empty_like(split.cls)
            fvus = torch.empty(n, dtype=split.cls.dtype, device=split.cls.device)
            for start in range(0, n, self.SAE_PASS_ROWS):
                x = split.cls[start : start + self.SAE_PASS_ROWS]
                part, reconstruction = steering.direction_and_reconstruction(self.sae, x)
                direction[start : start + len(x)] = part
                fvus[start : start + len(x)] = per_sample_fvu(x, reconstruction, self.mean)
            self._sae_passes[split.name] = (direction, fvus)
        return self._sae_passes[split.name]

    def gate_threshold(self, quantile: float) -> float:
        return steering.gate_threshold(self.calibration_fvu, quantile, is_sorted=True)

    def zero_shot_labels(self, split: Split | Pool) -> torch.Tensor:
        if split.name not in self._zero_shot:
            # a chunk of logits at a time: the pool's (n, classes) logits would be the largest array of a trial
            embedding = split.embedding
            chunks = (
                torch.split(embedding, self.SAE_PASS_ROWS)
                if isinstance(embedding, torch.Tensor)
                else embedding.chunks(self.SAE_PASS_ROWS)
            )
            labels = [steering.logits_from_embeddings(chunk, self.classifier).argmax(dim=1) for chunk in chunks]
            self._zero_shot[split.name] = torch.cat(labels) if labels else split.labels[:0]
        return self._zero_shot[split.name]

    def neighbours(self, split: Split, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarities, pool row positions), each (n, k), memoised per (split, k)."""
        if (split.name, k) not in self._neighbours:
            if self.search is None:
                raise ValueError("VS2++ and the retrieval baselines need a retrieval index (search=...)")
            # the split lives on the trial's device; FAISS takes host arrays
            queries = (split.retrieval if split.retrieval is not None else split.embedding).cpu().numpy()
            scores, rows = self.search(queries, k, split.name)
            device = split.cls.device
            self._neighbours[(split.name, k)] = (
                torch.from_numpy(scores).to(split.cls),
                torch.from_numpy(rows).long().to(device),
            )
        return self._neighbours[(split.name, k)]

    @torch.no_grad()
    def code_difference(
        self, split: Split, k: int, key: tuple[Any, ...], positives_of: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """W_dec (mean S+ codes − mean S− codes) (n, d), which queries are steered (n,) and which have an
        empty S− (n,). An empty S−'s mean code is the pool's mean code under `empty_negatives='pool_mean'`.

        Depends on neither γ nor λ, so it is computed once per (split, k, key) for the whole grid.
        """
        memo = (split.name, k, key)
        if memo not in self._code_differences:
            rows = self.neighbours(split, k)[1]
            positives = positives_of(rows)
            pool_mean = self.pool_mean_code() if self.empty_negatives == "pool_mean" else None
            differences = []
            for start in range(0, len(rows), 256):  # (chunk, N, n_latents) dense codes stay small
                chunk = rows[start : start + 256]
                codes = self._dense_codes(self.pool.cls.take(chunk.reshape(-1))).reshape(*chunk.shape, -1)
                difference = steering.vs2pp_direction(self.sae, codes, positives[start : start + 256], 2.0, pool_mean)
                # in the query's space: a layer-norm SAE's code difference moves the query σ(query) times as far
                differences.append(difference * self.sae.input_scale(split.cls[start : start + 256]))
            steered = steering.steerable_queries(positives, self.empty_negatives)
            self._code_differences[memo] = (torch.cat(differences), steered, steering.lacks_negatives(positives))
        return self._code_differences[memo]

    def _dense_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Dense sparse codes (n, n_latents) of rows x (n, d)."""
        return self.sae.dense_codes(*self.sae.encode(x))

    @torch.no_grad()
    def pool_mean_code(self) -> torch.Tensor:
        """The pool's mean sparse code over its [CLS] rows (n_latents,): an empty S−'s mean code in VS2++."""
        if self._pool_mean_code is None:
            cls = self.pool.cls
            total = torch.zeros(self.sae.n_latents, device=self.pool.device)
            for chunk in cls.chunks(4096):
                total += self._dense_codes(chunk).sum(0)
            self._pool_mean_code = total / len(cls)
        return self._pool_mean_code

    def pool_mean_embedding(self) -> torch.Tensor:
        """The pool's mean CLIP embedding (embed,): an empty S−'s mean in CLIP-space steering."""
        return self.pool.embedding.mean()

    @torch.no_grad()
    def reconstruct_every_block(self, split: Split) -> torch.Tensor:
        """SAE_REC^A: the last block's [CLS] (n, width) with every block's output replaced by its SAE's."""
        encoder = self.encoder
        if encoder is None or encoder.run_block is None or len(encoder.block_saes) != encoder.num_blocks:
            raise ValueError("sae_rec_all needs the encoder and one SAE per block (Encoder.block_saes)")
        if 0 not in split.tokens:
            raise ValueError("sae_rec_all needs every token of block 0 (extraction.tokens: all, layers from 0)")
        return steering.sae_rec_every_block(split.tokens[0], encoder.block_saes, encoder.run_block, encoder.token_set)

    @torch.no_grad()
    def latent_scores(self, score: steering.AssociationScore) -> torch.Tensor:
        """Each latent's association with the nuisance attribute (latents,), on the pool's labelled rows
        (the SAE's training rows): per image, the mean code over the rows the SAE steers ([CLS], or every
        token of the block). Memoised per score."""
        if score not in self._latent_scores:
            pool = self.pool
            if pool.attributes is None:
                raise ValueError("ablate needs the nuisance attribute of the pool rows (a dataset with groups)")
            # 256 images at a time: dense (rows, latents) codes stay small even for every token. [CLS] rows are
            # already on the device; every token is read from the host
            if self._steers_every_token:
                tokens = self._pool_token_rows()
                per_image = len(tokens) // len(pool.labels)
                chunks: Iterator[torch.Tensor] = (x.to(pool.device) for x in tokens.chunks(256 * per_image))
            else:
                per_image, chunks = 1, pool.cls.chunks(256)
            image_codes = torch.cat([steering.mean_codes_per_image(self._dense_codes(x), per_image) for x in chunks])
            self._latent_scores[score] = steering.association_scores(
                image_codes, pool.labels, pool.attributes, score, self.num_classes
            )
        return self._latent_scores[score]

    # ------------------------------------------------ evaluation

    @torch.no_grad()
    def logits(self, method: str, split: Split, setting: Setting) -> tuple[torch.Tensor, Steered]:
        """Logits (n, classes) of `method` at `setting` on `split`, and what its function returned (the steered
        rows, their coverage and the share of queries whose S− was empty)."""
        entry = METHODS[method]
        if entry.steer is None:
            raise ValueError(f"{method} is not available: {entry.unavailable}")
        if isinstance(split, SplitData) and split.token_source and not split.tokens:
            split = self.whole(split)  # a caller's whole split; evaluate() goes part by part instead
        # a plain (rows, coverage) tuple is a Steered too: methods written before empty_negatives keep working
        rows = self.steered_rows(split) if entry.kind == "token" and entry.rowwise else split
        steered = Steered(*entry.steer(self, rows, setting))
        if entry.kind == "embedding":
            return steering.logits_from_embeddings(steered.rows, self.classifier), steered
        final_cls = steered.rows if entry.kind == "final" else self.final_cls(split, steered.rows, entry.rowwise)
        return steering.classify(final_cls, self.head, self.classifier), steered

    def steered_rows(self, split: Split) -> Split:
        """The rows a row-wise method steers: every token of the steering block (an all-token SAE inside the
        encoder: n·T rows, an image's tokens consecutive), else the [CLS] tokens (n rows)."""
        return self._token_view(split) if self._steers_every_token else split

    def final_cls(self, split: Split, steered: torch.Tensor, every_token: bool = True) -> torch.Tensor:
        """The last block's [CLS] (n, width) from steered rows of `split` at the steering block: [CLS] tokens
        (n, width), or with `every_token` the rows of `steered_rows` (n·T, width); c copies of the split's
        rows stacked (c·n rows, say c steered units) give c·n outputs."""
        if self.encoder is None or self.encoder.at_last_block:
            return steered
        tokens = split.tokens[self.encoder.block]  # (n, T, width)
        every = self._steers_every_token and every_token
        patches = every and self.encoder.patches_only
        per_image = tokens.shape[1] - patches if every else 1
        copies = len(steered) // (tokens.shape[0] * per_image)
        tokens = tokens.repeat(copies, 1, 1)
        if patches:
            return self._finish(steering.with_patches(tokens, steered.reshape(len(tokens), per_image, -1)))
        return self._finish(steered.reshape(tokens.shape) if every else steering.with_cls(tokens, steered))

    def _finish(self, tokens_ntd: torch.Tensor) -> torch.Tensor:
        """The last block's [CLS] (n, width) from the steering block's tokens, through the real encoder."""
        encoder = self.encoder
        if encoder is None or encoder.run_block is None:
            block = encoder.block if encoder else "?"
            raise ValueError(f"steering at block {block} needs the encoder's blocks (Encoder.run_block)")
        return steering.finish_forward(tokens_ntd, encoder.block + 1, encoder.num_blocks, encoder.run_block)[:, 0]

    def _tallies(
        self, method: str, split: SplitData, settings: list[Setting], keep_predictions: bool = False
    ) -> tuple[list[Tally], list[Steered]]:
        """Per setting: `method`'s accuracies over the whole split, counted part by part (`Tally`), and its
        coverage and empty-S− shares over the split (no rows: they stay with their part)."""
        tallies = [Tally(self.num_classes, self.num_groups, keep_predictions) for _ in settings]
        shares: list[list[tuple[int, Steered]]] = [[] for _ in settings]
        for part in self.parts(split):
            for i, setting in enumerate(settings):
                part_logits, steered = self.logits(method, part, setting)
                written = part.attributes if self.written_words else None
                tallies[i].add(part_logits, part.labels, part.groups, written)
                shares[i].append((len(part.labels), steered._replace(rows=torch.zeros(0))))  # rows: the part's
        return tallies, [_pooled_shares(s) for s in shares]

    def evaluate(self, method: str, grid: Grid) -> MethodResult:
        """Every setting of `method` on validation and test."""
        settings = settings_for(method, grid)
        result = MethodResult(method, settings, self.select_by)
        for split in (self.val, self.test):
            is_test = split is self.test
            for tally, steered in zip(*self._tallies(method, split, settings, keep_predictions=is_test), strict=True):
                per_group = tally.per_group()
                if not is_test:
                    result.val_top1.append(tally.top1())
                    result.val_top5.append(tally.top5())
                    if per_group is not None:
                        result.val_worst.append(worst_group(per_group))
                    if self.written_words:
                        result.val_typographic.append(tally.typographic())
                else:
                    result.test_top1.append(tally.top1())
                    result.test_top5.append(tally.top5())
                    result.coverage.append(steered.coverage)
                    result.empty_negatives.append(steered.empty_negatives)
                    result.per_class_test.append(tally.per_class())
                    result.test_predictions.append(torch.cat(tally.predictions or []).numpy())
                    if per_group is not None:
                        result.test_worst.append(worst_group(per_group))
                        result.per_group_test.append(per_group)
                    if self.written_words:
                        result.test_typographic.append(tally.typographic())
                        result.test_attacked_top1.append(tally.attacked_top1())
                        result.test_clean_top1.append(tally.clean_top1())
        units = METHODS[method].units
        if units is not None:
            result.units = units(self, settings[result.selected])
        return result

    def validate(self, method: str, grid: Grid) -> dict[str, float]:
        """`method`'s validation top-1 and top-5 (and worst-group accuracy) at its selected setting, without
        touching the test split."""
        scores = []
        for tally in self._tallies(method, self.val, settings_for(method, grid))[0]:
            per_group = tally.per_group()
            score = {metric_name("val_top1", method): tally.top1(), metric_name("val_top5", method): tally.top5()}
            if per_group is not None:
                score[metric_name("val_worst_group", method)] = worst_group(per_group)
            scores.append(score)
        key = metric_name("val_worst_group" if self.select_by == "worst_group" else "val_top1", method)
        return max(scores, key=lambda score: score[key])

    def with_sae(self, sae: SparseAutoencoder) -> Evaluator:
        """The same splits, head and encoder with another SAE (every SAE-derived cache starts empty)."""
        return Evaluator(
            sae,
            self.head,
            self.classifier,
            self.pool,
            self.val,
            self.test,
            self.search,
            self.encoder,
            self.num_groups,
            self.select_by,
            self.empty_negatives,
            self.written_words,
        )

    def evaluate_all(self, methods: Sequence[str], grid: Grid) -> dict[str, MethodResult]:
        """Each method in `methods`, in that order."""
        return {m: self.evaluate(m, grid) for m in methods}


def _sort_in_place(values: torch.Tensor) -> None:
    """Sort `values` (n,) ascending where they are (on the CPU without a copy; torch.sort makes two)."""
    if values.device.type == "cpu":
        values.numpy().sort()
    else:
        values.copy_(values.sort().values)


def _pooled_shares(parts: list[tuple[int, Steered]]) -> Steered:
    """One Steered for a split from its parts' (rows, Steered): coverage and empty-S− shares weighted by rows."""

    def pooled(values: list[tuple[int, float | None]]) -> float | None:
        known = [(n, v) for n, v in values if v is not None]
        return sum(n * v for n, v in known) / sum(n for n, _ in known) if known else None

    if len(parts) == 1:
        return parts[0][1]
    coverage = pooled([(n, steered.coverage) for n, steered in parts])
    return Steered(parts[0][1].rows, coverage, pooled([(n, steered.empty_negatives) for n, steered in parts]))


def format_table(results: dict[str, MethodResult]) -> str:
    """One row per method: validation top-1, test top-1 at the validation-selected setting, test-oracle best,
    and at that setting on typographic datasets the attacked images' true-label and typographic accuracy and
    the clean images' top-1, on other datasets with groups the test worst-group accuracy."""
    zero = results["zero_shot"].test_top1[0] if "zero_shot" in results else None
    typographic = any(result.test_typographic for result in results.values())
    extra = (
        {"attacked top-1": "test_attacked_top1", "typographic": "test_typographic", "clean top-1": "test_clean_top1"}
        if typographic
        else {"test worst-group": "test_worst"}
        if any(result.test_worst for result in results.values())
        else {}
    )
    width = max(18, *(len(method) for method in results))
    extra_header = "".join(f" {header:>16}" for header in extra)
    lines = [
        f"{'method':<{width}} {'val top-1':>9} {'test top-1':>10} {'Δ zero-shot':>11} {'test-oracle':>11}"
        f"{extra_header}  selected",
        "-" * (width + 68 + len(extra_header)),
    ]
    for method, result in results.items():
        i = result.selected
        delta = f"{100 * (result.test_top1[i] - zero):+.2f}" if zero is not None else ""
        chosen = ", ".join(f"{k}={v}" for k, v in result.settings[i].items())
        if result.coverage[i] is not None:
            chosen += f", coverage={result.coverage[i]:.3f}"
        if result.empty_negatives[i] is not None:
            chosen += f", S− empty={result.empty_negatives[i]:.3f}"
        values = [getattr(result, name)[i] for name in extra.values()]
        shown = "".join(f" {'—':>16}" if v is None else f" {100 * v:>16.2f}" for v in values)
        lines.append(
            f"{method:<{width}} {100 * result.val_top1[i]:>9.2f} {100 * result.test_top1[i]:>10.2f} {delta:>11} "
            f"{100 * max(result.test_top1):>11.2f}{shown}  {chosen}"
        )
    return "\n".join(lines)
