"""The stages every entry point shares, without Ray of their own: prepare the data, get or train the SAE,
start retrieval, build the evaluator, zero-shot accuracy.

The CLI (`vs2ray.cli`) and a sweep's trials (`vs2ray.trainable`) both call these; they reach
Ray only through the stages below them (`extract`'s Ray Data pipeline, `retrieval`'s FAISS
actors). `prepare_data` runs once per sweep on the driver (extraction if needed, arrays
loaded once); the sweep hands its `SweepData` to every trial through Ray's object store.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vs2ray import steering
from vs2ray.config import TYPOGRAPHIC_DATASETS, ConfigError, Distribution, ExperimentConfig, values_of
from vs2ray.data import get_dataset, prompt_templates_for
from vs2ray.devices import worker_device
from vs2ray.evaluate import Encoder, Evaluator, Grid, PoolData, PoolRows, SplitData, Tally
from vs2ray.methods import METHODS
from vs2ray.models import block_runner, build_text_classifier, encode_images, load_clip
from vs2ray.sae import ActivationRows, SAETrainParams, SparseAutoencoder, evaluate_sae, kind_reads, train_sae
from vs2ray.steerability import SteerabilityResult, SteerabilitySettings, measure_steerability
from vs2ray.store import (
    Activations,
    block_index,
    cls_column,
    content_key,
    holder_lock,
    load_activations,
    read_manifest,
    sae_dir_for,
    train_val_split,
)

Log = Callable[[str], None]
SAE_METRICS = (  # reported per trial; l0_cls and l0_patches by SAEs on every token
    "fvu",
    "val_fvu",
    "l0",
    "l0_std",
    "l0_p10",
    "l0_median",
    "l0_p90",
    "l0_cls",
    "l0_patches",
    "val_l0",
    "dead_fraction",
    "dense_fraction",
    "train_seconds",
)


def sae_params(config: ExperimentConfig) -> SAETrainParams:
    """The SAE training parameters of a config whose searchable values are fixed (by a trial or --set)."""
    values = {
        "sae.layer": config.sae.layer,
        "sae.tokens": config.sae.tokens,
        "sae.kind": config.sae.kind,
        "sae.normalize": config.sae.normalize,
        "sae.k": config.sae.k,
        "sae.expansion": config.sae.expansion,
        "sae.l1_coef": config.sae.l1_coef,
        "sae.l0_coef": config.sae.l0_coef,
        "sae.lr": config.sae.lr,
        "sae.auxk_coef": config.sae.auxk_coef,
        "pass.w_aux": config.pass_.w_aux,
        "pass.momentum": config.pass_.momentum,
    }
    kind = config.sae.kind
    # a value the SAE's kind does not read (sae.k of a relu_l1 SAE) may stay a distribution: it changes nothing
    unread = {
        key
        for key in values
        if key.startswith("sae.") and not isinstance(kind, Distribution) and not kind_reads(kind, key[4:])
    }
    searched = [key for key, value in values.items() if isinstance(value, Distribution) and key not in unread]
    if searched:
        raise ConfigError([f"{key}: is a search distribution here; fix it with --set {key}=VALUE" for key in searched])

    def fixed(value: Any) -> Any:  # an unread distribution's first value: the kind never reads it
        return value.values[0] if isinstance(value, Distribution) else value

    if config.sae.kind != "topk" and config.sae.topk == "abs":
        raise ConfigError([f"sae.topk: 'abs' selects by |value| for sae.kind topk only, not {config.sae.kind!r}"])
    return SAETrainParams(
        k=fixed(config.sae.k),
        expansion=config.sae.expansion,
        kind=config.sae.kind,
        normalize=config.sae.normalize,
        prefixes=config.sae.prefixes,
        l1_coef=fixed(config.sae.l1_coef),
        l0_coef=fixed(config.sae.l0_coef),
        bandwidth=config.sae.bandwidth,
        jumprelu_threshold=config.sae.jumprelu_threshold,
        threshold_lr_scale=config.sae.threshold_lr_scale,
        sparsity_warmup_steps=config.sae.sparsity_warmup_steps,
        topk=config.sae.topk,
        init=config.sae.init,
        encoder_bias=config.sae.encoder_bias,
        precision=config.sae.precision,
        lr=config.sae.lr,
        lr_scale_with_width=config.sae.lr_scale_with_width,
        warmup_steps=config.sae.warmup_steps,
        steps=config.sae.steps,
        epochs=config.sae.epochs,
        batch_size=config.sae.batch_size,
        dead_threshold=config.sae.dead_threshold,
        auxk_coef=config.sae.auxk_coef,
        auxk_k=config.sae.auxk_k,
        w_aux=config.pass_.w_aux,
        pass_momentum=config.pass_.momentum,
        seed=config.seed,
    )


@dataclass
class TrainSplit:
    """The train split's activations with the validation rows marked, or (`dataset.val_split`) every train row
    training and the validation rows in a store of their own (`val_acts`)."""

    store_dir: Path
    acts: Activations
    train_mask: np.ndarray
    val_mask: np.ndarray
    val_acts: Activations | None = None

    def val_source(self) -> tuple[Activations, np.ndarray]:
        """(the activations the validation rows are in, the mask of those rows)."""
        if self.val_acts is None:
            return self.acts, self.val_mask
        return self.val_acts, np.ones(len(self.val_acts.ids), dtype=bool)

    def val_rows(self, column: str, tokens: str = "all") -> ActivationRows:
        """`column_rows` of the validation images."""
        acts, images = self.val_source()
        return column_rows(acts, column, images, tokens)

    @property
    def num_blocks(self) -> int:
        return int(self.acts.manifest["model"]["num_layers"])

    def column(self, layer: int, tokens: str = "cls") -> str:
        """The store column an SAE of `layer` reads: cls_<block>, or tokens_<block> for `tokens` "all" / "patches"."""
        return cls_column(self.acts.manifest, layer, "cls" if tokens == "cls" else "tokens")

    def rows(self, column: str, images: np.ndarray, tokens: str = "all") -> ActivationRows:
        """`column_rows` of this split's activations."""
        return column_rows(self.acts, column, images, tokens)


