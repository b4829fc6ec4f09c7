"""Tune's experiment state, kept restorable whenever the sweep's driver dies.

Tune saves its state (`experiment_state-*.json`: the trials; `search_gen_state-*.json`
and `searcher-state-*.pkl`: the search algorithm) into a local staging dir and uploads
that dir to the experiment dir in a background thread. Two things go wrong when the
driver is killed:

- Tune rewrites the staging files in place while the previous upload may still be
  reading them, so an upload can carry a torn or mixed state;
- a kill in the middle of an upload leaves some state files from one save and some from
  the one before (a trial the searcher counted that the trial list lacks, or the reverse).

`keep_restorable_snapshots` makes Tune wait for the running upload before saving again
and, once an upload has finished, stores the state it carried as one file
(`vs2ray-tune-state.tar`, written whole). `prepare_resume` puts that state back before
`Tuner.restore` reads it, and sets aside (under `orphaned/`) state files and trial dirs
that came after it.
"""

from __future__ import annotations

import fnmatch
import functools
import io
import json
import logging
import tarfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from vs2ray.files import read_bytes, storage_filesystem
from vs2ray.results import TRIAL_DIR_PREFIX, trial_dir_name

logger = logging.getLogger(__name__)

STATE_PATTERNS = ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl")
SNAPSHOT_FILE = "vs2ray-tune-state.tar"
ORPHANED_DIR = "orphaned"


def is_state_file(name: str) -> bool:
    """Whether a file name is one of Tune's experiment-state files."""
    return any(fnmatch.fnmatch(name, pattern) for pattern in STATE_PATTERNS)


# ---------------------------------------------------------------- while the sweep runs


