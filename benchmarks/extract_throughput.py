"""Extraction throughput: the Ray Data pipeline against a plain single-process torch loop.

    python benchmarks/extract_throughput.py                   # quickstart train split, 20,000 images
    python benchmarks/extract_throughput.py --images 4000 --set extraction.batch_size=128
    python benchmarks/extract_throughput.py --workers 2       # two encoder actors
    python benchmarks/extract_throughput.py --fake-gpu-nodes 2  # a head + two 1-GPU nodes (ray.cluster_utils)
    python benchmarks/extract_throughput.py --arch ViT-B-32 --images 512 --encoder-only

Both sides encode the same images of the config's split (default: the quickstart's train
split) with the same models (CLIP with the config's block hooks, and the retrieval encoder
when `retrieval.space: dinov2`) and batch size; the figures are taken in the same run,
each into a fresh store. The plain loop is what a researcher would write: decode,
preprocess, encode, one batch after the other in one process; it says how its time splits
between decode/preprocess and the encoders. The pipeline's wall time includes everything
`extract` does (driver set-up, actor and worker start-up, Parquet writes) but not
`ray.init`; the breakdown gives its start-up, its rate after the first chunk, and Ray
Data's per-operator wall and CPU times.

`--fake-gpu-nodes N` runs the pipeline on a local multi-node cluster (a 1-CPU head and N
nodes with 2 CPUs and 1 fake GPU each; torch stays on the CPU) and shows on how many
nodes each operator ran: decode tasks go to every node with a free CPU, one encoder
actor to each GPU. On one 2-core machine this shows placement, not speed.

`--encoder-only` skips Ray and times the CLIP encoder alone on the best device (use it on
a GPU machine with `--arch ViT-B-32`; `pretrained: random` weights, so no download).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time

import torch

from vs2ray.config import ExperimentConfig, load_config
from vs2ray.data import get_dataset
from vs2ray.models import (
    capture_blocks,
    encode_images,
    encode_retrieval,
    load_clip,
    load_retrieval_encoder,
    resolve_layers,
)


def plain_loop(config: ExperimentConfig, split: str, device: str) -> dict[str, float]:
    """Decode + preprocess + encode in one process, timing the two halves separately."""
    bundle = load_clip(config.model, device=device)
    layers = resolve_layers(bundle, config.extraction.layers)
    retrieval = load_retrieval_encoder(config.retrieval, device) if config.retrieval.space == "dinov2" else None
    dataset = get_dataset(config.dataset)
    records = dataset.records(split)
    decode_s = encode_s = 0.0
    batch = config.extraction.batch_size
    all_tokens = config.extraction.tokens == "all"
    for start in range(0, len(records), batch):
        began = time.perf_counter()
        images = [dataset.load_image(split, r.ref) for r in records[start : start + batch]]
        pixels = torch.stack([bundle.preprocess(image) for image in images])
        retrieval_pixels = torch.stack([retrieval.preprocess(image) for image in images]) if retrieval else None
        decoded = time.perf_counter()
        with torch.no_grad(), capture_blocks(bundle, layers, all_tokens) as captured:
            embedding = encode_images(bundle, pixels.to(device))
            _ = [captured[layer].cpu() for layer in layers], embedding.cpu()
            if retrieval:
                encode_retrieval(retrieval, retrieval_pixels.to(device)).cpu()
        if device == "cuda":
            torch.cuda.synchronize()
        decode_s += decoded - began
        encode_s += time.perf_counter() - decoded
    total = decode_s + encode_s
    return {"images_per_s": len(records) / total, "decode_s": decode_s, "encode_s": encode_s, "rows": len(records)}


def encoder_only(config: ExperimentConfig, images: int, device: str, repeats: int = 3) -> float:
    """Images/s of the encoder forward alone on synthetic input of the model's size."""
    bundle = load_clip(config.model, device=device)
    size = bundle.model.visual.image_size
    pixels = torch.randn(config.extraction.batch_size, 3, *size, device=device)
    layers = resolve_layers(bundle, config.extraction.layers)
    with torch.no_grad(), capture_blocks(bundle, layers):
        encode_images(bundle, pixels)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            for _ in range(max(1, images // len(pixels))):
                encode_images(bundle, pixels)
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - began)
    return max(1, images // len(pixels)) * len(pixels) / best


_OPERATOR = re.compile(r"Operator \d+ ([^:]+): (\d+) tasks executed.*? in ([\d.]+)s")
_REMOTE = re.compile(r"Remote (wall|cpu) time: .*?([\d.]+)(ms|s|us) total")
_NODES = re.compile(r"(\d+) nodes used")


def operator_breakdown(stats: str) -> list[tuple[str, int, float, float, float, int]]:
    """(operator, tasks, span s, remote wall s, remote cpu s, nodes) from the text of Ray Data's `Dataset.stats()`."""
    rows = []
    for section in re.split(r"\n(?=Operator \d+ )", stats):
        header = _OPERATOR.search(section)
        if not header:
            continue
        totals = {}
        for kind, value, unit in _REMOTE.findall(section):
            totals[kind] = float(value) * {"s": 1.0, "ms": 1e-3, "us": 1e-6}[unit]
        wall, cpu = totals.get("wall", float("nan")), totals.get("cpu", float("nan"))
        nodes = _NODES.search(section)
        rows.append((header[1], int(header[2]), float(header[3]), wall, cpu, int(nodes[1]) if nodes else 0))
    return rows


def start_fake_gpu_cluster(gpu_nodes: int):
    """A local Ray cluster: a 1-CPU head and `gpu_nodes` nodes with 2 CPUs and one (fake) GPU each."""
    import os

    from ray.cluster_utils import Cluster

    os.environ["VS2RAY_FAKE_GPUS"] = "1"  # the nodes' GPUs are fake: vs2ray runs their actors on the CPU
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(gpu_nodes):
        cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    return cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sweeps/quickstart.yaml")
    parser.add_argument("--split", default="train")
    parser.add_argument("--images", type=int, default=None, help="limit the split to this many images")
    parser.add_argument("--workers", type=int, default=None, help="encoder actors (extraction.num_workers)")
    parser.add_argument("--fake-gpu-nodes", type=int, default=0, help="run on a local cluster with N 1-GPU nodes")
    parser.add_argument("--arch", default=None, help="another open_clip architecture, random weights")
    parser.add_argument("--encoder-only", action="store_true", help="time the encoder alone (no Ray, no decode)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = list(args.set)
    if args.images:
        overrides.append(f"dataset.sizes.{args.split}={args.images}")
    if args.workers:
        overrides.append(f"extraction.num_workers={args.workers}")
    if args.arch:
        overrides += [f"model.arch={args.arch}", "model.pretrained=random"]
    where = torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"device: {device} ({where}), torch threads {torch.get_num_threads()}")
    if args.encoder_only:
        config = load_config(args.config, overrides)
        rate = encoder_only(config, args.images or 2048, device)
        print(f"{config.model.arch} encoder forward, batch {config.extraction.batch_size}: {rate:.0f} images/s")
        return

    import ray

    from vs2ray.extract import extract

    with tempfile.TemporaryDirectory() as root:
        config = load_config(args.config, [*overrides, f"storage.root={root}"])
        plain = plain_loop(config, args.split, device)
        cluster = start_fake_gpu_cluster(args.fake_gpu_nodes) if args.fake_gpu_nodes else None
        address = cluster.address if cluster else None
        ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=False)
        began = time.perf_counter()
        result = extract(config, args.split)
        piped_s = time.perf_counter() - began
        ray.shutdown()
        if cluster:
            cluster.shutdown()
    piped_rate = result.rows / piped_s
    timings = result.timings
    share = plain["decode_s"] / (plain["decode_s"] + plain["encode_s"])
    encoders = "CLIP" + (" + retrieval encoder" if config.retrieval.space == "dinov2" else "")
    actors = len({json.dumps(w, sort_keys=True) for w in result.workers})
    nodes = f" on a head + {args.fake_gpu_nodes} fake-GPU nodes" if args.fake_gpu_nodes else ""
    print(
        f"{config.model.arch} ({encoders}), {plain['rows']} {config.dataset.name} {args.split} images, "
        f"batch {config.extraction.batch_size}, {actors} encoder actor(s){nodes}"
    )
    print(
        f"  plain torch loop : {plain['images_per_s']:7.1f} images/s "
        f"(decode+preprocess {plain['decode_s']:.1f} s = {100 * share:.0f}%, encoders {plain['encode_s']:.1f} s)"
    )
    print(
        f"  Ray Data pipeline: {piped_rate:7.1f} images/s ({piped_s:.1f} s: driver set-up {timings['set_up_s']:.1f} s, "
        f"first chunk after {timings['start_up_s']:.1f} s, then {timings['steady_images_per_s']:.0f} images/s)"
    )
    print(f"  ratio pipeline / plain: {piped_rate / plain['images_per_s']:.2f}")
    print("  per operator (Ray Data stats): tasks, span s, remote wall s, remote cpu s, nodes used")
    for name, tasks, span, wall, cpu, used in operator_breakdown(result.pipeline_stats):
        print(f"    {name:32s} {tasks:5d} {span:8.1f} {wall:8.1f} {cpu:8.1f} {used:5d}")


if __name__ == "__main__":
    main()
