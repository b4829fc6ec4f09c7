"""Faults a cluster meets (issue 32), injected for real and checked row by row: part files truncated, changed in
place or gone after the store was written; a disk that fills up while it is written; two drivers on one store;
S3 experiment storage with a killed driver, and an S3 endpoint that cannot be reached."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_command, finished_trials, kill_driver_when, tune_bookkeeping

from vs2ray.config import load_config
from vs2ray.extract import extract
from vs2ray.results import load_results
from vs2ray.store import StoreDamaged, load_activations, read_manifest

pytestmark = pytest.mark.faults  # `make faults` (CI runs it after `make test`): about six minutes on 2 cores

ROWS = 600  # 5 chunks of 128


def test_damaged_part_files_are_named_by_readers_and_extract_redoes_exactly_their_chunks(tmp_path: Path, ray_session):
    config = load_config(None, [f"storage.root={tmp_path}", f"dataset.sizes.test={ROWS}", "extraction.batch_size=128"])
    store = extract(config, "test").store_dir
    before = load_activations(store)
    embedding, cls = np.array(before["embedding"]), np.array(before["cls_3"])
    parts = sorted(store.glob("part-*.parquet"))
    assert len(parts) == 5 and set(read_manifest(store)["parts"]) == {p.name for p in parts}

    truncated, changed, gone = parts[0], parts[2], parts[4]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])  # a partial copy
    data = bytearray(changed.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])  # a bad disk: same size
    changed.write_bytes(bytes(data))
    gone.unlink()
    untouched = {p.name: p.stat().st_mtime_ns for p in (parts[1], parts[3])}

    with pytest.raises(StoreDamaged) as raised:  # the arrays no longer match the parts: rebuilding them refuses
        load_activations(store)
    assert set(raised.value.damaged) == {truncated.name, changed.name, gone.name}
    message = str(raised.value)
    assert "bytes" in raised.value.damaged[truncated.name] and "SHA-256" in raised.value.damaged[changed.name]
    assert raised.value.damaged[gone.name] == "missing" and "re-extracts exactly the damaged chunks" in message

    lines: list[str] = []
    again = extract(config, "test", lines.append)
    assert not again.reused and again.rows == ROWS
    assert any("re-extracting the chunks of 3 damaged part file(s)" in line for line in lines), lines
    assert {p.name: p.stat().st_mtime_ns for p in (parts[1], parts[3])} == untouched  # only the damaged redone
    after = load_activations(store)
    np.testing.assert_array_equal(after.ids, np.arange(ROWS))
    np.testing.assert_allclose(after["embedding"], embedding, atol=1e-6)
    np.testing.assert_allclose(after["cls_3"], cls, atol=1e-6)
    assert extract(config, "test").reused  # whole again


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of `size` mounted at `path` (root only: where mount is refused, the test cannot inject the fault)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here to fill up: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_stops_extraction_with_the_path_and_cause_and_a_rerun_with_space_completes(tmp_path, ray_session):
    rows = 1200
    assignments = [f"dataset.sizes.test={rows}", "extraction.batch_size=60"]
    address = ray_session.get_runtime_context().gcs_address
    with small_disk(tmp_path / "disk", "96k") as root:  # the ~0.9 MB store's head, classifier and a few parts
        command = cli_command("vs2ray", "extract", "--split", "test", "--address", address,
                              assignments=[f"storage.root={root}", *assignments])  # fmt: skip
        full = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert full.returncode == 1, full.stderr[-2000:]
        last = full.stderr.strip().splitlines()[-1]
        assert last.startswith("error: No space left on device") and str(root) in last, last
        assert "free space there" in last
        store = next((root / "activations").iterdir())
        assert read_manifest(store)["complete"] is False
        written = sorted(p.name for p in store.glob("part-*.parquet"))
        assert len(written) < rows // 60 and not list(store.glob(".*.tmp"))  # no half-written part left behind
        subprocess.run(["mount", "-o", "remount,size=64m", str(root)], check=True)
        again = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        acts = load_activations(store)
        np.testing.assert_array_equal(acts.ids, np.arange(rows))
        assert read_manifest(store)["complete"] is True


def test_a_full_disk_stops_sae_saving_with_the_path_and_cause_and_a_rerun_with_space_saves_it(tmp_path, ray_session):
    assignments = ["dataset.sizes={train: 600, test: 100}", "sae.expansion=16", "sae.steps=20", "sae.batch_size=128"]
    with small_disk(tmp_path / "disk", "8m") as root:
        config = load_config(None, [f"storage.root={root}", *assignments])
        extract(config, "train")  # the store fits; then the disk is shrunk to leave less than the SAE's 2 MB
        used_kib = int(subprocess.run(["du", "-sk", str(root)], capture_output=True, text=True).stdout.split()[0])
        subprocess.run(["mount", "-o", f"remount,size={used_kib + 512}k", str(root)], check=True)
        command = cli_command("vs2ray", "train-sae", assignments=[f"storage.root={root}", *assignments])
        full = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert full.returncode == 1, full.stderr[-2000:]
        last = full.stderr.strip().splitlines()[-1]
        assert last.startswith("error: No space left on device writing") and f"{root}/saes/" in last, last
        sae_dirs = [path for path in (root / "saes").iterdir() if path.is_dir()]
        assert len(sae_dirs) == 1 and not (sae_dirs[0] / "metrics.json").exists()  # not marked complete
        assert not list(sae_dirs[0].glob(".*.tmp"))  # no half-written file left behind
        subprocess.run(["mount", "-o", "remount,size=64m", str(root)], check=True)
        again = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0 and f"saved {sae_dirs[0]}" in again.stdout, again.stderr[-2000:]
        again = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert f"reused {sae_dirs[0]}" in again.stdout  # complete now: loaded, not trained


def test_two_drivers_extracting_one_store_at_once_write_it_once_and_the_second_reuses_it(tmp_path, ray_session):
    rows, per_chunk = 3600, 60
    assignments = [f"storage.root={tmp_path}", f"dataset.sizes.test={rows}", f"extraction.batch_size={per_chunk}"]
    address = ray_session.get_runtime_context().gcs_address
    command = cli_command("vs2ray", "extract", "--split", "test", "--address", address, assignments=assignments)
    run = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    # started together: each takes seconds to start, the extraction longer, so one waits while the other writes
    drivers = [subprocess.Popen(command, **run) for _ in range(2)]
    outputs = [driver.communicate(timeout=300)[0] for driver in drivers]
    assert [driver.returncode for driver in drivers] == [0, 0], [out[-2000:] for out in outputs]
    reused = [i for i, out in enumerate(outputs) if "(reused)" in out]
    assert len(reused) == 1, [out[-1500:] for out in outputs]
    waited, wrote = outputs[reused[0]], drivers[1 - reused[0]]
    assert "waiting for the extraction of" in waited and f"pid {wrote.pid}" in waited, waited[-2000:]
    store = next((tmp_path / "activations").iterdir())
    assert len(list(store.glob("part-*.parquet"))) == rows // per_chunk
    np.testing.assert_array_equal(load_activations(store).ids, np.arange(rows))  # every row once


# ---------------------------------------------------------------- S3 experiment storage


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    """A local S3-compatible server (moto's server mode) with a bucket `vs2ray`; the environment that points
    pyarrow, Ray Tune and vs2ray at it, as AWS_ENDPOINT_URL points them at MinIO or any S3-compatible store."""
    import pyarrow.fs as pafs

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto's server did not start"
                time.sleep(0.2)
        bucket = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing",
                                   secret_key="testing", region="us-east-1", allow_bucket_creation=True)  # fmt: skip
        bucket.create_dir("vs2ray")
        yield env
    finally:
        server.terminate()
        server.wait(30)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


S3_SWEEP = (
    "dataset.sizes={train: 2000, test: 500}",
    "sae.steps=200",
    "sae.batch_size=512",
    "sae.k={choice: [8, 16, 32]}",
    "sae.expansion={choice: [2, 4]}",
    "steering.methods=[zero_shot, vs2]",
    "resources.cpus_per_trial=0.5",
    "search.points_to_evaluate=[]",
    "search.num_samples=6",
    "search.max_concurrent_trials=1",
)


def finished_metrics(experiment: str | Path) -> dict[str, dict]:
    """`finished_trials` without what differs when a trial is re-run from its checkpoint and re-reports its
    result (a driver or a node lost after its report, before it returned): Tune's bookkeeping and checkpoint
    dir name change, vs2ray's metrics (its timings too) do not."""
    return finished_trials(experiment, ignore={*tune_bookkeeping(), "checkpoint_dir_name"})


def test_a_sweep_on_s3_survives_a_killed_driver_and_its_report_reads_it_back(tmp_path, s3_env, monkeypatch):
    """The cluster's storage: Tune's experiment on s3:// (VS2RAY_EXPERIMENTS), the stores on a local disk. Each
    driver starts its own Ray, as a restarted head node would."""
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    env = {**os.environ, "VS2RAY_EXPERIMENTS": "s3://vs2ray/experiments", "RAY_AUTH_MODE": "disabled"}
    experiment = "s3://vs2ray/experiments/spot"
    command = cli_command("vs2ray.sweep", "--name", "spot", assignments=(f"storage.root={tmp_path}", *S3_SWEEP))
    results = functools.partial(finished_metrics, experiment)
    kill_driver_when(command, lambda: len(results()) >= 2, env=env, poll_s=0.1)
    before = results()
    assert 2 <= len(before) < 6

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {experiment}" in resumed.stdout
    trials = load_results(experiment)
    assert len(trials) == 6 and trials["trial_id"].is_unique and (trials["status"] == "TERMINATED").all()
    after = results()
    assert sorted(name for name in after if not name.startswith("orphaned/")) == sorted("trial_" + trials["trial_id"])
    resume_lines = [line for line in resumed.stdout.splitlines() if line.startswith("resume:")]
    for trial, metrics in before.items():
        # kept, not run again (the same metrics down to the timings), or, when it finished after Tune's last
        # upload of its state (Tune's checkpoint period on object stores), set aside whole and run again
        kept = after.get(trial) == metrics
        set_aside = after.get(f"orphaned/{trial}") == metrics and f"resume: set aside {trial}" in resumed.stdout
        assert kept or set_aside, (trial, sorted(before), sorted(after), resume_lines)

    report = subprocess.run(cli_command("vs2ray", "report", experiment, "--out", str(tmp_path / "report")),
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    text = (tmp_path / "report" / "report.md").read_text()
    assert f"Experiment: `{experiment}`" in text and "Trials: 6 terminated" in text, text[:1500]
    assert "| VS2 |" in text and (tmp_path / "report" / "heatmap_gamma_lambda.png").stat().st_size > 1000


@contextlib.contextmanager
def silent_endpoint() -> Iterator[int]:
    """A port that accepts connections and never answers (an endpoint behind a dead proxy)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


@pytest.mark.parametrize("endpoint", ["refused", "silent"])
def test_an_unreachable_s3_endpoint_fails_fast_naming_the_uri(tmp_path, s3_env, endpoint):
    with contextlib.ExitStack() as stack:
        port = stack.enter_context(silent_endpoint()) if endpoint == "silent" else _free_port()
        env = {**os.environ, **s3_env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "RAY_AUTH_MODE": "disabled",
               "VS2RAY_EXPERIMENTS": "s3://vs2ray/experiments"}  # fmt: skip
        for command in (
            cli_command("vs2ray.sweep", "--name", "nowhere", assignments=(f"storage.root={tmp_path}",)),
            cli_command("vs2ray", "report", "s3://vs2ray/experiments/nowhere", "--out", str(tmp_path / "report")),
        ):
            started = time.monotonic()
            failed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
            seconds = time.monotonic() - started
            assert failed.returncode == 1, failed.stderr[-2000:]
            last = failed.stderr.strip().splitlines()[-1]
            assert last.startswith("error: ") and "s3://vs2ray/experiments" in last and "AWS_ENDPOINT_URL" in last
            assert ("no answer" in last or "timeout" in last.lower()) if endpoint == "silent" else "connect" in last
            assert seconds < 45, f"{seconds:.0f} s to fail"  # the SDK's defaults took ~100 s on a silent endpoint
            assert "Traceback" not in failed.stderr
    assert not (tmp_path / "activations").exists()  # failed before any work


# ---------------------------------------------------------------- actors killed mid-work


def _pids_of(title: str) -> set[int]:
    """Processes whose command line (Ray's process title for an actor) contains `title`."""
    pids = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if title in cmdline.read_bytes().decode(errors="replace"):
                pids.add(int(cmdline.parent.name))
    return pids


def test_an_encoder_actor_killed_mid_extraction_is_restarted_and_every_row_written_once(tmp_path, ray_session):
    rows, per_chunk = 3600, 60
    assignments = [f"storage.root={tmp_path}", f"dataset.sizes.test={rows}", f"extraction.batch_size={per_chunk}"]
    address = ray_session.get_runtime_context().gcs_address
    command = cli_command("vs2ray", "extract", "--split", "test", "--address", address, assignments=assignments)
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        while not killed and driver.poll() is None and time.monotonic() < deadline:
            parts = list(tmp_path.glob("activations/*/part-*.parquet"))
            if len(parts) >= 3:  # the actor is warm and has more chunks in flight
                killed = _pids_of("MapBatches(ChunkEncoder)")
                for pid in killed:
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        output = driver.communicate(timeout=300)[0]
    finally:
        driver.kill()
    assert killed, "no encoder actor was found to kill"
    assert driver.returncode == 0, output[-3000:]
    store = next((tmp_path / "activations").iterdir())
    manifest = read_manifest(store)
    assert manifest["complete"] is True and manifest["rows"] == rows
    assert len(list(store.glob("part-*.parquet"))) == rows // per_chunk
    np.testing.assert_array_equal(load_activations(store).ids, np.arange(rows))  # every row once
    pids = {worker["pid"] for worker in manifest["workers"]}
    assert pids & killed and pids - killed, (pids, killed)  # chunks written before the kill, and by its restart


def test_a_trial_worker_killed_mid_sae_training_is_retried_and_the_sae_cache_holds_no_partial_sae(
    tmp_path, ray_session
):
    import queue
    import threading

    from vs2ray.sae import SparseAutoencoder

    address = ray_session.get_runtime_context().gcs_address
    assignments = (  # two trials of one SAE key, one at a time: the first trains it, the second loads it
        "dataset.sizes={train: 2000, test: 500}",
        "sae.k=16",
        "sae.expansion=4",
        "sae.steps=1500",
        "sae.batch_size=256",
        "steering.methods=[zero_shot, vs2]",
        "resources.cpus_per_trial=0.5",
        "search.points_to_evaluate=[]",
        "search.num_samples=2",
        "search.max_concurrent_trials=1",
        "search.max_failures=1",
    )
    command = cli_command("vs2ray.sweep", "--name", "retried", "--address", address,
                          assignments=(f"storage.root={tmp_path}", *assignments))  # fmt: skip
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in driver.stdout], daemon=True).start()  # type: ignore[union-attr]
    output, killed = [], set()
    try:
        deadline = time.monotonic() + 400
        while not killed and driver.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                output.append(lines.get(timeout=0.1))
            if any("step " in line and "/1500" in line for line in output):  # the SAE is training
                killed = _pids_of("ImplicitFunc")
                for pid in killed:
                    os.kill(pid, signal.SIGKILL)
        assert killed, "no training trial was found to kill:\n" + "".join(output[-30:])
        driver.wait(400)
    finally:
        driver.kill()
    time.sleep(0.5)
    while not lines.empty():
        output.append(lines.get())
    text = "".join(output)
    assert driver.returncode == 0, text[-3000:]

    trials = load_results(tmp_path / "experiments" / "retried")
    assert len(trials) == 2 and trials["trial_id"].is_unique and (trials["status"] == "TERMINATED").all()
    for trial_dir in trials["trial_dir"]:  # each trial's result once
        results = [json.loads(line) for line in Path(trial_dir, "result.json").read_text().splitlines() if line]
        assert sum(bool(result.get("vs2ray_complete")) for result in results) == 1
    assert sorted(trials["sae_cache_hit"]) == [False, True]  # the retry trained the SAE; the other trial loaded it
    saes = [path for path in (tmp_path / "saes").iterdir() if path.is_dir()]
    assert len(saes) == 1 and (saes[0] / "metrics.json").is_file()  # no partial SAE left by the killed worker
    weights = SparseAutoencoder.load(saes[0]).sae.W_dec
    assert weights.shape[0] == 4 * weights.shape[1] and torch.isfinite(weights).all()
    assert [Path(d, "error.txt").is_file() for d in trials["trial_dir"]].count(True) == 1, text[-3000:]  # the retry


# ---------------------------------------------------------------- a node lost mid-sweep

CLUSTER_HELPER = """
import json, sys
from ray.cluster_utils import Cluster

# a head with no CPU: every task, trial and FAISS shard runs on a worker node
cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "include_dashboard": False})
nodes = {}
print(json.dumps({"address": cluster.address}), flush=True)
for line in sys.stdin:
    command, name = line.split()
    if command == "add":
        nodes[name] = cluster.add_node(num_cpus=2)
    elif command == "remove":  # as a pre-empted spot instance goes: its processes killed, nothing graceful
        cluster.remove_node(nodes.pop(name), allow_graceful=False)
    print(json.dumps({command: name}), flush=True)
cluster.shutdown()
"""


class HelperCluster:
    """A `ray.cluster_utils.Cluster` in a process of its own (its shutdown resets Ray state that the session's
    instance in this process still uses), told over stdin to add and remove worker nodes."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", CLUSTER_HELPER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)  # fmt: skip
        self.address = self._answer()["address"]

    def _answer(self) -> dict:
        line = self.process.stdout.readline()  # type: ignore[union-attr]
        assert line, "the cluster helper died"
        return json.loads(line)

    def tell(self, command: str, node: str) -> None:
        self.process.stdin.write(f"{command} {node}\n")  # type: ignore[union-attr]
        self.process.stdin.flush()  # type: ignore[union-attr]
        assert self._answer() == {command: node}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.process.stdin.close()  # type: ignore[union-attr]
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def test_a_node_lost_mid_sweep_loses_no_finished_trial_and_its_trials_and_faiss_shards_restart(tmp_path):
    assignments = (
        "dataset.sizes={train: 2000, test: 500}",
        "sae.k={choice: [8, 16, 32]}",
        "sae.steps=600",
        "sae.batch_size=256",
        "steering.methods=[zero_shot, vs2, vs2pp]",
        "retrieval.n_neighbors=20",
        "resources.cpus_per_trial=0.5",
        "search.points_to_evaluate=[]",
        "search.num_samples=4",
        "search.max_concurrent_trials=2",
        "search.max_failures=2",
    )
    experiment = tmp_path / "experiments" / "preempted"
    results = functools.partial(finished_metrics, experiment)
    cluster = HelperCluster()
    try:
        cluster.tell("add", "a")
        command = cli_command("vs2ray.sweep", "--name", "preempted", "--address", cluster.address,
                              assignments=(f"storage.root={tmp_path}", *assignments))  # fmt: skip
        driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 400
            while not results() and driver.poll() is None:
                assert time.monotonic() < deadline, "no trial finished in time"
                time.sleep(0.1)
            assert driver.poll() is None, "the sweep ended before its node could be lost"
            cluster.tell("remove", "a")  # two trials and the FAISS shard were running there: no CPU elsewhere
            before = results()
            cluster.tell("add", "b")  # the autoscaler's replacement
            output = driver.communicate(timeout=400)[0]
        finally:
            driver.kill()
    finally:
        cluster.close()
    assert driver.returncode == 0, output[-3000:]
    trials = load_results(experiment)
    assert len(trials) == 4 and trials["trial_id"].is_unique and (trials["status"] == "TERMINATED").all()
    after = results()
    for name, result in before.items():  # 0 finished trials lost or computed again
        assert after[name] == result
    retried = [Path(d, "error.txt").is_file() for d in trials["trial_dir"]].count(True)
    assert 1 <= retried <= 2, output[-3000:]  # those running on the lost node (two at once), retried on the new one
    shard_pids = set(re.findall(r"IndexShard pid=(\d+)\).*FAISS shard:", output))
    assert len(shard_pids) >= 2, output[-3000:]  # the shard came back (max_restarts) on the new node
    assert trials["test_top1_vs2pp"].notna().all()  # VS2++ queried it in every trial


# ---------------------------------------------------------------- two trials, one SAE key, two nodes


def test_two_trials_of_one_sae_key_on_two_nodes_train_it_once_and_the_other_loads_it(tmp_path):
    from vs2ray.sae import SparseAutoencoder

    assignments = (  # two trials with every parameter fixed: one SAE key
        "dataset.sizes={train: 2000, test: 500}",
        "sae.k=16",
        "sae.steps=3000",
        "sae.batch_size=256",
        "steering.methods=[zero_shot, vs2]",
        "resources.cpus_per_trial=2",
        "search.points_to_evaluate=[]",
        "search.num_samples=2",
        "search.max_concurrent_trials=2",
    )
    experiment = tmp_path / "experiments" / "shared"
    cluster = HelperCluster()
    try:
        # two nodes of two CPUs, a head with none and two CPUs a trial: two trials that run at once run on
        # different nodes, which share this machine's file system as a cluster's nodes share EFS
        cluster.tell("add", "a")
        cluster.tell("add", "b")
        command = cli_command("vs2ray.sweep", "--name", "shared", "--address", cluster.address,
                              assignments=(f"storage.root={tmp_path}", *assignments))  # fmt: skip
        run = subprocess.run(command, capture_output=True, text=True, timeout=500)
    finally:
        cluster.close()
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    trials = load_results(experiment)
    assert len(trials) == 2 and (trials["status"] == "TERMINATED").all()
    assert sorted(trials["sae_cache_hit"]) == [False, True], output[-3000:]  # trained once, loaded once
    saes = [path for path in (tmp_path / "saes").iterdir() if path.is_dir()]
    assert len(saes) == 1 and (saes[0] / "metrics.json").is_file()
    waited = re.findall(rf"waiting for SAE {saes[0].name} being trained \(pid (\d+) on ", output)
    assert len(waited) == 1, output[-3000:]  # the trials overlapped: the second waited for the first's SAE
    trainer = trials.loc[~trials["sae_cache_hit"].astype(bool), "pid"].item()
    assert int(waited[0]) == trainer
    loaded = SparseAutoencoder.load(saes[0]).metrics
    for _, trial in trials.iterrows():  # both report the one SAE's metrics
        assert trial["val_fvu"] == pytest.approx(loaded["val_fvu"], abs=1e-6)
