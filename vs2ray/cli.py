"""`python -m vs2ray <command>`: every command-line tool of vs2ray, with its arguments, printing and exit codes.

    python -m vs2ray extract    [--config YAML] [--split S|all] [--set K=V ...] [--address ADDR]
    python -m vs2ray zero-shot  [--config YAML] [--split S] [--limit N] [--set K=V ...]
    python -m vs2ray train-sae  [--config YAML] [--layer L] [--set K=V ...]
    python -m vs2ray evaluate   [--config YAML] [--set K=V ...] [--gammas G,..] [--lambdas L,..] [--address ADDR]
    python -m vs2ray sweep      [--config YAML] [--name NAME] [--set K=V ...] [--resume] [--address ADDR]
    python -m vs2ray export-sae SAE_OR_TRIAL_DIR --out DIR
    python -m vs2ray features   SAE_OR_TRIAL_DIR [--latents F,..] [--top N] [--classes N]
    python -m vs2ray report     EXPERIMENT_DIR [--out DIR]
    python -m vs2ray devices    [--require-cuda]

`python -m vs2ray.sweep` starts the sweep command too (`vs2ray/sweep.py`, which nothing imports).
This is the only module that prints; an invalid config exits 2 with one line per
problem, a missing dataset or model exits 1 with the reason, and so does a Ray cluster that
refuses this machine's authentication token (checked before any work starts).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vs2ray.config import ConfigError, ExperimentConfig, config_to_yaml, config_with, load_config
from vs2ray.devices import GpuUnavailable
from vs2ray.files import StorageUnavailable
from vs2ray.sae import CheckpointError
from vs2ray.store import StoreIncomplete, disk_full

Command = Callable[[argparse.Namespace], int]


def _say(line: str) -> None:
    print(line, flush=True)


class ClusterRefused(RuntimeError):
    """The Ray cluster at an address refused this machine's authentication token."""


def join_ray(address: str | None, **options: Any) -> None:
    """`ray.init` (a local instance when `address` is None), after checking that a cluster at `address`
    accepts this machine's token: Ray itself would retry for 20 s and then report only "Failed to connect"."""
    import ray

    if ray.is_initialized():
        return
    if address is not None:
        check_token(address)
    ray.init(address=address, **{"include_dashboard": False, "configure_logging": False, **options})


def check_token(address: str) -> None:
    """Raise ClusterRefused, naming the cause, when the GCS at `address` rejects this machine's token."""
    from ray.exceptions import AuthenticationError

    try:  # Ray's own GCS client and address resolution ("auto" included)
        from ray._private.services import canonicalize_bootstrap_address
        from ray._raylet import GcsClient  # type: ignore[attr-defined]  # compiled, without stubs
    except ImportError:  # a Ray without them: ray.init reports what goes wrong
        return

    def ask_the_gcs() -> None:
        gcs_address = canonicalize_bootstrap_address(address)
        if gcs_address is not None:
            GcsClient(address=gcs_address).internal_kv_get(b"vs2ray-token-check", None, timeout=10)

    # a GCS that answers refuses a wrong token at once; an unreachable one is left to ray.init after 15 s
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(ask_the_gcs).result(timeout=15)
    except AuthenticationError:
        mode = os.environ.get("RAY_AUTH_MODE", "unset")
        raise ClusterRefused(
            f"the Ray cluster at {address} refused this machine's authentication token, so nothing was started "
            f"(here RAY_AUTH_MODE={mode}; the token is read from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, "
            f"else ~/.ray/auth_token). Use the token the cluster was started with: on a `ray up` cluster the "
            f"~/.ray/auth_token that cluster/aws.yaml copies to every node, with RAY_AUTH_MODE=token."
        ) from None
    except Exception:  # unreachable, slow, or no GCS there: ray.init says so
        return
    finally:
        pool.shutdown(wait=False)


def _config(args: argparse.Namespace, default: str | None = None) -> ExperimentConfig:
    return load_config(args.config or default, args.overrides)


# ---------------------------------------------------------------- commands


