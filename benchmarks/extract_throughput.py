"""Extraction throughput: the Ray Data pipeline against a plain single-process torch loop.

    python benchmarks/extract_throughput.py                       # vs2ray-tiny on shapes, CPU
    python benchmarks/extract_throughput.py --arch ViT-B-32 --images 512 --encoder-only

Both sides encode the same images with the same model and batch size; the figures are
taken in the same run. The plain loop also reports how its time splits between
decode/preprocess and the encoder, which says what bounds extraction on this machine.
`--encoder-only` skips Ray and times the encoder alone on the best device (use it on a
GPU machine with `--arch ViT-B-32`; `pretrained: random` weights, so no download).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from vs2ray.config import load_config
from vs2ray.data import get_dataset
from vs2ray.models import capture_blocks, encode_images, load_clip, resolve_layers


def plain_loop(config, split: str, images: int, device: str) -> dict[str, float]:
    """Decode + preprocess + encode in one process, timing the two halves separately."""
    bundle = load_clip(config.model, device=device)
    layers = resolve_layers(bundle, config.extraction.layers)
    dataset = get_dataset(config.dataset)
    records = dataset.records(split)[:images]
    decode_s = encode_s = 0.0
    batch = config.extraction.batch_size
    for start in range(0, len(records), batch):
        began = time.perf_counter()
        pixels = torch.stack(
            [bundle.preprocess(dataset.load_image(split, r.ref)) for r in records[start : start + batch]]
        )
        decoded = time.perf_counter()
        with torch.no_grad(), capture_blocks(bundle, layers) as captured:
            embedding = encode_images(bundle, pixels)
            _ = [captured[layer].cpu() for layer in layers], embedding.cpu()
        if device == "cuda":
            torch.cuda.synchronize()
        decode_s += decoded - began
        encode_s += time.perf_counter() - decoded
    total = decode_s + encode_s
    return {"images_per_s": len(records) / total, "decode_s": decode_s, "encode_s": encode_s}


def encoder_only(config, images: int, device: str, repeats: int = 3) -> float:
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


def ray_pipeline(config, split: str) -> dict[str, float]:
    """Wall time of `extract` into a fresh store (Ray already started, so start-up is excluded)."""
    from vs2ray.extract import extract

    began = time.perf_counter()
    result = extract(config, split)
    seconds = time.perf_counter() - began
    return {"images_per_s": result.rows / seconds, "seconds": seconds, "rows": result.rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vs2ray-tiny")
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--encoder-only", action="store_true", help="time the encoder alone (no Ray, no decode)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = [f"extraction.batch_size={args.batch_size}", f"dataset.sizes.test={args.images}"]
    if args.arch != "vs2ray-tiny":
        overrides += [f"model.arch={args.arch}", "model.pretrained=random"]
    print(
        f"device: {device} ({torch.cuda.get_device_name() if device == 'cuda' else os.cpu_count()} "
        f"{'' if device == 'cuda' else 'CPU cores'}), torch threads {torch.get_num_threads()}"
    )
    if args.encoder_only:
        config = load_config(None, overrides)
        rate = encoder_only(config, args.images, device)
        print(f"{args.arch} encoder forward, batch {args.batch_size}: {rate:.0f} images/s")
        return

    import ray

    with tempfile.TemporaryDirectory() as root:
        config = load_config(None, [*overrides, f"storage.root={root}"])
        plain = plain_loop(config, "test", args.images, device)
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
        piped = ray_pipeline(config, "test")
        ray.shutdown()
    share = plain["decode_s"] / (plain["decode_s"] + plain["encode_s"])
    print(f"{args.arch}, {args.images} shapes images, batch {args.batch_size}")
    print(
        f"  plain torch loop : {plain['images_per_s']:8.1f} images/s "
        f"(decode+preprocess {plain['decode_s']:.1f}s = {100 * share:.0f}%, encoder {plain['encode_s']:.1f}s)"
    )
    print(f"  Ray Data pipeline: {piped['images_per_s']:8.1f} images/s ({piped['seconds']:.1f}s incl. driver set-up)")
    print(f"  ratio pipeline / plain: {piped['images_per_s'] / plain['images_per_s']:.2f}")


if __name__ == "__main__":
    main()
