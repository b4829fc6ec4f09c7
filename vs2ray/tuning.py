"""The sweep behind `python -m vs2ray.sweep`: a Ray Tune + Optuna search over SAE and steering parameters.

The driver extracts (or reuses) the activation stores, loads the arrays once and hands
them to every trial through the object store (`tune.with_parameters`), starts the FAISS
retrieval actors when a neighbour method is evaluated, and runs a `tune.Tuner` whose
`OptunaSearch` samples every value the YAML marks as a distribution (define-by-run, so
a value that only matters under a condition is sampled only then), with the configured
scheduler (FIFO, or ASHA / HyperBand / the median rule on the SAE step) and trackers
(MLflow, W&B, TensorBoard, a persisted Optuna study). At the end it prints the best
trials and each method at its validation-selected trial.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from vs2ray.config import (
    DATASETS_WITH_GROUPS,
    TYPOGRAPHIC_DATASETS,
    WITH_CLEAN_IMAGES,
    ConfigError,
    Distribution,
    ExperimentConfig,
    TrackingConfig,
    config_with,
    full_steps,
    search_space,
)
from vs2ray.files import is_uri, list_dirs, modified, storage_filesystem
from vs2ray.methods import GROUP_METRICS, METHOD_METRICS, TYPOGRAPHIC_METRICS, metric_name

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "sweeps" / "quickstart.yaml"


def _sampled_only_with_pass(values: dict[str, Any]) -> bool:
    return float(values.get("pass.w_aux", 0.0)) > 0


# key -> when it is sampled (given the values sampled or fixed before it); otherwise the config's value stands
CONDITIONS = {"pass.momentum": _sampled_only_with_pass}


class SearchSpace:
    """Optuna define-by-run space over a config's distributions (a class, so Tune can pickle the searcher)."""

    def __init__(self, distributions: list[tuple[str, Distribution]], fixed: dict[str, Any]) -> None:
        self.distributions = distributions
        self.fixed = fixed  # constants the conditions look at

    def __call__(self, trial: Any) -> None:
        values = dict(self.fixed)
        for key, dist in self.distributions:
            if key in CONDITIONS and not CONDITIONS[key](values):
                continue
            low, high = dist.values[0], dist.values[-1]
            if dist.kind == "choice":
                values[key] = trial.suggest_categorical(key, list(dist.values))
            elif dist.kind == "int":
                values[key] = trial.suggest_int(key, low, high)
            else:
                values[key] = trial.suggest_float(key, low, high, log=dist.kind == "loguniform")


def allowed_metrics(config: ExperimentConfig) -> list[str]:
    """Every metric a trial of `config` reports that the search may optimise."""
    from vs2ray.stages import SAE_METRICS

    methods = config.steering.methods
    kinds = METHOD_METRICS + GROUP_METRICS * (config.dataset.name in DATASETS_WITH_GROUPS)
    if config.dataset.name in TYPOGRAPHIC_DATASETS:
        with_clean = config.dataset.name in WITH_CLEAN_IMAGES
        kinds += tuple(k for k in TYPOGRAPHIC_METRICS if k != "test_clean_top1" or with_clean)
    steerability = ["steerable_latents", "steerable_neurons"] * config.steerability.enabled
    return [metric_name(kind, m) for m in methods for kind in kinds] + [*SAE_METRICS, "trial_seconds", *steerability]


def check_sweep(config: ExperimentConfig) -> list[tuple[str, Distribution]]:
    """The search space, after checking what pydantic cannot: metric names and points_to_evaluate (ConfigError)."""
    from vs2ray.stages import vocabulary_problems

    space = list(search_space(config))
    problems = []
    allowed = allowed_metrics(config)
    for metric in config.search.metrics:
        if metric not in allowed:
            problems.append(f"search.metric: {metric!r} is not reported by these methods; one of: {', '.join(allowed)}")
    distributions = dict(space)
    keys = list(distributions)
    if not space:
        problems.append("the config has no distribution to search; mark a value as e.g. {choice: [...]}")
    for i, point in enumerate(config.search.points_to_evaluate):
        unknown = sorted(set(point) - set(keys))
        if unknown:
            problems.append(
                f"search.points_to_evaluate[{i}]: {', '.join(unknown)} not searched; searched keys: {', '.join(keys)}"
            )
            continue
        missing = [key for key in keys if key not in point and key not in CONDITIONS]
        if missing:
            problems.append(f"search.points_to_evaluate[{i}]: missing {', '.join(missing)}")
        for key, value in point.items():
            if not _within(distributions[key], value):
                bounds = distributions[key].model_dump()
                problems.append(f"search.points_to_evaluate[{i}].{key}: {value!r} is outside its search space {bounds}")
        try:
            config_with(config, point, f"search.points_to_evaluate[{i}]")
        except ConfigError as error:
            problems += error.problems
    problems += vocabulary_problems(config)
    problems += _scheduler_problems(config) + tracker_problems(config.tracking, experiments_root(config))
    if problems:
        raise ConfigError(problems, "sweep")
    return space


