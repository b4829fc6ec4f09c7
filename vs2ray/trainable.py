"""One sweep trial, as a Ray Tune function trainable, and the files it leaves in its checkpoint.

`run_trial` fixes the trial's sampled values in the config, gets or trains the SAE (a
checkpoint cache keyed by the training parameters, so trials that differ only in steering
parameters reuse it), evaluates the configured methods, and reports the result; while it
trains an SAE it also reports intermediate results (`IntermediateReports`) that the
schedulers act on. The stage functions it calls (`vs2ray.stages`) are the ones the CLI uses.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray.tune import Callback

from vs2ray.config import ExperimentConfig, config_with, full_steps, validate_config
from vs2ray.devices import environment, limit_gpu_memory, worker_device
from vs2ray.evaluate import Evaluator, MethodResult
from vs2ray.methods import GROUP_METRICS, METHOD_METRICS, TYPOGRAPHIC_METRICS, method_of
from vs2ray.results import (
    CHECKPOINT_FILES,
    METHODS_FILE,
    METRICS_FILE,
    PER_CLASS_FILE,
    PREDICTIONS_FILE,
    STEERABILITY_FILE,
    record_stopped,
)
from vs2ray.sae import SparseAutoencoder, evaluate_sae
from vs2ray.stages import (
    SAE_METRICS,
    SweepData,
    TrainedSAE,
    block_saes,
    build_evaluator,
    get_or_train_sae,
    sae_params,
    steerability,
    steering_grid,
)
from vs2ray.steerability import SteerabilityResult

# ---------------------------------------------------------------- the Tune trainable


def trial_metrics(trained: TrainedSAE, results: dict[str, MethodResult]) -> dict[str, Any]:
    """The flat result a trial reports (DESIGN.md "Trial result"): SAE metrics, then each method's summary."""
    metrics: dict[str, Any] = {name: float(trained.metrics[name]) for name in SAE_METRICS if name in trained.metrics}
    metrics["sae_cache_hit"] = trained.cache_hit
    metrics["sae_dir"] = str(trained.directory)
    for result in results.values():
        metrics.update(result.summary())
    return metrics


class IntermediateReports:
    """`on_report` for a training SAE: every `sae.report_every` steps, one Tune result with the SAE as it is.

    The result holds the step (`sae_step`, the schedulers' time axis), FVU on a sample of the
    training rows and on the validation rows, L0, the dead fraction of training, and each
    `search.metric` measured on validation only (`Evaluator.validate` at this trial's steering
    settings), so that a scheduler can compare the trial with others at the same step.
    """

    SAMPLE_ROWS = 4096  # rows for the intermediate FVUs: enough for 3 digits, cheap at every report

    def __init__(self, config: ExperimentConfig, data: SweepData, device: str, started: float) -> None:
        self.config, self.data, self.device, self.started = config, data, device, started
        kinds = METHOD_METRICS + GROUP_METRICS + TYPOGRAPHIC_METRICS
        searched = {method_of(metric, kind) for metric in config.search.metrics for kind in kinds}
        self.methods = [m for m in config.steering.methods if m in searched]
        self.samples: dict[str, torch.Tensor] = {}  # drawn at the first report: a cached SAE never needs them
        self.evaluator: Evaluator | None = None
        self.seconds = 0.0

    def _draw_samples(self) -> dict[str, torch.Tensor]:
        """Up to SAMPLE_ROWS training and validation rows of the SAE's column, drawn with the config's seed."""
        split, config = self.data.split, self.config
        column = split.column(config.sae.layer, config.sae.tokens)
        generator = torch.Generator().manual_seed(config.seed)
        samples = {}
        tokens = config.sae.tokens
        training, held_out = split.rows(column, split.train_mask, tokens), split.val_rows(column, tokens)
        for name, rows in (("fvu", training), ("val_fvu", held_out)):
            # read from the store: only the sampled rows are touched
            samples[name] = rows.take(torch.randperm(len(rows), generator=generator)[: self.SAMPLE_ROWS].numpy())
        return samples

    def __call__(self, step: int, sae: SparseAutoencoder, dead_fraction: float) -> None:
        from ray import tune

        started = time.perf_counter()
        result: dict[str, Any] = {"sae_step": step, "dead_fraction": dead_fraction, "vs2ray_intermediate": True}
        self.samples = self.samples or self._draw_samples()
        for name, rows in self.samples.items():
            measured = evaluate_sae(sae, rows)
            result[name] = measured["fvu"]
            result.update(l0=measured["l0"], dense_fraction=measured["dense_fraction"])
        if self.methods:
            # built once (splits, head, encoder); each report only swaps in the SAE as it is now
            evaluator = (
                self.evaluator.with_sae(sae)
                if self.evaluator is not None
                else build_evaluator(self.config, self.data, sae, self.device)
            )
            self.evaluator, grid = evaluator, steering_grid(self.config)
            on_test = any(m.startswith("test_") for m in self.config.search.metrics)  # allow_test_selection
            for method in self.methods:
                scores = evaluator.evaluate(method, grid).summary() if on_test else evaluator.validate(method, grid)
                result.update(scores)
        sae.train()  # the evaluator put it in eval mode; training goes on
        self.seconds += time.perf_counter() - started
        elapsed = time.perf_counter() - self.started
        tune.report({**result, "report_seconds": self.seconds, "train_seconds": elapsed, "trial_seconds": elapsed})


