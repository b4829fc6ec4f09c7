"""What early stopping buys: the same sweep with FIFO and with ASHA, same space, seed and trial count.

    python benchmarks/early_stopping.py                      # sweeps/quickstart_asha.yaml, 8 trials each
    python benchmarks/early_stopping.py --samples 12 --set search.max_concurrent_trials=1

Both sweeps read the same activation stores (extracted once) but each has its own SAE
cache, so neither reuses the other's SAEs. Printed for each: trial-seconds (the sum of
every trial's seconds, stopped trials up to their stop), trials stopped early, the best
validation value of the search metric, the test top-1 of the selected trial, and the
ASHA / FIFO ratios. The cost of the intermediate results themselves (`report_seconds`
against the trial seconds of the trials that trained an SAE) is printed too.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from vs2ray.config import load_config
from vs2ray.results import STATUS_DONE, STATUS_STOPPED, load_results


def run_sweep(config: str, root: Path, scheduler: str, samples: int, overrides: list[str]) -> pd.DataFrame:
    """One sweep through the CLI (its own Ray), results loaded from its experiment dir."""
    sets = [f"storage.root={root}", f"search.scheduler={scheduler}", f"search.num_samples={samples}", *overrides]
    command = [sys.executable, "-m", "vs2ray", "sweep", "--config", config, "--name", scheduler]
    for assignment in sets:
        command += ["--set", assignment]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return load_results(root / "experiments" / scheduler)


def summarise(trials: pd.DataFrame, metric: str, mode: str, test_metric: str) -> dict[str, float]:
    """Trial-seconds, stopped count, best validation metric and the test metric of the selected trial."""
    done = trials[trials["status"] == STATUS_DONE]
    best = done.sort_values(metric, ascending=mode == "min").iloc[0]
    trained = trials[trials["sae_cache_hit"] == False] if "sae_cache_hit" in trials else trials  # noqa: E712
    return {
        "trial_seconds": float(trials["trial_seconds"].sum()),
        "stopped": int((trials["status"] == STATUS_STOPPED).sum()),
        "best_val": float(best[metric]),
        "test": float(best[test_metric]) if test_metric in best else float("nan"),
        "report_share": float(trained["report_seconds"].sum() / trained["trial_seconds"].sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sweeps/quickstart_asha.yaml")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    config = load_config(args.config, args.set)
    metric, mode = config.search.metrics[0], config.search.modes[0]
    test_metric = metric.replace("val_", "test_", 1)
    with tempfile.TemporaryDirectory() as tmp:
        shared = Path(tmp) / "shared"
        extract = [sys.executable, "-m", "vs2ray", "extract", "--config", args.config, "--split", "all"]
        for assignment in [*args.set, f"storage.root={shared}"]:
            extract += ["--set", assignment]
        subprocess.run(extract, check=True, stdout=subprocess.DEVNULL)
        figures = {}
        for scheduler in ("fifo", "asha"):
            root = Path(tmp) / scheduler
            root.mkdir()
            (root / "activations").symlink_to(shared / "activations")  # same stores, separate SAE caches
            trials = run_sweep(args.config, root, scheduler, args.samples, args.set)
            figures[scheduler] = summarise(trials, metric, mode, test_metric)
    print(f"{args.config}: {args.samples} trials each, metric {metric} ({mode}), seed {config.seed}")
    print(f"{'scheduler':>9} {'trial-s':>8} {'stopped':>7} {'best val':>9} {'test (sel.)':>11} {'report cost':>11}")
    for name, row in figures.items():
        print(
            f"{name:>9} {row['trial_seconds']:8.1f} {row['stopped']:7d} {100 * row['best_val']:9.2f} "
            f"{100 * row['test']:11.2f} {100 * row['report_share']:10.1f}%"
        )
    fifo, asha = figures["fifo"], figures["asha"]
    print(
        f"ASHA / FIFO: trial-seconds {asha['trial_seconds'] / fifo['trial_seconds']:.2f}x, "
        f"best val {100 * (asha['best_val'] - fifo['best_val']):+.2f} points, "
        f"selected test {100 * (asha['test'] - fifo['test']):+.2f} points"
    )


if __name__ == "__main__":
    main()
