"""The GPU check: what vs2ray's GPU paths do on this machine's GPU, against its CPU, in one command.

    make gpu-check                                   # = python scripts/gpu_check.py --out gpu_check.json
    python scripts/gpu_check.py --device cpu --small  # the same code at small sizes; `make test` runs it

For a bare machine with one NVIDIA GPU: it needs torch, numpy and pyarrow, and uses open_clip
(+ ftfy, regex), pydantic and faiss when they import; Ray is never needed (the encoder actor's
own encode path is called without an actor). Sections whose packages are missing are listed as
skipped, with the package named. Printed as a table, written as JSON (--out):

- environment: torch, its CUDA build, the NVIDIA driver, the GPU's name and compute capability;
- extraction images/s at fp32 / tf32 / bf16, for vs2ray-tiny and a random-weight ViT-B/32, through
  `ChunkEncoder.encode` (uint8 pixels in, store columns out) and through a bare loop over
  `encode_image` on device-resident tensors, and their ratio (the encode path's overhead);
- SAE training samples/s and held-out FVU on the device and on the CPU at equal steps, and
  sparsify's SparseCoder on the device when it imports;
- FAISS queries/s on the GPU against the CPU, where a GPU build imports;
- every steering method's logits on the device against the CPU: max |Δ| and argmax agreement.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # vs2ray from this checkout, installed or not

from vs2ray import devices

Row = dict[str, Any]


def missing(*modules: str) -> list[str]:
    """The modules among `modules` that do not import here."""
    return [name for name in modules if importlib.util.find_spec(name) is None]


def timed(run: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Seconds per call of `run` (after one warm-up call), synchronising a GPU around the clock."""
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


# ---------------------------------------------------------------- extraction


def extraction_rows(device: torch.device, small: bool) -> list[Row]:
    """Images/s of the encoder actor's encode path and of a bare loop, per model and precision."""
    from vs2ray.config import ModelConfig
    from vs2ray.extract import ChunkEncoder, _split_preprocess
    from vs2ray.models import encode_images, load_clip
    from vs2ray.store import INT_COLUMNS

    rows = []
    models = [("vs2ray-tiny", "bundled", 256 if not small else 32)]
    models.append(("ViT-B-32", "random", 256 if not small else 2))
    for arch, pretrained, batch in models:
        loaded = load_clip(ModelConfig(arch=arch, pretrained=pretrained), device=device)  # fp32 weights, any precision
        for precision in ("fp32", "tf32", "bf16"):
            bundle = dataclasses.replace(loaded, precision=precision)  # what load_clip returns for model.precision
            size = bundle.model.visual.image_size
            size = size[0] if isinstance(size, (tuple, list)) else size
            split = _split_preprocess(bundle.preprocess)
            encoder = object.__new__(ChunkEncoder)  # the actor's state without the actor (no Ray here)
            encoder.bundle, encoder.retrieval, encoder.all_tokens = bundle, None, False
            encoder.layers = [len(bundle.model.visual.transformer.resblocks) - 1]
            encoder.normalisation = {"pixels": (split.mean, split.std)}
            pixels = np.random.default_rng(0).integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)
            chunk = {"pixels": [pixels], **{f"{name}s": [np.arange(batch)] for name in INT_COLUMNS}}
            images = torch.randn(batch, 3, size, size, device=device)
            repeats = 1 if small else 10
            path_s = timed(lambda encoder=encoder, chunk=chunk: encoder.encode(chunk), device, repeats)
            bare_s = timed(lambda bundle=bundle, images=images: encode_images(bundle, images), device, repeats)
            rows.append(
                {
                    "model": f"{arch}/{pretrained}",
                    "precision": precision,
                    "batch": batch,
                    "encode_path_images_per_s": batch / path_s,
                    "bare_loop_images_per_s": batch / bare_s,
                    "path_over_bare": bare_s / path_s,
                }
            )
    return rows


# ---------------------------------------------------------------- SAE


