"""Steerability S_f (METHOD.md §8, Joseph et al. 2025): how precisely steering one unit alone moves CLIP's output
over a concept vocabulary, for every sampled SAE latent and, as the paper's comparison, the block's neurons.

What the paper's code (ViT-Prisma) shows, and we follow: the unit's activation is clamped to a value on every
token the SAE reads (the SAE's error term kept), the rest of the forward runs, and the output distribution
is softmax(100 · e · Vᵀ) over the text embeddings V of the vocabulary; its change against the unsteered
distribution is what steering did. What it leaves open, and we chose (docs/companion.md):

- units: a seeded sample of `units` latents and of `units` neurons (ViT-Prisma samples 1/20 of the latents);
  a neuron is one coordinate of the residual stream at the steering block, the basis the SAE decomposes;
- on-level h_u: the `quantile` of the unit's positive activations on (up to 8,192 of) the SAE's training rows; amplify
  clamps the unit to `strength` · h_u, suppress to 0, the same rule for latents and neurons; a latent
  never active there is never steered and counts as not steerable;
- probe images: the first `probe_images` validation rows;
- S_u = the probability mass the `top` concepts with the largest mean gain receive (steering.steerability),
  the larger of amplify and suppress; a unit is steerable when S_u ≥ `threshold`.

This module knows neither Ray nor the config: the trial builds the settings and the vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from vs2ray import steering
from vs2ray.evaluate import Evaluator

UnitKind = Literal["latent", "neuron"]
CALIBRATION_ROWS = 8192  # training rows (seeded sample) a unit's on-level is measured on


@dataclass(frozen=True)
class SteerabilitySettings:
    probe_images: int = 64
    units: int = 64  # latents sampled, and neurons sampled
    strength: float = 10.0  # amplify clamps a unit to strength × its on-level
    quantile: float = 0.9  # on-level: this quantile of the unit's positive activations
    top: int = 1  # concepts whose gain makes S
    threshold: float = 0.1  # S at which a unit counts as steerable (probability mass)
    seed: int = 0


@dataclass
class UnitSteerability:
    kind: UnitKind
    unit: int
    score: float  # S: the larger of amplify's and suppress's
    direction: str  # "amplify" or "suppress", whichever gave S
    concepts: list[str]  # the `top` concepts that gained most, largest gain first
    gains: list[float]  # their mean probability gain


@dataclass
class SteerabilityResult:
    block: int
    settings: SteerabilitySettings
    totals: dict[str, int]  # units of each kind the sample was drawn from: {"latent": n_latents, "neuron": width}
    units: list[UnitSteerability] = field(default_factory=list)

    def of(self, kind: UnitKind) -> list[UnitSteerability]:
        return [u for u in self.units if u.kind == kind]

    def share(self, kind: UnitKind) -> float:
        """The share of sampled units of `kind` with S ≥ threshold."""
        units = self.of(kind)
        return sum(u.score >= self.settings.threshold for u in units) / max(1, len(units))

    def estimated_count(self, kind: UnitKind) -> float:
        """The number of steerable units of `kind` the block has, estimated from the sample's share."""
        return self.share(kind) * self.totals[kind]

    def ranked(self, kind: UnitKind = "latent", limit: int = 10) -> list[UnitSteerability]:
        return sorted(self.of(kind), key=lambda u: -u.score)[:limit]

    def metrics(self) -> dict[str, float]:
        """What a trial reports: the shares of steerable latents and neurons and the counts they imply."""
        return {
            "steerable_latents": self.share("latent"),
            "steerable_neurons": self.share("neuron"),
            "steerable_latents_count": self.estimated_count("latent"),
            "steerable_neurons_count": self.estimated_count("neuron"),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "block": self.block,
            "settings": asdict(self.settings),
            "share_latents": self.share("latent"),
            "share_neurons": self.share("neuron"),
            "totals": self.totals,
            "units": [asdict(u) for u in self.units],
        }


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
    totals = {"latent": sae.n_latents, "neuron": calibration_rows.width}
    sampled = {
        kind: torch.randperm(n, generator=generator)[: settings.units].sort().values for kind, n in totals.items()
    }
    # on-levels from at most CALIBRATION_ROWS training rows, and only the sampled latents' dense columns
    picked = torch.randperm(len(calibration_rows), generator=generator)[:CALIBRATION_ROWS]
    calibration = calibration_rows.take(picked.numpy()).to(rows.device)
    latent_acts = [
        sae.dense_codes(*sae.encode(calibration[start : start + 1024]))[:, sampled["latent"]]
        for start in range(0, len(calibration), 1024)
    ]
    levels = {
        "latent": on_levels(torch.cat(latent_acts), settings.quantile),
        "neuron": on_levels(calibration[:, sampled["neuron"]], settings.quantile),
    }
    block = evaluator.encoder.block if evaluator.encoder else -1
    result = SteerabilityResult(block, settings, totals)
    clamps: dict[UnitKind, Callable[[torch.Tensor, int, float], torch.Tensor]] = {
        "latent": lambda x, u, v: steering.clamp_latent(sae, x, u, v),
        "neuron": steering.clamp_neuron,
    }
    for kind, clamp in clamps.items():
        for unit, level in zip(sampled[kind].tolist(), levels[kind].tolist(), strict=True):
            if kind == "latent" and level <= 0:  # never active on the training rows: nothing to clamp it from
                result.units.append(UnitSteerability(kind, unit, 0.0, "amplify", [], []))
                continue
            steered = torch.cat([clamp(rows, unit, settings.strength * level), clamp(rows, unit, 0.0)])
            probs = distribution(evaluator.final_cls(probe, steered))
            scored = []
            for direction, half in zip(("amplify", "suppress"), probs.chunk(2), strict=True):
                shift = steering.concept_shift(default, half)
                scored.append((*steering.steerability(shift, settings.top), direction, shift))
            score, top, direction, shift = max(scored, key=lambda entry: entry[0])
            result.units.append(
                UnitSteerability(kind, unit, score, direction, [words[c] for c in top], [float(shift[c]) for c in top])
            )
    return result


def format_concepts(concepts: list[str], gains: list[float]) -> str:
    """'red (+0.909), purple (+0.120)': a unit's top concepts with their mean probability gains."""
    return ", ".join(f"{word} (+{gain:.3f})" for word, gain in zip(concepts, gains, strict=True))


def format_steerability(result: SteerabilityResult, limit: int = 10) -> str:
    """The shares of steerable latents and neurons, then the most steerable latents with their top concepts."""
    s = result.settings
    lines = [
        f"block {result.block}: steerable (S ≥ {s.threshold}, strength {s.strength}) latents "
        f"{100 * result.share('latent'):.1f}% of {len(result.of('latent'))} sampled (about "
        f"{result.estimated_count('latent'):.0f} of {result.totals['latent']}), neurons "
        f"{100 * result.share('neuron'):.1f}% of {len(result.of('neuron'))} sampled (about "
        f"{result.estimated_count('neuron'):.0f} of {result.totals['neuron']})",
        f"{'latent':>7} {'S':>6}  direction  top concepts (gain)",
    ]
    for u in result.ranked("latent", limit):
        lines.append(f"{u.unit:>7} {u.score:>6.3f}  {u.direction:<9}  {format_concepts(u.concepts, u.gains)}")
    return "\n".join(lines)
