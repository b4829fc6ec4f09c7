"""A sweep's experiment dir -> a pandas DataFrame (one row per trial), without Ray running.

Tune writes one directory per trial: `params.json` (the sampled values), `result.json`
(one JSON line per report), `error.txt` when it failed, and `checkpoint_000000/` with
the files a vs2ray trial leaves (`per_class.json`, `methods.json`, `predictions.npz`,
`metrics.json`).
Paths may be local or `s3://` / `gs://` URIs (read through pyarrow's filesystems).

    from vs2ray.results import load_results, method_table
    trials = load_results("~/vs2ray/experiments/quickstart-20261122-101500")
    print(method_table(trials))
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from vs2ray.store import atomic_write_bytes

# row label of each method in tables (the paper's names; centroid_shift is our ablation)
METHOD_LABELS = {
    "zero_shot": "zero-shot CLIP",
    "sae_rec_final": "SAE_REC^F",
    "sae_rec_amplified": "SAE_REC^{F+γ}",
    "vs2": "VS2",
    "vs2_pass": "VS2 + PASS",
    "vs2_gated": "VS2 + FVU gate",
    "vs2pp": "VS2++ (pseudo-labels)",
    "vs2pp_oracle": "VS2++ (oracle: query's true label)",
    "vs2pp_oracle_neighbours": "VS2++ (true neighbour labels, zero-shot query)",
    "weighted_rag": "weighted RAG",
    "clip_steer": "CLIP-space steering",
    "centroid_shift": "centroid shift (ours)",
}
STATUS_DONE, STATUS_ERROR, STATUS_INCOMPLETE = "TERMINATED", "ERROR", "INCOMPLETE"
SWEEP_CONFIG_FILE = "vs2ray_config.yaml"  # the sweep's config, saved in the experiment dir for --resume and analysis
TRIAL_DIR_PREFIX = "trial_"


# ---------------------------------------------------------------- local paths and URIs alike


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


def storage_filesystem(path: str | Path) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a local path or an s3:// / gs:// URI; local writes are atomic."""
    text = str(path)
    if "://" in text:
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


# ---------------------------------------------------------------- trials


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _last_complete_result(text: str | None) -> dict[str, Any] | None:
    # a driver killed while Tune uploaded the file can leave its last line cut short
    lines = [_json_or_none(line) for line in (text or "").splitlines() if line.strip()]
    complete = [line for line in lines if isinstance(line, dict) and line.get("vs2ray_complete")]
    return complete[-1] if complete else None


def load_results(experiment: str | Path) -> pd.DataFrame:
    """One row per trial of an experiment dir, in start order: trial_id, status, error, sampled values, metrics.

    Sampled values keep their config keys (`sae.k`, `steering.gamma`); metrics have no
    dot (`val_top1_vs2`, `fvu`). A trial that failed and succeeded on a retry is
    TERMINATED; one that never reported a complete result is ERROR (with the last line
    of its error) or INCOMPLETE (still pending or running).
    """
    experiment = str(experiment)
    if not list_dirs(experiment) and read_text(f"{experiment}/{SWEEP_CONFIG_FILE}") is None:
        raise FileNotFoundError(f"{experiment} is not a vs2ray experiment dir (no trials, no vs2ray_config.yaml)")
    rows = []
    for name in list_dirs(experiment):
        trial_dir = f"{experiment}/{name}"
        params_text = read_text(f"{trial_dir}/params.json")
        if params_text is None:
            continue
        params = _json_or_none(params_text) or {}  # cut short only for a trial that had just started
        started = modified(f"{trial_dir}/params.json")  # Tune writes params.json when the trial starts
        result = _last_complete_result(read_text(f"{trial_dir}/result.json"))
        error = read_text(f"{trial_dir}/error.txt")
        status = STATUS_DONE if result else STATUS_ERROR if error else STATUS_INCOMPLETE
        row = {
            "trial_id": name.removeprefix(TRIAL_DIR_PREFIX),
            "status": status,
            "error": _error_summary(error) if status == STATUS_ERROR else "",
            "trial_dir": trial_dir,
            "started": started,
        }
        row.update(params)
        if result:
            row.update({k: v for k, v in result.items() if k not in ("config", "vs2ray_complete") and "/" not in k})
        rows.append(row)
    trials = pd.DataFrame(rows)
    return trials.sort_values("started", kind="stable").reset_index(drop=True) if rows else trials


def modified(path: str | Path) -> pd.Timestamp:
    """A file's modification time; FileNotFoundError when it does not exist."""
    fs, where = storage_filesystem(path)
    info = fs.get_file_info(where)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    return pd.Timestamp(info.mtime)


def load_sweep_config(experiment: str) -> Any | None:
    """The ExperimentConfig the sweep saved in `experiment`, or None when there is none."""
    import yaml

    from vs2ray.config import validate_config

    text = read_text(f"{experiment}/{SWEEP_CONFIG_FILE}")
    return None if text is None else validate_config(yaml.safe_load(text), f"{experiment}/{SWEEP_CONFIG_FILE}")


def best_trials(trials: pd.DataFrame, search: Any, top: int = 5) -> pd.DataFrame:
    """The `top` finished trials by the search's first objective (`search`: the config's SearchConfig)."""
    metric, mode = search.metrics[0], search.modes[0]
    done = trials[trials["status"] == STATUS_DONE]
    if metric not in done:
        return done.iloc[:0]
    return done.sort_values(metric, ascending=mode == "min").head(top)


