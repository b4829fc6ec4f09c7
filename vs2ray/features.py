"""Feature cards: what an SAE's latents look like (`python -m vs2ray features`, and the report's section).

For a trained SAE (found through its directory alone: `<root>/saes/<key>` beside `<root>/activations/<store>`,
whose manifest names the dataset and split), every image of its training store is coded once, a chunk at a
time, keeping for each latent its `per_latent` top-activating images, its firing frequency and its mean
activation per class. A card shows a latent's top images (read back through the dataset by id) with, for an
SAE on every token or on the patches, its activation over the patch grid as a heatmap; its density; its
automatic name; its top images' labels. Cards are written once per SAE, under `<sae dir>/cards/`, so trials
that share an SAE share its cards.

Latents chosen by default: for each class, the latent most specific to its images (its mean activation over
them minus its mean over all: among what VS2's γ·W_dec c amplifies for the class, what sets the class apart),
up to `max_classes`; then those a trial gives with a reason (`results.card_latents`: what `ablate` removed, the
most steerable), and any named.

Steering effect (last-block SAEs): on the store's images, the classes whose top-1 accuracy moves most when the
latent is switched on at its mean top activation (`steering.clamp_latent`) and when it is ablated
(`steering.ablate`), in points against the unsteered images.

Name: the class whose text embedding is nearest the latent's direction through the head, e(b_pre + a·W_dec[f])
− e(b_pre) with a its mean top activation (last-block SAEs only: the head reads the last block). Agreement:
the share of a latent's top images whose label is its name's class, against that class's share of the store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vs2ray import plots, steering
from vs2ray.config import DatasetConfig
from vs2ray.data import DatasetUnavailable, get_dataset
from vs2ray.interop import load_any_sae
from vs2ray.sae import ActivationRows, SparseAutoencoder
from vs2ray.stages import column_rows
from vs2ray.store import cls_column, load_activations, write_json

CARDS_DIR = "cards"
CARDS_FILE = "cards.json"  # the chosen latents, their names, densities, top images; written last
CARDS_VERSION = 2  # 2: steering effects; cards of another version are drawn again
EFFECT_CLASSES = 3  # classes named per steering effect


@dataclass
class Card:
    """One latent's card: its top images (store row positions and activations), name and density."""

    latent: int
    frequency: float  # share of the store's rows the latent fires on
    top_rows: list[int]  # image positions in the store, most activating first
    top_values: list[float]
    top_labels: list[str]
    name: str = ""
    agreement: float | None = None  # share of the top images whose class is the name
    chance: float | None = None  # the name's class's share of the store
    why: str = ""
    image: str = ""  # the card's PNG, relative to the cards dir
    amplified: list[tuple[str, float]] = field(default_factory=list)  # (class, top-1 change in points)
    ablated: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class CardSet:
    """Every card of one SAE, with where they were written."""

    directory: Path
    cards: list[Card] = field(default_factory=list)
    sae_tokens: str = "cls"

    @property
    def mean_agreement(self) -> tuple[float, float] | None:
        """(mean agreement, mean chance) over the named cards; None when none is named."""
        named = [c for c in self.cards if c.agreement is not None and c.chance is not None]
        if not named:
            return None
        return float(np.mean([c.agreement for c in named])), float(np.mean([c.chance for c in named]))


