"""Metrics for one SAE: every steering method over a grid of its parameters, on validation and test.

Selection follows METHOD.md §7: each method's parameters are chosen on the validation
rows carved from the train split (which the SAE did not train on), and the test figure
is reported at that point, beside the best test figure over the grid (the paper's way,
labelled `test_oracle_top1`: an optimistic number, not a result).

Neighbours for VS2++ and the retrieval baselines come from a `search(queries, k, key)`
callable, normally `vs2ray.retrieval.RetrievalIndex.search` (FAISS in Ray actors), over
the train rows that are not validation rows, so a validation query never finds itself.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vs2ray import steering
from vs2ray.sae import TopKSAE, per_sample_fvu

Search = Callable[[np.ndarray, int, str], tuple[np.ndarray, np.ndarray]]
NEIGHBOUR_METHODS = ("vs2pp", "vs2pp_oracle", "vs2pp_oracle_neighbours", "weighted_rag", "clip_steer")
VS2PP_METHODS = ("vs2pp", "vs2pp_oracle", "vs2pp_oracle_neighbours")


@dataclass
class SplitData:
    """Cached activations of one evaluation split (rows sorted by id)."""

    name: str
    cls: torch.Tensor  # (n, width) last-block [CLS] tokens
    embedding: torch.Tensor  # (n, embed) CLIP embeddings
    labels: torch.Tensor  # (n,) int64
    retrieval: torch.Tensor | None = None  # (n, r) neighbour-search vectors; default: embedding


@dataclass
class Grid:
    """Steering parameters evaluated for every method that uses them."""

    gammas: Sequence[float] = (1.5,)
    lambdas: Sequence[float] = (2.1,)
    gate_quantiles: Sequence[float] = (0.9, 0.95, 0.99, 0.995)
    rag_alphas: Sequence[float] = (0.25, 0.5, 0.75)
    n_neighbors: int = 50
    positive_rules: Sequence[str] = ("query", "majority")


@dataclass
class MethodResult:
    """One method's outcome: per-setting validation/test top-1 and the validation-selected point."""

    method: str
    settings: list[dict[str, float]]
    val_top1: list[float] = field(default_factory=list)
    val_top5: list[float] = field(default_factory=list)
    test_top1: list[float] = field(default_factory=list)
    test_top5: list[float] = field(default_factory=list)
    coverage: list[float | None] = field(default_factory=list)
    per_class_test: list[list[float]] = field(default_factory=list, repr=False)
    test_predictions: list[np.ndarray] = field(default_factory=list, repr=False)  # (n_test,) each

    @property
    def selected(self) -> int:
        return int(np.argmax(self.val_top1))

    def summary(self) -> dict[str, Any]:
        """Flat metrics: val/test at the validation-selected setting, and the test-oracle best."""
        i = self.selected
        out = {
            f"val_top1_{self.method}": self.val_top1[i],
            f"val_top5_{self.method}": self.val_top5[i],
            f"test_top1_{self.method}": self.test_top1[i],
            f"test_top5_{self.method}": self.test_top5[i],
            f"test_oracle_top1_{self.method}": max(self.test_top1),
        }
        out.update({f"selected_{name}_{self.method}": value for name, value in self.settings[i].items()})
        if self.coverage[i] is not None:
            out[f"coverage_{self.method}"] = self.coverage[i]
        return out


def accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[float, float, list[float]]:
    """top-1, top-5 and per-class top-1 of logits (n, classes) against labels (n,)."""
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit1 = ranked[:, 0] == labels
    top5 = (ranked == labels[:, None]).any(dim=1).float().mean().item()
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1)
    per_class = (torch.bincount(labels[hit1], minlength=num_classes) / counts).tolist()
    return hit1.float().mean().item(), top5, per_class


