"""Steering overhead: VS2 + classification per image against the encoder forward, and FAISS in actors.

    python benchmarks/steering_overhead.py

1. ViT-B-32 sizes (random weights, no download): d = 768, an SAE of 4 × 768 latents with
   k = 64, 100 classes. Time of `vs2` + the classification step per image, against the
   vision tower's forward per image (the paper: VS2 adds < 0.1% of the encoder's FLOPs).
2. FAISS: queries/s of a flat index over 50,000 × 512 vectors searched in-process and
   through a `RetrievalIndex` actor (same index, same queries); the ratio is the actor's cost.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from vs2ray.config import ModelConfig
from vs2ray.models import encode_images, load_clip
from vs2ray.retrieval import IndexShard, RetrievalIndex
from vs2ray.sae import SparseAutoencoder
from vs2ray.steering import classify, vs2


def best_of(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    batch = 64
    bundle = load_clip(ModelConfig(arch="ViT-B-32", pretrained="random"), device="cpu")
    images = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():
        encoder_s = best_of(lambda: encode_images(bundle, images)) / batch
    d, embed = 768, 512
    sae = SparseAutoencoder(d, 4 * d, 64).eval()
    head = {"ln_post.weight": torch.ones(d), "ln_post.bias": torch.zeros(d), "proj": torch.randn(d, embed)}
    classifier = torch.nn.functional.normalize(torch.randn(100, embed), dim=1)
    tokens = torch.randn(4096, d)
    with torch.no_grad():
        zero_shot_s = best_of(lambda: classify(tokens, head, classifier)) / len(tokens)
        steer_s = best_of(lambda: classify(vs2(sae, tokens, 1.5, 2.1), head, classifier)) / len(tokens)
    print(f"torch threads {torch.get_num_threads()}, CPU")
    print(f"ViT-B-32 encoder forward : {1e3 * encoder_s:8.3f} ms/image")
    print(f"classification step alone: {1e3 * zero_shot_s:8.4f} ms/image")
    print(
        f"VS2 + classification     : {1e3 * steer_s:8.4f} ms/image "
        f"({100 * steer_s / encoder_s:.2f}% of the encoder; VS2 alone {100 * (steer_s - zero_shot_s) / encoder_s:.2f}%)"
    )

    import ray

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50_000, embed)).astype(np.float32)
    queries = rng.normal(size=(2_000, embed)).astype(np.float32)
    local = IndexShard(vectors, np.arange(len(vectors)))
    local_s = best_of(lambda: local.search(queries, 50))
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    remote = RetrievalIndex("bench-overhead", vectors, np.arange(len(vectors)))
    remote_s = best_of(lambda: remote.search(queries, 50))
    ray.shutdown()
    print(
        f"FAISS flat 50000×{embed}, 2000 queries, k=50: in-process {len(queries) / local_s:8.0f} queries/s, "
        f"actor {len(queries) / remote_s:8.0f} queries/s, overhead ratio {remote_s / local_s:.2f}"
    )


if __name__ == "__main__":
    main()
