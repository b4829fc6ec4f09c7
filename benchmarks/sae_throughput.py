"""SAE training throughput: vs2ray's sparse decode against a naive dense-TopK baseline.

    python benchmarks/sae_throughput.py                 # CPU, or CUDA when present
    python benchmarks/sae_throughput.py --steps 20 --batch-size 4096

For d = 768, k = 64 and expansions 4 (the paper's ViT-B/32 setting) and 16, it times
`train_sae` with our decode (embedding_bag over the k active decoder rows) and with the
naive one (scatter the codes into a dense (batch, n) tensor, then a dense matmul),
each in its own process so that peak memory is the training's own. To say what bounds
a step it also reports the step's achieved GFLOP/s next to a plain matmul of the
encoder's size measured in the same run, and the time of a tiny-SAE step (Python and
framework overhead, which a large step should dwarf).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def dense_decode_without_bias(self, values, indices=None):
    """The naive baseline: materialise the dense (batch, n) code and multiply by W_dec."""
    if indices is None:
        return values @ self.W_dec
    dense = torch.zeros(values.shape[0], self.n_latents, dtype=values.dtype, device=values.device)
    return dense.scatter(-1, indices, values) @ self.W_dec


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_one(d: int, expansion: int, k: int, batch: int, steps: int, dense: bool) -> dict:
    """Train for `steps` on random data in this process; returns samples/s and peak memory."""
    from vs2ray.sae import SAETrainParams, SparseAutoencoder, train_sae

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dense:
        SparseAutoencoder.decode_without_bias = dense_decode_without_bias
    acts = torch.randn(batch * 2, d, generator=torch.Generator().manual_seed(0))
    params = SAETrainParams(k=k, expansion=expansion, steps=steps, batch_size=batch, warmup_steps=1)
    train_sae(acts, SAETrainParams(**{**params.as_dict(), "steps": 2}), device=device)  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = peak_memory_mb(device)
    result = train_sae(acts, params, device=device)
    n = expansion * d
    # forward + backward ≈ 3× forward; forward: encoder matmul + decode (k rows per sample)
    flops = 3 * (2 * batch * d * n + 2 * batch * k * d) * steps
    seconds = steps * batch / result.metrics["samples_per_second"]
    return {
        "samples_per_s": result.metrics["samples_per_second"],
        "gflops_per_s": flops / seconds / 1e9,
        "peak_mb": peak_memory_mb(device),
        "peak_increase_mb": peak_memory_mb(device) - before if device == "cuda" else peak_memory_mb(device),
        "device": device,
    }


def matmul_gflops(d: int, n: int, batch: int, device: str) -> float:
    """Achieved GFLOP/s of the encoder's matmul alone (batch, d) @ (d, n)."""
    x, w = torch.randn(batch, d, device=device), torch.randn(n, d, device=device)
    F.linear(x, w)
    if device == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(5):
        F.linear(x, w)
    if device == "cuda":
        torch.cuda.synchronize()
    return 5 * 2 * batch * d * n / (time.perf_counter() - began) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    args = parser.parse_args()
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(run_one(**spec)))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, torch threads "
        f"{torch.get_num_threads()}, batch {args.batch_size}, {args.steps} timed steps"
    )
    rows = []
    for d, expansion, k in ((768, 4, 64), (768, 16, 64), (64, 2, 8)):
        batch = args.batch_size if d > 64 else 256
        results = {}
        for dense in (False, True):
            spec = {"d": d, "expansion": expansion, "k": k, "batch": batch, "steps": args.steps, "dense": dense}
            output = subprocess.run(
                [sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True, check=True
            )
            results[dense] = json.loads(output.stdout.strip().splitlines()[-1])
        matmul = matmul_gflops(d, expansion * d, batch, device)
        rows.append((d, expansion, k, batch, results[False], results[True], matmul))
    header = (
        f"{'d':>4} {'exp':>3} {'k':>3} {'batch':>5} | {'ours samples/s':>14} {'GFLOP/s':>8} {'peak MB':>8} | "
        f"{'dense samples/s':>15} {'peak MB':>8} | {'speed-up':>8} | {'matmul GFLOP/s':>14}"
    )
    print(header)
    print("-" * len(header))
    for d, expansion, k, batch, ours, dense, matmul in rows:
        print(
            f"{d:>4} {expansion:>3} {k:>3} {batch:>5} | {ours['samples_per_s']:>14.0f} {ours['gflops_per_s']:>8.1f} "
            f"{ours['peak_mb']:>8.0f} | {dense['samples_per_s']:>15.0f} {dense['peak_mb']:>8.0f} | "
            f"{ours['samples_per_s'] / dense['samples_per_s']:>7.2f}x | {matmul:>14.1f}"
        )
    tiny = rows[-1][4]
    print(
        f"tiny SAE step (d=64, n=128, batch 256): {256 / tiny['samples_per_s'] * 1e3:.2f} ms — the fixed "
        f"per-step cost of Python and the framework"
    )


if __name__ == "__main__":
    main()
