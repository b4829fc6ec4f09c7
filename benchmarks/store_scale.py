"""Stores larger than memory: what SAE training and an evaluation hold, as the store grows.

    python benchmarks/store_scale.py [--sizes 0.5,2,8] [--root DIR] [--steps 200] [--skip-cli]

1. Synthetic every-token stores (shaped like the bundled model's block 1: 17 tokens × 128, with
   [CLS] and embedding columns), written through vs2ray's own store writer, of `--sizes` GB of
   token column each. For each: peak RSS and samples/s of training an all-token SAE (one trial,
   in a process of its own), peak RSS of an evaluation with that SAE (steering at block 1 on every
   token: the pool's tokens calibrate the gate), and two such training trials at once on the same
   store: the sum of their peak PSS (physical memory, shared pages counted once) against one's,
   also above the PSS of a process that has imported what a trial imports (torch, Ray-free stages; no
   model: a training trial loads none) and read nothing.
2. On the quickstart's [CLS] store (extracted when missing): SAE training samples/s reading the
   memory-mapped store against the same rows held in memory.
3. `python -m vs2ray train-sae` on every-token stores of the bundled world (block 1) of 4,000 and
   32,000 training images (the measurement of issue 26): peak RSS, and its rise per byte of column.

The trial itself is `python benchmarks/store_scale.py trial ...`, which tests/test_store.py also runs
under a memory limit (RLIMIT_DATA: private memory; mapped store pages do not count against it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vs2ray.config import ExperimentConfig, ModelConfig, load_config
from vs2ray.data import get_dataset
from vs2ray.models import build_text_classifier, load_clip, vision_head
from vs2ray.stages import (
    SweepData,
    build_evaluator,
    get_or_train_sae,
    load_train_split,
    sae_params,
    steering_grid,
)
from vs2ray.store import (
    build_arrays,
    column_shapes,
    load_activations,
    write_json,
    write_part,
    write_tensors,
)

TOKENS, WIDTH, BLOCKS = 17, 128, 4  # the bundled model's sequence, width and depth
EMBED = 64
IMAGES_PER_PART = 4096
TRIAL = [
    "extraction.tokens=all",
    "extraction.layers=[1]",
    "sae.layer=1",
    "sae.tokens=all",
    "sae.k=16",
    "sae.expansion=2",
    "sae.batch_size=4096",
    "pass.w_aux=0",
    "steering.methods=[zero_shot, vs2, vs2_gated]",
    "steering.gamma=1.5",
    "steering.lambda=2.1",
    "steering.gate_quantiles=[0.95]",
    "sae.report_every=null",
]


def token_bytes(images: int) -> int:
    return images * TOKENS * WIDTH * 4


def write_synthetic_store(
    directory: Path, images: int, seed: int, dtype: str = "float32", images_per_part: int = IMAGES_PER_PART
) -> Path:
    """A complete every-token store of `images` rows in the bundled world's classes, written part by part
    through `store.write_part` (a class-dependent mean plus noise: structure for the SAE, not for steering)."""
    if (directory / "manifest.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    dataset = get_dataset(load_config(None).dataset)
    bundle = load_clip(ModelConfig(), device="cpu")
    rng = np.random.default_rng(seed)
    class_means = rng.normal(size=(len(dataset.classes), TOKENS, WIDTH)).astype(np.float32)
    order = rng.permutation(images)  # ids spread over the parts, as a resumed extraction writes them
    for chunk, start in enumerate(range(0, images, images_per_part)):
        ids = np.sort(order[start : start + images_per_part])
        labels = ids % len(dataset.classes)
        tokens = class_means[labels] + rng.standard_normal((len(ids), TOKENS, WIDTH), dtype=np.float32)
        embedding = rng.standard_normal((len(ids), EMBED), dtype=np.float32)
        columns = {"id": ids, "label": labels, "attribute": -np.ones_like(ids), "group": -np.ones_like(ids)}
        columns.update({"cls_1": tokens[:, 0], "tokens_1": tokens, "embedding": embedding})
        write_part(directory, chunk, columns, [], dtype)
    build_arrays(directory)
    write_tensors(directory / "head.safetensors", vision_head(bundle))
    templates = ["a photo of a {}."]
    classifier = build_text_classifier(bundle, dataset.classes, templates)
    write_tensors(directory / "classifier.safetensors", {"classifier": classifier})
    manifest = {
        "key": directory.name,
        "inputs": {"synthetic": True, "images": images, "seed": seed, "dtype": dtype},
        "classes": dataset.classes,
        "attributes": [],
        "prompt_templates": templates,
        "rows": images,
        "num_failed": 0,
        "failed": [],
        "columns": column_shapes(directory),
        "model": {"arch": "vs2ray-tiny", "num_layers": BLOCKS},
        "dtype": dtype,
        "complete": True,
    }
    write_json(directory / "manifest.json", manifest)
    return directory


# ---------------------------------------------------------------- one trial, in a process of its own


def _vm_data_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmData:")[1].split()[0]) * 1024


def run_trial(train_dir: Path, test_dir: Path, root: Path, seed: int, steps: int, evaluate: bool) -> dict[str, Any]:
    """Train (or reuse) an all-token SAE on `train_dir` and, with `evaluate`, evaluate it on `test_dir`:
    a trial's stages without Ray, on the CPU. Returns its metrics."""
    config = load_config(None, [*TRIAL, f"storage.root={root}", f"seed={seed}", f"sae.steps={steps}"])
    split = load_train_split(config, store=train_dir)
    started = time.perf_counter()
    trained = get_or_train_sae(config, sae_params(config), split, lambda _: None, device="cpu")
    result: dict[str, Any] = {"train_seconds": time.perf_counter() - started, "cache_hit": trained.cache_hit}
    result.update({k: trained.metrics[k] for k in ("fvu", "val_fvu", "l0", "samples_per_second")})
    if evaluate:
        result.update(evaluate_trial(config, split, test_dir, trained.sae))
    return result


