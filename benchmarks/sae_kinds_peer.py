"""vs2ray's SAE kinds (METHOD.md §9) at equal L0 against sparsify's TopK, and each against SAELens's own.

    pip install -e '.[cpu,dev,bench,peers]'     # bench: sparsify; peers: sae-lens (large: transformers)
    SPARSIFY_DISABLE_TRITON=1 python benchmarks/sae_kinds_peer.py [--config sweeps/quickstart.yaml]
        [--steps 1000] [--batch-size 1024] [--expansion 4] [--ks 8,16,32,64] [--seed 0]
        [--l0-coefs 0.003,0.01,0.03] [--l1-coefs 0.1,0.3,1]

Every SAE trains on the config's train-split [CLS] rows minus its validation rows (18,000 on the
quickstart) with the same batches in the same order, Adam, learning rate, warm-up and decay
(benchmarks/sae_peer.py's protocol), and is scored with one function on the held-out rows:
FVU = ‖X − X̂‖² / ‖X − mean X‖² and L0 = mean active latents per row, each library's SAE at
inference (SAELens's BatchTopK, Matryoshka and JumpReLU as the JumpReLU SAE it saves for
inference, its thresholds included).

1. *Against TopK at equal L0*: sparsify's TopK at every k of `--ks` traces FVU against L0; each
   vs2ray kind's FVU is divided by that curve's FVU at the kind's own L0 (log-linear in L0 between
   the two nearest k; outside the curve's range: no ratio). Target (issue 27): BatchTopK and
   Matryoshka ≤ 0.95×.
2. *Against the same kind elsewhere*: SAELens's BatchTopK and Matryoshka-BatchTopK at the same k
   (and Matryoshka prefixes), its JumpReLU and its standard (ReLU + L1) SAE at sparsity weights
   converted to its loss's scale (SAELens sums the squared error over d and weighs the penalty
   against it: ours × the rows' mean per-row variance, and for L1 ÷ their mean deviation norm);
   each printed with its L0, and the vs2ray / SAELens FVU ratio at equal L0 on SAELens's curve.
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from sae_peer import held_out_fvu, peer_parser, peer_steps, train_sparsify, training_rows

from vs2ray.sae import SAETrainParams, matryoshka_prefixes, train_sae

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's fused kernels need a GPU

Row = tuple[str, str, str, float, float]  # (kind, implementation, setting, L0, held-out FVU)


@torch.no_grad()
def held_out_l0(encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    """Mean active latents per row of `encode(chunk)` (dense codes) over `x`."""
    return sum(float((encode(chunk) != 0).sum()) for chunk in x.split(4096)) / len(x)


def at_l0(curve: list[tuple[float, float]], l0: float) -> float | None:
    """A (L0, FVU) curve's FVU at `l0`, log-linear in L0 between its nearest points; None outside it."""
    points = sorted(curve)
    for (l0_low, fvu_low), (l0_high, fvu_high) in itertools.pairwise(points):
        if l0_low <= l0 <= l0_high and l0_high > l0_low:
            share = (math.log(l0) - math.log(l0_low)) / (math.log(l0_high) - math.log(l0_low))
            return fvu_low + share * (fvu_high - fvu_low)
    return None


def train_sae_lens(kind: str, x: torch.Tensor, params: SAETrainParams, coefficient: float) -> Any:
    """SAELens's training SAE of `kind` trained with its own forward pass and loss on `x` (N, d), in
    vs2ray's batch order and schedule; returns the inference SAE it saves (`save_inference_model`)."""
    from sae_lens import SAE
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

    torch.manual_seed(params.seed)
    d = x.shape[1]
    width = params.expansion * d
    warm_up = params.sparsity_warmup_steps
    sae: Any
    if kind == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d, d_sae=width, k=params.k))
        coefficients: dict[str, float] = {}
    elif kind == "matryoshka":
        widths = matryoshka_prefixes(width, params.prefixes)
        config = MatryoshkaBatchTopKTrainingSAEConfig(d_in=d, d_sae=width, k=params.k, matryoshka_widths=widths)
        sae, coefficients = MatryoshkaBatchTopKTrainingSAE(config), {}
    elif kind == "jumprelu":
        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d, d_sae=width, l0_coefficient=coefficient))
        coefficients = {"l0": coefficient}
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=width, l1_coefficient=coefficient))
        coefficients = {"l1": coefficient}
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(dim=0))  # as vs2ray's b_pre and sparsify's b_dec start
    adam = torch.optim.Adam(sae.parameters(), lr=params.lr, betas=(0.9, 0.999), eps=6.25e-10)
    since_fired = torch.zeros(width, dtype=torch.long)
    for step, batch in peer_steps(x, params, adam):
        warm = min(1.0, (step + 1) / warm_up) if warm_up else 1.0
        step_input = TrainStepInput(
            sae_in=batch,
            coefficients={name: warm * value for name, value in coefficients.items()},
            dead_neuron_mask=since_fired > params.dead_threshold,
            n_training_steps=step,
            is_logging_step=False,
        )
        out = sae.training_forward_pass(step_input)
        adam.zero_grad(set_to_none=True)
        out.loss.backward()
        adam.step()
        since_fired += len(batch)
        since_fired[(out.feature_acts > 0).any(dim=0)] = 0
    with tempfile.TemporaryDirectory() as directory:
        sae.save_inference_model(directory)
        return SAE.load_from_disk(directory).eval()


