"""The stages every entry point shares, without Ray of their own: prepare the data, get or train the SAE,
start retrieval, build the evaluator, zero-shot accuracy.

The CLI (`vs2ray.cli`) and a sweep's trials (`vs2ray.trainable`) both call these; they reach
Ray only through the stages below them (`extract`'s Ray Data pipeline, `retrieval`'s FAISS
actors). `prepare_data` runs once per sweep on the driver (extraction if needed, arrays
loaded once); the sweep hands its `SweepData` to every trial through Ray's object store.
"""

from __future__ import annotations

import contextlib
import fcntl
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vs2ray import steering
from vs2ray.config import ConfigError, Distribution, ExperimentConfig
from vs2ray.data import get_dataset, prompt_templates_for
from vs2ray.evaluate import Evaluator, Grid, SplitData, accuracy
from vs2ray.methods import METHODS
from vs2ray.models import build_text_classifier, encode_images, load_clip
from vs2ray.sae import SAETrainParams, TopKSAE, evaluate_sae, train_sae
from vs2ray.store import (
    Activations,
    cls_column,
    content_key,
    load_activations,
    sae_dir_for,
    train_val_split,
)

Log = Callable[[str], None]
SAE_METRICS = ("fvu", "val_fvu", "l0", "dead_fraction", "dense_fraction", "train_seconds")  # reported per trial


