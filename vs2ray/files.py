"""Reading and writing experiment files whether they live on a local path or behind an `s3://` / `gs://` URI.

Everything goes through pyarrow's filesystems. `AtomicLocalFiles` is the local filesystem
Tune writes experiments through: every file is written beside its target and renamed over
it when complete, so a killed driver never leaves a cut-short file.
"""

from __future__ import annotations

import io
import threading
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from vs2ray.store import atomic_write_bytes


def is_uri(path: str | Path) -> bool:
    """Whether `path` names remote storage (`s3://...`, `gs://...`) rather than a local path."""
    return "://" in str(path)


class _ReplaceOnClose:
    """A file stream kept in memory and written to its path atomically when closed (store.atomic_write_bytes)."""

    def __init__(self, path: str):
        self._path, self._buffer = Path(path), io.BytesIO()

    def write(self, data: Any) -> int:
        return self._buffer.write(data)

    def flush(self) -> None:
        pass  # nothing reaches the disk before close

    @property
    def closed(self) -> bool:
        return self._buffer.closed

    def close(self) -> None:
        if not self._buffer.closed:
            atomic_write_bytes(self._path, self._buffer.getvalue())
            self._buffer.close()


class AtomicLocalFiles(pafs.FileSystemHandler):
    """The local filesystem, except that a file being written never replaces the old one until it is complete.

    Tune copies its experiment state (trial list, searcher state) and every trial's
    results to the storage path again and again; on a plain local filesystem a driver
    killed mid-copy leaves a truncated `experiment_state-*.json` that `--resume` cannot
    read. Behind this handler a reader sees the previous file or the new one. (Object
    stores write whole objects already; they do not need it.)
    """

    def __init__(self) -> None:
        self._local = pafs.LocalFileSystem()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AtomicLocalFiles)

    def __hash__(self) -> int:
        return hash(AtomicLocalFiles)

    def get_type_name(self) -> str:
        return "vs2ray-atomic-local"

    def normalize_path(self, path: str) -> str:
        return self._local.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[Any]:
        return self._local.get_file_info(paths)

    def get_file_info_selector(self, selector: Any) -> list[Any]:
        return self._local.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self._local.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self._local.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        self._local.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path: str) -> None:
        self._local.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self._local.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        with self._local.open_input_stream(src) as source, self.open_output_stream(dest, None) as target:
            target.write(source.read())

    def open_input_stream(self, path: str) -> Any:
        return self._local.open_input_stream(path)

    def open_input_file(self, path: str) -> Any:
        return self._local.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any) -> Any:
        return pa.PythonFile(_ReplaceOnClose(path), mode="w")

    def open_append_stream(self, path: str, metadata: Any) -> Any:
        return self._local.open_append_stream(path)


class StorageUnavailable(RuntimeError):
    """Remote experiment storage that does not answer, refuses, or has no such bucket."""


STORAGE_PROBE_TIMEOUT_S = 20.0


def _probe_filesystem(uri: str) -> tuple[Any, str]:
    """`uri`'s filesystem; for S3 the same one with short timeouts and one retry (the SDK's defaults wait
    about 100 s on an endpoint that accepts connections and never answers)."""
    fs, where = pafs.FileSystem.from_uri(uri)  # honours AWS_ENDPOINT_URL, the URI's query and the region
    if isinstance(fs, pafs.S3FileSystem):
        options = {**fs.__reduce__()[1][0], "connect_timeout": 3.0, "request_timeout": 5.0}
        fs = pafs.S3FileSystem(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2))
    return fs, where


def _probe(uri: str, write: bool) -> None:
    fs, where = _probe_filesystem(uri)
    bucket = where.split("/", 1)[0]
    if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"bucket {bucket!r} does not exist (create it first)")
    if write:  # a read-only credential fails here, not after Ray and the first trials have started
        probe = f"{where.rstrip('/')}/.vs2ray-probe-{uuid.uuid4().hex}"
        with fs.open_output_stream(probe) as stream:
            stream.write(b"")
        fs.delete_file(probe)
    else:
        fs.get_file_info(where)


def check_storage(uri: str, write: bool, timeout_s: float = STORAGE_PROBE_TIMEOUT_S) -> None:
    """Fail fast when remote storage (`s3://`, `gs://`) cannot be reached, read or (with `write`) written.

    Raises StorageUnavailable naming the URI and the cause, after at most `timeout_s` seconds
    (the SDK's own retries can take minutes against an endpoint that never answers). Local paths
    are not checked.
    """
    if not is_uri(uri):
        return
    failure: list[BaseException] = []
    answered = threading.Event()

    def probe() -> None:
        try:
            _probe(uri, write)
        except Exception as error:  # reported by the caller's thread
            failure.append(error)
        answered.set()

    threading.Thread(target=probe, name="vs2ray-storage-probe", daemon=True).start()
    hint = "check the URI, the credentials and, for an S3-compatible server, AWS_ENDPOINT_URL"
    if not answered.wait(timeout_s):
        raise StorageUnavailable(f"{uri}: no answer from its storage endpoint within {timeout_s:.0f} s; {hint}")
    if failure:
        what = "write to" if write else "read"
        message = str(failure[0]).strip()
        cause = message.splitlines()[0] if message else type(failure[0]).__name__
        raise StorageUnavailable(f"cannot {what} {uri}: {cause}; {hint}")


def storage_filesystem(path: str | Path) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a local path or an s3:// / gs:// URI; local writes are atomic."""
    text = str(path)
    if is_uri(text):
        return pafs.FileSystem.from_uri(text)
    return pafs.PyFileSystem(AtomicLocalFiles()), str(Path(text).expanduser().resolve())


def read_bytes(path: str | Path) -> bytes | None:
    """A file's bytes, or None when it does not exist."""
    fs, where = storage_filesystem(path)
    if fs.get_file_info(where).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(where) as stream:
        return stream.read()


def read_text(path: str | Path) -> str | None:
    data = read_bytes(path)
    return None if data is None else data.decode()


def write_text(path: str | Path, text: str) -> None:
    fs, where = storage_filesystem(path)
    fs.create_dir(where.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(where) as stream:
        stream.write(text.encode())


def list_dirs(path: str | Path) -> list[str]:
    """Names of the directories directly under `path` (none if it does not exist)."""
    fs, where = storage_filesystem(path)
    if fs.get_file_info(where).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(where))
    return sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory)


def modified(path: str | Path) -> pd.Timestamp:
    """A file's modification time; FileNotFoundError when it does not exist."""
    fs, where = storage_filesystem(path)
    info = fs.get_file_info(where)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    return pd.Timestamp(info.mtime)
