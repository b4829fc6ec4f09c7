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

from vs2ray.files import list_dirs, modified, read_bytes, read_text, write_text
from vs2ray.methods import METHODS, method_of, metric_name
from vs2ray.sae import DENSITY_FILE, kind_reads
from vs2ray.steerability import format_concepts

# row label of each method in tables, in registry order; "vs2_pass" is VS2 on the PASS-trained SAEs
METHOD_LABELS: dict[str, str] = {}
for _name, _method in METHODS.items():
    if _method.steer is not None:
        METHOD_LABELS[_name] = _method.label
    if _name == "vs2":
        METHOD_LABELS["vs2_pass"] = "VS2 + PASS"
STATUS_DONE, STATUS_ERROR, STATUS_INCOMPLETE = "TERMINATED", "ERROR", "INCOMPLETE"
STATUS_STOPPED = "STOPPED"  # stopped early by the scheduler (ASHA, HyperBand, median rule)
STOPPED_FILE = "vs2ray_stopped.json"  # trial id -> SAE step at which the scheduler stopped it
# the files a trial leaves in its checkpoint (vs2ray.trainable writes them)
PER_CLASS_FILE, METHODS_FILE, PREDICTIONS_FILE = "per_class.json", "methods.json", "predictions.npz"
METRICS_FILE = "metrics.json"  # the reported result, kept so that a restarted trial need not rerun
STEERABILITY_FILE = "steerability.json"  # with steerability.enabled: S of every sampled latent and neuron
CHECKPOINT_FILES = (PER_CLASS_FILE, METHODS_FILE, PREDICTIONS_FILE, METRICS_FILE)
SWEEP_CONFIG_FILE = "vs2ray_config.yaml"  # the sweep's config, saved in the experiment dir for --resume and analysis
TRIAL_DIR_PREFIX = "trial_"


# ---------------------------------------------------------------- trials


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def last_complete_result(text: str | None) -> dict[str, Any] | None:
    """The last complete result line of a trial's result.json text, or None."""
    # a driver killed while Tune uploaded the file can leave its last line cut short
    lines = [_json_or_none(line) for line in (text or "").splitlines() if line.strip()]
    complete = [line for line in lines if isinstance(line, dict) and line.get("vs2ray_complete")]
    return complete[-1] if complete else None


def _results(text: str | None) -> list[dict[str, Any]]:
    return [line for line in map(_json_or_none, (text or "").splitlines()) if isinstance(line, dict)]


def _stopped(experiment: str) -> dict[str, int]:
    """Trial id -> the SAE step at which the scheduler stopped it ({} when none was)."""
    return _json_or_none(read_text(f"{experiment}/{STOPPED_FILE}") or "{}") or {}


def record_stopped(experiment: str, trial_id: str, step: int) -> None:
    """Note in the experiment dir that the scheduler stopped `trial_id` at SAE step `step`."""
    write_text(f"{experiment}/{STOPPED_FILE}", json.dumps({**_stopped(experiment), trial_id: step}))


def learning_curves(trials: pd.DataFrame) -> pd.DataFrame:
    """Every result each trial reported (intermediate and final), one row per report: trial_id, sae_step, metrics."""
    rows = []
    for trial in trials.itertuples():
        for result in _results(read_text(f"{trial.trial_dir}/result.json")):
            if "sae_step" in result:
                metrics = {k: v for k, v in result.items() if isinstance(v, (int, float)) and "/" not in k}
                rows.append({"trial_id": trial.trial_id, "status": trial.status, **metrics})
    return pd.DataFrame(rows)


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
    stopped = _stopped(experiment)
    for name in list_dirs(experiment):
        trial_dir = f"{experiment}/{name}"
        params_text = read_text(f"{trial_dir}/params.json")
        if params_text is None:
            continue
        params = _json_or_none(params_text) or {}  # cut short only for a trial that had just started
        started = modified(f"{trial_dir}/params.json")  # Tune writes params.json when the trial starts
        trial_id = name.removeprefix(TRIAL_DIR_PREFIX)
        text = read_text(f"{trial_dir}/result.json")
        result = last_complete_result(text)
        error = read_text(f"{trial_dir}/error.txt")
        status = STATUS_DONE if result else STATUS_ERROR if error else STATUS_INCOMPLETE
        if status == STATUS_INCOMPLETE and trial_id in stopped:
            status, result = STATUS_STOPPED, {**_results(text)[-1], "stopped_step": stopped[trial_id]}
        row = {
            "trial_id": trial_id,
            "status": status,
            "error": _error_summary(error) if status == STATUS_ERROR else "",
            "trial_dir": trial_dir,
            "started": started,
        }
        row.update(params)
        if result:
            skip = ("config", "vs2ray_complete", "vs2ray_intermediate")
            row.update({k: v for k, v in result.items() if k not in skip and "/" not in k})
        rows.append(row)
    trials = pd.DataFrame(rows)
    return trials.sort_values("started", kind="stable").reset_index(drop=True) if rows else trials


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
    reported = {method_of(c, "val_top1") for c in trials.columns}
    return [m for m in METHOD_LABELS if m in reported]


