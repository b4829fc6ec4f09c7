"""vs2ray on a Ray cluster with token authentication: a real sweep and its resume with the right token, and a
clear refusal, before any work, with a wrong or missing one."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import cli_command

from vs2ray.results import load_results

SMALL_SWEEP = (
    "dataset.sizes={train: 800, test: 300}",
    "sae.k={choice: [16]}",
    "sae.expansion=2",
    "sae.steps=60",
    "sae.batch_size=512",
    "pass.w_aux={choice: [0.0]}",
    "steering.methods=[zero_shot, vs2, vs2pp]",  # vs2pp: the FAISS actors run on the cluster too
    "retrieval.space=clip",
    "retrieval.n_neighbors=10",
    "search.num_samples=2",
    "search.max_concurrent_trials=1",
    "search.points_to_evaluate=[]",
    "resources.cpus_per_trial=0.5",
)
HEAD = """
import sys, ray
ray.init(address="local", num_cpus=2, include_dashboard=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # the cluster lives until the test closes stdin
"""


def token_env(token_file: Path | None = None, token: str | None = None, mode: str = "token") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
    env["RAY_AUTH_MODE"] = mode
    if token_file is not None:
        env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    return env


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """A local Ray cluster started with RAY_AUTH_MODE=token and a token file of its own (not ~/.ray)."""
    token_file = tmp_path_factory.mktemp("auth") / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    head = subprocess.Popen(
        [sys.executable, "-c", HEAD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=token_env(token_file),
    )
    try:
        address = head.stdout.readline().strip()
        assert address, "the authenticated head did not start"
        yield address, token_file
    finally:
        head.stdin.close()  # the driver exits and takes its local cluster down
        head.wait(timeout=60)


def sweep(address: str, storage: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    command = cli_command(
        "vs2ray", "sweep", "--name", "auth", "--address", address, *extra,
        assignments=(*SMALL_SWEEP, f"storage.root={storage}"),
    )  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=500, env=env)


def test_a_sweep_runs_and_resumes_on_a_cluster_with_token_authentication(token_cluster, tmp_path):
    address, token_file = token_cluster
    first = sweep(address, tmp_path, token_env(token_file))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "retrieval: vs2ray-retrieval-" in first.stdout  # the FAISS actors ran on the authenticated cluster
    trials = load_results(tmp_path / "experiments" / "auth")
    assert list(trials["status"]) == ["TERMINATED", "TERMINATED"]
    assert trials["val_top1_vs2pp"].notna().all()
    resumed = sweep(address, tmp_path, token_env(token_file), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    assert len(load_results(tmp_path / "experiments" / "auth")) == 2  # nothing run twice


@pytest.mark.parametrize("case", ["wrong token", "authentication off"])
def test_a_refused_token_is_a_clear_error_before_any_work(token_cluster, tmp_path, case):
    address, _ = token_cluster
    env = token_env(token=secrets.token_hex(32)) if case == "wrong token" else token_env(mode="disabled")
    output = sweep(address, tmp_path, env)
    assert output.returncode == 1
    assert f"error: the Ray cluster at {address} refused this machine's authentication token" in output.stderr
    assert "Traceback" not in output.stderr
    assert not (tmp_path / "activations").exists() and not (tmp_path / "experiments" / "auth").exists()
    if case != "wrong token":
        return  # the extraction CLI shares the sweep's connection code: one refusal of it is enough
    command = cli_command("vs2ray", "extract", "--split", "test", "--address", address)
    extract = subprocess.run(
        [*command, "--set", f"storage.root={tmp_path}"], capture_output=True, text=True, timeout=200, env=env
    )
    assert extract.returncode == 1 and "refused this machine's authentication token" in extract.stderr
    assert not (tmp_path / "activations").exists()
