"""The activation store on disk: `<storage.root>/activations/<key>/`.

Layout (DESIGN.md, "Activation store"):

    part-00000.parquet ...   one file per chunk of rows: id, label, attribute, group, cls_<layer>..., embedding
                             (+ tokens_<layer>... with extraction.tokens: all, (tokens, width) each)
    manifest.json            inputs of the key, classes, attributes, rows, shapes, dtype, versions, failures, complete
    head.safetensors         ln_post.weight, ln_post.bias, proj of the vision tower
    classifier.safetensors   the zero-shot text classifier (classes × embed dim)
    arrays/<column>.npy      every column again, rows sorted by id, as a memory-mappable .npy (derived)
    arrays/index.json        written last: the part files the arrays were built from (names, sizes, rows)

Each part file is written under a hidden temporary name and renamed into place, so a
part file that exists is complete; `manifest.json` gets `complete: true` only after
every part is there. Readers refuse a store whose manifest is not complete.

A complete manifest records every part's rows, bytes and SHA-256 (`parts`). A part damaged afterwards
(truncated by a partial copy, bytes changed by a bad disk) is found by `damaged_parts`: building the
arrays refuses it with StoreDamaged, which names the file and the repair, and the extraction deletes the
damaged parts of a complete store and re-extracts exactly those chunks.

The Parquet parts are the store (any Arrow reader opens them). The `arrays/` beside them are
how vs2ray reads it: memory-mapped, so a reader holds only the rows it touches, and every
process of a node that maps a column shares one copy of it in the page cache. They are built
by the extraction before it marks the store complete (and, for a store written before they
existed, by the first reader, under a lock), each under a temporary name, with `index.json`
last; arrays whose index does not match the part files on disk are rebuilt, never read.

Activation columns (`cls_*`, `tokens_*`) are stored in `extraction.dtype`: float32, float16, or
bfloat16 kept as its uint16 bit patterns (Arrow has no bfloat16); readers up-cast to float32
per batch (`as_float32`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import mmap
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

STORE_FORMAT = 2  # 2: attribute and group columns (-1 for datasets without groups)
INT_COLUMNS = ("id", "label", "attribute", "group")  # per-row integers; every other column is a float tensor
PART_PATTERN = "part-{:05d}.parquet"
FAILED_METADATA_KEY = b"vs2ray.failed"
ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")
ARRAYS_DIR = "arrays"


class StoreIncomplete(RuntimeError):
    """The store directory exists but its manifest does not say `complete: true`."""


class StoreDamaged(StoreIncomplete):
    """Part files of a store no longer hold what was written (`damaged`: file name -> what is wrong)."""

    def __init__(self, store_dir: Path, damaged: dict[str, str]) -> None:
        self.damaged = damaged
        listed = "; ".join(f"{name}: {why}" for name, why in sorted(damaged.items()))
        super().__init__(
            f"{store_dir}: damaged part file(s): {listed}. Repair: run the extraction again with the same config "
            f"(`python -m vs2ray extract --config ...`, or the sweep): it re-extracts exactly the damaged chunks"
        )


def content_key(inputs: dict[str, Any], length: int = 16) -> str:
    """A stable hex digest of a JSON-serialisable mapping (key order does not matter)."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _naming_the_path(error: OSError, path: Path) -> OSError:
    """A full disk's error with the file it was writing (a write() error names none), else `error` itself."""
    if error.errno != errno.ENOSPC:
        return error
    return OSError(errno.ENOSPC, f"No space left on device writing {path}", str(path))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise _naming_the_path(error, path) from error
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def disk_full(error: BaseException) -> str | None:
    """What filled up, when `error` (or an error it was raised from or wraps, as Ray's task errors do) is a
    full disk's: the message naming the file; else None."""
    pending: list[BaseException | None] = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            message = _no_space_words(str(current.strerror or current))
            named = current.filename and str(current.filename) not in message
            return f"{message} ({current.filename})" if named else message
        pending += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    # a worker's error that reached the driver as text only
    lines = [line for line in str(error).splitlines() if "No space left on device" in line]
    return _no_space_words(lines[-1]) if lines else None


