"""Local paths and URIs alike: atomic local storage for Tune's files."""

from __future__ import annotations


def test_a_file_written_to_local_storage_replaces_the_old_one_only_when_complete(tmp_path):
    import pyarrow.fs as pafs

    from vs2ray.files import storage_filesystem

    fs, root = storage_filesystem(tmp_path)
    state = tmp_path / "experiment_state-x.json"
    state.write_text('{"trials": 1}')
    stream = fs.open_output_stream(f"{root}/{state.name}")
    stream.write(b'{"trials": 2, "cut here')  # a driver killed now has written part of the new state
    stream.flush()
    assert state.read_text() == '{"trials": 1}'
    stream.close()
    assert state.read_text() == '{"trials": 2, "cut here'

    # Tune uploads with pyarrow's copy_files; it goes through the same streams
    staging = tmp_path / "staging"
    (staging / "trial_a").mkdir(parents=True)
    (staging / "trial_a" / "result.json").write_text("{}\n" * 1000)
    pafs.copy_files(str(staging), f"{root}/experiment", destination_filesystem=fs)
    assert (tmp_path / "experiment" / "trial_a" / "result.json").read_text() == "{}\n" * 1000
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]  # atomic_write_bytes' temp files
    assert leftovers == []