def sae_rows(device: torch.device, small: bool) -> list[Row]:
    """vs2ray's SAE (and sparsify's SparseCoder) trained for equal steps on `device` and on the CPU."""
    from vs2ray.sae import SAETrainParams, evaluate_sae, train_sae

    d, n = (64, 6000) if small else (768, 60000)
    generator = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(4 * d, d, generator=generator), dim=1)
    codes = torch.rand(n, 4 * d, generator=generator) * (torch.rand(n, 4 * d, generator=generator) < 0.02)
    x = codes @ atoms + 0.05 * torch.randn(n, d, generator=generator)
    train, held_out = x[: n * 9 // 10], x[n * 9 // 10 :]
    params = SAETrainParams(k=16 if small else 64, expansion=4, steps=50 if small else 300, batch_size=1024)
    rows = []
    targets = [device] if device.type == "cpu" else [device, torch.device("cpu")]
    for target in targets:
        for precision in ("fp32", "bf16"):
            run = SAETrainParams(**{**params.as_dict(), "precision": precision})
            result = train_sae(train, run, device=target)
            rows.append(
                {
                    "sae": "vs2ray SparseAutoencoder",
                    "device": str(target),
                    "precision": precision,
                    "steps": params.steps,
                    "samples_per_s": result.metrics["samples_per_second"],
                    "held_out_fvu": evaluate_sae(result.sae, held_out)["fvu"],
                }
            )
    rows.append(streamed_row(train, held_out, params, device))
    if not missing("sparsify"):
        rows.append(sparsify_row(train, held_out, params, device))
    return rows


def streamed_row(train: torch.Tensor, held_out: torch.Tensor, params: Any, device: torch.device) -> Row:
    """The same SAE trained from a memory-mapped .npy, batch by batch from the host, against the rows staged
    on the device: a store larger than the GPU must give the same weights, at what speed."""
    import tempfile

    import numpy as np

    from vs2ray.sae import ActivationRows, evaluate_sae, train_sae

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "rows.npy"
        np.save(path, train.numpy())
        mapped = ActivationRows(np.load(path, mmap_mode="r"))
        staged = train_sae(mapped, params, device=device, stage=True, log=lambda _: None)
        streamed = train_sae(mapped, params, device=device, stage=False, log=lambda _: None)
    same = all(torch.equal(weight, streamed.sae.state_dict()[name]) for name, weight in staged.sae.state_dict().items())
    return {
        "sae": "vs2ray SparseAutoencoder, host batches from a memory map",
        "device": str(device),
        "precision": "fp32",
        "steps": params.steps,
        "samples_per_s": streamed.metrics["samples_per_second"],
        "held_out_fvu": evaluate_sae(streamed.sae, held_out)["fvu"],
        "staged_samples_per_s": staged.metrics["samples_per_second"],
        "same_weights_as_staged": same,
    }


def sparsify_row(train: torch.Tensor, held_out: torch.Tensor, params: Any, device: torch.device) -> Row:
    """sparsify's SparseCoder on `device`, trained on the same rows for the same steps (its FVU loss, Adam)."""
    if device.type != "cuda":  # sparsify's fused Triton kernels need a GPU; set before its first import
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    coder = SparseCoder(train.shape[1], SparseCoderConfig(expansion_factor=params.expansion, k=params.k), device=device)
    adam = torch.optim.Adam(coder.parameters(), lr=params.lr)
    data = train.to(device)
    order = torch.randperm(len(data), device=device)
    started = time.perf_counter()
    for step in range(params.steps):
        batch = data[order[(step * params.batch_size) % (len(data) - params.batch_size) :][: params.batch_size]]
        out = coder(batch)
        adam.zero_grad()
        out.fvu.backward()
        adam.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    with torch.no_grad():
        x = held_out.to(device)
        fvu = ((coder(x).sae_out - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    return {
        "sae": "sparsify SparseCoder",
        "device": str(device),
        "precision": "fp32",
        "steps": params.steps,
        "samples_per_s": params.steps * params.batch_size / seconds,
        "held_out_fvu": fvu,
    }


# ---------------------------------------------------------------- FAISS


def faiss_rows(small: bool) -> list[Row]:
    """Queries/s of a flat inner-product shard on the CPU and, with a GPU build, on the GPU."""
    import faiss

    from vs2ray.retrieval import IndexShard

    size, dim, queries = (2000, 64, 500) if small else (200000, 768, 10000)
    rng = np.random.default_rng(0)
    vectors, probe = rng.normal(size=(size, dim)).astype(np.float32), rng.normal(size=(queries, dim)).astype(np.float32)
    rows = []
    gpu_build = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    for use_gpu in ("no", "yes") if gpu_build else ("no",):
        shard = IndexShard(vectors, np.arange(size), use_gpu=use_gpu, gpu_ids=None)
        seconds = timed(lambda shard=shard: shard.search(probe, 50), torch.device("cpu"), 3)
        rows.append({"index": "flat", "on_gpu": shard.on_gpu, "vectors": size, "queries_per_s": queries / seconds})
    if not gpu_build:
        rows.append({"index": "flat", "on_gpu": None, "note": f"faiss {faiss.__version__} here is a CPU build"})
    return rows


# ---------------------------------------------------------------- steering methods


def steering_rows(device: torch.device, small: bool) -> list[Row]:
    """Every registry method's test logits on `device` against the CPU on one synthetic world."""
    from vs2ray.evaluate import Evaluator, Grid, SplitData, settings_for
    from vs2ray.methods import METHODS
    from vs2ray.sae import SAETrainParams, train_sae
    from vs2ray.steering import apply_head

    width, embed, classes = 32, 16, 6
    generator = torch.Generator().manual_seed(0)
    head = {"ln_post.weight": torch.ones(width), "ln_post.bias": torch.zeros(width), "proj": torch.randn(width, embed)}
    centres = 2 * torch.randn(classes, width, generator=generator)

    def split(name: str, n: int) -> SplitData:
        labels = torch.randint(classes, (n,), generator=generator)
        cls = centres[labels] + torch.randn(n, width, generator=generator) + 1.0
        attributes = torch.randint(2, (n,), generator=generator)
        return SplitData(name, cls, apply_head(cls, head), labels, None, {}, attributes, labels * 2 + attributes)

    pool, val, test = split("pool", 1500), split("val", 300), split("test", 300)
    classifier = torch.nn.functional.normalize(torch.randn(classes, embed, generator=generator), dim=1)
    sae = train_sae(pool.cls, SAETrainParams(k=4, expansion=4, steps=100, batch_size=256), device="cpu").sae

    def search(queries: np.ndarray, k: int, key: str) -> tuple[np.ndarray, np.ndarray]:  # exact cosine, on the host
        pool_n = pool.embedding / pool.embedding.norm(dim=1, keepdim=True)
        q = torch.from_numpy(queries)
        scores, rows = (q / q.norm(dim=1, keepdim=True) @ pool_n.T).topk(k, dim=1)
        return scores.numpy(), rows.numpy()

    def on(target: torch.device) -> Evaluator:
        def moved(s: SplitData) -> SplitData:
            tensors = {
                name: getattr(s, name).to(target) for name in ("cls", "embedding", "labels", "attributes", "groups")
            }
            return SplitData(s.name, **tensors)

        splits = (moved(pool), moved(val), moved(test))
        target_head = {name: value.to(target) for name, value in head.items()}
        target_sae = copy.deepcopy(sae).to(target)
        return Evaluator(target_sae, target_head, classifier.to(target), *splits, search, num_groups=2 * classes)

    grid = Grid(gammas=(1.5, 3.0), lambdas=(2.1,), n_neighbors=10, ablate_counts=(2,))
    cpu, there = on(torch.device("cpu")), on(device)
    rows = []
    for name in METHODS:
        if name == "sae_rec_all":  # needs one SAE per block and the encoder: checked by the end-to-end tests
            rows.append({"method": name, "note": "needs the encoder and one SAE per block; not checked here"})
            continue
        setting = settings_for(name, grid)[-1]
        reference, _ = cpu.logits(name, cpu.test, setting)
        logits, _ = there.logits(name, there.test, setting)
        logits = logits.cpu()
        rows.append(
            {
                "method": name,
                "setting": setting,
                "max_abs_delta": (logits - reference).abs().max().item(),
                "argmax_agreement": (logits.argmax(1) == reference.argmax(1)).float().mean().item(),
            }
        )
    return rows


# ---------------------------------------------------------------- main


def print_table(title: str, rows: list[Row]) -> None:
    print(f"\n{title}")
    if not rows:
        return
    keys = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[f"{row[k]:.4g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    for line in cells:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--small", action="store_true", help="small sizes (the CPU mode make test runs)")
    parser.add_argument("--out", default="gpu_check.json", help="where to write the JSON")
    args = parser.parse_args(argv)
    device = devices.worker_device(args.device, None)  # cuda without a GPU: GpuUnavailable, naming the cause
    report: dict[str, Any] = {"environment": devices.environment(device), "small": args.small, "skipped": {}}
    print_table("environment", [report["environment"]])
    sections = {
        "extraction": (("open_clip", "pydantic"), lambda: extraction_rows(device, args.small)),
        "sae": ((), lambda: sae_rows(device, args.small)),
        "faiss": (("faiss",), lambda: faiss_rows(args.small)),
        "steering": ((), lambda: steering_rows(device, args.small)),
    }
    for name, (needs, run) in sections.items():
        lacking = missing(*needs)
        if lacking:
            report["skipped"][name] = f"not installed: {', '.join(lacking)}"
            print(f"\n{name}: skipped ({report['skipped'][name]})")
            continue
        started = time.perf_counter()
        report[name] = run()
        print_table(f"{name} ({time.perf_counter() - started:.0f} s)", report[name])
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
