"""Shared fixtures: a session-wide local Ray instance and the bundled world."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file written by test clusters


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (starting Ray costs 5-10 s)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def cli_command(module: str, *args: str, assignments: Sequence[str] = ()) -> list[str]:
    """`python -m <module> <args> --set a --set b ...` with this interpreter."""
    command = [sys.executable, "-m", module, *args]
    for assignment in assignments:
        command += ["--set", assignment]
    return command


def train_with_three_seeds(script: Path, tmp_path: Path, *extra: str) -> tuple[dict[str, float], list[dict]]:
    """Run a bundled-world training script (3 steps on 256 images) with seeds 0, 0 and 1.

    Returns the first run's closing JSON line and the three runs' fp16 tensors, after checking what
    both trainers promise: the same seed gives the same weights, another seed other weights, all fp16.
    """
    from safetensors.torch import load_file

    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):  # side by side: most of each run is start-up
        out = tmp_path / f"{name}.safetensors"
        command = [sys.executable, str(script), "--out", str(out), "--steps", "3", "--pool-size", "256"]
        command += ["--batch-size", "32", "--seed", str(seed), *extra]
        runs.append((out, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    outputs, scores = [], None
    for out, process in runs:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        scores = scores or json.loads(stdout.strip().splitlines()[-1])
        outputs.append(load_file(out))
    a, b, c = outputs
    assert a.keys() == b.keys() and all(t.dtype.is_floating_point and t.itemsize == 2 for t in a.values())
    assert all(a[name].equal(b[name]) for name in a)
    assert not all(a[name].equal(c[name]) for name in a)
    return scores, outputs