class Evaluator:
    """Evaluates the steering methods of one SAE on a validation and a test split."""

    def __init__(
        self,
        sae: TopKSAE,
        head: dict[str, torch.Tensor],
        text_classifier: torch.Tensor,
        pool: SplitData,
        val: SplitData,
        test: SplitData,
        search: Search | None = None,
    ) -> None:
        self.sae, self.head, self.classifier = sae.eval(), head, text_classifier
        self.pool, self.val, self.test = pool, val, test
        self.search = search
        self.num_classes = text_classifier.shape[0]
        self.mean = pool.cls.mean(dim=0)
        with torch.no_grad():
            self.calibration_fvu = steering.per_sample_fvu(sae, pool.cls, self.mean)
            self.pool_pseudo = self._logits_of_embeddings(pool.embedding).argmax(dim=1)
        self._neighbours: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._sae_pass: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._code_differences: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _direction_and_fvu(self, split: SplitData) -> tuple[torch.Tensor, torch.Tensor]:
        """W_dec c and per-sample FVU of a split, from one SAE pass shared by every (γ, λ, q) setting."""
        if split.name not in self._sae_pass:
            values, indices = self.sae.encode(split.cls)
            direction = self.sae.decode_without_bias(values, indices)
            fvu = per_sample_fvu(split.cls, direction + self.sae.b_pre, self.mean)
            self._sae_pass[split.name] = (direction, fvu)
        return self._sae_pass[split.name]

    def _logits_of_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        return steering.logits_from_embeddings(embeddings, self.classifier)

    def _neighbours_of(self, split: SplitData, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarities, pool row positions), each (n, k), memoised per split."""
        if split.name not in self._neighbours:
            if self.search is None:
                raise ValueError("VS2++ and the retrieval baselines need a retrieval index (search=...)")
            queries = (split.retrieval if split.retrieval is not None else split.embedding).numpy()
            scores, rows = self.search(queries, k, split.name)
            self._neighbours[split.name] = (torch.from_numpy(scores).to(split.cls), torch.from_numpy(rows).long())
        return self._neighbours[split.name]

    @torch.no_grad()
    def _token_method(
        self, split: SplitData, method: str, setting: dict[str, float]
    ) -> tuple[torch.Tensor, float | None]:
        """Logits of a method that steers [CLS] tokens, with its coverage if it is gated."""
        x, sae = split.cls, self.sae
        coverage = None
        if method == "zero_shot":
            steered = x
        elif method == "sae_rec_final":
            steered = steering.sae_rec_final(sae, x)
        elif method == "sae_rec_amplified":
            steered = steering.sae_rec_amplified(sae, x, setting["gamma"])
        elif method in ("vs2", "vs2_gated"):
            # x + λ(γ − 1) W_dec c: the SAE pass is shared by the whole grid (see steering.vs2)
            direction, fvu = self._direction_and_fvu(split)
            steered = steering.norm_preserving(x, setting["lambda"] * (setting["gamma"] - 1) * direction)
            if method == "vs2_gated":
                threshold = steering.gate_threshold(self.calibration_fvu, setting["quantile"])
                steered, coverage = steering.gated(x, steered, fvu, threshold)
        elif method == "centroid_shift":
            steered = steering.centroid_shift(x, self.mean, setting["lambda"] * (setting["gamma"] - 1))
        elif method in VS2PP_METHODS:
            steered, coverage = self._vs2pp(split, method, setting)
        else:
            raise ValueError(f"unknown token method {method!r}")
        return steering.classify(steered, self.head, self.classifier), coverage

    def _positives(self, split: SplitData, rows: torch.Tensor, method: str, rule: str) -> torch.Tensor:
        """S+ of each query (n, N) for a neighbour method (METHOD.md §4).

        vs2pp: neighbours' and query's zero-shot pseudo-labels under `rule`. vs2pp_oracle (the
        paper's upper bound): neighbours whose true label is the query's true label.
        vs2pp_oracle_neighbours: neighbours' true labels against the query's zero-shot label under
        `rule` (with 'query' it can only reinforce the current prediction).
        """
        if method == "vs2pp_oracle":
            return self.pool.labels[rows] == split.labels[:, None]
        neighbour_labels = (self.pool.labels if method == "vs2pp_oracle_neighbours" else self.pool_pseudo)[rows]
        query_pseudo = self._logits_of_embeddings(split.embedding).argmax(dim=1)
        return steering.positive_mask(query_pseudo, neighbour_labels, rule, self.num_classes)

    def _vs2pp(self, split: SplitData, method: str, setting: dict[str, Any]) -> tuple[torch.Tensor, float]:
        """VS2++ tokens and coverage (share of queries with both S+ and S− non-empty, the rest unsteered)."""
        # v̄ = (γ − 1) W_dec Δ: W_dec Δ depends on neither γ nor λ, so it is computed once per grid
        k, rule = int(setting["n_neighbors"]), str(setting.get("rule", ""))
        key = (split.name, method, rule, k)
        if key not in self._code_differences:
            rows = self._neighbours_of(split, k)[1][:, :k]
            positives = self._positives(split, rows, method, rule)
            directions = []
            for start in range(0, len(rows), 256):  # (chunk, N, n_latents) dense codes stay small
                chunk = rows[start : start + 256]
                values, indices = self.sae.encode(self.pool.cls[chunk.reshape(-1)])
                codes = self.sae.dense_codes(values, indices).reshape(*chunk.shape, -1)
                directions.append(steering.vs2pp_direction(self.sae, codes, positives[start : start + 256], 2.0))
            self._code_differences[key] = (torch.cat(directions), steering.has_both_groups(positives))
        code_difference, steerable = self._code_differences[key]
        steered = steering.vs2pp(split.cls, (setting["gamma"] - 1) * code_difference, setting["lambda"])
        return steering.steer_where(split.cls, steered, steerable)

    @torch.no_grad()
    def _embedding_method(
        self, split: SplitData, method: str, setting: dict[str, Any]
    ) -> tuple[torch.Tensor, float | None]:
        """Logits of a CLIP-space neighbour baseline, with clip_steer's coverage (queries with S+ and S−)."""
        k = int(setting["n_neighbors"])
        similarities, rows = self._neighbours_of(split, k)
        similarities, rows = similarities[:, :k], rows[:, :k]
        neighbour_embeddings = self.pool.embedding[rows]
        if method == "weighted_rag":
            mixed = steering.weighted_rag(
                split.embedding, neighbour_embeddings, similarities.clamp_min(0), setting["a"]
            )
            return self._logits_of_embeddings(mixed), None
        positives = self._positives(split, rows, "vs2pp", str(setting["rule"]))
        moved = steering.clip_steer(split.embedding, neighbour_embeddings, positives, setting["lambda"])
        mixed, coverage = steering.steer_where(split.embedding, moved, steering.has_both_groups(positives))
        return self._logits_of_embeddings(mixed), coverage

    def settings_for(self, method: str, grid: Grid) -> list[dict[str, float]]:
        """The parameter settings a method is evaluated at."""
        pairs = [{"gamma": g, "lambda": lam} for g, lam in itertools.product(grid.gammas, grid.lambdas)]
        neighbours = {"n_neighbors": grid.n_neighbors}
        with_rules = [{**neighbours, "rule": rule} for rule in grid.positive_rules]
        return {
            "zero_shot": [{}],
            "sae_rec_final": [{}],
            "sae_rec_amplified": [{"gamma": g} for g in grid.gammas],
            "vs2": pairs,
            "centroid_shift": pairs,
            "vs2_gated": [{**p, "quantile": q} for p in pairs for q in grid.gate_quantiles],
            "vs2pp": [{**p, **r} for r in with_rules for p in pairs],
            "vs2pp_oracle": [{**p, **neighbours} for p in pairs],  # S+ from the query's true label: no rule
            "vs2pp_oracle_neighbours": [{**p, **r} for r in with_rules for p in pairs],
            "weighted_rag": [{"a": a, **neighbours} for a in grid.rag_alphas],
            "clip_steer": [{"lambda": lam, **r} for r in with_rules for lam in grid.lambdas],
        }[method]

    def evaluate(self, method: str, grid: Grid) -> MethodResult:
        """Every setting of `method` on validation and test."""
        settings = self.settings_for(method, grid)
        result = MethodResult(method, settings)
        for setting in settings:
            for split in (self.val, self.test):
                if method in ("weighted_rag", "clip_steer"):
                    logits, coverage = self._embedding_method(split, method, setting)
                else:
                    logits, coverage = self._token_method(split, method, setting)
                top1, top5, per_class = accuracy(logits, split.labels, self.num_classes)
                if split is self.val:
                    result.val_top1.append(top1)
                    result.val_top5.append(top5)
                else:
                    result.test_top1.append(top1)
                    result.test_top5.append(top5)
                    result.coverage.append(coverage)
                    result.per_class_test.append(per_class)
                    result.test_predictions.append(logits.argmax(dim=1).cpu().numpy())
        return result

    def evaluate_all(self, methods: Sequence[str], grid: Grid) -> dict[str, MethodResult]:
        """Each method in `methods` (sae_rec_all needs one SAE per layer and is not evaluated here)."""
        return {m: self.evaluate(m, grid) for m in methods if m != "sae_rec_all"}


def grid_values(value: Any, points: int = 5) -> list[float]:
    """A constant -> [it]; a choice -> its values; a (log)uniform or int range -> `points` values across it."""
    from vs2ray.config import Distribution

    if not isinstance(value, Distribution):
        return [float(value)]
    if value.kind == "choice":
        return [float(v) for v in value.values]
    low, high = value.values
    spaced = np.geomspace(low, high, points) if value.kind == "loguniform" else np.linspace(low, high, points)
    return [round(float(v), 6) for v in spaced]


def format_table(results: dict[str, MethodResult]) -> str:
    """One row per method: validation top-1, test top-1 at the validation-selected setting, test-oracle best."""
    zero = results["zero_shot"].summary()["test_top1_zero_shot"] if "zero_shot" in results else None
    width = max(18, *(len(method) for method in results))
    lines = [
        f"{'method':<{width}} {'val top-1':>9} {'test top-1':>10} {'Δ zero-shot':>11} {'test-oracle':>11}  selected",
        "-" * (width + 68),
    ]
    for method, result in results.items():
        i = result.selected
        delta = f"{100 * (result.test_top1[i] - zero):+.2f}" if zero is not None else ""
        chosen = ", ".join(f"{k}={v}" for k, v in result.settings[i].items())
        if result.coverage[i] is not None:
            chosen += f", coverage={result.coverage[i]:.3f}"
        lines.append(
            f"{method:<{width}} {100 * result.val_top1[i]:>9.2f} {100 * result.test_top1[i]:>10.2f} {delta:>11} "
            f"{100 * max(result.test_top1):>11.2f}  {chosen}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m vs2ray.evaluate`: every configured method for one SAE, selected on validation."""
    import argparse

    from vs2ray.config import load_config
    from vs2ray.trainable import (
        build_evaluator,
        get_or_train_sae,
        needs_retrieval,
        prepare_data,
        sae_params,
        start_retrieval,
        steering_grid,
    )

    parser = argparse.ArgumentParser(prog="python -m vs2ray.evaluate", description=main.__doc__)
    parser.add_argument("--config", help="experiment YAML (default: built-in defaults = the bundled world)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--gammas", help="comma-separated γ grid (default: from steering.gamma)")
    parser.add_argument("--lambdas", help="comma-separated λ grid (default: from steering.lambda)")
    parser.add_argument("--address", default=None, help="Ray cluster address for the retrieval actors")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)

    def log(line: str) -> None:
        print(line, flush=True)

    data = prepare_data(config, log)
    trained = get_or_train_sae(config, sae_params(config), data.split, log)
    log(f"SAE {trained.directory} ({'reused' if trained.cache_hit else 'trained'}): FVU {trained.metrics['fvu']:.4f}")
    index = None  # the FAISS actors live as long as this handle
    if needs_retrieval(config):
        import ray

        if not ray.is_initialized():
            ray.init(address=args.address, include_dashboard=False, configure_logging=False, log_to_driver=False)
        index = start_retrieval(config, data)
    grid = steering_grid(
        config,
        gammas=[float(v) for v in args.gammas.split(",")] if args.gammas else None,
        lambdas=[float(v) for v in args.lambdas.split(",")] if args.lambdas else None,
    )
    evaluator = build_evaluator(data, trained.sae)
    results = evaluator.evaluate_all(config.steering.methods, grid)
    print(f"{len(evaluator.val.labels)} validation rows (carved from train), {len(evaluator.test.labels)} test rows")
    print(format_table(results))
    del index
    return 0


if __name__ == "__main__":
    from vs2ray.config import run_cli
    from vs2ray.evaluate import main as _main

    run_cli(_main)