class StoppedTrials(Callback):
    """Tune callback (driver side): records every trial a scheduler stopped in `vs2ray_stopped.json`.

    A trial counts as stopped when it ended without error and its last result is an
    intermediate one, before `max_t`; `vs2ray.results` reads the file to tell such trials
    from unfinished ones.
    """

    def __init__(self, experiment: str, max_t: int) -> None:
        self.experiment, self.max_t = experiment, max_t

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        if result.get("vs2ray_intermediate") and result.get("sae_step", self.max_t) < self.max_t:
            record_stopped(self.experiment, trial.trial_id, int(result["sae_step"]))


def write_trial_files(
    directory: Path, data: SweepData, results: dict[str, MethodResult], measured: SteerabilityResult | None = None
) -> None:
    """Per-class (and per-group) test accuracy and test predictions of each method at its selected setting,
    every setting's figures, and the steerability measurement if there is one."""
    per_class = {m: r.per_class_test[r.selected] for m, r in results.items()}
    accuracies: dict[str, Any] = {"classes": data.classes, "per_class_top1": per_class}
    if data.group_names:
        accuracies["groups"] = data.group_names
        accuracies["per_group_top1"] = {m: r.per_group_test[r.selected] for m, r in results.items()}
    (directory / PER_CLASS_FILE).write_text(json.dumps(accuracies))
    if measured is not None:
        (directory / STEERABILITY_FILE).write_text(json.dumps(measured.to_json()))
    every_setting = {
        m: {
            "settings": r.settings,
            "val_top1": r.val_top1,
            "test_top1": r.test_top1,
            "coverage": r.coverage,
            "empty_negatives": r.empty_negatives,
        }
        for m, r in results.items()
    }
    (directory / METHODS_FILE).write_text(json.dumps(every_setting))
    predictions: dict[str, Any] = {
        m: np.asarray(r.test_predictions[r.selected], dtype=np.int32) for m, r in results.items()
    }
    predictions["labels"] = data.test.labels.astype(np.int32)
    np.savez(directory / PREDICTIONS_FILE, **predictions)


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
        tune.report(json.loads(saved[METRICS_FILE] or b"{}"))
        return
    started = time.perf_counter()
    config = config_with(validate_config(base_config, "sweep"), params)
    gpu_ids = ray.get_gpu_ids()  # the trial's share (resources.gpus_per_trial); none: the CPU, even on a GPU node
    device = worker_device(config.model.device, gpu_ids, "this trial")
    limit_gpu_memory(device, config.resources.gpus_per_trial)
    sae_training = sae_params(config)
    reports = IntermediateReports(config, data, str(device), started) if config.sae.report_every else None
    trained = get_or_train_sae(config, sae_training, data.split, log=print, on_report=reports, device=device)
    every_block = block_saes(config, sae_training, data.split, print, device)
    evaluation_started = time.perf_counter()
    evaluator = build_evaluator(config, data, trained.sae, device, every_block)
    results = evaluator.evaluate_all(config.steering.methods, steering_grid(config))
    metrics = trial_metrics(trained, results)
    measured = steerability(config, data, evaluator)
    if measured is not None:
        metrics.update(measured.metrics())
    metrics.update(
        sae_block=evaluator.encoder.block if evaluator.encoder else -1,  # the block index, whatever sae.layer says
        sae_tokens=config.sae.tokens,
        sae_kind=config.sae.kind,
        sae_normalize=config.sae.normalize,
        sae_step=full_steps(config),  # a cached SAE counts as fully trained for the schedulers
        report_seconds=reports.seconds if reports else 0.0,
        eval_seconds=time.perf_counter() - evaluation_started,
        trial_seconds=time.perf_counter() - started,
        node_id=ray.get_runtime_context().get_node_id(),
        gpu_ids=",".join(str(i) for i in gpu_ids),  # the GPU share Ray gave this trial
        device=str(device),
        # torch, its CUDA build, the driver and the GPU's name, as env_torch, env_cuda_build, env_driver, env_gpu, ...
        **{f"env_{name}": "" if value is None else value for name, value in environment(device).items()},
        retrieval_index=data.retrieval_index or "",
        vs2ray_complete=True,
    )
    with tempfile.TemporaryDirectory() as staging:
        write_trial_files(Path(staging), data, results, measured)
        (Path(staging) / METRICS_FILE).write_text(json.dumps(metrics))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(staging))