def trial_dir_name(trial_id: str) -> str:
    """The directory Tune gives a trial inside the experiment dir (set by the sweep)."""
    return f"{TRIAL_DIR_PREFIX}{trial_id}"


def trial_file(trial_dir: str, name: str) -> bytes | None:
    """A file the trial left in its checkpoint (per_class.json, methods.json, predictions.npz, metrics.json)."""
    return read_bytes(f"{trial_dir}/checkpoint_000000/{name}")


def trial_predictions(trial_dir: str) -> dict[str, np.ndarray]:
    """Test labels and each method's test predictions at its selected setting: name -> (n_test,) int32."""
    data = trial_file(trial_dir, PREDICTIONS_FILE)
    if data is None:
        raise FileNotFoundError(f"{trial_dir} has no checkpoint_000000/predictions.npz")
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return {name: arrays[name] for name in arrays.files}


# ---------------------------------------------------------------- the method table


def method_table(trials: pd.DataFrame, select_by: str = "top1") -> pd.DataFrame:
    """Each method at its validation-selected trial (paper Table 1, with selection done on validation).

    For method m the selected trial is the finished one with the highest `val_top1_m` (with
    `select_by="worst_group"`, the highest `val_worst_group_m`; the table then also shows the selected
    trial's validation and test worst-group accuracy);
    `test_top1` is its test accuracy, `test_oracle_top1` the best test accuracy of m
    over every trial and grid setting (the paper's way; optimistic). VS2 is split into
    plain SAEs (w_aux = 0) and PASS SAEs (w_aux > 0) when the sweep has both.
    Accuracies are in %; `delta` is test_top1 minus zero-shot's, in points.
    """
    done = _done(trials)
    rows = []
    w_aux = done["pass.w_aux"] if "pass.w_aux" in done else pd.Series(0.0, index=done.index)
    for method in methods_in(done):
        subsets = [(method, done)]
        if method == "vs2":
            subsets = [("vs2", done[w_aux == 0]), ("vs2_pass", done[w_aux > 0])]
        selection = metric_name("val_worst_group" if select_by == "worst_group" else "val_top1", method)
        for key, subset in subsets:
            subset = subset.dropna(subset=[selection]) if selection in subset else subset.iloc[:0]
            if subset.empty:
                continue
            best = subset.loc[subset[selection].idxmax()]
            kind = best.get("sae_kind", best.get("sae.kind", "topk"))
            chosen = {
                k: best[k]
                for k in _relevant_keys(subset, method)
                if pd.notna(best[k]) and kind_reads(str(kind), k.removeprefix("sae."))
            }
            for column in _selected(best, method):  # the setting chosen within the trial (γ, λ, q, a, N)
                chosen[column.removeprefix("selected_").removesuffix(f"_{method}")] = best[column]
            rows.append(
                {
                    "key": key,
                    "method": METHOD_LABELS[key],
                    "val_top1": 100 * best[metric_name("val_top1", method)],
                    "test_top1": 100 * best[metric_name("test_top1", method)],
                    "test_oracle_top1": 100 * subset[metric_name("test_oracle_top1", method)].max(),
                    "coverage": best.get(metric_name("coverage", method), np.nan),
                    "empty_negatives": best.get(metric_name("empty_negatives", method), np.nan),
                    **(
                        {
                            "val_worst_group": 100 * best[metric_name("val_worst_group", method)],
                            "test_worst_group": 100 * best[metric_name("test_worst_group", method)],
                        }
                        if select_by == "worst_group"
                        else {}
                    ),
                    "trial_id": best["trial_id"],
                    "selected": ", ".join(f"{k}={_short(v)}" for k, v in chosen.items()),
                }
            )
    table = pd.DataFrame(rows)
    if not table.empty and "zero_shot" in set(table["key"]):
        zero = table.loc[table["key"] == "zero_shot", "test_top1"].iloc[0]
        table.insert(4, "delta", table["test_top1"] - zero)
    return table


