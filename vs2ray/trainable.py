"""One sweep trial, as a Ray Tune function trainable, and the files it leaves in its checkpoint.

`run_trial` fixes the trial's sampled values in the config, gets or trains the SAE (a
checkpoint cache keyed by the training parameters, so trials that differ only in steering
parameters reuse it), evaluates the configured methods, and reports one result. The stage
functions it calls (`vs2ray.stages`) are the ones the CLI uses.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vs2ray.config import config_with, validate_config
from vs2ray.evaluate import MethodResult
from vs2ray.results import CHECKPOINT_FILES, METHODS_FILE, METRICS_FILE, PER_CLASS_FILE, PREDICTIONS_FILE
from vs2ray.stages import (
    SAE_METRICS,
    SweepData,
    TrainedSAE,
    block_saes,
    build_evaluator,
    get_or_train_sae,
    sae_params,
    steering_grid,
)

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
    (directory / PER_CLASS_FILE).write_text(json.dumps({"classes": classes, "per_class_top1": per_class}))
    every_setting = {
        m: {"settings": r.settings, "val_top1": r.val_top1, "test_top1": r.test_top1, "coverage": r.coverage}
        for m, r in results.items()
    }
    (directory / METHODS_FILE).write_text(json.dumps(every_setting))
    predictions = {m: np.asarray(r.test_predictions[r.selected], dtype=np.int32) for m, r in results.items()}
    np.savez(directory / PREDICTIONS_FILE, labels=labels.astype(np.int32), **predictions)


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
    params = sae_params(config)
    trained = get_or_train_sae(config, params, data.split, log=print)
    every_block = block_saes(config, params, data.split, print)
    evaluation_started = time.perf_counter()
    evaluator = build_evaluator(config, data, trained.sae, device, every_block)
    results = evaluator.evaluate_all(config.steering.methods, steering_grid(config))
    metrics = trial_metrics(trained, results)
    metrics.update(
        sae_block=evaluator.encoder.block,  # the block index, whatever way sae.layer was written
        sae_tokens=config.sae.tokens,
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
