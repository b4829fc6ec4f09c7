"""What one trial does: get or train its SAE on the cached activations, then evaluate it.

`prepare_data` runs once per sweep on the driver (extraction if needed, arrays loaded
once); the sweep hands its `SweepData` to every trial through Ray's object store
(`tune.with_parameters`). `run_trial` is the Tune function trainable: it fixes the
trial's sampled values in the config, gets or trains the SAE (a checkpoint cache keyed
by the training parameters, so trials that differ only in steering parameters reuse
it), evaluates the configured methods, and reports one result.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vs2ray.config import ConfigError, Distribution, ExperimentConfig, config_with, validate_config
from vs2ray.evaluate import NEIGHBOUR_METHODS, Evaluator, Grid, MethodResult, SplitData, grid_values
from vs2ray.sae import SAETrainParams, TopKSAE, evaluate_sae, sae_from_state, state_tensors, train_sae
from vs2ray.store import (
    Activations,
    cls_column,
    content_key,
    load_activations,
    load_sae_files,
    sae_dir_for,
    save_sae,
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
    """The SAE for (train store, column, params): loaded when a complete checkpoint exists, else trained and saved."""
    directory = sae_dir_for(config.storage.root, f"{split.store_dir.name}-{split.column}", params.as_dict())
    x = _tensor(split.acts[split.column])
    with _exclusive(directory):
        if (directory / "metrics.json").is_file():
            tensors, saved, metrics = load_sae_files(directory, expected_d=x.shape[1])
            return TrainedSAE(sae_from_state(tensors, saved["k"], saved["topk"]), metrics, directory, cache_hit=True)
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
        record = {
            **params.as_dict(),
            "d": result.sae.d,
            "n_latents": result.sae.n_latents,
            "activation_key": split.store_dir.name,
            "column": split.column,
            "val_fraction": config.dataset.val_fraction,
        }
        save_sae(directory, state_tensors(result.sae), record, metrics)
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
    return any(method in NEIGHBOUR_METHODS for method in config.steering.methods)


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


# ---------------------------------------------------------------- the Tune trainable


def trial_metrics(trained: TrainedSAE, results: dict[str, MethodResult]) -> dict[str, Any]:
    """The flat result a trial reports (DESIGN.md "Trial result"): SAE metrics, then each method's summary."""
    metrics: dict[str, Any] = {name: float(trained.metrics[name]) for name in SAE_METRICS if name in trained.metrics}
    metrics["sae_cache_hit"] = trained.cache_hit
    metrics["sae_dir"] = str(trained.directory)
    for result in results.values():
        metrics.update(result.summary())
    return metrics


def write_trial_files(directory: Path, classes: list[str], labels: np.ndarray, results: dict[str, MethodResult]):
    """Per-class test accuracy and test predictions of each method at its selected setting, plus every setting."""
    per_class = {m: r.per_class_test[r.selected] for m, r in results.items()}
    (directory / "per_class.json").write_text(json.dumps({"classes": classes, "per_class_top1": per_class}))
    every_setting = {
        m: {"settings": r.settings, "val_top1": r.val_top1, "test_top1": r.test_top1, "coverage": r.coverage}
        for m, r in results.items()
    }
    (directory / "methods.json").write_text(json.dumps(every_setting))
    predictions = {m: np.asarray(r.test_predictions[r.selected], dtype=np.int32) for m, r in results.items()}
    np.savez(directory / "predictions.npz", labels=labels.astype(np.int32), **predictions)


METRICS_FILE = "metrics.json"  # the reported result, kept in the checkpoint so a restarted trial need not rerun
CHECKPOINT_FILES = ("per_class.json", "methods.json", "predictions.npz", METRICS_FILE)


def run_trial(params: dict[str, Any], base_config: dict[str, Any], data: SweepData, experiment: str) -> None:
    """Tune function trainable: one SAE (cached) and every configured method at the trial's sampled values.

    `experiment` is the experiment dir (local or URI) where Tune keeps this trial's files.
    """
    import ray
    from ray import tune

    from vs2ray.results import trial_dir_name, trial_file

    trial_dir = f"{experiment}/{trial_dir_name(tune.get_context().get_trial_id())}"
    saved = {name: trial_file(trial_dir, name) for name in CHECKPOINT_FILES}
    if all(content is not None for content in saved.values()):
        # The driver died after this trial reported but before Tune saved its state, so Tune
        # runs it again; its checkpoint already holds the whole result.
        tune.report(json.loads(saved[METRICS_FILE]))
        return
    started = time.perf_counter()
    config = config_with(validate_config(base_config, "sweep"), params)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    trained = get_or_train_sae(config, sae_params(config), data.split, log=print)
    evaluation_started = time.perf_counter()
    evaluator = build_evaluator(data, trained.sae, device)
    results = evaluator.evaluate_all(config.steering.methods, steering_grid(config))
    metrics = trial_metrics(trained, results)
    metrics.update(
        eval_seconds=time.perf_counter() - evaluation_started,
        trial_seconds=time.perf_counter() - started,
        node_id=ray.get_runtime_context().get_node_id(),
        gpu_ids=",".join(str(i) for i in ray.get_gpu_ids()),  # the GPU share Ray gave this trial
        device=device,
        retrieval_index=data.retrieval_index or "",
        vs2ray_complete=True,
    )
    with tempfile.TemporaryDirectory() as staging:
        write_trial_files(Path(staging), data.classes, data.test.labels, results)
        (Path(staging) / METRICS_FILE).write_text(json.dumps(metrics))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(staging))
