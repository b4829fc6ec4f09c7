"""vs2ray's top-k SAE against EleutherAI sparsify's SparseCoder (the trainer the VS2 paper used), same rows.

    pip install -e '.[cpu,dev,bench]'      # the bench extra installs eai-sparsify
    SPARSIFY_DISABLE_TRITON=1 python benchmarks/sae_peer.py [--config sweeps/quickstart.yaml]
        [--steps 1000] [--batch-size 1024] [--shapes 32x4,64x4,32x8] [--seeds 0,1,2] [--init linear|tied]

Both train on the config's train-split [CLS] rows minus its validation rows (18,000 on the
quickstart), see the same batches in the same order, and share the learning rate, its linear
warm-up and decay, Adam, the AuxK loss (weight `sae.auxk_coef`, d/2 latents, dead after
`sae.dead_threshold` samples without firing), b_pre / b_dec at the data mean, unit-norm decoder
rows and the decoder-gradient projection: sparsify's training step, written out here because
its Trainer hooks a Hugging Face model. What differs is each library's own SAE: vs2ray's
`train_sae` (with `--init`, the initialisation being compared) against `sparsify.SparseCoder`
(nn.Linear's initialisation, an encoder bias). Printed per (k, expansion): held-out FVU (one
shared function, on the validation rows), dead fraction, L0, samples/s — each the mean over
`--seeds` (the seed draws both SAEs' initial weights and the batch order) — and the ratios
vs2ray / sparsify, with the range of the per-seed FVU ratios. Targets (issue 16): FVU ratio ≤ 1.0,
samples/s ratio ≥ 1.0.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

from vs2ray.config import load_config
from vs2ray.sae import SAETrainParams, lr_factor, train_sae
from vs2ray.stages import load_train_split

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's fused kernels need a GPU


@torch.no_grad()
def held_out_fvu(reconstruct, x: torch.Tensor) -> float:
    """FVU = ‖X − X̂‖² / ‖X − mean(X)‖² over all held-out rows, the one definition both SAEs are scored with."""
    x_hat = torch.cat([reconstruct(chunk) for chunk in x.split(4096)])
    return ((x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()).item()


def peer_steps(
    x: torch.Tensor, params: SAETrainParams, optimizer: torch.optim.Optimizer
) -> Iterator[tuple[int, torch.Tensor]]:
    """(step, batch of `x`) in the order vs2ray's train_sae draws them, the optimizer's learning rate set to
    vs2ray's schedule for the step: a peer's SAE trains on exactly what vs2ray's does."""
    generator = torch.Generator().manual_seed(params.seed)
    order, cursor = torch.randperm(len(x), generator=generator), 0
    for step in range(params.steps):
        if cursor + params.batch_size > len(x):
            order, cursor = torch.randperm(len(x), generator=generator), 0
        batch = x[order[cursor : cursor + params.batch_size]]
        cursor += params.batch_size
        for group in optimizer.param_groups:
            group["lr"] = params.lr * lr_factor(step, params)
        yield step, batch


def train_sparsify(x: torch.Tensor, params: SAETrainParams) -> tuple[object, float]:
    """sparsify's SparseCoder trained with its Trainer's step on `x` (N, d); returns (coder, seconds)."""
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(params.seed)
    d = x.shape[1]
    coder = SparseCoder(d, SparseCoderConfig(expansion_factor=params.expansion, k=params.k))
    with torch.no_grad():
        coder.b_dec.copy_(x.mean(dim=0))
    adam = torch.optim.Adam(coder.parameters(), lr=params.lr, eps=6.25e-10)
    since_fired = torch.zeros(coder.num_latents, dtype=torch.long)
    started = time.perf_counter()
    for _, batch in peer_steps(x, params, adam):
        out = coder(batch, dead_mask=since_fired > params.dead_threshold)
        loss = out.fvu + params.auxk_coef * out.auxk_loss
        adam.zero_grad(set_to_none=True)
        loss.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        adam.step()
        coder.set_decoder_norm_to_unit_norm()
        since_fired += len(batch)
        since_fired[out.latent_indices[out.latent_acts > 0].flatten()] = 0
    return coder, time.perf_counter() - started


