"""Steerability S_f (METHOD.md §8, Joseph et al. 2025): how precisely steering one unit alone moves CLIP's output
over a concept vocabulary, for every sampled SAE latent and, as the paper's comparison, the block's neurons.

The unit's activation is clamped to a value on every token the SAE reads (the SAE's error term kept), the rest
of the forward runs, and the output distribution is p = softmax(100 · e · Vᵀ) over the text embeddings V of the
vocabulary; Δ̄p_c is the mean over the probe images of p_c(steered) − p_c(unsteered). By default, as the authors'
code (ViT-Prisma) defines it:

- S_f = Σ_c (Δ̄p_c)² (`score: sum_squares`); a unit is steerable when S_f > `threshold` (0.1);
- the clamp is absolute (`clamp: absolute`, `value` 150): a latent's activation, or a neuron (one coordinate of
  the residual stream at the steering block, the basis the SAE decomposes), is set to 150; amplification only
  (`direction: amplify`);
- beside S_f: the power P_f = max_c Δ̄p_c, S_f / P_f, and the concept c of P_f (the unit's top concept).

What the authors leave open, and we chose (docs/companion.md): a seeded sample of `units` latents and of `units`
neurons; the probe images are the first `probe_images` validation rows. The earlier vs2ray score stays available:
`score: top_gain` (the probability mass the `top` most-gaining concepts receive, steerable when ≥ threshold),
`clamp: relative` (`strength` × the unit's on-level, the `quantile` of its positive activations on up to 8,192
training rows; a latent never active there is never steered) and `direction: both` (the larger of amplify and
suppress).

This module knows neither Ray nor the config: the trial builds the settings and the vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from vs2ray import steering
from vs2ray.evaluate import Evaluator
from vs2ray.sae import ActivationRows

UnitKind = Literal["latent", "neuron"]
Score = Literal["sum_squares", "top_gain"]
Clamp = Literal["absolute", "relative"]
Direction = Literal["amplify", "both"]
CALIBRATION_ROWS = 8192  # training rows (seeded sample) a unit's on-level is measured on
CONFIDENCE_Z = 1.959964  # a two-sided 95% interval


@dataclass(frozen=True)
class SteerabilitySettings:
    probe_images: int = 64
    units: int = 64  # latents sampled, and neurons sampled
    score: Score = "sum_squares"  # S_f = Σ_c (Δ̄p_c)², or the `top` concepts' gain
    clamp: Clamp = "absolute"  # amplify sets a unit to `value`, or to `strength` × its on-level
    value: float = 150.0
    strength: float = 10.0
    quantile: float = 0.9  # on-level (relative clamp): this quantile of the unit's positive activations
    direction: Direction = "amplify"  # amplify only, or the larger of amplify and suppress (clamp to 0)
    top: int = 1  # concepts reported per unit (and whose gain makes S under top_gain)
    threshold: float = 0.1  # steerable: S_f > threshold (sum_squares), S ≥ threshold (top_gain)
    seed: int = 0

    @classmethod
    def from_keys(cls, keys: Mapping[str, Any], seed: int = 0) -> SteerabilitySettings:
        """Settings from the `steerability.*` keys: `enabled`, `vocabulary` and `template` (what is measured,
        not how) are left out; any other key must be a setting."""
        measured = {key: value for key, value in keys.items() if key not in ("enabled", "vocabulary", "template")}
        return cls(**measured, seed=seed)

    def steerable(self, score: float) -> bool:
        return score > self.threshold if self.score == "sum_squares" else score >= self.threshold


@dataclass
class UnitSteerability:
    kind: UnitKind
    unit: int
    score: float  # S under settings.score, in the direction that gave the larger one
    direction: str  # "amplify" or "suppress", whichever gave S
    concepts: list[str]  # the `top` concepts that gained most, largest gain first
    gains: list[float]  # their mean probability gain
    sum_squares: float = 0.0  # S_f = Σ_c (Δ̄p_c)², in that direction
    power: float = 0.0  # P_f = max_c Δ̄p_c, in that direction
    steerable: bool = False

    @property
    def precision(self) -> float:
        """S_f / P_f (0 for a unit that moved nothing up)."""
        return self.sum_squares / self.power if self.power > 0 else 0.0


@dataclass
class SteerabilityResult:
    block: int
    settings: SteerabilitySettings
    totals: dict[UnitKind, int]  # units of each kind the sample was drawn from: {"latent": n_latents, "neuron": width}
    units: list[UnitSteerability] = field(default_factory=list)

    def of(self, kind: UnitKind) -> list[UnitSteerability]:
        return [u for u in self.units if u.kind == kind]

    def share(self, kind: UnitKind) -> float:
        """The share of sampled units of `kind` that are steerable."""
        units = self.of(kind)
        return sum(u.steerable for u in units) / max(1, len(units))

    def interval(self, kind: UnitKind) -> tuple[float, float]:
        """The 95% Wilson interval of `share(kind)` over the sampled units."""
        units = self.of(kind)
        return wilson_interval(sum(u.steerable for u in units), len(units))

    def distinct_concepts(self, kind: UnitKind) -> int:
        """Distinct top concepts among the steerable units of `kind` (the paper's concept-space coverage)."""
        return len({u.concepts[0] for u in self.of(kind) if u.steerable and u.concepts})

    def estimated_count(self, kind: UnitKind) -> float:
        """The number of steerable units of `kind` the block has, estimated from the sample's share."""
        return self.share(kind) * self.totals[kind]

    def ranked(self, kind: UnitKind = "latent", limit: int = 10) -> list[UnitSteerability]:
        return sorted(self.of(kind), key=lambda u: -u.score)[:limit]

    def metrics(self) -> dict[str, float]:
        """What a trial reports, for latents and neurons: the shares of steerable units with their 95% intervals,
        the counts they imply, and the distinct top concepts among the steerable ones."""
        metrics = {}
        for kind in ("latent", "neuron"):
            low, high = self.interval(kind)
            metrics.update(
                {
                    f"steerable_{kind}s": self.share(kind),
                    f"steerable_{kind}s_low": low,
                    f"steerable_{kind}s_high": high,
                    f"steerable_{kind}s_count": self.estimated_count(kind),
                    f"steerable_{kind}s_concepts": float(self.distinct_concepts(kind)),
                }
            )
        return metrics

    def to_json(self) -> dict[str, Any]:
        return {
            "block": self.block,
            "settings": asdict(self.settings),
            "share_latents": self.share("latent"),
            "share_neurons": self.share("neuron"),
            "totals": self.totals,
            "units": [asdict(u) for u in self.units],
        }


def wilson_interval(successes: int, trials: int, z: float = CONFIDENCE_Z) -> tuple[float, float]:
    """The Wilson score interval of a binomial share successes / trials ((0, 1) for no trials)."""
    if trials == 0:
        return 0.0, 1.0
    share = successes / trials
    centre = (share + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def on_levels(activations: torch.Tensor, quantile: float) -> torch.Tensor:
    """Per column of (n, units), the `quantile` of its positive values; 0 for a column never positive."""
    positive = torch.where(activations > 0, activations, torch.nan)
    levels = torch.nanquantile(positive.double(), quantile, dim=0)
    return torch.nan_to_num(levels, nan=0.0).float()


@torch.no_grad()
def measure_steerability(
    evaluator: Evaluator, concepts: torch.Tensor, words: list[str], settings: SteerabilitySettings
) -> SteerabilityResult:
    """S of sampled latents and neurons at the evaluator's steering block.

    concepts: (V, embed) unit-norm text embeddings of `words`. Each steered unit costs one forward of the
    probe images through the blocks after the steering block (none at the last block with [CLS] only).
    """
    sae = evaluator.sae
    probe = evaluator.val.rows(0, min(settings.probe_images, len(evaluator.val.labels)), f"{evaluator.val.name}/probe")
    rows = evaluator.steered_rows(probe).cls  # (P, d) or (P·T, d)
    calibration_rows = evaluator.pool_steered_rows()  # on the host; only a sample is read

    def distribution(final_cls: torch.Tensor) -> torch.Tensor:
        return torch.softmax(
            steering.logits_from_embeddings(steering.apply_head(final_cls, evaluator.head), concepts), 1
        )

    default = distribution(evaluator.final_cls(probe, rows))
    generator = torch.Generator().manual_seed(settings.seed)
    totals: dict[UnitKind, int] = {"latent": sae.n_latents, "neuron": calibration_rows.width}
    sampled: dict[UnitKind, torch.Tensor] = {
        kind: torch.randperm(n, generator=generator)[: settings.units].sort().values for kind, n in totals.items()
    }
    levels = _on_levels(evaluator, calibration_rows, sampled, settings, generator, rows.device)
    block = evaluator.encoder.block if evaluator.encoder else -1
    result = SteerabilityResult(block, settings, totals)
    clamps: dict[UnitKind, Callable[[torch.Tensor, int, float], torch.Tensor]] = {
        "latent": lambda x, u, v: steering.clamp_latent(sae, x, u, v),
        "neuron": steering.clamp_neuron,
    }
    for kind, clamp in clamps.items():
        for unit, level in zip(sampled[kind].tolist(), levels[kind].tolist(), strict=True):
            if settings.clamp == "relative" and kind == "latent" and level <= 0:
                # never active on the training rows: no on-level to clamp it from
                result.units.append(UnitSteerability(kind, unit, 0.0, "amplify", [], []))
                continue
            amplified = settings.value if settings.clamp == "absolute" else settings.strength * level
            targets = [("amplify", amplified)] + ([("suppress", 0.0)] if settings.direction == "both" else [])
            steered = torch.cat([clamp(rows, unit, value) for _, value in targets])
            probs = distribution(evaluator.final_cls(probe, steered))
            scored = [
                _scored(kind, unit, direction, steering.concept_shift(default, half), words, settings)
                for (direction, _), half in zip(targets, probs.chunk(len(targets)), strict=True)
            ]
            result.units.append(max(scored, key=lambda u: u.score))
    return result


def _on_levels(
    evaluator: Evaluator,
    calibration_rows: ActivationRows,
    sampled: dict[UnitKind, torch.Tensor],
    settings: SteerabilitySettings,
    generator: torch.Generator,
    device: torch.device,
) -> dict[UnitKind, torch.Tensor]:
    """Each sampled unit's on-level (relative clamp) from at most CALIBRATION_ROWS training rows; ones otherwise."""
    if settings.clamp == "absolute":
        return {kind: torch.ones(len(units)) for kind, units in sampled.items()}
    sae = evaluator.sae
    picked = torch.randperm(len(calibration_rows), generator=generator)[:CALIBRATION_ROWS]
    calibration = calibration_rows.take(picked.numpy()).to(device)
    latent_acts = [  # only the sampled latents' dense columns
        sae.dense_codes(*sae.encode(calibration[start : start + 1024]))[:, sampled["latent"]]
        for start in range(0, len(calibration), 1024)
    ]
    return {
        "latent": on_levels(torch.cat(latent_acts), settings.quantile),
        "neuron": on_levels(calibration[:, sampled["neuron"]], settings.quantile),
    }


def _scored(
    kind: UnitKind, unit: int, direction: str, shift: torch.Tensor, words: list[str], settings: SteerabilitySettings
) -> UnitSteerability:
    """One steered unit's scores from its concept shift Δ̄p (V,)."""
    top_gain, top = steering.steerability(shift, settings.top)
    sum_squares = steering.sum_squared_shift(shift)
    power, _ = steering.shift_power(shift)
    score = sum_squares if settings.score == "sum_squares" else top_gain
    return UnitSteerability(
        kind,
        unit,
        score,
        direction,
        [words[c] for c in top],
        [float(shift[c]) for c in top],
        sum_squares=sum_squares,
        power=power,
        steerable=settings.steerable(score),
    )


def format_concepts(concepts: list[str], gains: list[float]) -> str:
    """'red (+0.909), purple (+0.120)': a unit's top concepts with their mean probability gains."""
    return ", ".join(f"{word} (+{gain:.3f})" for word, gain in zip(concepts, gains, strict=True))


def describe_settings(settings: SteerabilitySettings) -> str:
    """'S_f > 0.1, clamp 150, amplify': the rule a share of steerable units was measured under."""
    rule = (
        f"S_f > {settings.threshold}"
        if settings.score == "sum_squares"
        else f"top-{settings.top} gain ≥ {settings.threshold}"
    )
    clamp = f"clamp {settings.value:g}" if settings.clamp == "absolute" else f"clamp {settings.strength:g} × on-level"
    return f"{rule}, {clamp}, {'amplify' if settings.direction == 'amplify' else 'amplify or suppress'}"


def format_steerability(result: SteerabilityResult, limit: int = 10) -> str:
    """The shares of steerable latents and neurons (95% intervals), then the most steerable latents with their
    S_f, P_f, S_f / P_f and top concepts."""

    def share(kind: UnitKind) -> str:
        low, high = result.interval(kind)
        return (
            f"{100 * result.share(kind):.1f}% [{100 * low:.1f}, {100 * high:.1f}] of {len(result.of(kind))} sampled "
            f"(about {result.estimated_count(kind):.0f} of {result.totals[kind]}; "
            f"{result.distinct_concepts(kind)} distinct top concepts)"
        )

    lines = [
        f"block {result.block}, steerable ({describe_settings(result.settings)}): latents {share('latent')}, "
        f"neurons {share('neuron')}",
        f"{'latent':>7} {'S':>6} {'S_f':>6} {'P_f':>6} {'S_f/P_f':>7}  direction  top concepts (gain)",
    ]
    for u in result.ranked("latent", limit):
        lines.append(
            f"{u.unit:>7} {u.score:>6.3f} {u.sum_squares:>6.3f} {u.power:>6.3f} {u.precision:>7.3f}  "
            f"{u.direction:<9}  {format_concepts(u.concepts, u.gains)}"
        )
    return "\n".join(lines)
