"""What a trial that steers a middle block costs against one that steers the last block (same run).

    python benchmarks/layer_cost.py [--config sweeps/quickstart_layers.yaml] [--gammas 5 --lambdas 5]

On the config's world (default: the bundled layer sweep, 20,000 train / 5,000 test images with
every token of every block stored) it trains or reuses one SAE per (block, tokens) with the config's
SAE settings, then times one trial's evaluation — zero-shot, SAE_REC^F and VS2 over a γ × λ grid,
on the validation and test rows — at every block. A middle block costs the rest of the encoder's
forward (blocks L+1 … end) for every grid setting; the last block is the cached path. Printed per
(block, tokens): SAE training seconds (or "cached"), evaluation seconds, milliseconds per image
and setting, and the ratio to the last block's [CLS] evaluation. The first row is the baseline.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from vs2ray.config import config_with, load_config
from vs2ray.stages import build_evaluator, get_or_train_sae, prepare_data, sae_params, steering_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="sweeps/quickstart_layers.yaml")
    parser.add_argument("--gammas", type=int, default=5, help="γ values in the grid (spread over the config's range)")
    parser.add_argument("--lambdas", type=int, default=5, help="λ values in the grid")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    base = load_config(args.config, args.set)
    methods = ["zero_shot", "sae_rec_final", "vs2"]
    data = prepare_data(config_with(base, {"steering.methods": methods}), print)
    num_blocks = data.split.num_blocks
    gammas = list(np.linspace(1.0, 3.0, args.gammas).round(3))
    lambdas = list(np.linspace(0.5, 5.0, args.lambdas).round(3))
    settings = len(gammas) * len(lambdas) + 2
    images = int(data.split.val_source()[1].sum()) + len(data.test.ids)
    print(f"torch threads {torch.get_num_threads()}, {images} images per setting, {settings} settings per trial")
    rows, baseline = [], None
    for tokens in ("cls", "all"):
        for block in reversed(range(num_blocks)):
            config = config_with(base, {"sae.layer": block, "sae.tokens": tokens, "steering.methods": methods})
            trained = get_or_train_sae(config, sae_params(config), data.split, lambda _: None)
            began = time.perf_counter()
            evaluator = build_evaluator(config, data, trained.sae)
            evaluator.evaluate_all(methods, steering_grid(config, gammas=gammas, lambdas=lambdas))
            seconds = time.perf_counter() - began
            baseline = baseline or seconds
            training = "cached" if trained.cache_hit else f"{trained.metrics['train_seconds']:.1f}"
            rows.append((block, tokens, training, seconds, 1e3 * seconds / (images * settings), seconds / baseline))
            print(f"  block {block} {tokens}: {seconds:.1f} s", flush=True)
    header = f"{'block':>5} {'tokens':>6} {'SAE train s':>11} {'eval s':>7} {'ms/image/setting':>16}"
    header += f" {'× last [CLS]':>12}"
    print(f"\n{header}")
    for block, tokens, training, seconds, per_image, ratio in rows:
        print(f"{block:>5} {tokens:>6} {training:>11} {seconds:>7.1f} {per_image:>16.4f} {ratio:>12.1f}")


if __name__ == "__main__":
    main()