@torch.no_grad()
def sparsify_stats(coder, x: torch.Tensor) -> tuple[float, float]:
    """(L0, dead fraction: latents that never fire) of a SparseCoder on `x`."""
    fired = torch.zeros(coder.num_latents, dtype=torch.bool)
    active = 0.0
    for chunk in x.split(4096):
        encoded = coder.encode(chunk)
        live = encoded.top_acts > 0
        fired[encoded.top_indices[live]] = True
        active += live.sum().item()
    return active / len(x), 1.0 - fired.float().mean().item()


def peer_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every peer benchmark takes: the config whose rows it trains on, steps, batch size, lr."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="sweeps/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=5e-4)
    return parser


def training_rows(config_path: str) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """(config, training [CLS] rows (N, d), held-out rows (M, d)) of the config's train split, as the stages
    carve them; prints their sizes."""
    config = load_config(config_path, ["sae.k=64", "sae.expansion=4", "pass.w_aux=0"])
    split = load_train_split(config, print)
    cls = torch.from_numpy(split.acts[split.column(-1)].copy())
    train, held_out = cls[torch.from_numpy(split.train_mask)], cls[torch.from_numpy(split.val_mask)]
    print(f"{len(train)} training rows, {len(held_out)} held out, d = {cls.shape[1]}")
    return config, train, held_out


def main() -> None:
    parser = peer_parser(__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="32x4,64x4,32x8", help="k x expansion pairs")
    parser.add_argument("--seeds", default="0,1,2", help="seeds to average over")
    parser.add_argument("--init", default="linear", choices=["linear", "tied"], help="vs2ray's initialisation")
    args = parser.parse_args()

    config, train, held_out = training_rows(args.config)
    print(f"torch threads {torch.get_num_threads()}")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    rows = []
    for shape in args.shapes.split(","):
        k, expansion = (int(v) for v in shape.split("x"))
        ours, theirs = [], []  # per seed: (FVU, dead, L0, samples/s)
        for seed in seeds:
            params = SAETrainParams(
                k=k, expansion=expansion, lr=args.lr, steps=args.steps, batch_size=args.batch_size, seed=seed,
                warmup_steps=config.sae.warmup_steps, dead_threshold=config.sae.dead_threshold,
                auxk_coef=config.sae.auxk_coef, init=args.init,
            )  # fmt: skip
            trained = train_sae(train, params, device="cpu")
            fvu = held_out_fvu(lambda chunk, sae=trained.sae: sae(chunk).reconstruction, held_out)
            metrics = trained.metrics
            ours.append((fvu, metrics["dead_fraction"], metrics["l0"], metrics["samples_per_second"]))
            coder, seconds = train_sparsify(train, params)
            fvu = held_out_fvu(lambda chunk, coder=coder: coder(chunk).sae_out, held_out)
            l0, dead = sparsify_stats(coder, train)
            theirs.append((fvu, dead, l0, params.steps * params.batch_size / seconds))
            print(f"  k={k} expansion={expansion} seed={seed}: FVU {ours[-1][0]:.4f} vs {fvu:.4f}", flush=True)
        mine, peer = torch.tensor(ours).mean(dim=0).tolist(), torch.tensor(theirs).mean(dim=0).tolist()
        per_seed = [o[0] / t[0] for o, t in zip(ours, theirs, strict=True)]
        rows += [(k, expansion, "vs2ray", *mine), (k, expansion, "sparsify", *peer)]
        rows.append((k, expansion, "ratio", mine[0] / peer[0], min(per_seed), max(per_seed), mine[3] / peer[3]))
    print(f"\nvs2ray init: {args.init}; {args.steps} steps of {args.batch_size}, lr {args.lr}, seeds {seeds}")
    print(f"{'k':>4} {'exp':>4} {'trainer':>8} {'held-out FVU':>12} {'dead':>6} {'L0':>6} {'samples/s':>10}")
    for k, expansion, trainer, fvu, dead, l0, rate in rows:
        if trainer == "ratio":  # dead and L0 hold the smallest and largest per-seed FVU ratio
            spread = f"per seed {dead:.3f}–{l0:.3f}"
            print(f"{k:>4} {expansion:>4} {trainer:>8} {fvu:11.3f}× {'':>13} {rate:9.2f}×   {spread}")
        else:
            print(f"{k:>4} {expansion:>4} {trainer:>8} {fvu:12.4f} {dead:6.3f} {l0:6.1f} {rate:10.0f}")


if __name__ == "__main__":
    main()
