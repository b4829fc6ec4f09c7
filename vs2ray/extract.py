"""Activation extraction: a Ray Data pipeline from images to the Parquet activation store.

    python -m vs2ray extract --config sweeps/quickstart.yaml --split all

The pipeline, per chunk of `extraction.batch_size` images:

    chunk (start, stop) ──decode + resize/crop on CPU tasks──▶ uint8 pixels
        ──encoder actor pool (one per GPU or GPU fraction; CPU actors without GPUs)──▶
        [CLS] tokens (or every token) of the requested blocks + CLIP embedding,
        written by the same actor as part-<chunk>.parquet (atomically)
        ──▶ a small summary row to the driver

Activations never travel through the object store: only uint8 pixels go to the
actors, only summaries come back. Each actor runs two calls at once; a lock keeps the
encoder to one batch at a time, so one chunk's Parquet write overlaps the next
chunk's forward pass. Decoding is a task per chunk, so it spreads over every CPU of
the cluster that the actors leave free.

The driver only lists chunk boundaries: workers list the dataset's records themselves
(deterministically) and load their own images. A rerun skips every chunk whose part
file exists, so an interrupted extraction resumes without duplicates; a store whose
manifest says `complete: true` is returned at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import numpy as np

from vs2ray import __version__
from vs2ray.config import BUNDLED_RETRIEVAL_ENCODER, ExperimentConfig, RetrievalConfig
from vs2ray.data import ImageDataset, get_dataset, prompt_templates_for
from vs2ray.data.decode import decode_chunk
from vs2ray.devices import environment, worker_device
from vs2ray.files import is_uri
from vs2ray.models import (
    BUNDLED_RETRIEVAL_WEIGHTS,
    build_text_classifier,
    bundled_weights,
    load_clip,
    load_retrieval_encoder,
    num_vision_layers,
    resolve_layers,
    vision_head,
)
from vs2ray.store import (
    INT_COLUMNS,
    STORE_FORMAT,
    column_shapes,
    content_key,
    damaged_parts,
    ensure_arrays,
    extraction_lock,
    finished_chunks,
    part_record,
    read_manifest,
    write_json,
    write_part,
    write_tensors,
)

_FULL_HASH_LIMIT = 64 * 2**20


@dataclass
class ExtractionResult:
    """What one `extract` call produced or found."""

    split: str
    store_dir: Path
    rows: int
    failed: list[dict[str, Any]] = field(default_factory=list)
    reused: bool = False
    seconds: float = 0.0
    workers: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # set-up, start-up, steady-state figures
    pipeline_stats: str = ""  # Ray Data's per-operator statistics of the run


def _file_fingerprint(path: Path) -> str:
    """sha256 of a weights file (size and mtime for files too large to hash on every call)."""
    stat = path.stat()
    if stat.st_size > _FULL_HASH_LIMIT:
        return f"size={stat.st_size},mtime={stat.st_mtime_ns}"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def store_inputs(
    config: ExperimentConfig, split: str, layers: list[int], preprocess: dict[str, SplitPreprocess]
) -> dict[str, Any]:
    """Every input that determines a store's content; the store's key is their hash."""
    pretrained = config.model.pretrained
    weights = bundled_weights(config.model.arch) if pretrained == "bundled" else Path(pretrained).expanduser()
    dataset = config.dataset.model_dump(exclude={"val_fraction", "val_split", "train_split", "test_split"})
    if dataset["root"]:
        dataset["root"] = str(Path(dataset["root"]).expanduser().resolve())
    return {
        "format": STORE_FORMAT,
        "model": {
            "arch": config.model.arch,
            "pretrained": pretrained,
            "weights": _file_fingerprint(weights) if weights.is_file() else None,
            "precision": config.model.precision,
        },
        "dataset": dataset,
        "split": split,
        "layers": layers,
        **({"tokens": "all"} if config.extraction.tokens == "all" else {}),  # cls stores keep their old keys
        **({"dtype": config.extraction.dtype} if config.extraction.dtype != "float32" else {}),
        "preprocess": {name: [repr(p.pixels), p.mean, p.std] for name, p in preprocess.items()},
        "retrieval": _retrieval_inputs(config.retrieval) if config.retrieval.space == "dinov2" else None,
    }


def _retrieval_inputs(retrieval: RetrievalConfig) -> dict[str, Any]:
    """The retrieval encoder's part of a store key; the bundled encoder's weights are fingerprinted too."""
    inputs = retrieval.model_dump(include={"space", "encoder", "encoder_pretrained", "image_size"})
    if retrieval.encoder == BUNDLED_RETRIEVAL_ENCODER and BUNDLED_RETRIEVAL_WEIGHTS.is_file():
        inputs["weights"] = _file_fingerprint(BUNDLED_RETRIEVAL_WEIGHTS)
    return inputs


def store_dir_for(config: ExperimentConfig, split: str, inputs: dict[str, Any]) -> Path:
    """`<storage.root>/activations/<dataset>-<split>-<arch>-<hash>`."""
    root = config.storage.root
    if is_uri(root):
        raise ValueError(f"storage.root: {root!r}: remote stores are not supported by extraction yet; use a path")
    name = f"{config.dataset.name}-{split}-{config.model.arch}-{content_key(inputs)}"
    return Path(root).expanduser() / "activations" / name


@dataclass(frozen=True)
class SplitPreprocess:
    """open_clip's eval transform cut in two: PIL steps on CPU workers, tensor steps on the encoder."""

    pixels: Callable[[Any], Any]  # PIL image -> PIL image (resize, crop, mode)
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _split_preprocess(preprocess: Any) -> SplitPreprocess:
    """Split `Compose([..., ToTensor, Normalize])` so that uint8 pixels, not floats, travel to the GPU."""
    from torchvision.transforms import Compose, Normalize

    steps = list(preprocess.transforms)
    if len(steps) < 2 or not isinstance(steps[-1], Normalize) or "ToTensor" not in type(steps[-2]).__name__:
        raise ValueError(f"unexpected preprocessing pipeline (expected ... ToTensor, Normalize): {preprocess}")
    normalize = steps[-1]
    return SplitPreprocess(
        Compose(steps[:-2]), tuple(float(m) for m in normalize.mean), tuple(float(s) for s in normalize.std)
    )