def evaluate_trial(config: ExperimentConfig, split: Any, test_dir: Path, sae: Any) -> dict[str, Any]:
    from safetensors.numpy import load_file

    test = load_activations(test_dir, layers=[1])
    head = load_file(test_dir / "head.safetensors")
    classifier = load_file(test_dir / "classifier.safetensors")["classifier"]
    started = time.perf_counter()
    evaluator = build_evaluator(config, SweepData(split, test, head, classifier), sae, "cpu")
    results = evaluator.evaluate_all(config.steering.methods, steering_grid(config))
    scores = {f"test_top1_{m}": r.test_top1[r.selected] for m, r in results.items()}
    return {**scores, "evaluate_seconds": time.perf_counter() - started}


def trial_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="store_scale.py trial")
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--root", type=Path, required=True, help="storage.root: where the SAE cache goes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--evaluate", action="store_true")
    parser.add_argument("--idle", action="store_true", help="import what a trial imports, read nothing: the baseline")
    parser.add_argument(
        "--limit-private-mb", type=int, default=None, help="RLIMIT_DATA: this much private memory above what is used"
    )
    args = parser.parse_args(argv)
    limit = None
    if args.limit_private_mb is not None:
        load_clip(ModelConfig(), device="cpu")  # the model and its libraries loaded before the limit is set
        limit = _vm_data_bytes() + args.limit_private_mb * 2**20
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    if args.idle:
        time.sleep(1.0)  # long enough for the sampler to see it
        result: dict[str, Any] = {}
    else:
        result = run_trial(args.train, args.test, args.root, args.seed, args.steps, args.evaluate)
    result["peak_rss_mb"] = _hwm_kb("self") / 1024
    if limit is not None:  # is the limit binding? the whole token column read into memory must not fit
        try:
            whole = np.array(load_activations(args.train, layers=[1])["tokens_1"])
            result["whole_column_fits"] = bool(whole.size)
        except MemoryError:
            result["whole_column_fits"] = False
    print(json.dumps(result))


