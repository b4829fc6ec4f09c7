"""Shared fixtures: a session-wide local Ray instance and the bundled world."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

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