BLOCK_COLUMNS = ("sae_block", "sae_tokens")  # what every trial reports about where its SAE reads


def block_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Accuracy and SAE quality by block and token set (the companion paper's layer-wise view).

    One row per (block, tokens) with finished trials: their count; the FVU, validation FVU and
    L0 averaged over the group's distinct SAEs; then per method the test top-1 (%) at the
    group's trial with the best validation top-1 for that method (selection as in `method_table`).
    """
    rows = []
    for (block, tokens), group in _done_by_block(trials):
        saes = group.drop_duplicates("sae_dir")
        row: dict[str, Any] = {"block": int(block), "tokens": tokens, "trials": len(group)}
        measured = ("fvu", "val_fvu", "l0", "l0_cls", "l0_patches")
        row.update({name: saes[name].mean() for name in measured if name in saes and saes[name].notna().any()})
        for method in methods_in(group):
            scored = group.dropna(subset=[metric_name("val_top1", method)])
            best = scored.loc[scored[metric_name("val_top1", method)].idxmax()]
            row[method] = 100 * best[metric_name("test_top1", method)]
        rows.append(row)
    return pd.DataFrame(rows)


KIND_COLUMNS = ("sae_kind", "sae_normalize")  # which SAE a trial trained, whatever was searched
KIND_SAE_METRICS = ("fvu", "val_fvu", "l0", "l0_p10", "l0_p90", "dead_fraction")


def kind_table(trials: pd.DataFrame) -> pd.DataFrame:
    """SAE quality and accuracy by SAE kind and input normalisation (METHOD.md §9).

    One row per (kind, normalisation) with finished trials: their count and distinct SAEs; FVU, validation
    FVU, L0 (mean, 10th and 90th percentile) and dead fraction averaged over the distinct SAEs; then per
    method the test top-1 (%) at the group's trial with the best validation top-1 for that method.
    """
    done = _done(trials)
    if done.empty or "sae_kind" not in done:
        return pd.DataFrame()
    # trials written before sae.normalize existed report no normalisation: they had none
    done = done.assign(sae_normalize=done.get("sae_normalize", pd.Series("none", index=done.index)).fillna("none"))
    rows = []
    for (kind, normalize), group in done.groupby(list(KIND_COLUMNS), sort=True):
        saes = group.drop_duplicates("sae_dir") if "sae_dir" in group else group
        row: dict[str, Any] = {"kind": kind, "normalize": normalize, "trials": len(group), "SAEs": len(saes)}
        row.update({name: saes[name].mean() for name in KIND_SAE_METRICS if name in saes})
        for method in methods_in(group):
            scored = group.dropna(subset=[metric_name("val_top1", method)])
            if len(scored):
                best = scored.loc[scored[metric_name("val_top1", method)].idxmax()]
                row[method] = 100 * best[metric_name("test_top1", method)]
        rows.append(row)
    return pd.DataFrame(rows)


def sae_density(sae_dir: str) -> np.ndarray | None:
    """The share of its training rows each latent of the SAE at `sae_dir` fired on (n_latents,), from its
    density.safetensors; None for an SAE without one (imported, or trained before densities were kept)."""
    from safetensors.numpy import load

    data = read_bytes(f"{sae_dir.rstrip('/')}/{DENSITY_FILE}")
    return None if data is None else load(data)["frequency"]


def density_table(trials: pd.DataFrame, search: Any) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The latent densities of the best trial by the search metric and of each SAE kind's best trial: a table
    (SAE, trial, kind, latents, dead %, dense % (fired on more than 10% of rows), median frequency of the
    live latents) and each SAE's frequencies by its row's label."""
    done = _done(trials)
    if done.empty or "sae_dir" not in done:
        return pd.DataFrame(), {}
    metric, mode = search.metrics[0], search.modes[0]
    if metric not in done:
        return pd.DataFrame(), {}
    ranked = done.dropna(subset=[metric]).sort_values(metric, ascending=mode == "min")
    chosen = {"best trial": ranked.iloc[0]} if len(ranked) else {}
    if "sae_kind" in ranked and ranked["sae_kind"].nunique() > 1:
        chosen.update({f"best {kind}": group.iloc[0] for kind, group in ranked.groupby("sae_kind", sort=True)})
    rows, densities = [], {}
    for label, trial in chosen.items():
        frequency = sae_density(str(trial["sae_dir"]))
        if frequency is None:
            continue
        live = frequency[frequency > 0]
        densities[label] = frequency
        rows.append(
            {
                "SAE": label,
                "trial": trial["trial_id"],
                "kind": trial.get("sae_kind", "topk"),
                "latents": len(frequency),
                "dead %": 100 * float((frequency == 0).mean()),
                "dense %": 100 * float((frequency > 0.1).mean()),
                "median frequency": float(np.median(live)) if len(live) else float("nan"),
            }
        )
    return pd.DataFrame(rows), densities


def _done(trials: pd.DataFrame) -> pd.DataFrame:
    """The finished trials (every row of a frame without a status column)."""
    return trials[trials["status"] == STATUS_DONE] if "status" in trials else trials


def _done_by_block(trials: pd.DataFrame) -> Any:
    done = _done(trials)
    if done.empty or not set(BLOCK_COLUMNS) <= set(done):
        return []
    return done.groupby(list(BLOCK_COLUMNS), sort=True)


def worst_group_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Average and worst-group test accuracy (%) by block and token set, for every method that reports groups.

    Per (block, tokens) and method, the trial with the best validation worst-group accuracy for that
    method gives its test top-1 ("avg") and test worst-group accuracy ("worst"). Empty without groups.
    """
    rows = []
    for (block, tokens), group in _done_by_block(trials):
        row: dict[str, Any] = {"block": int(block), "tokens": tokens, "trials": len(group)}
        for method in methods_in(group):
            selection = metric_name("val_worst_group", method)
            if _metric_missing(group, selection):
                continue
            best = group.loc[group[selection].idxmax()]
            row[f"{method} avg"] = 100 * best[metric_name("test_top1", method)]
            row[f"{method} worst"] = 100 * best[metric_name("test_worst_group", method)]
        if len(row) > 3:
            rows.append(row)
    return pd.DataFrame(rows)


def typographic_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy (%) under typographic attack by block and token set, for every method on a typographic
    dataset: on the attacked images (another class's name written) the share predicted as the true class
    (`true`) and as the written class (`typographic`), and top-1 on the images without a word (`clean`,
    where the dataset has them: shapes_typographic).

    Per (block, tokens) and method, the trial with the best validation top-1 for that method gives all three.
    Empty on other datasets.
    """
    columns = {"true": "test_attacked_top1", "typographic": "test_typographic", "clean": "test_clean_top1"}
    rows = []
    for (block, tokens), group in _done_by_block(trials):
        row: dict[str, Any] = {"block": int(block), "tokens": tokens, "trials": len(group)}
        for method in methods_in(group):
            if _metric_missing(group, metric_name("test_typographic", method)):
                continue
            best = group.loc[group[metric_name("val_top1", method)].idxmax()]
            for column, kind in columns.items():
                if not _metric_missing(group, metric_name(kind, method)):
                    row[f"{method} {column}"] = 100 * best[metric_name(kind, method)]
        if len(row) > 3:
            rows.append(row)
    return pd.DataFrame(rows)


def _metric_missing(trials: pd.DataFrame, metric: str) -> bool:
    return metric not in trials or trials[metric].isna().all()


def steerability_table(trials: pd.DataFrame) -> pd.DataFrame:
    """The share (%) of steerable latents and of steerable neurons by block and token set, and the numbers of
    steerable units they imply (share × the block's latents or width), averaged over the block's trials that
    measured them (steerability.enabled). Empty when none did."""
    rows = []
    for (block, tokens), group in _done_by_block(trials):
        measured = group.dropna(subset=["steerable_latents"]) if "steerable_latents" in group else group.iloc[:0]
        if len(measured):
            rows.append(
                {
                    "block": int(block),
                    "tokens": tokens,
                    "trials": len(measured),
                    "latents steerable %": 100 * measured["steerable_latents"].mean(),
                    "latents 95% interval": _interval(measured, "steerable_latents"),
                    "neurons steerable %": 100 * measured["steerable_neurons"].mean(),
                    "neurons 95% interval": _interval(measured, "steerable_neurons"),
                    "steerable latents (est.)": measured["steerable_latents_count"].mean(),
                    "steerable neurons (est.)": measured["steerable_neurons_count"].mean(),
                    "distinct top concepts (latents)": _mean_or_nan(measured, "steerable_latents_concepts"),
                }
            )
    return pd.DataFrame(rows)


def _mean_or_nan(trials: pd.DataFrame, column: str) -> float:
    return float(trials[column].mean()) if column in trials else float("nan")


def _interval(trials: pd.DataFrame, share: str) -> str:
    """'[lo, hi]' (%) of a share's 95% Wilson interval, averaged over the trials that report one ('' if none)."""
    if f"{share}_low" not in trials or trials[f"{share}_low"].isna().all():
        return ""
    return f"[{100 * trials[f'{share}_low'].mean():.1f}, {100 * trials[f'{share}_high'].mean():.1f}]"


def most_steerable(trials: pd.DataFrame, limit: int = 10) -> pd.DataFrame:
    """The `limit` latents with the largest S over every finished trial's steerability file, with their concepts."""
    rows = []
    for _, trial in _done(trials).iterrows():
        text = trial_file(trial["trial_dir"], STEERABILITY_FILE)
        if text is None:
            continue
        measured = json.loads(text)
        for unit in measured["units"]:
            if unit["kind"] == "latent":
                concepts = format_concepts(unit["concepts"], unit["gains"])
                rows.append(
                    {
                        "trial": trial["trial_id"],
                        "block": measured["block"],
                        "tokens": trial.get("sae_tokens", ""),
                        "latent": unit["unit"],
                        "S": unit["score"],
                        "S_f": unit.get("sum_squares", float("nan")),
                        "P_f": unit.get("power", float("nan")),
                        "direction": unit["direction"],
                        "top concepts (gain)": concepts,
                    }
                )
    ranked = pd.DataFrame(rows)
    return ranked.sort_values("S", ascending=False).head(limit) if len(ranked) else ranked


def card_latents(result: Any, trial_dir: str, steerable: int = 3) -> dict[int, str]:
    """The latents of one trial worth a feature card, each with why: those `ablate` removed at its selected
    setting (`latents_ablate`), then the `steerable` latents with the largest S in its steerability file.
    `result`: the trial's result (a dict, or a row of `load_results`)."""
    chosen: dict[int, str] = {}
    removed = result.get("latents_ablate")
    if isinstance(removed, str) and removed:
        how = f"{result.get('selected_score_ablate')}, {result.get('selected_n_latents_ablate')} latents"
        chosen.update({int(latent): f"ablate removed it ({how})" for latent in removed.split(",")})
    text = trial_file(trial_dir, STEERABILITY_FILE)
    units = [u for u in json.loads(text)["units"] if u["kind"] == "latent"] if text is not None else []
    for unit in sorted(units, key=lambda u: -u["score"])[:steerable]:
        toward = f" toward {unit['concepts'][0]}" if unit["concepts"] else ""
        reason = f"steerable (S {unit['score']:.2f}{toward})"
        chosen[int(unit["unit"])] = f"{chosen[int(unit['unit'])]}; {reason}" if unit["unit"] in chosen else reason
    return chosen


def _relevant_keys(trials: pd.DataFrame, method: str) -> list[str]:
    """The sampled SAE keys that shape `method`'s result (steering values are in its selected_* columns)."""
    if not METHODS[method].uses_sae:
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
    table = method_table(trials, config.steering.select_by)
    if not table.empty:
        wanted = ("method", "val_top1", "test_top1", "delta", "test_oracle_top1", "val_worst_group", "test_worst_group")
        shown = [c for c in (*wanted, "trial_id") if c in table]
        lines += [
            "",
            "each method at its validation-selected trial (top-1 %; test-oracle = best test figure, optimistic):",
            table[shown].to_string(index=False, float_format="%.2f"),
        ]
    return "\n".join(lines)