def main() -> None:
    parser = peer_parser(__doc__.splitlines()[0])
    parser.add_argument("--expansion", type=int, default=4)
    parser.add_argument("--ks", default="8,16,32,64", help="k of the TopK curve and of BatchTopK / Matryoshka")
    parser.add_argument("--l0-coefs", default="0.003,0.01,0.03", help="vs2ray's sae.l0_coef values (JumpReLU)")
    parser.add_argument("--l1-coefs", default="0.1,0.3,1", help="vs2ray's sae.l1_coef values (ReLU + L1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-sae-lens", action="store_true", help="only the comparison against TopK")
    args = parser.parse_args()

    config, train, held_out = training_rows(args.config)
    variance = float((train - train.mean(dim=0)).pow(2).sum(dim=1).mean())  # per row
    deviation = float((train - train.mean(dim=0)).norm(dim=1).mean())
    print(
        f"torch threads {torch.get_num_threads()}; mean per-row variance {variance:.1f}, deviation norm {deviation:.2f}"
    )
    base = {
        "expansion": args.expansion, "lr": args.lr, "steps": args.steps, "batch_size": args.batch_size,
        "seed": args.seed, "warmup_steps": config.sae.warmup_steps, "dead_threshold": config.sae.dead_threshold,
        "auxk_coef": config.sae.auxk_coef,
    }  # fmt: skip
    ks = [int(k) for k in args.ks.split(",")]
    weights = {"jumprelu": [float(c) for c in args.l0_coefs.split(",")]}
    weights["relu_l1"] = [float(c) for c in args.l1_coefs.split(",")]
    rows: list[Row] = []

    def record(kind: str, implementation: str, setting: str, l0: float, fvu: float) -> None:
        rows.append((kind, implementation, setting, l0, fvu))
        print(f"  {kind:10s} {implementation:8s} {setting:14s} L0 {l0:7.2f}  held-out FVU {fvu:.4f}", flush=True)

    for k in ks:
        coder, _ = train_sparsify(train, SAETrainParams(**base, k=k))
        fvu = held_out_fvu(lambda chunk, c=coder: c(chunk).sae_out, held_out)
        l0 = held_out_l0(lambda chunk, c=coder: c.encode(chunk).top_acts, held_out)
        record("topk", "sparsify", f"k={k}", l0, fvu)
    settings: list[tuple[str, dict[str, Any], str]] = [
        (kind, {"k": k}, f"k={k}") for kind in ("topk", "batchtopk", "matryoshka") for k in ks
    ]
    settings += [("jumprelu", {"l0_coef": c}, f"l0_coef={c:g}") for c in weights["jumprelu"]]
    settings += [("relu_l1", {"l1_coef": c}, f"l1_coef={c:g}") for c in weights["relu_l1"]]
    for kind, extra, setting in settings:
        sae = train_sae(train, SAETrainParams(**base, kind=kind, **extra), device="cpu").sae.eval()
        fvu = held_out_fvu(lambda chunk, s=sae: s(chunk).reconstruction, held_out)
        l0 = held_out_l0(lambda chunk, s=sae: s.dense_codes(*s.encode(chunk)), held_out)
        record(kind, "vs2ray", setting, l0, fvu)
    if not args.skip_sae_lens:
        params = SAETrainParams(**base)
        for kind, extra, setting in settings:
            if kind == "topk":
                continue  # sparsify is the TopK reference
            value = extra.get("l0_coef", 0.0) * variance or extra.get("l1_coef", 0.0) * variance / deviation
            trained = train_sae_lens(kind, train, SAETrainParams(**{**params.as_dict(), **extra}), value)
            fvu = held_out_fvu(lambda chunk, s=trained: s(chunk), held_out)
            l0 = held_out_l0(lambda chunk, s=trained: s.encode(chunk), held_out)
            record(kind, "SAELens", setting if not value else f"{setting} ({value:.3g})", l0, fvu)

    topk_curve = [(l0, fvu) for kind, who, _, l0, fvu in rows if kind == "topk" and who == "sparsify"]
    print(f"\n{args.steps} steps of {args.batch_size}, lr {args.lr}, expansion {args.expansion}, seed {args.seed}")
    print(f"{'kind':10s} {'library':8s} {'setting':22s} {'L0':>7s} {'FVU':>7s} {'/ TopK':>7s} {'/ SAELens':>9s}")
    for kind, who, setting, l0, fvu in rows:
        topk = at_l0(topk_curve, l0)
        peer_curve = [(p_l0, p_fvu) for p_kind, p_who, _, p_l0, p_fvu in rows if p_kind == kind and p_who == "SAELens"]
        peer = at_l0(peer_curve, l0) if who == "vs2ray" else None
        ratios = [f"{fvu / topk:6.3f}×" if topk else "     –", f"{fvu / peer:8.3f}×" if peer else "       –"]
        print(f"{kind:10s} {who:8s} {setting:22s} {l0:7.2f} {fvu:7.4f} {ratios[0]:>7s} {ratios[1]:>9s}")
    for kind in ("batchtopk", "matryoshka"):
        ratios = [
            fvu / t for k_, who, _, l0, fvu in rows if k_ == kind and who == "vs2ray" if (t := at_l0(topk_curve, l0))
        ]
        if ratios:
            print(f"{kind}: FVU / TopK's at equal L0, median {np.median(ratios):.3f}× (target <= 0.95×)")


if __name__ == "__main__":
    main()