# ---------------------------------------------------------------- measuring processes


def _hwm_kb(pid: int | str) -> int:
    """VmHWM, the peak RSS of a process's own address space. (getrusage's ru_maxrss is not that in a child:
    Linux carries the parent's resident size at fork across exec into it, so a child of a large parent
    reports at least the parent's size.)"""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    if "VmHWM:" not in text:  # a process that has exited (a zombie) has no address space left
        return 0
    return int(text.split("VmHWM:")[1].split()[0])


def _pss_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    return int(text.split("Pss:")[1].split()[0])


def run_processes(commands: list[list[str]]) -> tuple[list[dict[str, Any]], float]:
    """Run commands at once; (their JSON outputs with peak RSS, the peak of their summed PSS in MB)."""
    processes = [subprocess.Popen(c, stdout=subprocess.PIPE, text=True) for c in commands]
    peak = [0.0]

    def sample() -> None:
        while any(p.poll() is None for p in processes):
            peak[0] = max(peak[0], sum(_pss_kb(p.pid) for p in processes) / 1024)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    outputs = []
    for process in processes:
        out, _ = process.communicate()
        if process.returncode:
            raise SystemExit(f"a trial failed ({process.returncode}): {' '.join(process.args)}")
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    sampler.join()
    return outputs, peak[0]


def trial_command(
    train: Path, test: Path, root: Path, seed: int, steps: int, evaluate: bool, idle: bool = False
) -> list[str]:
    command = [sys.executable, __file__, "trial", "--train", str(train), "--test", str(test), "--root", str(root)]
    command += ["--seed", str(seed), "--steps", str(steps)]
    return [*command, *(["--evaluate"] if evaluate else []), *(["--idle"] if idle else [])]