def sae_params(config: ExperimentConfig) -> SAETrainParams:
    """The SAE training parameters of a config whose searchable values are fixed (by a trial or --set)."""
    values = {
        "sae.k": config.sae.k,
        "sae.expansion": config.sae.expansion,
        "sae.lr": config.sae.lr,
        "sae.auxk_coef": config.sae.auxk_coef,
        "pass.w_aux": config.pass_.w_aux,
        "pass.momentum": config.pass_.momentum,
    }
    searched = [key for key, value in values.items() if isinstance(value, Distribution)]
    if searched:
        raise ConfigError([f"{key}: is a search distribution here; fix it with --set {key}=VALUE" for key in searched])
    return SAETrainParams(
        k=config.sae.k,
        expansion=config.sae.expansion,
        topk=config.sae.topk,
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
    """The train split's activations with the validation rows marked."""

    store_dir: Path
    acts: Activations
    column: str
    train_mask: np.ndarray
    val_mask: np.ndarray


def load_train_split(config: ExperimentConfig, layer: int = -1, log: Log = lambda _: None) -> TrainSplit:
    """Extract (or reuse) the train store and carve the validation rows deterministically."""
    from vs2ray.extract import extract

    store = extract(config, config.dataset.train_split, log).store_dir
    acts = load_activations(store, layers=[layer], retrieval=config.retrieval.space == "dinov2")
    column = cls_column(acts.manifest, layer)
    train_mask, val_mask = train_val_split(acts.ids, config.dataset.val_fraction, config.seed)
    return TrainSplit(store, acts, column, train_mask, val_mask)


@dataclass
class TrainedSAE:
    sae: TopKSAE
    metrics: dict[str, Any]
    directory: Path
    cache_hit: bool


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Hold a file lock beside `directory`, so concurrent trials with one SAE key train it once."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def get_or_train_sae(config: ExperimentConfig, params: SAETrainParams, split: TrainSplit, log: Log) -> TrainedSAE:
    """The SAE for (train store, column, params, training rows): loaded when a complete checkpoint exists,
    else trained and saved. The key holds `dataset.val_fraction` (with the seed in `params`, it decides which
    rows the SAE trained on), so a changed validation share never reuses an SAE trained on validation rows."""
    training = {**params.as_dict(), "val_fraction": config.dataset.val_fraction}
    directory = sae_dir_for(config.storage.root, f"{split.store_dir.name}-{split.column}", training)
    x = _tensor(split.acts[split.column])
    with _exclusive(directory):
        if (directory / "metrics.json").is_file():
            saved = TopKSAE.load(directory, expected_d=x.shape[1])
            return TrainedSAE(saved.sae, saved.metrics, directory, cache_hit=True)
        labels = torch.from_numpy(split.acts.labels.astype(np.int64))
        train, val = torch.from_numpy(split.train_mask), torch.from_numpy(split.val_mask)
        log(f"training an SAE on {int(train.sum())} of {len(x)} activations ({int(val.sum())} held out for validation)")
        result = train_sae(
            x[train],
            params,
            labels=labels[train],
            num_classes=len(split.acts.manifest["classes"]),
            log_every=max(1, params.steps // 10),
            log=log,
        )
        val_metrics = evaluate_sae(result.sae, x[val].to(result.sae.b_pre.device)) if bool(val.any()) else {}
        metrics = {**result.metrics, **{f"val_{name}": value for name, value in val_metrics.items()}}
        record = {**training, "activation_key": split.store_dir.name, "column": split.column}
        result.sae.save(directory, record, metrics)
    return TrainedSAE(result.sae, metrics, directory, cache_hit=False)


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

    @property
    def classes(self) -> list[str]:
        return list(self.split.acts.manifest["classes"])


def prepare_data(config: ExperimentConfig, log: Log = lambda _: None) -> SweepData:
    """Extract (or reuse) the train and test stores of `config` and load the arrays every trial needs."""
    from safetensors.numpy import load_file

    from vs2ray.extract import extract

    split = load_train_split(config, -1, log)
    test_store = extract(config, config.dataset.test_split, log).store_dir
    test = load_activations(test_store, retrieval=config.retrieval.space == "dinov2")
    head = load_file(test_store / "head.safetensors")
    classifier = load_file(test_store / "classifier.safetensors")["classifier"]
    return SweepData(split, test, head, classifier)


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
        "val_fraction": config.dataset.val_fraction,
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


def evaluation_splits(data: SweepData, device: torch.device | str = "cpu") -> tuple[SplitData, SplitData, SplitData]:
    """(pool, val, test): the SAE's training rows (neighbour pool, calibration), validation and test rows."""
    split = data.split
    with_retrieval = "retrieval" in split.acts.columns

    def rows(acts: Activations, mask: np.ndarray, name: str) -> SplitData:
        def take(column: str) -> torch.Tensor:
            return _tensor(acts[column])[torch.from_numpy(mask)].to(device)

        return SplitData(
            name=name,
            cls=take(split.column),
            embedding=take("embedding"),
            labels=torch.from_numpy(acts.labels.astype(np.int64))[torch.from_numpy(mask)].to(device),
            retrieval=take("retrieval") if with_retrieval else None,
        )

    everything = np.ones(len(data.test.ids), dtype=bool)
    return (
        rows(split.acts, split.train_mask, "pool"),
        rows(split.acts, split.val_mask, "val"),
        rows(data.test, everything, "test"),
    )


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


def build_evaluator(data: SweepData, sae: TopKSAE, device: torch.device | str = "cpu") -> Evaluator:
    """An Evaluator of `sae` on the shared arrays, searching neighbours through the named FAISS actors."""
    search = None
    if data.retrieval_index is not None:
        from vs2ray.retrieval import RetrievalIndex

        search = RetrievalIndex(data.retrieval_index).search  # attaches to the running actors by name
    pool, val, test = evaluation_splits(data, device)
    head = {name: _tensor(value).to(device) for name, value in data.head.items()}
    return Evaluator(sae.to(device), head, _tensor(data.text_classifier).to(device), pool, val, test, search)


def zero_shot_evaluate(
    config: ExperimentConfig,
    split: str,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Zero-shot top-1/top-5 of the configured model on `split` of the configured dataset.

    Runs in-process (no Ray); meant for checks and the demo, not for large datasets.
    `progress(done, total)` is called after every batch.
    """
    dataset = get_dataset(config.dataset)
    bundle = load_clip(config.model)
    classifier = build_text_classifier(bundle, dataset.classes, prompt_templates_for(config.dataset, dataset))
    records = dataset.records(split)[:limit]
    logits, labels = [], []
    started = time.perf_counter()
    batch = config.extraction.batch_size
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        pixels = torch.stack([bundle.preprocess(dataset.load_image(split, r.ref)) for r in chunk])
        logits.append(steering.logits_from_embeddings(encode_images(bundle, pixels), classifier).cpu())
        labels.extend(r.label for r in chunk)
        if progress is not None:
            progress(len(labels), len(records))
    top1, top5, _ = accuracy(torch.cat(logits), torch.tensor(labels), len(dataset.classes))
    return {
        "model": f"{bundle.arch}/{bundle.pretrained}",
        "dataset": dataset.name,
        "split": split,
        "images": len(records),
        "classes": len(dataset.classes),
        "top1": top1,
        "top5": top5,
        "seconds": time.perf_counter() - started,
    }