@torch.no_grad()
def scan_store(
    sae: SparseAutoencoder, rows: ActivationRows, labels: np.ndarray, num_classes: int, per_latent: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Code every image of `rows` (an image's tokens are consecutive rows), an image's activation being its
    largest over its tokens: (top values (n, per_latent), their image positions (n, per_latent), firing
    frequency over rows (n,), mean activation per class (classes, n))."""
    per_image = rows.group
    images = len(rows) // per_image
    top_values = torch.full((sae.n_latents, per_latent), -torch.inf)
    top_rows = torch.zeros((sae.n_latents, per_latent), dtype=torch.long)
    fired = torch.zeros(sae.n_latents)
    class_sums = torch.zeros(num_classes, sae.n_latents)
    chunk_images = max(1, 4096 // per_image)
    labels_t = torch.from_numpy(labels.astype(np.int64))
    for start, x in zip(range(0, images, chunk_images), rows.chunks(chunk_images * per_image), strict=False):
        codes = sae.dense_codes(*sae.encode(x))  # (rows, n)
        fired += (codes != 0).sum(dim=0)
        image_codes = codes.reshape(-1, per_image, sae.n_latents).amax(dim=1)  # (images, n)
        positions = torch.arange(start, start + len(image_codes))
        class_sums.index_add_(0, labels_t[positions], image_codes)
        values = torch.cat([top_values, image_codes.T], dim=1)
        where = torch.cat([top_rows, positions.expand(sae.n_latents, -1)], dim=1)
        top_values, order = values.topk(per_latent, dim=1)
        top_rows = where.gather(1, order)
    counts = torch.bincount(labels_t, minlength=num_classes).clamp_min(1).float()
    return top_values, top_rows, fired / max(1, len(rows)), class_sums / counts[:, None]


def default_latents(class_means: torch.Tensor, class_share: torch.Tensor, max_classes: int) -> list[tuple[int, int]]:
    """(latent, class) for each class in turn, the latent most specific to its images: the largest mean activation
    over them minus the mean over every image (a dense latent fires for every class and says little about one);
    each latent once, up to `max_classes` classes. `class_means`: (classes, n); `class_share`: (classes,)."""
    specific = class_means - (class_share[:, None] * class_means).sum(dim=0)
    chosen: dict[int, int] = {}
    for label in range(min(max_classes, class_means.shape[0])):
        for latent in specific[label].argsort(descending=True).tolist():
            if latent not in chosen:
                chosen[latent] = label
                break
    return list(chosen.items())


@torch.no_grad()
def latent_names(
    sae: SparseAutoencoder,
    latents: list[int],
    scale: torch.Tensor,
    head: dict[str, torch.Tensor],
    text_classifier: torch.Tensor,
) -> list[int]:
    """The class nearest each latent's direction through the head (see the module docstring): (len(latents),)
    class indices. `scale` (len(latents),): the activation a each direction is taken at."""
    # the head begins with a layer norm, so points of a layer-norm SAE's space need no mapping back
    centre = sae.b_pre[None]
    moved = centre + scale[:, None] * sae.W_dec[latents]
    direction = steering.apply_head(moved, head) - steering.apply_head(centre, head)
    scores = torch.nn.functional.normalize(direction, dim=1) @ text_classifier.T
    return scores.argmax(dim=1).tolist()


@torch.no_grad()
def steering_effects(
    sae: SparseAutoencoder,
    cls_rows: ActivationRows,
    labels: np.ndarray,
    head: dict[str, torch.Tensor],
    text_classifier: torch.Tensor,
    latents: list[int],
    levels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class top-1 change, in points, of the last block's [CLS] rows (one per image, labels (n,)) when each
    latent is switched on at its level (len(latents),) and when it is ablated: two (len(latents), classes)."""
    num_classes = text_classifier.shape[0]
    labels_t = torch.from_numpy(labels.astype(np.int64))
    hits = torch.zeros(3, len(latents), num_classes)  # unsteered, on, ablated

    def count(x: torch.Tensor, chunk_labels: torch.Tensor) -> torch.Tensor:
        right = steering.classify(x, head, text_classifier).argmax(dim=1) == chunk_labels
        return torch.bincount(chunk_labels[right], minlength=num_classes).float()

    start = 0
    for x in cls_rows.chunks(4096):
        chunk_labels = labels_t[start : start + len(x)]
        start += len(x)
        hits[0] += count(x, chunk_labels)
        for i, latent in enumerate(latents):
            hits[1, i] += count(steering.clamp_latent(sae, x, latent, float(levels[i])), chunk_labels)
            hits[2, i] += count(steering.ablate(sae, x, torch.tensor([latent])), chunk_labels)
    accuracy = 100 * hits / torch.bincount(labels_t, minlength=num_classes).clamp_min(1)
    return accuracy[1] - accuracy[0], accuracy[2] - accuracy[0]


def largest_changes(change: torch.Tensor, classes: list[str], top: int = EFFECT_CLASSES) -> list[tuple[str, float]]:
    """The `top` (class, change) of a per-class change (classes,) with the largest |change|, nonzero only."""
    order = change.abs().argsort(descending=True)[:top].tolist()
    return [(classes[c], round(float(change[c]), 2)) for c in order if change[c] != 0]


def feature_cards(
    sae_dir: str | Path,
    latents: list[int] | None = None,
    per_latent: int = 8,
    max_classes: int = 12,
    log: Any = print,
    reasons: dict[int, str] | None = None,
) -> CardSet:
    """Write the feature cards of the vs2ray SAE at `sae_dir` (reused when complete and the latents asked for
    are among them) and return them. `latents`: named by the user; `reasons`: latent -> why a trial chose it."""
    sae_dir = Path(sae_dir).expanduser()
    imported = load_any_sae(sae_dir)  # first: a directory that is no SAE is an error, whatever it holds
    out = sae_dir / CARDS_DIR
    cached = read_cards(out)
    wanted = set(latents or []) | set(reasons or {})
    if cached is not None and wanted <= {c.latent for c in cached.cards}:
        return cached
    sae, record = imported.sae.eval(), imported.config
    store_dir = sae_dir.parent.parent / "activations" / str(record["activation_key"])
    column = str(record["column"])
    acts = load_activations(store_dir, layers=[])
    every_token = acts.stored(column).ndim == 3
    tokens = str(record.get("tokens", "all" if every_token else "cls"))
    rows = column_rows(acts, column, np.ones(len(acts.ids), dtype=bool), tokens)
    classes = list(acts.manifest["classes"])
    log(f"coding {len(acts.ids)} images of {store_dir.name} ({column}) with the SAE's {sae.n_latents} latents")
    top_values, top_rows, frequency, class_means = scan_store(sae, rows, acts.labels, len(classes), per_latent)
    label_share = np.bincount(acts.labels, minlength=len(classes)) / max(1, len(acts.labels))
    share = torch.from_numpy(label_share).float()
    chosen: dict[int, str] = {}
    for latent, why in [
        *((f, f"top latent of {classes[label]}") for f, label in default_latents(class_means, share, max_classes)),
        *(reasons or {}).items(),
        *((f, "named") for f in latents or []),
    ]:
        chosen[latent] = f"{chosen[latent]}; {why}" if latent in chosen else why
    ids = list(chosen)
    names: list[int | None] = [None] * len(ids)
    effects: tuple[torch.Tensor, torch.Tensor] | None = None
    if column in (cls_column(acts.manifest, -1), f"tokens_{cls_column(acts.manifest, -1).removeprefix('cls_')}"):
        from safetensors.torch import load_file

        head = load_file(store_dir / "head.safetensors")
        classifier = load_file(store_dir / "classifier.safetensors")["classifier"]
        scale = top_values[ids].clamp_min(0).mean(dim=1).clamp_min(1e-3)
        names = list(latent_names(sae, ids, scale, head, classifier))
        cls_rows = column_rows(acts, cls_column(acts.manifest, -1), np.ones(len(acts.ids), dtype=bool), "cls")
        log(f"steering effects of {len(ids)} latents on {len(acts.ids)} images")
        effects = steering_effects(sae, cls_rows, acts.labels, head, classifier, ids, scale)
    cards = []
    for i, (latent, name) in enumerate(zip(ids, names, strict=True)):
        positions = top_rows[latent].tolist()
        labels = [int(acts.labels[p]) for p in positions]
        card = Card(
            latent,
            float(frequency[latent]),
            positions,
            top_values[latent].tolist(),
            [classes[label] for label in labels],
            why=chosen[latent],
        )
        if effects is not None:
            card.amplified, card.ablated = (largest_changes(change[i], classes) for change in effects)
        if name is not None:
            card.name = classes[name]
            card.agreement = float(np.mean([label == name for label in labels]))
            card.chance = float(label_share[name])
        cards.append(card)
    card_set = CardSet(out, cards, tokens)
    draw_cards(card_set, sae, rows, acts, store_dir, log)
    record = {"version": CARDS_VERSION, "tokens": tokens, "cards": [card.__dict__ for card in cards]}
    write_json(out / CARDS_FILE, record)
    return card_set


def draw_cards(
    card_set: CardSet, sae: SparseAutoencoder, rows: ActivationRows, acts: Any, store_dir: Path, log: Any
) -> None:
    """One PNG per card: its top images, with the latent's patch heatmap for token SAEs."""
    manifest = acts.manifest
    inputs = manifest["inputs"]
    try:
        dataset = get_dataset(DatasetConfig(**inputs["dataset"]))
        refs = {record.id: record.ref for record in dataset.records(inputs["split"])}
    except DatasetUnavailable as error:
        log(f"feature cards without images: {error}")
        dataset, refs = None, {}
    card_set.directory.mkdir(parents=True, exist_ok=True)
    per_image = rows.group
    for card in card_set.cards:
        images, heatmaps = [], []
        for position in card.top_rows:
            image_id = int(acts.ids[position])
            images.append(np.asarray(dataset.load_image(inputs["split"], refs[image_id])) if dataset else None)
            if card_set.sae_tokens in ("all", "patches"):
                x = rows.take(np.arange(position * per_image, (position + 1) * per_image))
                codes = sae.dense_codes(*sae.encode(x))[:, card.latent].detach()
                patches = codes[1:] if card_set.sae_tokens == "all" else codes
                side = round(len(patches) ** 0.5)
                square = side * side == len(patches)
                heatmaps.append(patches.reshape(side, side).numpy() if square else None)
            else:
                heatmaps.append(None)
        name = f" “{card.name}”" if card.name else ""
        title = f"latent {card.latent}{name} · fires on {100 * card.frequency:.2f}% of rows · {card.why}"
        captions = [f"{label}\n{value:.2f}" for label, value in zip(card.top_labels, card.top_values, strict=True)]
        card.image = f"latent_{card.latent}.png"
        plots.feature_card(images, heatmaps, captions, title, card_set.directory / card.image)


def read_cards(directory: Path) -> CardSet | None:
    """The cards written under `directory`, or None when they are not complete."""
    file = directory / CARDS_FILE
    if not file.is_file():
        return None
    record = json.loads(file.read_text())
    if record.get("version") != CARDS_VERSION:
        return None
    return CardSet(directory, [Card(**card) for card in record["cards"]], record.get("tokens", "cls"))


def cards_markdown(card_set: CardSet, image_prefix: str = "") -> str:
    """The cards as markdown: a table (latent, name, agreement, density, steering effects, why) and each card's
    image."""
    lines = [
        "| latent | name | top images of its class | density | switched on: top-1 Δ (pts) | ablated: Δ | chosen as |",
        "|---|---|---|---|---|---|---|",
    ]
    for card in card_set.cards:
        agreement = ""
        if card.agreement is not None and card.chance is not None:
            agreement = f"{100 * card.agreement:.0f}% (chance {100 * card.chance:.0f}%)"
        on, off = (
            ", ".join(f"{label} {change:+.1f}" for label, change in effect) for effect in (card.amplified, card.ablated)
        )
        lines.append(
            f"| {card.latent} | {card.name} | {agreement} | {100 * card.frequency:.2f}% | {on} | {off} | {card.why} |"
        )
    lines.append("")
    for card in card_set.cards:
        lines += [f"![latent {card.latent}]({image_prefix}{card.image})", ""]
    return "\n".join(lines)