def column_rows(acts: Activations, column: str, images: np.ndarray, tokens: str = "all") -> ActivationRows:
    """The rows of `column` that belong to `images` (a mask over the store's rows), read from the store in
    batches: one row per image for [CLS]; for an all-token column every token of each image (consecutive rows),
    or with `tokens` "patches" every token but the first ([CLS])."""
    stored = acts.stored(column)
    per_image = stored.shape[1] if stored.ndim == 3 else 1
    flat, chosen = stored.reshape(-1, stored.shape[-1]), np.flatnonzero(images)
    if tokens == "patches" and per_image > 1:
        return ActivationRows(flat, chosen, group=per_image - 1, stride=per_image, offset=1)
    return ActivationRows(flat, chosen, group=per_image)


def blocks_to_load(config: ExperimentConfig, manifest: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(blocks whose [CLS] tokens, blocks whose every token) the trials of `config` read, as block indices.

    Every token is needed where the SAE trains on every token, where steering happens before the
    last block (the rest of the forward needs the whole sequence), and for SAE_REC^A (block 0).
    Raises ConfigError, before any trial starts, when the store cannot serve them.
    """
    last = int(manifest["model"]["num_layers"]) - 1
    steered = sorted({block_index(manifest, layer) for layer in values_of(config.sae.layer)})
    token_sets = set(values_of(config.sae.tokens))
    every_token = bool({"all", "patches"} & token_sets)
    cls_blocks, token_blocks = set(steered), {b for b in steered if b != last or every_token}
    if "sae_rec_all" in config.steering.methods:
        cls_blocks |= set(range(last + 1))
        token_blocks |= set(range(last + 1)) if every_token else {0}
    stored = {block_index(manifest, layer) for layer in config.extraction.layers}
    problems = [f"sae.layer / sae_rec_all: block {b} is not in extraction.layers" for b in sorted(cls_blocks - stored)]
    if token_blocks and config.extraction.tokens != "all":
        problems.append(
            f"sae.layer: steering at block(s) {sorted(token_blocks)} before the last ({last}) runs the rest of the "
            f"encoder on every token of the block; set extraction.tokens: all"
        )
    if "patches" in token_sets and last in steered:
        problems.append(
            f"sae.tokens: patches steers the patch tokens, which reach the head only through later blocks; choose "
            f"a sae.layer before the last block ({last})"
        )
    if problems:
        raise ConfigError(problems)
    return sorted(cls_blocks), sorted(token_blocks)


def load_train_split(
    config: ExperimentConfig, log: Log = lambda _: None, store: Path | None = None, val_store: Path | None = None
) -> TrainSplit:
    """Extract (or reuse) the train store, load the [CLS] columns the config reads, carve validation rows, or
    with `dataset.val_split` extract (or reuse) that split's store and select on it.

    `store`, `val_store`: the stores when the caller has just extracted them. All-token columns
    stay on disk until a trial reads its block's (`Activations.__getitem__`).
    """
    from vs2ray.extract import extract

    store = store or extract(config, config.dataset.train_split, log).store_dir
    cls_blocks, _ = blocks_to_load(config, read_manifest(store) or {})
    retrieval = config.retrieval.space == "dinov2"
    acts = load_activations(store, layers=cls_blocks, retrieval=retrieval)
    if config.dataset.val_split is None:
        train_mask, val_mask = train_val_split(acts.ids, config.dataset.val_fraction, config.seed)
        return TrainSplit(store, acts, train_mask, val_mask)
    val_store = val_store or extract(config, config.dataset.val_split, log).store_dir
    val_acts = load_activations(val_store, layers=cls_blocks, retrieval=retrieval)
    everything = np.ones(len(acts.ids), dtype=bool)
    return TrainSplit(store, acts, everything, ~everything, val_acts)


def selection_key(config: ExperimentConfig) -> dict[str, Any]:
    """What decides which train rows are held out for selection (part of the SAE and FAISS keys)."""
    if config.dataset.val_split is None:
        return {"val_fraction": config.dataset.val_fraction}
    return {"val_split": config.dataset.val_split}


@dataclass
class TrainedSAE:
    sae: SparseAutoencoder
    metrics: dict[str, Any]
    directory: Path
    cache_hit: bool


def get_or_train_sae(
    config: ExperimentConfig,
    params: SAETrainParams,
    split: TrainSplit,
    log: Log,
    layer: int | None = None,
    on_report: Callable[[int, SparseAutoencoder, float], None] | None = None,
    device: torch.device | str | None = None,
) -> TrainedSAE:
    """The SAE of `layer` (default `sae.layer`) on `sae.tokens`, for (train store, params, training rows):
    loaded when a complete checkpoint exists, else trained and saved. It trains on `device` (a trial's: the
    GPU Ray gave it, or the CPU), by default the one `model.device` names on this machine.

    While it trains, `on_report(step, sae, dead_fraction)` runs every `sae.report_every` steps; when
    it raises (a trial stopped early), nothing is saved, so the cache never holds an unfinished SAE
    and a later trial with the same parameters trains it from the start.

    The key holds the store column (block and token set) and `dataset.val_fraction` (with the seed in
    `params`, it decides which rows the SAE trained on), so a changed validation share never reuses
    an SAE trained on validation rows. An all-token SAE trains on every token of the training images.
    """
    layer = config.sae.layer if layer is None else layer
    if config.sae.from_ is not None:
        return imported_sae(config, split, layer, log, device)
    tokens = config.sae.tokens
    column = split.column(layer, tokens)
    # the column names the block and cls / every token; patches-only SAEs read the every-token column too
    training = {**params.key_dict(), **selection_key(config), **({"tokens": tokens} if tokens == "patches" else {})}
    directory = sae_dir_for(config.storage.root, f"{split.store_dir.name}-{column}", training)
    device = device if device is not None else worker_device(config.model.device, None)
    # concurrent trials with one SAE key (on any node of a shared file system) train it once; the others load it
    with holder_lock(directory.parent / f".{directory.name}.lock", f"SAE {directory.name} being trained", log):
        if (directory / "metrics.json").is_file():
            saved = SparseAutoencoder.load(directory, expected_d=split.acts.stored(column).shape[-1])
            return TrainedSAE(saved.sae, saved.metrics, directory, cache_hit=True)
        train, val = split.rows(column, split.train_mask, tokens), split.val_rows(column, tokens)
        per_image = len(train) // max(1, int(split.train_mask.sum()))
        labels = None
        if params.w_aux > 0:  # PASS only: a label per row is 8 bytes for every token of the training images
            labels = torch.from_numpy(split.acts.labels[split.train_mask].astype(np.int64)).repeat_interleave(per_image)
        total = len(split.acts.ids) * per_image
        log(f"training an SAE on {column}: {len(train)} of {total} rows ({len(val)} held out)")
        result = train_sae(
            train,
            params,
            labels=labels,
            num_classes=len(split.acts.manifest["classes"]),
            log_every=max(1, params.steps // 10),
            log=log,
            on_report=on_report,
            report_every=config.sae.report_every or 0,
            device=device,
            val_acts=val,  # measured on the training device, before the SAE returns to the CPU
        )
        record = {**training, "activation_key": split.store_dir.name, "column": column}
        result.sae.save(directory, record, result.metrics, result.frequencies)
    return TrainedSAE(result.sae, result.metrics, directory, cache_hit=False)


def imported_sae(
    config: ExperimentConfig, split: TrainSplit, layer: int, log: Log, device: torch.device | str | None = None
) -> TrainedSAE:
    """`sae.from`'s SAE (interop.load_any_sae: any supported format or a Hub id), measured on this split's
    training and validation rows of its column as a trained SAE is; nothing is trained or cached."""
    from vs2ray.interop import load_any_sae

    column = split.column(layer, config.sae.tokens)
    imported = load_any_sae(str(config.sae.from_), expected_d=split.acts.stored(column).shape[-1])
    sae = imported.sae
    log(f"steering with {imported.format} SAE {config.sae.from_} ({sae.kind}, {sae.n_latents} latents)")
    device = device if device is not None else worker_device(config.model.device, None)
    sae = sae.to(device)
    tokens = config.sae.tokens
    metrics = evaluate_sae(sae, split.rows(column, split.train_mask, tokens))
    held_out = split.val_rows(column, tokens)
    if len(held_out):
        metrics.update({f"val_{name}": value for name, value in evaluate_sae(sae, held_out).items()})
    return TrainedSAE(sae.cpu(), {**imported.metrics, **metrics}, Path(str(config.sae.from_)), cache_hit=True)


def block_saes(
    config: ExperimentConfig,
    params: SAETrainParams,
    split: TrainSplit,
    log: Log,
    device: torch.device | str | None = None,
) -> list[SparseAutoencoder] | None:
    """One SAE per block (trained on `device`, or reused from the cache) with the same parameters when the
    config evaluates SAE_REC^A; None otherwise."""
    if "sae_rec_all" not in config.steering.methods:
        return None
    return [get_or_train_sae(config, params, split, log, layer, device=device).sae for layer in range(split.num_blocks)]


def _tensor(array: np.ndarray) -> torch.Tensor:
    # arrays from Ray's object store are read-only views; nothing here writes into them
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


# ---------------------------------------------------------------- what a sweep shares


@dataclass
class SweepData:
    """What every trial shares, whatever its sampled values: put in Ray's object store once per sweep."""

    split: TrainSplit
    test: Activations
    head: dict[str, np.ndarray]  # ln_post.weight, ln_post.bias, proj
    text_classifier: np.ndarray  # (classes, embed)
    retrieval_index: str | None = None  # name of the FAISS actors, set once they run
    concepts: np.ndarray | None = None  # (V, embed) text embeddings of the steerability vocabulary
    concept_words: list[str] | None = None

    @property
    def classes(self) -> list[str]:
        return list(self.split.acts.manifest["classes"])

    @property
    def group_names(self) -> list[str]:
        """'<class> / <attribute>' in group order when both splits carry group labels, else []."""
        if not (self.split.acts.has_groups and self.test.has_groups):
            return []
        return [f"{c} / {a}" for c in self.classes for a in self.split.acts.manifest.get("attributes", [])]

    @property
    def num_groups(self) -> int:
        return len(self.group_names)


def prepare_data(config: ExperimentConfig, log: Log = lambda _: None) -> SweepData:
    """Extract (or reuse) the train and test stores of `config` and load the arrays every trial needs."""
    from safetensors.numpy import load_file

    from vs2ray.extract import extract_splits

    val_split = config.dataset.val_split
    splits = [config.dataset.train_split, *([val_split] if val_split else []), config.dataset.test_split]
    stores = extract_splits(config, splits, log)  # one pipeline
    val_store = stores[val_split].store_dir if val_split else None
    split = load_train_split(config, store=stores[config.dataset.train_split].store_dir, val_store=val_store)
    test_store = stores[config.dataset.test_split].store_dir
    cls_blocks, _ = blocks_to_load(config, read_manifest(test_store) or {})
    test = load_activations(test_store, layers=cls_blocks, retrieval=config.retrieval.space == "dinov2")
    head = load_file(test_store / "head.safetensors")
    classifier = load_file(test_store / "classifier.safetensors")["classifier"]
    data = SweepData(split, test, head, classifier)
    if config.steerability.enabled:
        data.concept_words = concept_vocabulary(config)
        data.concepts = concept_embeddings(config, data.concept_words)
    return data


SHIPPED_VOCABULARIES = {"common-words-5k": Path(__file__).parent / "assets" / "vocabulary" / "common-words-5k.txt"}


def _vocabulary_file(config: ExperimentConfig) -> tuple[list[str], list[str]]:
    """(words of `steerability.vocabulary`, one per line, first occurrences; problems with the file)."""
    name = config.steerability.vocabulary or ""
    file = SHIPPED_VOCABULARIES.get(name, Path(name).expanduser())
    if not file.is_file():
        return [], [f"steerability.vocabulary: {str(file)!r} does not exist (a word list, one concept per line)"]
    words = list(dict.fromkeys(line.strip() for line in file.read_text().splitlines() if line.strip()))
    return words, [] if words else [f"steerability.vocabulary: {str(file)!r} has no words"]


def vocabulary_problems(config: ExperimentConfig) -> list[str]:
    """What is wrong with a steerability vocabulary file the config names (checked before a sweep starts)."""
    if not (config.steerability.enabled and config.steerability.vocabulary):
        return []
    return _vocabulary_file(config)[1]


def concept_vocabulary(config: ExperimentConfig) -> list[str]:
    """The steerability vocabulary: `steerability.vocabulary`'s words (one per line), else the dataset's words."""
    if config.steerability.vocabulary is None:
        return get_dataset(config.dataset).concept_words
    words, problems = _vocabulary_file(config)
    if problems:
        raise ConfigError(problems)
    return words


def concept_embeddings(config: ExperimentConfig, words: list[str]) -> np.ndarray:
    """(V, embed) unit-norm CLIP text embeddings of `steerability.template` filled with each word."""
    bundle = load_clip(config.model, device="cpu")  # on the driver, which may have no GPU (the cluster's head)
    return build_text_classifier(bundle, words, [config.steerability.template]).cpu().numpy()


def needs_retrieval(config: ExperimentConfig) -> bool:
    """Whether a configured method searches neighbours (the FAISS actors must run)."""
    return any(METHODS[method].uses_neighbours for method in config.steering.methods)


def start_retrieval(config: ExperimentConfig, data: SweepData, gpus_per_shard: float = 0.0) -> Any:
    """Create (or find) the FAISS actors over the train rows that are not validation rows; name them in `data`."""
    from vs2ray.retrieval import RetrievalIndex

    column = "retrieval" if config.retrieval.space == "dinov2" else "embedding"
    vectors = data.split.acts[column][data.split.train_mask]
    inputs = {
        "store": data.split.store_dir.name,
        "column": column,
        **selection_key(config),
        "seed": config.seed,
        "index": config.retrieval.index,
        "num_shards": config.retrieval.num_shards,
    }
    name = f"vs2ray-retrieval-{content_key(inputs)}"
    index = RetrievalIndex(
        name,
        vectors,
        np.arange(len(vectors)),
        kind=config.retrieval.index,
        num_shards=config.retrieval.num_shards,
        use_gpu=config.retrieval.use_gpu,
        gpus_per_shard=gpus_per_shard,
    )
    data.retrieval_index = name
    return index


def evaluation_splits(
    data: SweepData,
    layer: int = -1,
    device: torch.device | str = "cpu",
    token_blocks: tuple[int, ...] = (),
    pool_token_block: int | None = None,
) -> tuple[PoolData, SplitData, SplitData]:
    """(pool, val, test) at block `layer`: the SAE's training rows (neighbour pool, calibration), validation
    and test rows, their [CLS] rows and embeddings on `device`. Every token of `token_blocks` (steering
    inside the encoder, SAE_REC^A) of val and test, and of `pool_token_block` of the pool (all-token
    calibration), stays on the host, read in batches (`SplitData.token_source`): these are the large ones.
    On the CPU the pool's [CLS] rows and embeddings stay in the store too (`PoolRows`), read a chunk or a
    gather at a time; on a GPU they are copied to it. The pool's retrieval vectors are not read: FAISS
    holds them (`start_retrieval`)."""
    split = data.split
    with_retrieval = split.acts.has("retrieval")
    grouped = data.num_groups > 0
    cls = split.column(layer)
    device = torch.device(device)

    def integers(values: np.ndarray, mask: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(values[mask].astype(np.int64)).to(device)  # a copy: values may be read-only

    def groups_of(acts: Activations, mask: np.ndarray) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(attributes, groups) of the rows of `mask`, on datasets with groups."""
        chosen = [integers(v, mask) if grouped and v is not None else None for v in (acts.attributes, acts.groups)]
        return chosen[0], chosen[1]

    def rows(acts: Activations, mask: np.ndarray, name: str, blocks: tuple[int, ...]) -> SplitData:
        def take(column: str) -> torch.Tensor:
            return column_rows(acts, column, mask).to(device)  # filled a chunk at a time

        attributes, groups = groups_of(acts, mask)
        return SplitData(
            name=name,
            cls=take(cls),
            embedding=take("embedding"),
            labels=integers(acts.labels, mask),
            retrieval=take("retrieval") if with_retrieval else None,
            attributes=attributes,
            groups=groups,
            token_source={block: column_rows(acts, split.column(block, "all"), mask) for block in blocks},
        )

    def pool_column(column: str) -> PoolRows:
        stored = column_rows(split.acts, column, split.train_mask)
        return PoolRows(stored, device) if device.type == "cpu" else PoolRows(stored.to(device))

    pool_blocks = () if pool_token_block is None else (pool_token_block,)
    attributes, groups = groups_of(split.acts, split.train_mask)
    pool = PoolData(
        name="pool",
        cls=pool_column(cls),
        embedding=pool_column("embedding"),
        labels=integers(split.acts.labels, split.train_mask),
        token_source={
            block: column_rows(split.acts, split.column(block, "all"), split.train_mask) for block in pool_blocks
        },
        attributes=attributes,
        groups=groups,
    )
    everything = np.ones(len(data.test.ids), dtype=bool)
    return pool, rows(*split.val_source(), "val", token_blocks), rows(data.test, everything, "test", token_blocks)


def steering_grid(
    config: ExperimentConfig, gammas: list[float] | None = None, lambdas: list[float] | None = None
) -> Grid:
    """The steering settings to evaluate: a constant gives one value, a distribution a spread of values."""
    return Grid(
        gammas=gammas or grid_values(config.steering.gamma),
        lambdas=lambdas or grid_values(config.steering.lambda_),
        gate_quantiles=config.steering.gate_quantiles,
        rag_alphas=grid_values(config.steering.rag_alpha, 3),
        n_neighbors=int(_first(config.retrieval.n_neighbors)),
        positive_rules=_all_values(config.retrieval.positive_rule),
        ablate_scores=config.steering.ablate_score,
        ablate_counts=config.steering.ablate_latents,
    )


def grid_values(value: Any, points: int = 5) -> list[float]:
    """A constant -> [it]; a choice -> its values; a (log)uniform or int range -> `points` values across it."""
    if not isinstance(value, Distribution):
        return [float(value)]
    if value.kind == "choice":
        return [float(v) for v in value.values]
    low, high = value.values
    spaced = np.geomspace(low, high, points) if value.kind == "loguniform" else np.linspace(low, high, points)
    return [round(float(v), 6) for v in spaced]


def _all_values(value: Any) -> list[Any]:
    # a list is a grid inside every trial; a choice outside a trial (the evaluate CLI) is gridded too
    if isinstance(value, Distribution):
        return list(value.values)
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _first(value: Any) -> Any:
    # a standalone evaluation of a searched neighbour setting uses its first value; a trial has fixed it
    return value.values[0] if isinstance(value, Distribution) else value


def build_evaluator(
    config: ExperimentConfig,
    data: SweepData,
    sae: SparseAutoencoder,
    device: torch.device | str = "cpu",
    saes_by_block: list[SparseAutoencoder] | None = None,
) -> Evaluator:
    """An Evaluator of `sae` at block `sae.layer` on the shared arrays, searching neighbours through the named
    FAISS actors. Steering before the last block, or SAE_REC^A (`saes_by_block`), loads the CLIP model here
    to run the remaining blocks on `device`."""
    search = None
    if data.retrieval_index is not None:
        from vs2ray.retrieval import RetrievalIndex

        search = RetrievalIndex(data.retrieval_index).search  # attaches to the running actors by name
    layer = config.sae.layer
    num_blocks = data.split.num_blocks
    block = block_index(data.split.acts.manifest, layer)
    inside = block != num_blocks - 1
    all_tokens = config.sae.tokens in ("all", "patches")
    token_blocks = {block} if inside else set()
    if saes_by_block:
        token_blocks.add(0)  # SAE_REC^A starts from block 0's output and runs every later block itself
    run_block = block_runner(load_clip(config.model, device=device)) if token_blocks else None
    encoder = Encoder(block, num_blocks, run_block, all_tokens, saes_by_block or (), config.sae.tokens == "patches")
    pool_block = block if inside and all_tokens else None
    pool, val, test = evaluation_splits(data, layer, device, tuple(sorted(token_blocks)), pool_block)
    head = {name: _tensor(value).to(device) for name, value in data.head.items()}
    classifier = _tensor(data.text_classifier).to(device)
    return Evaluator(
        sae.to(device),
        head,
        classifier,
        pool,
        val,
        test,
        search,
        encoder,
        data.num_groups,
        config.steering.select_by,
        config.retrieval.empty_negatives,
        written_words=config.dataset.name in TYPOGRAPHIC_DATASETS,
    )


def steerability(config: ExperimentConfig, data: SweepData, evaluator: Evaluator) -> SteerabilityResult | None:
    """S of the sampled latents and neurons at the evaluator's block (`steerability.*`), or None when disabled."""
    if not config.steerability.enabled or data.concepts is None:
        return None
    settings = SteerabilitySettings.from_keys(config.steerability.model_dump(), seed=config.seed)
    concepts = _tensor(data.concepts).to(evaluator.pool.device)
    return measure_steerability(evaluator, concepts, list(data.concept_words or ()), settings)


def zero_shot_evaluate(
    config: ExperimentConfig,
    split: str,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Zero-shot top-1/top-5 of the configured model on `split` of the configured dataset, and on a typographic
    dataset the attacked images' true-label top-1 (`attacked_top1`) and typographic accuracy (`typographic`)
    and the clean images' top-1 (`clean_top1`, None where every image has a word).

    Runs in-process (no Ray); meant for checks and the demo, not for large datasets.
    `progress(done, total)` is called after every batch.
    """
    dataset = get_dataset(config.dataset)
    bundle = load_clip(config.model)
    classifier = build_text_classifier(bundle, dataset.classes, prompt_templates_for(config.dataset, dataset))
    records = dataset.records(split)[:limit]
    tally = Tally(len(dataset.classes))
    typographic = config.dataset.name in TYPOGRAPHIC_DATASETS
    started = time.perf_counter()
    batch = config.extraction.batch_size
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        pixels = torch.stack([bundle.preprocess(dataset.load_image(split, r.ref)) for r in chunk])
        logits = steering.logits_from_embeddings(encode_images(bundle, pixels), classifier).cpu()
        written = torch.tensor([r.attribute for r in chunk]) if typographic else None
        tally.add(logits, torch.tensor([r.label for r in chunk]), written=written)
        if progress is not None:
            progress(tally.images, len(records))
    words = {
        "attacked_top1": tally.attacked_top1(),
        "typographic": tally.typographic(),
        "clean_top1": tally.clean_top1(),
    }
    return {
        "model": f"{bundle.arch}/{bundle.pretrained}",
        "dataset": dataset.name,
        "split": split,
        "images": len(records),
        "classes": len(dataset.classes),
        "top1": tally.top1(),
        "top5": tally.top5(),
        **(words if typographic else {}),
        "seconds": time.perf_counter() - started,
    }
