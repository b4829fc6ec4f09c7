"""What a sweep saves: N trials sharing one activation store and SAE cache vs N independent runs.

    python benchmarks/sweep_amortization.py               # N = 4 on a 4,000-image shapes world
    python benchmarks/sweep_amortization.py --trials 6 --train 8000

Both sides evaluate the same N steering settings of one SAE configuration (k, expansion,
w_aux fixed; γ and λ differ), as the researcher's alternative would: N separate
`python -m vs2ray evaluate` runs, each in a fresh storage root (its own Ray start,
extraction and SAE training), against one `python -m vs2ray.sweep` of N trials in a
fresh storage root (one Ray start, one extraction, one SAE trained, N-1 cache hits).
It prints both wall times and their ratio, and from the sweep's own results the mean
time of a cache-hit trial against the training trial.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    output = subprocess.run(command, capture_output=True, text=True)
    if output.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{output.stderr[-3000:]}")
    return time.perf_counter() - started


def with_sets(command: list[str], assignments: list[str]) -> list[str]:
    for assignment in assignments:
        command += ["--set", assignment]
    return command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--train", type=int, default=4000, help="shapes training images")
    parser.add_argument("--test", type=int, default=1000, help="shapes test images")
    parser.add_argument("--steps", type=int, default=500, help="SAE training steps")
    args = parser.parse_args()

    from vs2ray.results import load_results

    rng = np.random.default_rng(0)
    settings = [(round(float(g), 3), round(float(lam), 3)) for g, lam in rng.uniform([1, 0], [3, 5], (args.trials, 2))]
    world = [
        f"dataset.sizes={{train: {args.train}, test: {args.test}}}",
        "sae.k=32",
        "sae.expansion=4",
        "pass.w_aux=0.0",
        f"sae.steps={args.steps}",
        "steering.methods=[zero_shot, vs2, vs2_gated, centroid_shift]",
    ]
    python = [sys.executable, "-m"]
    with tempfile.TemporaryDirectory() as scratch:
        independent = 0.0
        for i, (gamma, lam) in enumerate(settings):
            root = Path(scratch) / f"independent-{i}"
            command = [*python, "vs2ray", "evaluate", "--gammas", str(gamma), "--lambdas", str(lam)]
            seconds = timed(with_sets(command, [*world, f"storage.root={root}"]))
            print(f"independent run {i + 1}/{args.trials} (γ {gamma}, λ {lam}): {seconds:.1f} s", flush=True)
            independent += seconds
        root = Path(scratch) / "sweep"
        points = [{"steering.gamma": g, "steering.lambda": lam} for g, lam in settings]
        sweep = [
            *world,
            f"storage.root={root}",
            "steering.gamma={uniform: [1.0, 3.0]}",
            "steering.lambda={uniform: [0.0, 5.0]}",
            f"search.num_samples={args.trials}",
            "search.max_concurrent_trials=1",  # the same one-at-a-time order as the independent runs
            "resources.cpus_per_trial=1",
            f"search.points_to_evaluate={json.dumps(points)}",
        ]
        shared = timed(with_sets([*python, "vs2ray.sweep", "--name", "amortization"], sweep))
        trials = load_results(root / "experiments" / "amortization")

    hits = trials[trials["sae_cache_hit"].astype(bool)]["trial_seconds"]
    training = trials[~trials["sae_cache_hit"].astype(bool)]["trial_seconds"]
    print()
    print("| N | independent runs (s) | one sweep (s) | sweep / independent |")
    print("|---|---|---|---|")
    print(f"| {args.trials} | {independent:.1f} | {shared:.1f} | {shared / independent:.2f} |")
    print()
    print("| training trials | mean training trial (s) | cache-hit trials | mean cache-hit trial (s) | hit/training |")
    print("|---|---|---|---|---|")
    print(
        f"| {len(training)} | {training.mean():.2f} | {len(hits)} | {hits.mean():.2f} | "
        f"{hits.mean() / training.mean():.3f} |"
    )


if __name__ == "__main__":
    main()