def synthetic_table(root: Path, sizes_gb: list[float], steps: int) -> list[str]:
    test = write_synthetic_store(root / "stores" / "test", 2000, seed=1)
    (_,), idle_pss = run_processes([trial_command(test, test, root, 0, 0, False, idle=True)])
    # two idle processes share their libraries' pages, so a pair's baseline is less than twice one's
    _, idle_pair_pss = run_processes([trial_command(test, test, root, 0, 0, False, idle=True) for _ in range(2)])
    lines = [
        f"A process that has imported what a trial imports, and read nothing: {idle_pss:,.0f} MB PSS; two such "
        f"processes at once: {idle_pair_pss:,.0f} MB.",
        "",
        "| token column | train: peak RSS | train: samples/s | evaluate: peak RSS | 1 trial: peak PSS "
        "| 2 at once: peak PSS (sum) | ratio | above the idle baseline: 2 at once / 1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in sizes_gb:
        images = int(size * 2**30 / token_bytes(1))
        store = write_synthetic_store(root / "stores" / f"train-{size}gb", images, seed=0)
        saes = root / f"saes-{size}gb"
        shutil.rmtree(saes, ignore_errors=True)  # every SAE trains here: none from an earlier run
        (one,), one_pss = run_processes([trial_command(store, test, saes, 0, steps, False)])
        (evaluated,), _ = run_processes([trial_command(store, test, saes, 0, steps, True)])  # SAE from the cache
        pair, pair_pss = run_processes([trial_command(store, test, saes, s, steps, False) for s in (1, 2)])
        assert evaluated["cache_hit"] and not any(t["cache_hit"] for t in pair)
        lines.append(
            f"| {token_bytes(images) / 2**30:.2f} GB ({images:,} images) | {one['peak_rss_mb']:,.0f} MB "
            f"| {one['samples_per_second']:,.0f} | {evaluated['peak_rss_mb']:,.0f} MB | {one_pss:,.0f} MB "
            f"| {pair_pss:,.0f} MB | {pair_pss / one_pss:.2f} "
            f"| {(pair_pss - idle_pair_pss) / (one_pss - idle_pss):.2f} |"
        )
        print(lines[-1], flush=True)
    return lines


def quickstart_streaming(steps: int) -> str:
    """samples/s of SAE training on the quickstart's [CLS] rows: mapped from the store, and in memory."""
    from vs2ray.sae import ActivationRows, train_sae

    config = load_config("sweeps/quickstart.yaml", ["sae.k=32", "sae.expansion=4", "pass.w_aux=0"])
    split = load_train_split(config, print)
    mapped = split.rows(split.column(config.sae.layer), split.train_mask)
    in_memory = ActivationRows(np.array(mapped.array), mapped.rows, mapped.group)
    params = dataclasses.replace(sae_params(config), steps=steps)
    rates = {}
    for name, rows in (("in memory", in_memory), ("mapped", mapped), ("in memory again", in_memory)):
        rates[name] = train_sae(rows, params, device="cpu", log=lambda _: None).metrics["samples_per_second"]
    memory = (rates["in memory"] + rates["in memory again"]) / 2
    return (
        f"quickstart [CLS] store ({len(mapped):,} rows × {mapped.width}): in memory {memory:,.0f} samples/s, "
        f"mapped {rates['mapped']:,.0f} samples/s, ratio {rates['mapped'] / memory:.2f}"
    )


def cli_train_sae(root: Path) -> list[str]:
    """Peak RSS of `python -m vs2ray train-sae` (all tokens, block 1) on 4,000 and 32,000 training images."""
    lines, measured = [], []
    for images in (4000, 32000):
        assignments = [
            f"storage.root={root / 'cli'}",
            f"dataset.sizes={{train: {images}, test: 500}}",
            "extraction.tokens=all",
            "extraction.layers=[1]",
            "sae.layer=1",
            "sae.tokens=all",
            "sae.steps=200",
        ]
        sets = [arg for a in assignments for arg in ("--set", a)]
        env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
        extract = [sys.executable, "-m", "vs2ray", "extract", "--split", "train", *sets]
        subprocess.run(extract, check=True, env=env, stdout=subprocess.DEVNULL)
        process = subprocess.Popen([sys.executable, "-m", "vs2ray", "train-sae", *sets], env=env)
        peak_kb = 0
        while process.poll() is None:  # VmHWM only rises: the last reading before the exit is the peak
            peak_kb = max(peak_kb, _hwm_kb(process.pid))
            time.sleep(0.02)
        if process.returncode:
            raise SystemExit(f"train-sae failed on {images} images")
        column = token_bytes(int(images * 0.9))
        measured.append((column, peak_kb * 1024))
        peak = f"peak RSS {peak_kb / 1024:,.0f} MB"
        lines.append(f"train-sae, {images:,} images: column {column / 2**20:,.0f} MB, {peak}")
    (small_column, small_rss), (large_column, large_rss) = measured
    lines.append(f"rise: {(large_rss - small_rss) / (large_column - small_column):.3f} bytes of RSS per byte of column")
    return lines


def main() -> None:
    if sys.argv[1:2] == ["trial"]:
        trial_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.5,2,8", help="GB of token column per synthetic store")
    parser.add_argument("--root", type=Path, default=Path("/tmp/vs2ray-store-scale"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--skip-cli", action="store_true", help="skip part 3 (it extracts 36,500 images)")
    parser.add_argument("--skip-synthetic", action="store_true", help="skip part 1 (it writes 10.5 GB of stores)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}; stores under {args.root}")
    lines = (
        [] if args.skip_synthetic else synthetic_table(args.root, [float(s) for s in args.sizes.split(",")], args.steps)
    )
    lines.append("")
    lines.append(quickstart_streaming(1000))
    if not args.skip_cli:
        lines += cli_train_sae(args.root)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
