"""The activation store on disk: `<storage.root>/activations/<key>/`.

Layout (DESIGN.md, "Activation store"):

    part-00000.parquet ...   one file per chunk of rows: id, label, attribute, group, cls_<layer>..., embedding
                             (+ tokens_<layer>... with extraction.tokens: all, (tokens, width) each)
    manifest.json            inputs of the key, classes, attributes, rows, shapes, versions, failures, complete
    head.safetensors         ln_post.weight, ln_post.bias, proj of the vision tower
    classifier.safetensors   the zero-shot text classifier (classes × embed dim)

Each part file is written under a hidden temporary name and renamed into place, so a
part file that exists is complete; `manifest.json` gets `complete: true` only after
every part is there. Readers refuse a store whose manifest is not complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
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


class StoreIncomplete(RuntimeError):
    """The store directory exists but its manifest does not say `complete: true`."""


def content_key(inputs: dict[str, Any], length: int = 16) -> str:
    """A stable hex digest of a JSON-serialisable mapping (key order does not matter)."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    """(n, *shape) float array -> Arrow fixed-shape tensor column (readable by pyarrow/pandas without Ray)."""
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(values, dtype=np.float32))


def write_part(store_dir: Path, chunk: int, columns: dict[str, np.ndarray], failed: list[dict[str, Any]]) -> Path:
    """Write one chunk's rows as `part-<chunk>.parquet`, atomically; `failed` goes into the file metadata.

    columns: the INT_COLUMNS (n,) each and any number of (n, d) float arrays.
    """
    arrays = {
        name: pa.array(np.asarray(columns[name], dtype=np.int64 if name == "id" else np.int32)) for name in INT_COLUMNS
    }
    arrays.update({name: tensor_column(v) for name, v in columns.items() if name not in INT_COLUMNS})
    table = pa.table(arrays).replace_schema_metadata({FAILED_METADATA_KEY: json.dumps(failed).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    path = Path(store_dir) / PART_PATTERN.format(chunk)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())
    return path


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
    """Arrays read from a store, sorted by id.

    A stored column that was not loaded is read from `store_dir` on first use: all-token
    columns are read this way where they are needed (a trial's block), never shipped through
    Ray's object store with the rest.
    """

    ids: np.ndarray  # (n,) int64
    labels: np.ndarray  # (n,) int32
    columns: dict[str, np.ndarray]  # name -> (n, d) or (n, tokens, d) float32
    manifest: dict[str, Any]
    store_dir: Path | None = None
    attributes: np.ndarray | None = None  # (n,) int32, -1 where the dataset has no groups
    groups: np.ndarray | None = None  # (n,) int32: label · len(manifest["attributes"]) + attribute, or -1

    @property
    def has_groups(self) -> bool:
        return self.groups is not None and bool(len(self.groups)) and bool((self.groups >= 0).all())

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.columns and self.store_dir is not None and name in self.manifest.get("columns", {}):
            self.columns[name] = _read_columns(self.store_dir, [name])[name]
        return self.columns[name]


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
    """Read ids, labels and the asked-for columns of a complete store, sorted by id.

    Only the columns asked for are read from the Parquet files: `cls_<layer>` (n, width) for
    each of `layers` (negative indices count from the last block), `tokens_<layer>`
    (n, tokens, width) for each of `token_layers`, `embedding`, `retrieval`.
    Raises StoreIncomplete for a store that is missing or was not finished.
    """
    store_dir = Path(store_dir).expanduser()
    manifest = read_manifest(store_dir)
    if not manifest or manifest.get("complete") is not True:
        raise StoreIncomplete(f"{store_dir} is not a complete activation store (run `python -m vs2ray extract`)")
    names = [cls_column(manifest, layer) for layer in layers]
    names += [cls_column(manifest, layer, "tokens") for layer in token_layers]
    names += ["embedding"] * embedding + ["retrieval"] * retrieval
    columns = _read_columns(store_dir, names)
    ids, labels, attributes, groups = (columns.pop(name) for name in INT_COLUMNS)
    return Activations(ids, labels, columns, manifest, store_dir, attributes, groups)


def _read_columns(store_dir: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The INT_COLUMNS and every tensor column of `names` from every part file, rows sorted by id."""
    files = sorted(str(p) for p in Path(store_dir).glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(f, columns=[*INT_COLUMNS, *names]) for f in files])
    order = np.argsort(table["id"].to_numpy(), kind="stable")
    columns = {name: table[name].to_numpy()[order] for name in INT_COLUMNS}
    columns.update({name: table[name].combine_chunks().to_numpy_ndarray()[order] for name in names})
    return columns


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
