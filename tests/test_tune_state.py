"""Tune's experiment state stays restorable: uploads never overlap saves, and --resume puts back the last whole one."""

from __future__ import annotations

import json
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs

from vs2ray.files import AtomicLocalFiles
from vs2ray.results import load_results
from vs2ray.tune_state import SNAPSHOT_FILE, keep_restorable_snapshots, prepare_resume, snapshot_bytes

SESSION = "2026-11-22_08-50-53"


def experiment_state(*trial_ids: str) -> str:
    """An experiment_state file in Tune's layout (each trial a JSON string), reduced to what vs2ray reads."""
    return json.dumps({"trial_data": [[json.dumps({"trial_id": t}), {}] for t in trial_ids], "runner_data": {}})


def write_state(directory: Path, session: str, *trial_ids: str) -> None:
    (directory / f"experiment_state-{session}.json").write_text(experiment_state(*trial_ids))
    (directory / f"search_gen_state-{session}.json").write_bytes(f"counter={len(trial_ids)}".encode())
    (directory / f"searcher-state-{session}.pkl").write_bytes(f"trials={','.join(trial_ids)}".encode())


class SlowLocalFiles(AtomicLocalFiles):
    """Local storage whose writes take a while, so that an upload is still running when Tune saves again."""

    def open_output_stream(self, path, metadata):
        time.sleep(0.2)
        return super().open_output_stream(path, metadata)


def test_every_save_waits_for_the_previous_upload_and_the_upload_is_kept_whole(tmp_path):
    from ray.train._internal.storage import _FilesystemSyncer
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    keep_restorable_snapshots()
    keep_restorable_snapshots()  # a second call must not wrap twice
    staging, experiment = tmp_path / "staging", tmp_path / "experiment"
    staging.mkdir()
    fs = pafs.PyFileSystem(SlowLocalFiles())
    storage = SimpleNamespace(  # the parts of Tune's StorageContext the manager uses, with Tune's real syncer
        experiment_driver_staging_path=str(staging),
        experiment_fs_path=str(experiment),
        storage_filesystem=fs,
        syncer=_FilesystemSyncer(storage_filesystem=fs, sync_period=0, sync_timeout=60),
    )
    manager = _ExperimentCheckpointManager(storage=storage, checkpoint_period=0)
    found_in_storage = []

    def save(*trial_ids):
        def save_fn():
            state = experiment / f"experiment_state-{SESSION}.json"
            found_in_storage.append(json.loads(state.read_text()) if state.exists() else None)
            write_state(staging, SESSION, *trial_ids)

        return save_fn

    manager.sync_up_experiment_state(save("a"))
    manager.sync_up_experiment_state(save("a", "b"))
    manager.sync_up_experiment_state(save("a", "b", "c"), wait=True)  # Tune's last save of a sweep

    # each save found the previous one whole in storage: the upload had finished before Tune rewrote the files
    assert found_in_storage == [None, json.loads(experiment_state("a")), json.loads(experiment_state("a", "b"))]
    with tarfile.open(experiment / SNAPSHOT_FILE) as tar:
        snapshot = {member.name: tar.extractfile(member).read() for member in tar.getmembers()}
    assert snapshot == {path.name: path.read_bytes() for path in staging.iterdir()}
    assert json.loads(snapshot[f"experiment_state-{SESSION}.json"]) == json.loads(experiment_state("a", "b", "c"))


def make_trial(experiment: Path, trial_id: str) -> None:
    trial = experiment / f"trial_{trial_id}"
    trial.mkdir()
    (trial / "params.json").write_text(json.dumps({"sae.k": 8}))
    (trial / "result.json").write_text(json.dumps({"vs2ray_complete": True, "val_top1_vs2": 0.5}) + "\n")


def test_resume_puts_back_the_last_whole_upload_and_sets_aside_what_came_after(tmp_path):
    uploaded, experiment = tmp_path / "uploaded", tmp_path / "experiment"
    uploaded.mkdir()
    experiment.mkdir()
    write_state(uploaded, SESSION, "a", "b")
    (experiment / SNAPSHOT_FILE).write_bytes(snapshot_bytes(uploaded))
    # a driver killed mid-upload: the trial list is one save ahead of the searcher's counter, and
    # a resumed driver was killed again before its first whole upload (a newer session)
    write_state(experiment, SESSION, "a", "b")
    (experiment / f"experiment_state-{SESSION}.json").write_text(experiment_state("a", "b", "c"))
    newer = "2026-11-22_09-10-00"
    (experiment / f"experiment_state-{newer}.json").write_text('{"trial_data": [["{\\n  \\"stub')
    for trial_id in "abc":
        make_trial(experiment, trial_id)

    changes = prepare_resume(str(experiment))

    for path in uploaded.iterdir():
        assert (experiment / path.name).read_bytes() == path.read_bytes()
    assert not (experiment / f"experiment_state-{newer}.json").exists()
    assert (experiment / "orphaned" / f"experiment_state-{newer}.json").exists()
    assert sorted(p.name for p in experiment.glob("trial_*")) == ["trial_a", "trial_b"]
    assert (experiment / "orphaned" / "trial_c" / "result.json").exists()
    assert list(load_results(experiment)["trial_id"]) == ["a", "b"]
    assert len(changes) == 3 and f"experiment_state-{SESSION}.json" in changes[0] and "trial_c" in changes[2]
    assert prepare_resume(str(experiment)) == []  # a second resume finds nothing to change


def test_a_result_line_cut_short_by_a_killed_upload_does_not_hide_the_trial_result(tmp_path):
    make_trial(tmp_path, "a")
    with (tmp_path / "trial_a" / "result.json").open("a") as result:
        result.write('{"vs2ray_complete": true, "val_to')
    trials = load_results(tmp_path)
    assert trials.loc[0, "status"] == "TERMINATED" and trials.loc[0, "val_top1_vs2"] == 0.5


class NoMoves(AtomicLocalFiles):
    """Storage that cannot move (as object stores cannot move a directory)."""

    def move(self, src, dest):
        raise NotImplementedError("move")


def test_setting_aside_copies_and_deletes_where_storage_cannot_move(tmp_path):
    from vs2ray.tune_state import _set_aside

    make_trial(tmp_path, "c")
    (tmp_path / "experiment_state-x.json").write_text("{}")
    fs = pafs.PyFileSystem(NoMoves())
    _set_aside(fs, str(tmp_path), "trial_c")
    _set_aside(fs, str(tmp_path), "experiment_state-x.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orphaned"]
    assert (tmp_path / "orphaned" / "trial_c" / "result.json").read_text().startswith('{"vs2ray_complete"')
    assert (tmp_path / "orphaned" / "experiment_state-x.json").read_text() == "{}"