def _no_space_words(text: str) -> str:
    """'No space left on device writing <file>' out of an error's text, without what Python or Ray put around
    it ('OSError: [Errno 28] ' before, ": '<file>'" after)."""
    words = text[max(0, text.find("No space left on device")) :]
    return words.split(": '")[0].strip()


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomically write `payload` as indented JSON (insertion order kept: `complete` goes last)."""
    atomic_write_bytes(path, (json.dumps(payload, indent=2, default=str) + "\n").encode())


def write_tensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Atomically write torch tensors as a safetensors file."""
    from safetensors.torch import save

    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    atomic_write_bytes(path, save(contiguous, metadata=metadata))


def read_manifest(store_dir: Path) -> dict[str, Any] | None:
    """The store's manifest, or None when there is none yet."""
    path = Path(store_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def is_complete(store_dir: Path) -> bool:
    """Whether `store_dir` holds a finished store (manifest with `complete: true`)."""
    manifest = read_manifest(store_dir)
    return bool(manifest and manifest.get("complete") is True)


def tensor_column(values: np.ndarray) -> pa.ExtensionArray:
    """(n, *shape) array -> Arrow fixed-shape tensor column (readable by pyarrow/pandas without Ray).

    float32, float16 and uint16 (bfloat16 bit patterns) are kept as they are; anything else becomes float32."""
    if values.dtype not in (np.float32, np.float16, np.uint16):
        values = values.astype(np.float32)
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(values))


def is_activation_column(name: str) -> bool:
    """Whether a store column holds block activations (stored in `extraction.dtype`)."""
    return name.startswith(("cls_", "tokens_"))


