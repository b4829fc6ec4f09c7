"""Train `vs2ray-tiny-retrieval`, the bundled image-only retrieval encoder that stands in for DINOv2.

    python scripts/train_retrieval_encoder.py      # re-creates vs2ray/assets/vs2ray-tiny-retrieval.safetensors

A small timm ViT (its architecture in vs2ray/assets/vs2ray-tiny-retrieval.json) trained
**supervised**, with cross-entropy on the true labels of `shapes/pretrain` — the split
`vs2ray-tiny` trains on and no experiment uses — and no text at all. DINOv2's role in
VS2++ is an image-only space whose neighbourhoods are far more accurate than CLIP's
zero-shot head; a supervised image model gives the bundled world that property in a few
minutes of CPU (self-supervised training at this size would take far longer). The
classifier head is dropped: the shipped fp16 safetensors hold the backbone, whose pooled
features land in the store's `retrieval` column through `vs2ray.models.load_retrieval_encoder`
(`retrieval.space: dinov2`, `retrieval.encoder: vs2ray-tiny-retrieval`).

CPU only and deterministic for a given seed and thread count. At the end the kNN-50
majority accuracy of the saved encoder on `shapes/test` (neighbours from the first
`--knn-pool` train images) is printed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from train_tiny_clip import add_training_arguments, lr_at, render_pretrain_pool, save_fp16
from world_card import knn_majority

from vs2ray.config import RetrievalConfig
from vs2ray.data.shapes import CLASS_NAMES, ShapesDataset
from vs2ray.models import BUNDLED_RETRIEVAL, BUNDLED_RETRIEVAL_WEIGHTS, encode_retrieval, load_retrieval_encoder


def train(args: argparse.Namespace) -> Path:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    spec = json.loads(BUNDLED_RETRIEVAL.read_text())
    model = timm.create_model(spec["timm_model"], pretrained=False, num_classes=len(CLASS_NAMES), **spec["model_args"])
    mean = torch.tensor(spec["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(spec["std"]).view(1, 3, 1, 1)

    started = time.perf_counter()
    pixels, attributes = render_pretrain_pool(args.data_seed, args.pool_size, mean, std)
    labels = torch.tensor([label for label, _, _ in attributes])
    print(f"rendered {len(labels)} pretrain images in {time.perf_counter() - started:.1f}s", flush=True)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    started = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        batch = torch.randint(len(labels), (args.batch_size,), generator=generator)
        images = pixels[batch]
        flip = torch.rand(args.batch_size, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        loss = F.cross_entropy(model(images), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            rate = (step + 1) * args.batch_size / (time.perf_counter() - started)
            print(f"step {step:5d}  loss {loss.item():.4f}  ({rate:.0f} images/s)", flush=True)

    model.reset_classifier(0)  # the backbone only: pooled features are the retrieval embedding
    print(f"trained in {time.perf_counter() - started:.0f}s")
    return save_fp16(model, args, ("knn_pool", "knn_queries"))


@torch.no_grad()
def knn_accuracy(weights: Path, pool: int, queries: int, k: int = 50) -> float:
    """kNN-k majority accuracy on shapes/test of `weights`, loaded through the library's own path."""
    encoder = load_retrieval_encoder(RetrievalConfig(encoder="vs2ray-tiny-retrieval", image_size=32), weights=weights)
    dataset = ShapesDataset()

    def embed(split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        records = dataset.records(split)[:count]
        images = torch.stack([encoder.preprocess(dataset.load_image(split, r.ref)) for r in records])
        return encode_retrieval(encoder, images), torch.tensor([r.label for r in records])

    pool_vectors, pool_labels = embed("train", pool)
    query_vectors, query_labels = embed("test", queries)
    majority = knn_majority(pool_vectors, pool_labels, query_vectors, k)
    accuracy = (majority == query_labels).float().mean().item()
    print(f"kNN-{k} majority on shapes/test ({queries} queries, {pool} train images): {100 * accuracy:.2f}%")
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser, BUNDLED_RETRIEVAL_WEIGHTS, steps=1000, lr=2e-3, decay=0.05)
    parser.add_argument("--knn-pool", type=int, default=5000, help="train images searched by the closing kNN check")
    parser.add_argument("--knn-queries", type=int, default=2000, help="test images the closing kNN check queries")
    args = parser.parse_args()
    weights = Path(args.out) if args.evaluate_only else train(args)
    accuracy = knn_accuracy(weights, args.knn_pool, args.knn_queries)
    print(json.dumps({"knn50": round(accuracy, 4)}))


if __name__ == "__main__":
    main()