def normalise_pixels(pixels_nhwc: Any, mean: Sequence[float], std: Sequence[float], device: Any = "cpu") -> Any:
    """uint8 (n, H, W, 3) -> float32 (n, 3, H, W) on `device`, the same arithmetic as ToTensor + Normalize.

    The uint8 pixels cross to a GPU (from pinned memory, asynchronously) and are normalised there: a quarter
    of the bytes of float32, and no CPU core spends its time on the arithmetic.
    """
    import torch

    device = torch.device(device)
    pixels = torch.from_numpy(np.array(pixels_nhwc, dtype=np.uint8))
    if device.type == "cuda":
        pixels = pixels.pin_memory().to(device, non_blocking=True)
    images = pixels.permute(0, 3, 1, 2).float().div(255)
    mean_t = torch.tensor(mean, dtype=images.dtype, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=device).view(1, -1, 1, 1)
    return images.sub(mean_t).div(std_t)


# ---------------------------------------------------------------- worker side


class ChunkEncoder:
    """Ray Data UDF (actor): CLIP forward pass with block hooks (and the retrieval encoder, if any),
    on the actor's GPU when it has one, then the chunk's part file.

    Ray Data may run two calls of one actor at once (`max_concurrent_calls_per_actor`):
    the forward pass holds `_encoder_lock`, the write does not.
    """

    def __init__(
        self,
        config_json: str,
        layers: list[int],
        normalisation: dict[str, tuple[tuple, tuple]],
    ) -> None:
        import threading

        import ray
        import torch

        config = ExperimentConfig.model_validate_json(config_json)
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        device = worker_device(config.model.device, self.gpu_ids, "this encoder actor")
        torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input shapes: pick the fastest conv once
        self.bundle = load_clip(config.model, device=device)
        self.retrieval = (
            load_retrieval_encoder(config.retrieval, device, precision=config.model.precision)
            if "retrieval_pixels" in normalisation
            else None
        )
        self.layers, self.normalisation = layers, normalisation
        self.all_tokens = config.extraction.tokens == "all"
        self.dtype = config.extraction.dtype
        self.node_id = ray.get_runtime_context().get_node_id()
        self.environment = environment(device)  # torch, CUDA build, driver, device and GPU, in the manifest
        self._encoder_lock = threading.Lock()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        with self._encoder_lock:
            columns = self.encode(batch)
        failed = json.loads(str(batch["failed"][0]))
        write_part(Path(str(batch["store_dir"][0])), int(batch["chunk"][0]), columns, failed, self.dtype)
        worker = {"node": self.node_id, "pid": os.getpid(), "gpus": self.gpu_ids, **self.environment}
        summary = {key: batch[key] for key in ("split", "chunk", "failed")}
        return {**summary, "rows": [len(columns["id"])], "worker": [json.dumps(worker)]}

    def encode(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One decoded chunk -> its part file's columns: id, label, attribute, group, cls_/tokens_<block>, embedding,
        retrieval."""
        import torch

        from vs2ray.models import capture_blocks, encode_images, encode_retrieval

        pixels = np.asarray(batch["pixels"][0])
        out = {name: np.asarray(batch[f"{name}s"][0]) for name in INT_COLUMNS}
        width = self.bundle.model.visual.transformer.width
        embed_dim = self.bundle.model.visual.proj.shape[1]
        if not len(pixels):  # every image of the chunk failed: empty columns of the right width
            out.update({f"cls_{layer}": np.zeros((0, width), np.float32) for layer in self.layers})
            if self.all_tokens:
                num_tokens = self.bundle.model.visual.positional_embedding.shape[0]
                out.update({f"tokens_{layer}": np.zeros((0, num_tokens, width), np.float32) for layer in self.layers})
            out["embedding"] = np.zeros((0, embed_dim), np.float32)
            if self.retrieval is not None:
                out["retrieval"] = np.zeros((0, self.retrieval.model.num_features), np.float32)
        else:
            with torch.inference_mode(), capture_blocks(self.bundle, self.layers, self.all_tokens) as captured:
                images = normalise_pixels(pixels, *self.normalisation["pixels"], self.bundle.device)
                out["embedding"] = encode_images(self.bundle, images).cpu().numpy()
                for layer in self.layers:
                    tokens = captured[layer].float().cpu().numpy()
                    # all-token stores keep cls_<layer> too (1/T of the size), so [CLS] readers never load tokens
                    out[f"cls_{layer}"] = tokens[:, 0] if self.all_tokens else tokens
                    if self.all_tokens:
                        out[f"tokens_{layer}"] = tokens
            if self.retrieval is not None:
                retrieval_images = np.asarray(batch["retrieval_pixels"][0])
                images = normalise_pixels(
                    retrieval_images, *self.normalisation["retrieval_pixels"], self.retrieval.device
                )
                out["retrieval"] = encode_retrieval(self.retrieval, images).cpu().numpy()
        return out


# ---------------------------------------------------------------- driver side


@dataclass(frozen=True)
class EncoderPool:
    """The encoder actor pool: Ray Data grows it from `min_size` to `max_size` actors, each reserving `gpus`."""

    min_size: int
    max_size: int
    gpus: float


def encoder_pool(config: ExperimentConfig, gpus_now: float, gpus_max: float | None) -> EncoderPool:
    """Size the encoder pool from the config and the cluster: `gpus_now` GPUs in it now, and `gpus_max` the
    most its autoscaler can add (None: unknown, e.g. Ray's v1 autoscaler does not publish it).

    GPU use follows the config, not what a cold autoscaling cluster shows at start: `model.device: cuda`
    always asks for GPU actors (pending ones make the autoscaler start GPU nodes); `auto` does when the
    cluster has or can have GPUs; `cpu` never. `extraction.num_workers` fixes the size; otherwise the pool
    starts with one actor and grows to `extraction.max_workers` or to as many as the GPUs allow.
    """
    extraction, device = config.extraction, config.model.device
    gpus = extraction.gpus_per_worker
    wants_gpu = device == "cuda" or (device == "auto" and max(gpus_now, gpus_max or 0.0) > 0)
    if device == "cuda" and gpus <= 0:
        raise ValueError("model.device: cuda needs extraction.gpus_per_worker > 0 (each encoder actor's GPU share)")
    if not wants_gpu or gpus <= 0:
        size = extraction.num_workers or 1
        return EncoderPool(size, size, 0.0)
    if extraction.num_workers is not None:
        return EncoderPool(extraction.num_workers, extraction.num_workers, gpus)
    capacity = max(gpus_now, gpus_max or 0.0)
    most = extraction.max_workers or max(1, int(capacity // gpus))
    return EncoderPool(1, most, gpus)


def _cluster_gpus() -> tuple[float, float | None]:
    """(GPUs in the cluster now, the most its autoscaler's node types allow, or None when it does not say)."""
    import ray

    now = ray.cluster_resources().get("GPU", 0.0)
    try:  # published by Ray's v2 autoscaler only; a private API, so any failure means "unknown"
        declared = ray._private.state.state.get_max_resources_from_cluster_config()
    except Exception:
        declared = None
    return now, (float(declared.get("GPU", 0)) if declared else None)


def _run_pipeline(
    config: ExperimentConfig, plans: list[_SplitPlan], models: _Models, log: Callable[[str], None]
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, float], str]:
    """Encode and write the chunks still to do of every plan, in one Ray Data pipeline.

    Returns the worker of every chunk by split, timings (start_up_s: until the first
    chunk is written; steady_images_per_s: the rate after it) and Ray Data's statistics.
    """
    import ray
    from ray.data import ActorPoolStrategy

    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False  # we print rows/s ourselves
    gpus_now, gpus_max = _cluster_gpus()
    pool = encoder_pool(config, gpus_now, gpus_max)
    if pool.gpus == 0 and config.model.device == "auto" and gpus_max is None:
        log(
            "  the cluster has no GPU now and its autoscaler does not say whether it can add some: encoding on "
            "CPU actors (set model.device: cuda to ask an autoscaling cluster for GPU actors)"
        )
    config_json = config.model_dump_json(by_alias=True)
    items = [
        {"split": plan.split, "store_dir": str(plan.store_dir), "chunk": c, "start": start, "stop": stop}
        for plan in plans
        for c, start, stop in plan.todo
    ]
    # failed images count as done rows here
    todo_rows = sum(stop - start for plan in plans for _, start, stop in plan.todo)
    size = f"{pool.min_size}" if pool.min_size == pool.max_size else f"{pool.min_size} to {pool.max_size}"
    log(
        f"extracting {todo_rows} images ({', '.join(p.split for p in plans if p.todo)}) in {len(items)} chunks "
        f"with {size} encoder actor(s) ({pool.gpus or 0} GPU, {config.extraction.cpus_per_worker} CPU each)"
    )
    preprocess = models.preprocess
    dataset = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(
            cast(Any, decode_chunk),  # its keyword arguments come from fn_kwargs, which Ray's annotation leaves out
            batch_size=1,
            fn_kwargs={"config_json": config_json, "transforms": {name: p.pixels for name, p in preprocess.items()}},
            num_cpus=1,
        )
        .map_batches(
            ChunkEncoder,
            batch_size=1,
            # two calls per actor: the second one's forward pass runs while the first one writes
            compute=ActorPoolStrategy(
                min_size=pool.min_size,
                max_size=pool.max_size,
                max_concurrent_calls_per_actor=2,
                enable_true_multi_threading=True,
            ),
            num_gpus=pool.gpus,
            num_cpus=config.extraction.cpus_per_worker,
            fn_constructor_kwargs={
                "config_json": config_json,
                "layers": models.layers,
                "normalisation": {name: (p.mean, p.std) for name, p in preprocess.items()},
            },
        )
    )
    started, done = time.perf_counter(), 0
    workers: dict[str, list[dict[str, Any]]] = {plan.split: [] for plan in plans}
    total = {plan.split: sum(stop - start for _, start, stop in plan.boundaries) for plan in plans}
    done_by_split = {plan.split: total[plan.split] - sum(b - a for _, a, b in plan.todo) for plan in plans}
    next_report, first_chunk, first_rows = 0, 0.0, 0
    for summary in dataset.iter_rows():
        split, rows = summary["split"], int(summary["rows"]) + len(json.loads(summary["failed"]))
        done += rows
        done_by_split[split] += rows
        workers[split].append(json.loads(summary["worker"]))
        if not first_chunk:
            first_chunk, first_rows = time.perf_counter(), done
            log(f"  first chunk written after {first_chunk - started:.1f} s (workers starting)")
        if done >= next_report:
            rate = done / (time.perf_counter() - started)
            eta = (todo_rows - done) / max(rate, 1e-9)
            log(f"  {split}: {done_by_split[split]}/{total[split]} images ({rate:.0f} images/s, ETA {eta:.0f} s)")
            next_report = done + max(1, todo_rows // 20)
    finished = time.perf_counter()
    timings = {
        "start_up_s": first_chunk - started,
        "pipeline_s": finished - started,
        "steady_images_per_s": (done - first_rows) / max(finished - first_chunk, 1e-9),
    }
    return workers, timings, dataset.stats()


def _versions() -> dict[str, str]:
    import open_clip
    import pyarrow
    import torch

    versions = {"vs2ray": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__}
    versions["pyarrow"] = pyarrow.__version__
    try:
        import ray

        versions["ray"] = ray.__version__
    except ImportError:
        pass
    return versions


@dataclass
class _SplitPlan:
    """One split's store, set up on the driver, and the chunks that are still to be written."""

    split: str
    store_dir: Path
    manifest: dict[str, Any]
    boundaries: list[tuple[int, int, int]]  # (chunk, start, stop) of every chunk
    todo: list[tuple[int, int, int]]


@dataclass
class _Models:
    """What the driver needs from the models to plan a store (loaded once for every split)."""

    bundle: Any
    layers: list[int]
    preprocess: dict[str, SplitPreprocess]


def _load_models(config: ExperimentConfig) -> _Models:
    bundle = load_clip(config.model, device="cpu")
    layers = resolve_layers(bundle, config.extraction.layers)
    preprocess = {"pixels": _split_preprocess(bundle.preprocess)}
    if config.retrieval.space == "dinov2":  # load it here so that a bad name or missing weights fail now
        preprocess["retrieval_pixels"] = _split_preprocess(load_retrieval_encoder(config.retrieval).preprocess)
    return _Models(bundle, layers, preprocess)


def _plan_split(
    config: ExperimentConfig,
    dataset: ImageDataset,
    split: str,
    models: _Models,
    store_dir: Path,
    log: Callable[[str], None],
) -> ExtractionResult | _SplitPlan:
    """The complete store of `split` (reused), or a started store with its head, classifier and chunks to write."""
    records = dataset.records(split)
    inputs = store_inputs(config, split, models.layers, models.preprocess)
    previous = read_manifest(store_dir) or {}
    complete = previous.get("complete") is True
    damaged = damaged_parts(store_dir, previous.get("parts") if complete else None) if store_dir.is_dir() else {}
    if complete and not damaged:
        log(f"{split}: reusing complete store {store_dir} ({previous['rows']} rows)")
        return ExtractionResult(split, store_dir, previous["rows"], previous["failed"], reused=True)
    if damaged:  # a part that exists must be whole: the damaged ones go, and their chunks are extracted again
        listed = "; ".join(f"{name}: {why}" for name, why in damaged.items())
        log(f"{split}: {store_dir}: re-extracting the chunks of {len(damaged)} damaged part file(s): {listed}")
        for name in damaged:
            (store_dir / name).unlink(missing_ok=True)
    chunk_rows = previous.get("chunk_rows", config.extraction.batch_size)  # a resumed store keeps its chunking
    manifest: dict[str, Any] = {
        "key": store_dir.name,
        "inputs": inputs,
        "classes": dataset.classes,
        "attributes": list(dataset.attribute_names),
        "prompt_templates": prompt_templates_for(config.dataset, dataset),
        "chunk_rows": chunk_rows,
        "complete": False,
    }
    store_dir.mkdir(parents=True, exist_ok=True)
    for stale in store_dir.glob(".*.tmp"):  # left by a killed writer; never read
        stale.unlink(missing_ok=True)
    write_json(store_dir / "manifest.json", manifest)
    if not (store_dir / "head.safetensors").is_file():
        write_tensors(store_dir / "head.safetensors", vision_head(models.bundle))
    if not (store_dir / "classifier.safetensors").is_file():
        classifier = build_text_classifier(models.bundle, dataset.classes, manifest["prompt_templates"])
        write_tensors(store_dir / "classifier.safetensors", {"classifier": classifier})

    starts = range(0, len(records), chunk_rows)
    boundaries = [(c, start, min(start + chunk_rows, len(records))) for c, start in enumerate(starts)]
    done = finished_chunks(store_dir)
    if done:
        log(f"{split}: resuming {store_dir}: {len(done)} of {len(boundaries)} chunks already written")
    return _SplitPlan(split, store_dir, manifest, boundaries, [b for b in boundaries if b[0] not in done])


def _finish_split(config: ExperimentConfig, plan: _SplitPlan, num_layers: int, workers: list[dict]) -> tuple[int, list]:
    """Check that every chunk of `plan` is written, then mark its manifest complete; return (rows, failed)."""
    store_dir, manifest = plan.store_dir, plan.manifest
    done = finished_chunks(store_dir)
    missing = sorted({c for c, _, _ in plan.boundaries} - set(done))
    if missing:
        raise RuntimeError(f"{store_dir}: chunks {missing[:10]} were not written; run the extraction again")
    parts = {path.name: part_record(path) for path in sorted(store_dir.glob("part-*.parquet"))}
    rows = sum(part["rows"] for part in parts.values())
    failed = [entry for chunk in sorted(done) for entry in done[chunk]]
    ensure_arrays(store_dir)  # before `complete`: a complete store always has its arrays (one builder at a time)
    manifest.update(
        {
            "rows": rows,
            "parts": parts,  # what each part held when the store was complete (store.damaged_parts)
            "dtype": config.extraction.dtype,
            "num_failed": len(failed),
            "failed": failed,
            "columns": column_shapes(store_dir),
            "model": {"arch": config.model.arch, "num_layers": num_layers},
            "versions": _versions(),
            "environment": environment(),  # the driver's; each worker's device is in "workers"
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "workers": [json.loads(w) for w in sorted({json.dumps(w, sort_keys=True) for w in workers})],
        }
    )
    manifest.pop("complete")
    manifest["complete"] = True  # inserted last, so that it is the last key written
    write_json(store_dir / "manifest.json", manifest)
    return rows, failed


def extract_splits(
    config: ExperimentConfig, splits: Sequence[str], log: Callable[[str], None] = lambda _: None
) -> dict[str, ExtractionResult]:
    """Make sure the activation stores of (`config`, each split) exist and are complete; return where they are.

    The splits that need work share one pipeline, so the encoder actors start (and load
    their weights) once. Everything that can be wrong with the input (unknown split,
    missing data, unknown model or tag, a layer out of range) raises before any Ray
    work starts.
    """
    started = time.perf_counter()
    dataset = get_dataset(config.dataset)
    for split in splits:
        dataset.check_split(split)
    models = _load_models(config)
    store_dirs = {
        split: store_dir_for(config, split, store_inputs(config, split, models.layers, models.preprocess))
        for split in dict.fromkeys(splits)
    }
    with contextlib.ExitStack() as locks:
        for store_dir in sorted(set(store_dirs.values())):  # in one order: two drivers never hold one lock each
            locks.enter_context(extraction_lock(store_dir, log))
        return _extract_locked(config, dataset, models, store_dirs, started, log)


def _extract_locked(
    config: ExperimentConfig,
    dataset: ImageDataset,
    models: _Models,
    store_dirs: dict[str, Path],
    started: float,
    log: Callable[[str], None],
) -> dict[str, ExtractionResult]:
    """`extract_splits` once this driver holds every store's extraction lock."""
    planned = {
        split: _plan_split(config, dataset, split, models, store_dir, log) for split, store_dir in store_dirs.items()
    }
    plans = [plan for plan in planned.values() if isinstance(plan, _SplitPlan)]
    timings, stats = {"set_up_s": time.perf_counter() - started}, ""
    workers: dict[str, list[dict[str, Any]]] = {}
    if any(plan.todo for plan in plans):
        workers, pipeline_timings, stats = _run_pipeline(config, plans, models, log)
        timings.update(pipeline_timings)
    results = {}
    for split, plan in planned.items():
        if isinstance(plan, ExtractionResult):
            results[split] = plan
            continue
        mine = workers.get(split, [])
        rows, failed = _finish_split(config, plan, num_vision_layers(models.bundle), mine)
        seconds = time.perf_counter() - started
        results[split] = ExtractionResult(split, plan.store_dir, rows, failed, False, seconds, mine, timings, stats)
    return results


def extract(config: ExperimentConfig, split: str, log: Callable[[str], None] = lambda _: None) -> ExtractionResult:
    """Make sure the activation store of (`config`, `split`) exists and is complete; return where it is."""
    return extract_splits(config, [split], log)[split]