def to_stored_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 activations -> their stored form: float32, float16, or bfloat16 as uint16 bit patterns
    (rounded to nearest, ties to even, as torch rounds)."""
    if dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"extraction.dtype: {dtype!r} is not one of {', '.join(ACTIVATION_DTYPES)}")
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "float32":
        return values
    if dtype == "float16":
        return values.astype(np.float16)
    bits = values.view(np.uint32)
    rounded: np.ndarray = bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
    return (rounded >> 16).astype(np.uint16)


def as_float32(values: np.ndarray) -> np.ndarray:
    """Stored activations (float32, float16, or uint16 bfloat16 bit patterns) -> a float32 array."""
    if values.dtype == np.uint16:
        return (values.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(values, dtype=np.float32)


def write_part(
    store_dir: Path,
    chunk: int,
    columns: dict[str, np.ndarray],
    failed: list[dict[str, Any]],
    dtype: str = "float32",
) -> Path:
    """Write one chunk's rows as `part-<chunk>.parquet`, atomically; `failed` goes into the file metadata.

    columns: the INT_COLUMNS (n,) each and any number of (n, d) float32 arrays; the activation
    columns are written in `dtype` (one of ACTIVATION_DTYPES).
    """
    arrays = {
        name: pa.array(np.asarray(columns[name], dtype=np.int64 if name == "id" else np.int32)) for name in INT_COLUMNS
    }
    arrays.update(
        {
            name: tensor_column(to_stored_dtype(v, dtype) if is_activation_column(name) else v)
            for name, v in columns.items()
            if name not in INT_COLUMNS
        }
    )
    table = pa.table(arrays).replace_schema_metadata({FAILED_METADATA_KEY: json.dumps(failed).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    path = Path(store_dir) / PART_PATTERN.format(chunk)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())
    return path


def part_record(path: Path) -> dict[str, Any]:
    """What a part file holds, read once: {"rows", "bytes", "sha256"}. Raises ValueError for a file that is no
    readable Parquet (a truncated one has no footer)."""
    data = Path(path).read_bytes()
    try:
        rows = pq.read_metadata(pa.BufferReader(data)).num_rows
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"not readable Parquet ({len(data)} bytes: {error})") from error
    return {"rows": rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def damaged_parts(store_dir: Path, recorded: dict[str, dict[str, Any]] | None) -> dict[str, str]:
    """The part files of a store that are unreadable, or (`recorded`: a complete manifest's `parts`) missing or
    not what was written: file name -> what is wrong. With `recorded`, reads every part once; without, only
    their footers."""
    store_dir, damaged = Path(store_dir), {}
    on_disk = sorted(p.name for p in store_dir.glob("part-*.parquet"))
    for name in sorted(set(recorded or {}) - set(on_disk)):
        damaged[name] = "missing"
    for name in on_disk:
        try:
            if recorded is None:  # nothing to compare with: a readable footer is all that can be checked
                pq.read_metadata(store_dir / name)
                continue
            record = part_record(store_dir / name)
        except (ValueError, pa.ArrowException, OSError) as error:
            damaged[name] = str(error) if isinstance(error, ValueError) else f"not readable Parquet ({error})"
            continue
        expected = recorded.get(name)
        if expected is None:
            damaged[name] = "not part of the complete store"
        elif record["bytes"] != expected["bytes"]:
            damaged[name] = f"{record['bytes']} bytes, {expected['bytes']} written"
        elif record["sha256"] != expected["sha256"]:
            damaged[name] = "its bytes changed since it was written (SHA-256 differs)"
    return damaged


def finished_chunks(store_dir: Path) -> dict[int, list[dict[str, Any]]]:
    """Chunks already written (their part file exists), each with the failures it recorded."""
    done: dict[int, list[dict[str, Any]]] = {}
    for path in sorted(Path(store_dir).glob("part-*.parquet")):
        metadata = pq.read_schema(path).metadata or {}
        done[int(path.stem.split("-")[1])] = json.loads(metadata.get(FAILED_METADATA_KEY, b"[]"))
    return done


def column_shapes(store_dir: Path) -> dict[str, list[int]]:
    """Per-row shape of every tensor column, from the first part file's schema."""
    first = next(iter(sorted(Path(store_dir).glob("part-*.parquet"))), None)
    if first is None:
        return {}
    schema = pq.read_schema(first)
    return {f.name: list(f.type.shape) for f in schema if isinstance(f.type, pa.FixedShapeTensorType)}


@dataclass
class Activations:
    """A store's rows, sorted by id: the per-row integers in memory, every float column memory-mapped.

    `self[name]` is a float32 (n, d) or (n, tokens, d) array: the store's memory-mapped array for a
    float32 store (nothing is read until rows are touched, and every process on the node shares the
    pages), an up-cast copy for a float16/bfloat16 one. `self.stored(name)` is the mapped array as
    stored, for readers that up-cast per batch (`as_float32`). Columns of the store are never pickled:
    an Activations sent through Ray's object store maps them again where it is used.
    """

    ids: np.ndarray  # (n,) int64
    labels: np.ndarray  # (n,) int32
    columns: dict[str, np.ndarray]  # name -> (n, d) or (n, tokens, d) float32, in memory or mapped
    manifest: dict[str, Any]
    store_dir: Path | None = None
    attributes: np.ndarray | None = None  # (n,) int32, -1 where the dataset has no groups
    groups: np.ndarray | None = None  # (n,) int32: label · len(manifest["attributes"]) + attribute, or -1

    @property
    def has_groups(self) -> bool:
        return self.groups is not None and bool(len(self.groups)) and bool((self.groups >= 0).all())

    def has(self, name: str) -> bool:
        """Whether the column is in memory or in the store."""
        return name in self.columns or (self.store_dir is not None and name in self.manifest.get("columns", {}))

    def stored(self, name: str) -> np.ndarray:
        """Column `name` as stored: float32, float16 or uint16 (bfloat16 bits); memory-mapped from the store."""
        if name in self.columns:
            return self.columns[name]
        if self.store_dir is None or name not in self.manifest.get("columns", {}):
            raise KeyError(f"column {name!r} is not in this store; it holds {sorted(self.manifest.get('columns', {}))}")
        return map_column(self.store_dir, name)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.columns:
            stored = self.stored(name)
            self.columns[name] = stored if stored.dtype == np.float32 else as_float32(stored)
        return self.columns[name]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        stored = set(self.manifest.get("columns", {})) if self.store_dir is not None else set()
        state["columns"] = {n: v for n, v in self.columns.items() if n not in stored}  # mapped again where used
        return state


def block_index(manifest: dict[str, Any], layer: int) -> int:
    """The block index of `layer` (negative counts from the end of the encoder)."""
    num_layers = manifest["model"]["num_layers"]
    return layer + num_layers if layer < 0 else layer


def cls_column(manifest: dict[str, Any], layer: int, prefix: str = "cls") -> str:
    """Column name of `layer`'s [CLS] tokens (`prefix` "tokens": its every token) in a store."""
    name = f"{prefix}_{block_index(manifest, layer)}"
    if name not in manifest["columns"]:
        stored = sorted(c for c in manifest["columns"] if c.startswith(f"{prefix}_"))
        hint = " (extract with extraction.tokens: all)" if prefix == "tokens" else ""
        raise KeyError(f"layer {layer} ({name}) is not in this store; it holds {stored}{hint}")
    return name


def load_activations(
    store_dir: str | Path,
    layers: Sequence[int] = (-1,),
    embedding: bool = True,
    retrieval: bool = False,
    token_layers: Sequence[int] = (),
) -> Activations:
    """Ids, labels and groups of a complete store, sorted by id, with its columns mapped (read on first touch).

    `layers` (negative indices count from the last block), `token_layers`, `embedding` and `retrieval`
    name the columns the caller needs; each must be in the store. Builds the store's `arrays/` first
    when they are missing or stale. Raises StoreIncomplete for a store that is missing or unfinished.
    """
    store_dir = Path(store_dir).expanduser()
    manifest = read_manifest(store_dir)
    if not manifest or manifest.get("complete") is not True:
        raise StoreIncomplete(f"{store_dir} is not a complete activation store (run `python -m vs2ray extract`)")
    names = [cls_column(manifest, layer) for layer in layers]
    names += [cls_column(manifest, layer, "tokens") for layer in token_layers]
    names += ["embedding"] * embedding + ["retrieval"] * retrieval
    missing = [name for name in names if name not in manifest["columns"]]
    if missing:
        raise KeyError(f"{store_dir} has no column(s) {missing}")
    ensure_arrays(store_dir)
    ids, labels, attributes, groups = (np.array(map_column(store_dir, name)) for name in INT_COLUMNS)
    return Activations(ids, labels, {}, manifest, store_dir, attributes, groups)


# ---------------------------------------------------------------- the memory-mappable arrays


def array_path(store_dir: Path, name: str) -> Path:
    """Where column `name`'s .npy lies in the store."""
    return Path(store_dir) / ARRAYS_DIR / f"{name}.npy"


def map_column(store_dir: Path, name: str) -> np.ndarray:
    """Column `name` of a store whose arrays are built, memory-mapped read-only (rows sorted by id)."""
    mapped: np.ndarray = np.load(array_path(store_dir, name), mmap_mode="r")
    return mapped


def _parts_on_disk(store_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(Path(store_dir).glob("part-*.parquet"))}


def arrays_ready(store_dir: Path) -> bool:
    """Whether the store's arrays are complete and built from the part files on disk now."""
    index = Path(store_dir) / ARRAYS_DIR / "index.json"
    if not index.is_file():
        return False
    built = json.loads(index.read_text())
    names = [*INT_COLUMNS, *built.get("columns", {})]
    return built.get("parts") == _parts_on_disk(store_dir) and all(array_path(store_dir, n).is_file() for n in names)


@contextlib.contextmanager
def _store_lock(store_dir: Path) -> Iterator[None]:
    """An exclusive lock on the store's arrays (flock; NFSv4, and so EFS, honours it across nodes)."""
    (Path(store_dir) / ARRAYS_DIR).mkdir(parents=True, exist_ok=True)
    with open(Path(store_dir) / ARRAYS_DIR / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def holder_lock(path: Path, what: str, log: Any = lambda _: None) -> Iterator[None]:
    """An exclusive lock on the file `path` (flock, across the nodes of a shared file system; NFSv4, and so EFS,
    honours it; the kernel drops it when its holder dies). The file names its holder, so a second process,
    which waits, can say whom it waits for: "waiting for {what} (pid P on host)"."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            log(f"waiting for {what} ({handle.read().strip() or 'holder unknown'})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def extraction_lock(store_dir: Path, log: Any = lambda _: None) -> contextlib.AbstractContextManager[None]:
    """Held by the one driver that extracts the store at `store_dir`: a second driver of the same key waits,
    then finds the store complete."""
    Path(store_dir).mkdir(parents=True, exist_ok=True)
    what = f"the extraction of {Path(store_dir).name} already running"
    return holder_lock(Path(store_dir) / ".extraction.lock", what, log)


def ensure_arrays(store_dir: Path) -> None:
    """Build the store's arrays unless complete ones, built from the part files on disk, are there."""
    if arrays_ready(store_dir):
        return
    with _store_lock(store_dir):
        if not arrays_ready(store_dir):  # another process may have built them while this one waited
            build_arrays(store_dir)


def release_pages(array: np.ndarray) -> None:
    """Hand a memory-mapped array's resident pages back (they stay in the page cache, so the next touch
    is a minor fault): keeps a reader's resident memory at what it touched since the last call."""
    mapped = getattr(array, "_mmap", None)
    if isinstance(mapped, mmap.mmap):
        mapped.madvise(mmap.MADV_DONTNEED)


def row_file(array: np.ndarray) -> tuple[str, int, int] | None:
    """(file, byte offset of row 0, bytes from one row to the next) of a memory-mapped (n, d) array, or of a view
    of one (a reshape, a slice of rows or of each row's first values) whose d values lie side by side in the file;
    None for any other array."""
    if array.ndim != 2 or array.strides[1] != array.itemsize or array.strides[0] < array.shape[1] * array.itemsize:
        return None
    root = array
    while isinstance(root.base, np.ndarray):
        root = root.base
    # a copy of a memmap (a reshape that could not be a view) is a memmap too, with the file's name and the
    # mapped array as its base: only rows whose bytes lie inside the mapping lie in the file
    if not isinstance(root, np.memmap) or not isinstance(root.base, mmap.mmap) or root.filename is None:
        return None
    start = array.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    end = start + (array.shape[0] - 1) * array.strides[0] + array.shape[1] * array.itemsize
    if array.shape[0] == 0 or start < 0 or end > root.nbytes:  # not in the mapping: a copy (numpy keeps its base)
        return None
    return str(root.filename), int(root.offset) + start, int(array.strides[0])


def read_rows(array: np.ndarray, index: np.ndarray) -> np.ndarray:
    """`array[index]` (len(index), d) for a memory-mapped `array` (row_file not None), read from its file with one
    pread per row: nothing is mapped, so what the read holds is the copy it returns, however scattered the rows
    (a fault on a mapped row maps the page cache around it: 64 KiB, or on Linux 6.x with large folios about
    1 MiB per row)."""
    located = row_file(array)
    if located is None:
        raise ValueError("read_rows needs a memory-mapped array with contiguous rows")
    path, offset, stride = located
    out = np.empty((len(index), array.shape[1]), dtype=array.dtype)
    row_bytes = out.strides[0]
    buffer = memoryview(out.data).cast("B")
    handle = os.open(path, os.O_RDONLY)
    try:
        for i, row in enumerate(index.tolist()):
            got = os.preadv(handle, [buffer[i * row_bytes : (i + 1) * row_bytes]], offset + row * stride)
            if got != row_bytes:
                raise OSError(f"{path}: row {row} is cut short ({got} of {row_bytes} bytes): the file was truncated")
    finally:
        os.close(handle)
    return out


def advise_access(array: np.ndarray, scattered: bool) -> None:
    """Tell the kernel how a memory-mapped array is about to be read: `scattered` rows (no read-ahead of a
    cold file around each row) or in order (read-ahead)."""
    mapped = getattr(array, "_mmap", None)
    if isinstance(mapped, mmap.mmap):
        mapped.madvise(mmap.MADV_RANDOM if scattered else mmap.MADV_SEQUENTIAL)


def build_arrays(store_dir: Path) -> None:
    """Write every column of the part files as `arrays/<column>.npy`, rows sorted by id, one part in memory
    at a time; `arrays/index.json` (the parts they came from) is written last."""
    store_dir = Path(store_dir)
    manifest = read_manifest(store_dir) or {}
    damaged = damaged_parts(store_dir, manifest.get("parts") if manifest.get("complete") is True else None)
    if damaged:
        raise StoreDamaged(store_dir, damaged)
    parts = _parts_on_disk(store_dir)
    files = [store_dir / name for name in parts]
    ids = np.concatenate([pq.read_table(f, columns=["id"])["id"].to_numpy() for f in files]) if files else np.zeros(0)
    position = np.empty(len(ids), dtype=np.int64)
    position[np.argsort(ids, kind="stable")] = np.arange(len(ids))  # row r of the parts goes to position[r]
    schema = pq.read_schema(files[0]) if files else pa.schema([])
    shapes = {f.name: list(f.type.shape) for f in schema if isinstance(f.type, pa.FixedShapeTensorType)}
    dtypes = {f.name: f.type.value_type.to_pandas_dtype() for f in schema if f.name in shapes}
    dtypes.update({name: np.int64 if name == "id" else np.int32 for name in INT_COLUMNS})
    directory = store_dir / ARRAYS_DIR
    directory.mkdir(exist_ok=True)
    (directory / "index.json").unlink(missing_ok=True)
    temporary = {name: directory / f".{name}.npy.tmp" for name in dtypes}
    outputs = {
        name: np.lib.format.open_memmap(temporary[name], "w+", dtypes[name], (len(ids), *shapes.get(name, [])))
        for name in dtypes
    }
    for path in temporary.values():  # a page written into a full disk's sparse map kills with SIGBUS: claim it now
        with open(path, "r+b") as handle:
            try:
                os.posix_fallocate(handle.fileno(), 0, path.stat().st_size)
            except OSError as error:
                raise _naming_the_path(error, path) from error
    start = 0
    for file in files:
        table = pq.read_table(file)
        rows = position[start : start + table.num_rows]
        start += table.num_rows
        for name, out in outputs.items():
            column = table[name]
            out[rows] = column.combine_chunks().to_numpy_ndarray() if name in shapes else column.to_numpy()
        for out in outputs.values():  # the page cache keeps the written pages (and writes them back); not this process
            release_pages(out)
    for out in outputs.values():
        out.flush()  # on disk before index.json says the arrays are ready
    outputs.clear()  # unmapped before the rename
    for name, path in temporary.items():
        os.replace(path, array_path(store_dir, name))
    columns = {name: [str(np.dtype(dtypes[name])), shapes[name]] for name in shapes}
    write_json(directory / "index.json", {"rows": len(ids), "columns": columns, "parts": parts})


# ---------------------------------------------------------------- SAE checkpoints


def sae_dir_for(root: str | Path, activation_key: str, training: dict[str, Any]) -> Path:
    """`<storage.root>/saes/<activation key>-<hash of every training parameter>/`."""
    key = content_key({"activations": activation_key, "training": training})
    return Path(root).expanduser() / "saes" / f"{activation_key}-{key}"


def train_val_split(ids: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic boolean masks (train, val) over `ids`: a seeded `val_fraction` share is held out.

    The draw depends only on the sorted ids and the seed, so every trial and every stage
    carves the same validation rows from the train split.
    """
    order = np.random.default_rng(seed).permutation(len(ids))
    val = np.zeros(len(ids), dtype=bool)
    val[np.argsort(ids, kind="stable")[order[: round(val_fraction * len(ids))]]] = True
    return ~val, val