def extract_command(args: argparse.Namespace) -> int:
    """Extract CLIP activations into the Parquet activation store."""
    from vs2ray.data import DatasetUnavailable
    from vs2ray.extract import extract_splits
    from vs2ray.models import ModelUnavailable

    config = _config(args)
    splits = [config.dataset.train_split, config.dataset.test_split] if args.split == "all" else [args.split]
    try:
        if args.address:
            join_ray(args.address, log_to_driver=False)
        results = extract_splits(config, splits, _say)
    except (DatasetUnavailable, ModelUnavailable, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for split, result in results.items():
        state = "reused" if result.reused else f"written in {result.seconds:.1f}s"
        print(f"{split}: {result.rows} rows -> {result.store_dir} ({state})")
        if result.failed:
            print(f"{split}: {len(result.failed)} image(s) could not be read and were skipped:")
            for entry in result.failed:
                print(f"  id {entry['id']}  {entry['ref']}  ({entry['error']})")
    return 0


def zero_shot_command(args: argparse.Namespace) -> int:
    """Zero-shot accuracy of the configured CLIP model (in-process, no Ray)."""
    from vs2ray.models import ModelUnavailable
    from vs2ray.stages import zero_shot_evaluate

    config = _config(args)
    started = time.perf_counter()
    next_report = [0]

    def report(done: int, total: int) -> None:
        if done >= next_report[0] or done == total:  # about ten lines, whatever the size
            print(f"  {done}/{total} images ({done / (time.perf_counter() - started):.0f} images/s)", flush=True)
            next_report[0] = done + max(1, total // 10)

    try:
        result = zero_shot_evaluate(config, args.split or config.dataset.test_split, args.limit, report)
    except (ModelUnavailable, RuntimeError, ValueError) as error:
        print(f"error: {error}")
        return 1
    print(
        f"{result['model']} zero-shot on {result['dataset']}/{result['split']} "
        f"({result['images']} images, {result['classes']} classes): "
        f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  "
        f"({result['images'] / result['seconds']:.0f} images/s)"
    )
    if "typographic" in result:
        shown = {
            k: "—" if result[k] is None else f"{100 * result[k]:.2f}%"
            for k in ("attacked_top1", "typographic", "clean_top1")
        }
        print(
            f"  attacked images (another class's name written): true label {shown['attacked_top1']}, "
            f"the written class {shown['typographic']}; images without a word: top-1 {shown['clean_top1']}"
        )
    return 0


def train_sae_command(args: argparse.Namespace) -> int:
    """Train (or reuse) the configured SAE (sae.kind) on the train split, minus the validation rows."""
    from vs2ray.stages import get_or_train_sae, load_train_split, sae_params

    config = _config(args)
    if args.layer is not None:
        config = config_with(config, {"sae.layer": args.layer}, "--layer")
    params = sae_params(config)
    trained = get_or_train_sae(config, params, load_train_split(config, _say), _say)
    print(f"{'reused' if trained.cache_hit else 'saved'} {trained.directory}")
    shown = ("fvu", "val_fvu", "l0", "dead_fraction", "dense_fraction", "samples_per_second", "train_seconds")
    print("  ".join(f"{name} {trained.metrics[name]:.4g}" for name in shown if name in trained.metrics))
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    """Every configured method for one SAE (trained or reused), over its grid, selected on validation."""
    from vs2ray.evaluate import format_table
    from vs2ray.stages import (
        block_saes,
        build_evaluator,
        get_or_train_sae,
        needs_retrieval,
        prepare_data,
        sae_params,
        start_retrieval,
        steerability,
        steering_grid,
    )
    from vs2ray.steerability import format_steerability

    config = _config(args)
    data = prepare_data(config, _say)
    params = sae_params(config)
    trained = get_or_train_sae(config, params, data.split, _say)
    every_block = block_saes(config, params, data.split, _say)
    _say(f"SAE {trained.directory} ({'reused' if trained.cache_hit else 'trained'}): FVU {trained.metrics['fvu']:.4f}")
    index = None  # the FAISS actors live as long as this handle
    if needs_retrieval(config):
        join_ray(args.address, log_to_driver=False)
        index = start_retrieval(config, data)
    grid = steering_grid(
        config,
        gammas=[float(v) for v in args.gammas.split(",")] if args.gammas else None,
        lambdas=[float(v) for v in args.lambdas.split(",")] if args.lambdas else None,
    )
    evaluator = build_evaluator(config, data, trained.sae, saes_by_block=every_block)
    results = evaluator.evaluate_all(config.steering.methods, grid)
    source = f"the {config.dataset.val_split} split" if config.dataset.val_split else "carved from train"
    print(f"{len(evaluator.val.labels)} validation rows ({source}), {len(evaluator.test.labels)} test rows")
    print(format_table(results))
    measured = steerability(config, data, evaluator)
    if measured is not None:
        print(format_steerability(measured))
    del index
    return 0


def sweep_command(args: argparse.Namespace) -> int:
    """Run (or --resume) a sweep; print the best trials, each method's selected trial and the experiment path."""
    from vs2ray import tuning
    from vs2ray.data import DatasetUnavailable, get_dataset
    from vs2ray.files import check_storage, is_uri, read_text, write_text
    from vs2ray.models import ModelUnavailable
    from vs2ray.results import STATUS_DONE, SWEEP_CONFIG_FILE, format_summary, load_results, load_sweep_config
    from vs2ray.stages import needs_retrieval, prepare_data, start_retrieval
    from vs2ray.tune_state import DamagedState, keep_restorable_snapshots, prepare_resume

    config = _config(args, str(tuning.DEFAULT_CONFIG))
    space = tuning.check_sweep(config)  # a bad sweep fails here, before Ray starts
    root = tuning.experiments_root(config)
    check_storage(root, write=True)  # an unreachable or read-only s3:// root fails here, before Ray starts
    if args.resume:
        name = args.name or tuning.latest_experiment(root, config.name)
        saved = load_sweep_config(f"{root}/{name}") if name else None
        if saved is None:
            raise ConfigError([f"--resume: no experiment {name or config.name + '-*'} under {root}"], "sweep")
        if args.overrides:
            print("note: --resume continues with the experiment's saved config; --set values are ignored")
        config = saved
        try:
            for change in prepare_resume(f"{root}/{name}"):
                print(f"resume: {change}")
        except DamagedState as error:
            print(
                f"error: --resume: {error}, so Tune cannot restore the sweep; "
                f"its finished trials stay readable: python -m analysis.report {root}/{name}",
                file=sys.stderr,
            )
            return 1
    else:
        name = args.name or f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if read_text(f"{root}/{name}/{SWEEP_CONFIG_FILE}") is not None:
            problem = f"--name: experiment {root}/{name} exists; add --resume or choose another name"
            raise ConfigError([problem], "sweep")
    path = f"{root}/{name}"
    try:
        get_dataset(config.dataset)  # a missing dataset root fails here, before Ray starts
    except DatasetUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    from ray import tune

    keep_restorable_snapshots()
    if not is_uri(root):  # save the experiment state at every step (cheap on a local or shared disk), so that
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")  # a killed driver loses no finished trial
    started = time.perf_counter()
    join_ray(args.address, include_dashboard=False if args.address is None else None)
    try:
        data = prepare_data(config, _say)
    except (DatasetUnavailable, ModelUnavailable) as error:  # offline, or files not where the config says
        print(f"error: {error}", file=sys.stderr)
        return 1
    index = None  # the FAISS actors live as long as this handle
    if needs_retrieval(config):
        index = start_retrieval(config, data, config.retrieval.gpus_per_shard)
        print(f"retrieval: {data.retrieval_index} ({sum(index.sizes)} vectors in {len(index.sizes)} shard(s))")
    trainable = tuning.build_trainable(config, data, path)
    if args.resume:
        print(f"resuming {path}")
        filesystem = tuning.tune_filesystem(root)
        tuner = tune.Tuner.restore(
            path, trainable, resume_unfinished=True, resume_errored=False, storage_filesystem=filesystem
        )
    else:
        write_text(f"{path}/{SWEEP_CONFIG_FILE}", config_to_yaml(config))
        tuner = tuning.build_tuner(config, space, trainable, str(name))
    tuner.fit()
    del index
    results = load_results(path)
    print()
    print(format_summary(results, config))
    print(f"\n{len(results)} trials in {time.perf_counter() - started:.0f} s; experiment: {path}")
    print(f"report: python -m analysis.report {path}")
    finished = int((results["status"] == STATUS_DONE).sum()) if len(results) else 0
    return 0 if finished else 1  # a sweep in which no trial finished is a failed command


def devices_command(args: argparse.Namespace) -> int:
    """torch, its CUDA build, the NVIDIA driver and the GPUs torch sees; with --require-cuda, exit 1 without one."""
    import torch

    from vs2ray.devices import cuda_diagnosis, environment

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, value in environment(device).items():
        print(f"{name:>12}: {value}")
    for index in range(torch.cuda.device_count()):
        _, total = torch.cuda.mem_get_info(index)
        print(f"{'cuda:' + str(index):>12}: {torch.cuda.get_device_name(index)}, {total / 2**30:.1f} GiB")
    if device == "cpu":
        print(f"no CUDA device: {cuda_diagnosis()}", file=sys.stderr if args.require_cuda else sys.stdout)
        return 1 if args.require_cuda else 0
    return 0


def export_sae_command(args: argparse.Namespace) -> int:
    """Write an SAE (a vs2ray SAE dir, or a finished trial's) in a Hugging Face Hub model layout."""
    from vs2ray.interop import export_sae, load_any_sae

    source, provenance, _ = _sae_of(Path(args.source).expanduser())
    out = export_sae(source, Path(args.out).expanduser(), provenance)
    loaded = load_any_sae(out).sae
    print(f"exported {source} to {out} ({loaded.kind}, {loaded.n_latents} latents over d = {loaded.d})")
    return 0


def _sae_of(source: Path) -> tuple[Path, dict[str, str], dict[int, str]]:
    """(the SAE dir, provenance, latents worth a card with why) of a vs2ray SAE dir or of a finished trial's dir
    (its result names its SAE and what `ablate` removed; its steerability file the most steerable latents)."""
    from vs2ray.results import card_latents, last_complete_result

    if (source / "result.json").is_file():
        result = last_complete_result((source / "result.json").read_text())
        if result is None:
            raise ConfigError([f"{source}: the trial has no complete result yet, so no SAE to read"])
        provenance = {"trial": source.name, "experiment": str(source.parent)}
        return Path(result["sae_dir"]), provenance, card_latents(result, str(source))
    return source, {}, {}


def features_command(args: argparse.Namespace) -> int:
    """Feature cards of an SAE (a vs2ray SAE dir or a finished trial's): top images, heatmaps, names, densities."""
    from vs2ray.features import cards_markdown, feature_cards

    sae_dir, _, reasons = _sae_of(Path(args.source).expanduser())
    latents = [int(value) for value in args.latents.split(",")] if args.latents else None
    cards = feature_cards(sae_dir, latents, args.top, args.classes, _say, reasons)
    (cards.directory / "cards.md").write_text(cards_markdown(cards))
    agreement = cards.mean_agreement
    if agreement is not None:
        print(f"names agree with their top images' labels {100 * agreement[0]:.0f}% (chance {100 * agreement[1]:.0f}%)")
    print(f"{len(cards.cards)} cards in {cards.directory} (cards.md)")
    return 0


def report_command(args: argparse.Namespace) -> int:
    """report.md and PNG figures for a finished (or interrupted) sweep; no Ray needed."""
    from vs2ray.report import main as report_main

    return report_main([args.experiment, *(["--out", args.out] if args.out else [])])


# ---------------------------------------------------------------- the parser


def _with_config(parser: argparse.ArgumentParser, default: str = "built-in defaults = the bundled world") -> None:
    parser.add_argument("--config", help=f"experiment YAML (default: {default})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def build_parser() -> argparse.ArgumentParser:
    """The `python -m vs2ray` parser: one sub-command per stage."""
    parser = argparse.ArgumentParser(prog="python -m vs2ray", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    def command(name: str, run: Command) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=run.__doc__, description=run.__doc__)
        sub.set_defaults(run=run)
        return sub

    sub = command("extract", extract_command)
    _with_config(sub)
    sub.add_argument("--split", default="all", help="a split name, or 'all' for dataset.train_split and test_split")
    sub.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    sub = command("zero-shot", zero_shot_command)
    _with_config(sub)
    sub.add_argument("--split", default=None, help="dataset split (default: dataset.test_split)")
    sub.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    sub = command("train-sae", train_sae_command)
    _with_config(sub)
    sub.add_argument("--layer", type=int, help="the block to train on (= --set sae.layer=L; default: sae.layer)")
    sub = command("evaluate", evaluate_command)
    _with_config(sub)
    sub.add_argument("--gammas", help="comma-separated γ grid (default: from steering.gamma)")
    sub.add_argument("--lambdas", help="comma-separated λ grid (default: from steering.lambda)")
    sub.add_argument("--address", default=None, help="Ray cluster address for the retrieval actors")
    sub = command("sweep", sweep_command)
    _with_config(sub, "sweeps/quickstart.yaml, the bundled world")
    sub.add_argument("--name", help="experiment name (default: <config name>-<date>-<time>; with --resume: latest)")
    sub.add_argument("--resume", action="store_true", help="continue an interrupted sweep (Tuner.restore)")
    sub.add_argument("--address", default=None, help="Ray cluster to join (e.g. auto); default: a local instance")
    sub = command("export-sae", export_sae_command)
    sub.add_argument("source", help="a vs2ray SAE dir (<storage.root>/saes/...) or a finished trial's dir")
    sub.add_argument("--out", required=True, help="the directory to write (upload it with huggingface-cli upload)")
    sub = command("features", features_command)
    sub.add_argument("source", help="a vs2ray SAE dir (<storage.root>/saes/...) or a finished trial's dir")
    sub.add_argument("--latents", help="comma-separated latents to add to the default choice (one per class)")
    sub.add_argument("--top", type=int, default=8, help="top-activating images per card")
    sub.add_argument("--classes", type=int, default=12, help="classes whose most specific latent gets a card")
    sub = command("report", report_command)
    sub.add_argument("experiment", help="the sweep's experiment dir (local path or s3:// / gs:// URI)")
    sub.add_argument("--out", help="where to write (default: <experiment>/report, or ./report-<name> for a URI)")
    sub = command("devices", devices_command)
    sub.add_argument("--require-cuda", action="store_true", help="exit 1 when torch sees no CUDA device")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` and run the command; a ConfigError prints its problems and returns 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (ClusterRefused, GpuUnavailable, CheckpointError, StoreIncomplete, StorageUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        full = disk_full(error)
        if full is None:
            raise
        print(
            f"error: {full}. Nothing unfinished was marked complete: free space there (or point storage.root at a "
            f"larger disk) and run the same command again; what was finished is kept",
            file=sys.stderr,
        )
        return 1