def _scheduler_problems(config: ExperimentConfig) -> list[str]:
    search = config.search
    if search.scheduler == "fifo":
        return []
    problems = []
    if len(search.metrics) > 1:
        problems.append(
            f"search.scheduler: {search.scheduler} stops trials on one metric, and search.metric is a list "
            f"{search.metrics}; use scheduler: fifo for a multi-objective search, or one metric"
        )
    if not config.sae.report_every:
        problems.append(f"search.scheduler: {search.scheduler} needs intermediate results; set sae.report_every")
    if config.sae.epochs is not None and search.max_t is None:
        problems.append("search.max_t: set it (SAE steps of a full trial) when sae.epochs decides the steps")
    if search.grace_period >= full_steps(config):
        problems.append(
            f"search.grace_period: {search.grace_period} is not below the {full_steps(config)} steps of a full "
            f"trial (search.max_t, default sae.steps), so no trial could be stopped"
        )
    return problems


# tracking.<flag> -> the module it needs (the pip extra has the flag's name)
TRACKERS = {"mlflow": "mlflow", "wandb": "wandb", "tensorboard": "tensorboardX"}
OPTUNA_JOURNAL, OPTUNA_SQLITE, MLFLOW_DB = "optuna.journal", "optuna.db", "mlflow.db"  # in the experiment dir


def tracker_problems(tracking: TrackingConfig, experiments: str) -> list[str]:
    """A config error for every tracker asked for whose package is not installed, or whose local default
    cannot live under a remote `experiments` root (checked before Ray starts)."""
    import importlib.util

    problems = []
    for flag, module in TRACKERS.items():
        if getattr(tracking, flag) and importlib.util.find_spec(module) is None:
            problems.append(
                f"tracking.{flag}: true needs the {module} package, which is not installed; "
                f"pip install 'vs2ray[{flag}]' (or set tracking.{flag}: false)"
            )
    if is_uri(experiments):
        if tracking.mlflow and not (tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")):
            problems.append("tracking.mlflow_uri: give one (or MLFLOW_TRACKING_URI); the experiments dir is remote")
        if tracking.optuna_storage != "none":
            problems.append(f"tracking.optuna_storage: {tracking.optuna_storage} needs a local experiments dir")
    return problems


def _within(dist: Distribution, value: Any) -> bool:
    if dist.kind == "choice":
        return value in dist.values
    low, high = dist.values
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def experiments_root(config: ExperimentConfig) -> str:
    """Where Tune writes experiments: storage.experiments, else <storage.root>/experiments (URIs kept as given)."""
    root = config.storage.experiments or f"{config.storage.root.rstrip('/')}/experiments"
    return root if is_uri(root) else str(Path(root).expanduser().resolve())


def tune_filesystem(root: str) -> Any | None:
    """Tune's storage_filesystem for an experiments root (a local path or a URI).

    A local root goes through vs2ray's atomic-write filesystem, so that a driver killed
    while Tune copies its experiment state leaves the previous state whole; object
    stores keep Ray's own filesystem (None).
    """
    return None if is_uri(root) else storage_filesystem(root)[0]


def _trial_dirname(trial: Any) -> str:
    from vs2ray.results import trial_dir_name

    return trial_dir_name(trial.trial_id)


def build_searcher(
    config: ExperimentConfig,
    space: list[tuple[str, Distribution]],
    study_name: str | None = None,
    storage: Any | None = None,
) -> Any:
    """OptunaSearch over `space` with the configured sampler, seeded; several metrics make it multi-objective.

    With `storage` the study lives there under `study_name` (optuna-dashboard can open it).
    """
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    seed = config.search.seed if config.search.seed is not None else config.seed
    sampler = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
    }[config.search.sampler]()
    fixed: dict[str, Any] = {} if isinstance(config.pass_.w_aux, Distribution) else {"pass.w_aux": config.pass_.w_aux}
    return OptunaSearch(
        space=SearchSpace(space, fixed),
        metric=config.search.metric,
        mode=list(config.search.mode) if isinstance(config.search.mode, list) else config.search.mode,
        points_to_evaluate=[dict(point) for point in config.search.points_to_evaluate] or None,
        sampler=sampler,
        study_name=study_name,
        storage=storage,
    )


