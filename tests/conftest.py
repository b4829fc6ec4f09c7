"""Shared fixtures: a session-wide local Ray instance and the bundled world."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file written by test clusters


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (starting Ray costs 5-10 s)."""
    import ray

    # address="local": a new instance even where `ray start` left this machine a current cluster to join
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def cli_command(module: str, *args: str, assignments: Sequence[str] = ()) -> list[str]:
    """`python -m <module> <args> --set a --set b ...` with this interpreter."""
    command = [sys.executable, "-m", module, *args]
    for assignment in assignments:
        command += ["--set", assignment]
    return command


QUICKSTART = Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml"
# a quickstart shortened to seconds per trial; test_sweep's tests share its stores
SMALL_WORLD = (
    "dataset.sizes={train: 2000, test: 500}",
    "extraction.layers=[1, -1]",  # one store for every test here, the two-block sweep's included
    "extraction.tokens=all",
    "sae.steps=100",
    "sae.batch_size=512",
    "resources.cpus_per_trial=0.5",
    "retrieval.n_neighbors=20",
    "search.points_to_evaluate=[]",  # the quickstart's paper defaults lie outside these tests' spaces
)


def run_sweep(storage: Path, address: str, name: str, *assignments: str, extra: tuple[str, ...] = (), timeout=400):
    """`python -m vs2ray.sweep` of SMALL_WORLD with `assignments` on the cluster at `address`."""
    command = cli_command(
        "vs2ray.sweep",
        "--name",
        name,
        "--address",
        address,
        *extra,
        assignments=(*SMALL_WORLD, f"storage.root={storage}", *assignments),
    )
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def _json_or_none(line: str) -> dict | None:
    try:
        return json.loads(line)
    except ValueError:
        return None


def tune_bookkeeping() -> set[str]:
    """The keys Tune adds to every result (timings, ids, dates): not what vs2ray measured."""
    from ray.tune.result import AUTO_RESULT_KEYS

    return {*AUTO_RESULT_KEYS, "trial_id", "done", "should_checkpoint"}


def finished_trials(experiment: str | Path, ignore: Collection[str] | None = None) -> dict[str, dict]:
    """trial dir (relative to the experiment: trial_x, or orphaned/trial_x once a resume set it aside) -> the last
    complete result vs2ray reported, without the keys in `ignore` (default: Tune's bookkeeping); a local
    experiment dir or an s3:// one, read as the report reads it."""
    import pyarrow.fs as pafs

    ignore = tune_bookkeeping() if ignore is None else set(ignore)
    text = str(experiment)
    fs, where = pafs.FileSystem.from_uri(text) if "://" in text else (pafs.LocalFileSystem(), str(Path(text)))
    finished = {}
    for info in fs.get_file_info(pafs.FileSelector(where, allow_not_found=True, recursive=True)):
        if info.base_name != "result.json":
            continue
        with fs.open_input_stream(info.path) as stream:
            lines = [_json_or_none(line) for line in stream.read().decode().splitlines() if line.strip()]
        complete = [line for line in lines if line and line.get("vs2ray_complete")]  # a kill can cut a line
        if complete:
            trial = info.path.removeprefix(f"{where}/").removesuffix("/result.json")
            finished[trial] = {k: v for k, v in complete[-1].items() if k not in ignore}
    return finished


def kill_driver_when(command: list[str], ready: Callable[[], bool], env: dict[str, str] | None = None,
                     timeout: float = 400, poll_s: float = 0.02) -> None:  # fmt: skip
    """Start the driver `command` and SIGKILL it as soon as `ready()` holds, while it still runs."""
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not ready() and driver.poll() is None:
            assert time.monotonic() < deadline, "what the kill waits for did not happen in time"
            time.sleep(poll_s)
        assert driver.poll() is None, "the sweep ended before it could be killed"
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        driver.kill()


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


class LocalAutoscalingCluster:
    """Ray's own autoscaler (`ray.cluster_utils.AutoscalingCluster`'s fake multi-node provider) with the
    node types of cluster/aws.yaml, on this machine, beside the session's Ray instance.

    `AutoscalingCluster` itself runs `ray stop --force`, which would end every Ray process here (the
    session fixture's included), and its base config file is not in the installed wheel; so this starts
    the same head (`ray start --head --autoscaling-config`, `RAY_FAKE_CLUSTER=1`) on a port of its own
    and stops only the processes that belong to that port. Every process it starts sees
    `VS2RAY_FAKE_GPUS=1`: the GPU resources are fake, and vs2ray is told so.
    """

    def __init__(self, head_resources: dict, worker_node_types: dict, idle_timeout_minutes: float = 5) -> None:
        import socket

        with socket.socket() as probe:
            probe.bind(("", 0))
            self.port = probe.getsockname()[1]
        self.head_resources = dict(head_resources)
        self.config = {
            "cluster_name": "vs2ray-fake",
            "max_workers": sum(node["max_workers"] for node in worker_node_types.values()),
            "provider": {
                "type": "fake_multinode",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
            },
            "available_node_types": {
                **worker_node_types,
                "ray.head.default": {"resources": self.head_resources, "node_config": {}, "max_workers": 0},
            },
            "head_node_type": "ray.head.default",
            "auth": {},
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": idle_timeout_minutes,
            "docker": {},
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            **{name: [] for name in ("initialization_commands", "setup_commands", "head_setup_commands")},
            **{name: [] for name in ("worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")},
        }
        self.address = ""

    def start(self, tmp_path: Path) -> str:
        """Start the head (no worker yet: the autoscaler adds them on demand) and return its address."""
        import ray._private.services as services

        self.address = f"{services.get_node_ip_address()}:{self.port}"
        self.config["provider"]["gcs_address"] = self.address  # where the fake nodes join (default: port 6379)
        config_file = tmp_path / "autoscaling.json"
        config_file.write_text(json.dumps(self.config))
        ray_bin = Path(sys.executable).with_name("ray")
        command = [str(ray_bin), "start", "--head", f"--port={self.port}", f"--autoscaling-config={config_file}"]
        cpus, gpus = self.head_resources.get("CPU", 0), self.head_resources.get("GPU", 0)
        command += [f"--num-cpus={cpus}", f"--num-gpus={gpus}", "--include-dashboard=false", "--disable-usage-stats"]
        env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1", "VS2RAY_FAKE_GPUS": "1"}
        env["PATH"] = f"{ray_bin.parent}{os.pathsep}{env.get('PATH', '')}"
        subprocess.run(command, check=True, env=env, capture_output=True, timeout=120)
        return self.address

    def shutdown(self) -> None:
        """Stop every process of this cluster (those whose command line names its port), and nothing else."""
        import psutil

        mine = []
        for process in psutil.process_iter(["cmdline"]):
            words = process.info["cmdline"] or []
            if any(word.endswith(f":{self.port}") or word.endswith(f"_port={self.port}") for word in words):
                mine.append(process)
        for process in mine:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        _, alive = psutil.wait_procs(mine, timeout=10)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        # `ray start` named this head the machine's current cluster, which a later plain `ray.init()` would join
        from ray._common.utils import get_ray_address_file

        current = Path(get_ray_address_file(None))
        if current.is_file() and current.read_text().strip() == self.address:
            current.unlink()