def _error_summary(error: str | None) -> str:
    lines = [line for line in (error or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def searched_keys(trials: pd.DataFrame) -> list[str]:
    """The sampled config keys present in `trials` (columns with a dot)."""
    return [c for c in trials.columns if "." in c]


def methods_in(trials: pd.DataFrame) -> list[str]:
    """Methods that some trial reported, in the order of METHOD_LABELS."""
    reported = {c.removeprefix("val_top1_") for c in trials.columns if c.startswith("val_top1_")}
    return [m for m in METHOD_LABELS if m in reported]


def trial_dir_name(trial_id: str) -> str:
    """The directory Tune gives a trial inside the experiment dir (set by the sweep)."""
    return f"{TRIAL_DIR_PREFIX}{trial_id}"


def trial_file(trial_dir: str, name: str) -> bytes | None:
    """A file the trial left in its checkpoint (per_class.json, methods.json, predictions.npz, metrics.json)."""
    return read_bytes(f"{trial_dir}/checkpoint_000000/{name}")


def trial_predictions(trial_dir: str) -> dict[str, np.ndarray]:
    """Test labels and each method's test predictions at its selected setting: name -> (n_test,) int32."""
    data = trial_file(trial_dir, "predictions.npz")
    if data is None:
        raise FileNotFoundError(f"{trial_dir} has no checkpoint_000000/predictions.npz")
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return {name: arrays[name] for name in arrays.files}


# ---------------------------------------------------------------- the method table


def method_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Each method at its validation-selected trial (paper Table 1, with selection done on validation).

    For method m the selected trial is the finished one with the highest `val_top1_m`;
    `test_top1` is its test accuracy, `test_oracle_top1` the best test accuracy of m
    over every trial and grid setting (the paper's way; optimistic). VS2 is split into
    plain SAEs (w_aux = 0) and PASS SAEs (w_aux > 0) when the sweep has both.
    Accuracies are in %; `delta` is test_top1 minus zero-shot's, in points.
    """
    done = trials[trials["status"] == STATUS_DONE] if "status" in trials else trials
    rows = []
    w_aux = done["pass.w_aux"] if "pass.w_aux" in done else pd.Series(0.0, index=done.index)
    for method in methods_in(done):
        subsets = [(method, done)]
        if method == "vs2":
            subsets = [("vs2", done[w_aux == 0]), ("vs2_pass", done[w_aux > 0])]
        for key, subset in subsets:
            subset = subset.dropna(subset=[f"val_top1_{method}"])
            if subset.empty:
                continue
            best = subset.loc[subset[f"val_top1_{method}"].idxmax()]
            chosen = {k: best[k] for k in _relevant_keys(subset, method) if pd.notna(best[k])}
            for column in _selected(best, method):  # the setting chosen within the trial (γ, λ, q, a, N)
                chosen[column.removeprefix("selected_").removesuffix(f"_{method}")] = best[column]
            rows.append(
                {
                    "key": key,
                    "method": METHOD_LABELS[key],
                    "val_top1": 100 * best[f"val_top1_{method}"],
                    "test_top1": 100 * best[f"test_top1_{method}"],
                    "test_oracle_top1": 100 * subset[f"test_oracle_top1_{method}"].max(),
                    "coverage": best.get(f"coverage_{method}", np.nan),
                    "trial_id": best["trial_id"],
                    "selected": ", ".join(f"{k}={_short(v)}" for k, v in chosen.items()),
                }
            )
    table = pd.DataFrame(rows)
    if not table.empty and "zero_shot" in set(table["key"]):
        zero = table.loc[table["key"] == "zero_shot", "test_top1"].iloc[0]
        table.insert(4, "delta", table["test_top1"] - zero)
    return table


SAE_FREE_METHODS = ("zero_shot", "centroid_shift", "weighted_rag", "clip_steer")  # results do not depend on the SAE


def _relevant_keys(trials: pd.DataFrame, method: str) -> list[str]:
    """The sampled SAE keys that shape `method`'s result (steering values are in its selected_* columns)."""
    if method in SAE_FREE_METHODS:
        return []
    return [k for k in searched_keys(trials) if k.startswith(("sae.", "pass."))]


def _selected(row: pd.Series, method: str) -> list[str]:
    return [c for c in row.index if c.startswith("selected_") and c.endswith(f"_{method}") and pd.notna(row[c])]


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_summary(trials: pd.DataFrame, config: Any, top: int = 5) -> str:
    """The sweep's closing printout: trial counts, the best trials by the search metric, the method table."""
    if trials.empty:
        return "no trials"
    counts = trials["status"].value_counts().to_dict()
    lines = ["trials: " + ", ".join(f"{n} {status.lower()}" for status, n in counts.items())]
    for _, failed in trials[trials["status"] == STATUS_ERROR].iterrows():
        lines.append(f"  failed trial {failed['trial_id']}: {failed['error']}")
    metric, mode = config.search.metrics[0], config.search.modes[0]
    best = best_trials(trials, config.search, top)
    if len(best):
        shown = ["trial_id", *searched_keys(best), metric, "fvu", "sae_cache_hit", "trial_seconds"]
        shown = [c for c in dict.fromkeys(shown) if c in best]
        lines += ["", f"best trials by {metric} ({mode}):", best[shown].to_string(index=False, float_format="%.4g")]
    table = method_table(trials)
    if not table.empty:
        shown = [c for c in ("method", "val_top1", "test_top1", "delta", "test_oracle_top1", "trial_id") if c in table]
        lines += [
            "",
            "each method at its validation-selected trial (top-1 %; test-oracle = best test figure, optimistic):",
            table[shown].to_string(index=False, float_format="%.2f"),
        ]
    return "\n".join(lines)