def build_scheduler(config: ExperimentConfig) -> Any | None:
    """The configured Tune scheduler on the SAE step (`sae_step`); None for FIFO (Tune's default)."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, MedianStoppingRule

    search, max_t = config.search, full_steps(config)
    if search.scheduler in ("asha", "hyperband"):
        # HyperBand as Li et al. (2020) run it at scale: asynchronous brackets (ASHA is one bracket). Tune's
        # synchronous HyperBandScheduler pauses trials at its rungs, and a paused SAE would restart from step 0.
        return AsyncHyperBandScheduler(
            time_attr="sae_step",
            max_t=max_t,
            grace_period=search.grace_period,
            reduction_factor=search.reduction_factor,
            brackets=search.brackets if search.scheduler == "hyperband" else 1,
        )
    if search.scheduler == "median":
        # min_time_slice = max_t: never pause a trial to "yield time" (a paused SAE would restart from step 0)
        return MedianStoppingRule(
            time_attr="sae_step", grace_period=search.grace_period, min_samples_required=3, min_time_slice=max_t
        )
    return None


def optuna_storage(config: ExperimentConfig, experiment: str) -> Any | None:
    """The Optuna storage `tracking.optuna_storage` asks for, in the (local) experiment dir; None for none."""
    import optuna

    kind = config.tracking.optuna_storage
    if kind == "none":
        return None
    Path(experiment).mkdir(parents=True, exist_ok=True)
    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(Path(experiment) / OPTUNA_JOURNAL)))
    return optuna.storages.RDBStorage(f"sqlite:///{Path(experiment) / OPTUNA_SQLITE}")


def build_callbacks(config: ExperimentConfig, experiment: str, name: str) -> list[Any]:
    """Tune callbacks: the record of early-stopped trials, then each tracker the config turns on."""
    from vs2ray.trainable import StoppedTrials

    tracking = config.tracking
    callbacks: list[Any] = [StoppedTrials(experiment, full_steps(config))]
    if tracking.mlflow:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        local = f"sqlite:///{Path(experiment) / MLFLOW_DB}"
        uri = tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or local
        callbacks.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=name, save_artifact=False))
    if tracking.wandb:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(
            WandbLoggerCallback(project=tracking.wandb_project, group=name, mode=tracking.wandb_mode, dir=experiment)
        )
    if tracking.tensorboard:
        from ray.tune.logger import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())
    return callbacks


def build_trainable(config: ExperimentConfig, data: Any, experiment: str) -> Any:
    """run_trial with the shared arrays in the object store and the configured per-trial resources."""
    from ray import tune

    from vs2ray.trainable import run_trial

    resources = {"cpu": config.resources.cpus_per_trial, "gpu": config.resources.gpus_per_trial}
    base = config.model_dump(mode="json", by_alias=True)
    trainable = tune.with_parameters(run_trial, base_config=base, data=data, experiment=experiment)
    return tune.with_resources(trainable, resources)


def build_tuner(config: ExperimentConfig, space: list[tuple[str, Distribution]], trainable: Any, name: str) -> Any:
    """A Tuner over `space` (from check_sweep) writing to <experiments root>/<name>."""
    from ray import tune

    single = not isinstance(config.search.metric, list)
    root = experiments_root(config)
    experiment = f"{root}/{name}"
    searcher = build_searcher(config, space, name, optuna_storage(config, experiment))
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=build_scheduler(config),
            metric=config.search.metrics[0] if single else None,
            mode=config.search.modes[0] if single else None,
            num_samples=config.search.num_samples,
            max_concurrent_trials=config.search.max_concurrent_trials,
            trial_dirname_creator=_trial_dirname,
            reuse_actors=config.search.reuse_actors,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=root,
            storage_filesystem=tune_filesystem(root),
            failure_config=tune.FailureConfig(max_failures=config.search.max_failures),
            callbacks=build_callbacks(config, experiment, name),
            verbose=1,  # status tables and trial errors; each trial's metrics are in the closing summary
        ),
    )


def latest_experiment(root: str, prefix: str) -> str | None:
    """The most recently started vs2ray experiment under `root` whose name starts with `prefix`-."""
    from vs2ray.results import SWEEP_CONFIG_FILE

    started: dict[str, float] = {}
    for name in list_dirs(root):
        if name.startswith(f"{prefix}-"):
            with contextlib.suppress(FileNotFoundError):
                started[name] = modified(f"{root}/{name}/{SWEEP_CONFIG_FILE}")
    return max(started, key=lambda name: started[name]) if started else None
