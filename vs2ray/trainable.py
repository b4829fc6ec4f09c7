"""What one trial does: get or train its SAE on the cached activations, then evaluate it.

The functions here need no Ray; the Tune trainable of the sweep wraps them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vs2ray.config import ConfigError, Distribution, ExperimentConfig
from vs2ray.sae import SAETrainParams, TopKSAE, evaluate_sae, sae_from_state, state_tensors, train_sae
from vs2ray.store import (
    Activations,
    cls_column,
    load_activations,
    load_sae_files,
    sae_dir_for,
    save_sae,
    train_val_split,
)

Log = Callable[[str], None]


def sae_params(config: ExperimentConfig) -> SAETrainParams:
    """The SAE training parameters of a config whose searchable values are fixed (by a trial or --set)."""
    values = {
        "sae.k": config.sae.k,
        "sae.expansion": config.sae.expansion,
        "sae.lr": config.sae.lr,
        "sae.auxk_coef": config.sae.auxk_coef,
        "pass.w_aux": config.pass_.w_aux,
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


def get_or_train_sae(config: ExperimentConfig, params: SAETrainParams, split: TrainSplit, log: Log) -> TrainedSAE:
    """The SAE for (train store, column, params): loaded when a complete checkpoint exists, else trained and saved."""
    directory = sae_dir_for(config.storage.root, f"{split.store_dir.name}-{split.column}", params.as_dict())
    x = torch.from_numpy(split.acts[split.column])
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
    val_metrics = evaluate_sae(result.sae, x[val]) if bool(val.any()) else {}
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
