"""Faults a store meets (issue 32), injected for real and checked row by row: part files truncated, changed in
place or gone after the store was written; a disk that fills up while it is written."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_command

from vs2ray.config import load_config
from vs2ray.extract import extract
from vs2ray.store import StoreDamaged, load_activations, read_manifest

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