def snapshot_bytes(staging: Path) -> bytes | None:
    """Tune's state files in `staging` as one uncompressed tar (None when there are none)."""
    files = sorted(path for path in staging.iterdir() if path.is_file() and is_state_file(path.name))
    if not files:
        return None
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in files:
            data = path.read_bytes()
            info = tarfile.TarInfo(path.name)
            info.size, info.mtime = len(data), int(path.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _finish_upload(storage: Any, snapshot: bool) -> None:
    """Wait for Tune's running upload; when it carried a save (`snapshot`) and succeeded, store that save whole."""
    try:
        storage.syncer.wait()
    except Exception as error:  # Tune logs its own upload failures only when it waits itself
        logger.warning("uploading the experiment state to %s failed: %s", storage.experiment_fs_path, error)
        return
    data = snapshot_bytes(Path(storage.experiment_driver_staging_path)) if snapshot else None
    if data is not None:
        with storage.storage_filesystem.open_output_stream(f"{storage.experiment_fs_path}/{SNAPSHOT_FILE}") as out:
            out.write(data)


def keep_restorable_snapshots() -> None:
    """Patch Tune's experiment-state saver in this (driver) process; calling it again does nothing.

    Each save first waits for the previous upload, so an upload reads files no one is
    writing, and then stores what that upload carried as SNAPSHOT_FILE. A save Tune
    waits for itself (the last one of a sweep) is stored right away.
    """
    try:  # a private Tune class (Ray 2.60); a Ray without it runs the sweep as Tune alone would
        from ray.tune.execution.experiment_state import _ExperimentCheckpointManager as Manager

        original = Manager.sync_up_experiment_state
    except (ImportError, AttributeError) as error:
        logger.warning("this Ray has no %s; a killed sweep may not resume cleanly", error)
        return
    if getattr(original, "vs2ray_snapshots", False):
        return

    @functools.wraps(original)
    def sync_up_experiment_state(self: Any, save_fn: Any, force: bool = False, wait: bool = False) -> None:
        def save_after_upload() -> None:
            _finish_upload(self._storage, snapshot=getattr(self, "_vs2ray_uploading_save", False))
            save_fn()
            self._vs2ray_uploading_save = True  # Tune uploads right after it saves

        original(self, save_after_upload, force=force, wait=wait)
        if wait and getattr(self, "_vs2ray_uploading_save", False):
            _finish_upload(self._storage, snapshot=True)
            self._vs2ray_uploading_save = False

    sync_up_experiment_state.vs2ray_snapshots = True  # type: ignore[attr-defined]
    Manager.sync_up_experiment_state = sync_up_experiment_state  # type: ignore[method-assign]  # the patch itself


# ---------------------------------------------------------------- before --resume


def _set_aside(fs: Any, where: str, name: str) -> None:
    """Move `where/name` to `where/orphaned/name` (copy + delete where the filesystem cannot move dirs)."""
    source, target = f"{where}/{name}", f"{where}/{ORPHANED_DIR}/{name}"
    fs.create_dir(f"{where}/{ORPHANED_DIR}", recursive=True)
    try:
        fs.move(source, target)
    except (OSError, NotImplementedError):  # object stores move files, not directories
        pafs.copy_files(source, target, source_filesystem=fs, destination_filesystem=fs)
        if fs.get_file_info(source).type == pafs.FileType.Directory:
            fs.delete_dir(source)
        else:
            fs.delete_file(source)


def _restore_snapshot(experiment: str, data: bytes) -> tuple[list[str], list[str]]:
    """Write the snapshot's state files over the experiment dir; returns (their names, those that differed)."""
    fs, where = storage_filesystem(experiment)
    names, changed = [], []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            if member.isfile() and "/" not in member.name and is_state_file(member.name):
                content = tar.extractfile(member).read()  # type: ignore[union-attr]
                names.append(member.name)
                if read_bytes(f"{experiment}/{member.name}") != content:
                    with fs.open_output_stream(f"{where}/{member.name}") as out:
                        out.write(content)
                    changed.append(member.name)
    return names, changed


def _newest_state(names: list[str]) -> str | None:
    sessions = [name for name in names if fnmatch.fnmatch(name, STATE_PATTERNS[0])]
    return max(sessions) if sessions else None  # Tune's own choice: the latest session's timestamp


def _known_trial_ids(state: dict[str, Any]) -> set[str] | None:
    """Trial ids in a parsed experiment_state file; None when its layout is not the one expected."""
    try:
        return {json.loads(trial)["trial_id"] for trial, _ in state["trial_data"]}
    except (KeyError, TypeError, ValueError):
        return None


class DamagedState(Exception):
    """The experiment's saved Tune state cannot be restored."""


def prepare_resume(experiment: str) -> list[str]:
    """Make `experiment`'s saved Tune state whole and consistent before Tuner.restore; returns what it changed.

    The last uploaded state (SNAPSHOT_FILE) is written back; state files that are not
    in it (from a save whose upload was cut short) and trial dirs the restored trial
    list does not know are moved to `orphaned/`. Raises DamagedState when the newest
    experiment_state is not whole JSON (an experiment written without snapshots).
    """
    fs, where = storage_filesystem(experiment)
    changes = []
    snapshot = read_bytes(f"{experiment}/{SNAPSHOT_FILE}")
    restored, changed = _restore_snapshot(experiment, snapshot) if snapshot else ([], [])
    if changed:
        changes.append(f"put back the last whole upload of {', '.join(changed)}")
    entries = fs.get_file_info(pafs.FileSelector(where, allow_not_found=True))
    files = [entry.base_name for entry in entries if entry.type == pafs.FileType.File]
    for name in files:
        if restored and is_state_file(name) and name not in restored:
            _set_aside(fs, where, name)
            changes.append(f"set aside {name}: saved after the last whole upload")
    newest = _newest_state(restored or files)
    if newest is None:
        return changes  # Tune's restore names a missing state itself
    try:
        state = json.loads(read_bytes(f"{experiment}/{newest}") or b"")
    except ValueError:
        raise DamagedState(f"{experiment}/{newest} is cut short (its driver was killed while writing it)") from None
    known = _known_trial_ids(state)
    if known is None:
        logger.warning("%s has an unexpected layout; trial dirs are left as they are", newest)
        return changes
    known_dirs = {trial_dir_name(trial_id) for trial_id in known}
    for entry in entries:
        name = entry.base_name
        if entry.type == pafs.FileType.Directory and name.startswith(TRIAL_DIR_PREFIX) and name not in known_dirs:
            _set_aside(fs, where, name)
            changes.append(f"set aside {name}: started after the last whole upload; Tune starts a new trial instead")
    return changes
