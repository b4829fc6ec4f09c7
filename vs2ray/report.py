"""A finished sweep as report.md plus PNG figures (`python -m vs2ray report` = `python -m analysis.report`).

Needs no running Ray: it reads the experiment dir through `vs2ray.results`. Written:

    report.md                 the method table (paper Table 1 layout), best trials, per-class tables
    heatmap_gamma_lambda.png  validation top-1 of VS2 over (γ, λ)
    fvu_vs_accuracy.png       test top-1 against SAE FVU by PASS w_aux, with the Pareto front
    fvu_vs_l0.png             validation FVU against L0, one dot per SAE, by SAE kind (with the by-kind table)
    accuracy_by_capacity.png  test top-1 against k, one line per expansion
    cards/latent_<f>.png      feature cards of the best VS2 trial's SAE (vs2ray/features.py)
    latent_density.png        log firing frequency of the best trial's SAE (and of each kind's best), dead counted
    by_block.png              accuracy, FVU and L0 by SAE block ([CLS], all-token and patch SAEs side by side;
                              an all-token SAE's L0 on [CLS] and on the patches)
    per_class_<method>.png    largest per-class gains and losses against zero-shot (VS2, VS2++)
    gate_coverage.png         accuracy against coverage for each FVU-gate quantile
    optuna_history.png        Optuna's optimisation history
    optuna_importance.png     Optuna's parameter importances (when at least two values varied)

A figure whose data the sweep does not have (no PASS trials, no gated method...) is left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vs2ray import plots
from vs2ray.files import StorageUnavailable, check_storage, is_uri
from vs2ray.results import (
    METHOD_LABELS,
    METHODS_FILE,
    PER_CLASS_FILE,
    STATUS_DONE,
    STATUS_ERROR,
    STATUS_STOPPED,
    best_trials,
    block_table,
    card_latents,
    density_table,
    kind_table,
    learning_curves,
    load_results,
    load_sweep_config,
    method_table,
    most_steerable,
    searched_keys,
    steerability_table,
    trial_file,
    trial_predictions,
    typographic_table,
    worst_group_table,
)
from vs2ray.steerability import SteerabilitySettings, describe_settings

PER_CLASS_METHODS = ("vs2", "vs2pp")  # the paper's Table 2 / 15


def per_class_deltas(trial_dir: str, method: str) -> pd.DataFrame:
    """Per class: zero-shot and `method` test top-1 (%), their difference, and the zero-shot confusion fixed most.

    `corrected_from` is the class zero-shot most often predicted for this class's images
    that `method` then got right, with `corrected` the number of such images.
    """
    per_class = json.loads(trial_file(trial_dir, PER_CLASS_FILE) or b"{}")
    classes, accuracy = per_class["classes"], per_class["per_class_top1"]
    predictions = trial_predictions(trial_dir)
    labels, zero, steered = predictions["labels"], predictions["zero_shot"], predictions[method]
    rows = []
    for c, name in enumerate(classes):
        fixed = (labels == c) & (zero != c) & (steered == c)
        sources, counts = np.unique(zero[fixed], return_counts=True)
        rows.append(
            {
                "class": name,
                "zero_shot": 100 * accuracy["zero_shot"][c],
                method: 100 * accuracy[method][c],
                "delta": 100 * (accuracy[method][c] - accuracy["zero_shot"][c]),
                "corrected_from": classes[sources[counts.argmax()]] if len(counts) else "",
                "corrected": int(counts.max()) if len(counts) else 0,
            }
        )
    return pd.DataFrame(rows)


def optuna_study(trials: pd.DataFrame, config: Any) -> Any:
    """An in-memory Optuna study rebuilt from the trials (no unpickling of the searcher state)."""
    import optuna

    from vs2ray.config import search_space

    metric, mode = config.search.metrics[0], config.search.modes[0]
    distributions = {key: _optuna_distribution(dist) for key, dist in search_space(config)}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize", study_name=metric)
    for _, row in trials.iterrows():
        params = {k: _plain(row[k]) for k in distributions if k in row and pd.notna(row[k])}
        done = row["status"] == STATUS_DONE and metric in row and pd.notna(row[metric])
        state = optuna.trial.TrialState.COMPLETE if done else optuna.trial.TrialState.FAIL
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={k: distributions[k] for k in params},
                value=float(row[metric]) if done else None,
                state=state,
            )
        )
    return study


def _optuna_distribution(dist: Any) -> Any:
    """The Optuna distribution of a config Distribution (the same kinds the sweep's SearchSpace suggests)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if dist.kind == "choice":
        return CategoricalDistribution(list(dist.values))
    low, high = dist.values
    if dist.kind == "int":
        return IntDistribution(low, high)
    return FloatDistribution(low, high, log=dist.kind == "loguniform")


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _markdown(frame: pd.DataFrame, floats: str = "{:.2f}") -> str:
    """A DataFrame as a GitHub table (no tabulate dependency)."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    lines = [header, "|" + "---|" * len(frame.columns)]
    for _, row in frame.iterrows():
        cells = [
            floats.format(v) if isinstance(v, float) and not pd.isna(v) else ("" if pd.isna(v) else str(v)) for v in row
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def method_section(table: pd.DataFrame) -> str:
    shown = table.rename(
        columns={
            "val_top1": "val top-1",
            "test_top1": "test top-1",
            "delta": "Δ zero-shot",
            "test_oracle_top1": "test-oracle best †",
            "coverage": "coverage",
            "empty_negatives": "S− empty",
            "val_worst_group": "val worst-group",
            "test_worst_group": "test worst-group",
            "trial_id": "trial",
            "selected": "selected on validation",
        }
    ).drop(columns=["key"])
    shown = shown.drop(columns=[c for c in ("coverage", "S− empty") if c in shown and shown[c].isna().all()])
    criterion = "worst-group accuracy" if "val worst-group" in shown else "top-1"
    return (
        f"Each method at the trial (and, within it, the grid setting) with the best **validation** {criterion}; "
        "test top-1 (%) is reported there. † test-oracle best = the best test top-1 over every trial "
        "and setting, the paper's way of choosing γ and λ: optimistic, not a result. `rule` is the VS2++ "
        "positive rule the row used (`query`: S+ shares the query's label; `majority`: the neighbours' most "
        "frequent label); the oracle's S+ shares the query's true label. Coverage: for the FVU gate the share "
        "steered; for VS2++ and CLIP-space steering the share of queries steered (an empty S+ stays unsteered). "
        "S− empty: the share of queries whose neighbours were all positives; `retrieval.empty_negatives: "
        "pool_mean` steered them against the pool's mean code (or embedding), `skip` left them unsteered.\n\n"
        + _markdown(shown)
    )


def block_section(blocks: pd.DataFrame) -> str:
    """The by-block table: per block and token set, SAE quality and each method's test top-1."""
    shown = blocks.rename(columns={m: METHOD_LABELS[m] for m in METHOD_LABELS if m in blocks})
    shown = shown.rename(
        columns={"fvu": "FVU", "val_fvu": "val FVU", "l0": "L0", "l0_cls": "L0 [CLS]", "l0_patches": "L0 patches"}
    )
    return (
        "Steering at block L changes block L's tokens and runs blocks L+1 … end of the real encoder. Per block "
        "and token set the SAE read ([CLS], every token, or the patches): FVU, validation FVU and L0 averaged "
        "over the block's SAEs (an all-token SAE's L0 also on its [CLS] and its patch tokens), then each "
        "method's test top-1 (%) at the block's trial with the best validation top-1 for that method.\n\n"
        + _markdown(shown, "{:.4g}")
    )


def cards_section(done: pd.DataFrame, config: Any, out: Path) -> list[str]:
    """Feature cards of the best VS2 trial's SAE (vs2ray.features), copied beside the report; a line saying why
    when its SAE or store is not on this machine."""
    import shutil

    from vs2ray.features import cards_markdown, feature_cards

    column = "val_top1_vs2" if "val_top1_vs2" in done else config.search.metrics[0]
    if column not in done or "sae_dir" not in done or done[column].isna().all():
        return []
    best = done.loc[done[column].idxmax()]
    title = [f"## Feature cards (trial {best['trial_id']}, best by `{column}`)", ""]
    try:
        reasons = card_latents(best, str(best["trial_dir"]))
        cards = feature_cards(str(best["sae_dir"]), log=lambda _: None, reasons=reasons)
    except (OSError, KeyError, RuntimeError) as error:  # the SAE or its store lives elsewhere (a cluster's disk)
        return [*title, f"No cards: {type(error).__name__}: {error}", ""]
    shutil.copytree(cards.directory, out / "cards", dirs_exist_ok=True)
    agreement = cards.mean_agreement
    measured = (
        f" Names agree with their top images' labels {100 * agreement[0]:.0f}% of the time (chance "
        f"{100 * agreement[1]:.0f}%)."
        if agreement
        else ""
    )
    intro = (
        "Per class, the latent most specific to its images (mean activation over them minus over all), then the "
        "latents this trial's `ablate` removed and its most steerable ones (where it ran them), each with its "
        "top-activating training images (activation under each; a heatmap over the patches for token SAEs), how "
        "often it fires, its name "
        "(the class whose text embedding is nearest its decoder direction through the head) and its steering "
        "effect: the classes whose top-1 on the store's images moves most, in points, when the latent is switched "
        f"on at its mean top activation or ablated (last-block SAEs).{measured}\n\n"
    )
    return [*title, intro + cards_markdown(cards, "cards/"), ""]


def density_section(density: pd.DataFrame) -> str:
    """The latent-density table: dead, dense and the bulk of each SAE shown."""
    return (
        "How often each latent fires on its SAE's training rows, for the best trial by the search metric and, "
        "when kinds were searched, each kind's best trial: dead latents never fire, dense ones fire on more than "
        "10% of rows; the median is over the live latents (`latent_density.png` has the whole histogram).\n\n"
        + _markdown(density, "{:.3g}")
    )


def kind_section(kinds: pd.DataFrame) -> str:
    """The by-kind table: per SAE kind and normalisation, SAE quality and each method's test top-1."""
    shown = kinds.rename(columns={m: METHOD_LABELS[m] for m in METHOD_LABELS if m in kinds})
    shown = shown.rename(
        columns={"fvu": "FVU", "val_fvu": "val FVU", "l0": "L0", "l0_p10": "L0 p10", "l0_p90": "L0 p90"}
    )
    shown = shown.rename(columns={"dead_fraction": "dead"})
    return (
        "Per SAE kind (`sae.kind`, METHOD.md §9) and input normalisation: FVU, validation FVU, L0 (mean and its "
        "10th / 90th percentile over samples) and the dead share averaged over the kind's SAEs, then each "
        "method's test top-1 (%) at the kind's trial with the best validation top-1 for that method. top-k fixes "
        "every sample's L0 at k, BatchTopK and Matryoshka its mean; JumpReLU and ReLU + L1 reach theirs.\n\n"
        + _markdown(shown, "{:.4g}")
    )


def _with_method_labels(table: pd.DataFrame) -> pd.DataFrame:
    """`table` with its "<method> <figure>" columns named by the methods' labels."""
    return table.rename(
        columns={c: c.replace(m, METHOD_LABELS[m]) for c in table for m in METHOD_LABELS if c.startswith(f"{m} ")}
    )


def worst_group_section(groups: pd.DataFrame) -> str:
    """Average and worst-group test accuracy by block (the companion paper's suppression view)."""
    shown = _with_method_labels(groups)
    return (
        "Per block and token set, each method at the block's trial (and grid setting) with the best "
        "**validation** worst-group accuracy: test top-1 (avg, %) and test worst-group accuracy (worst, %: the "
        "lowest accuracy over the class × attribute groups). Zero-shot does not depend on the block; it is "
        "repeated per block for comparison.\n\n" + _markdown(shown)
    )


def typographic_section(attacks: pd.DataFrame) -> str:
    """Attacked, typographic and clean test accuracy by block (the companion paper's typographic-attack view)."""
    shown = _with_method_labels(attacks)
    return (
        "Per block and token set, each method at the block's trial (and grid setting) with the best "
        "**validation** top-1. On the attacked test images (another class's name written on them): true-label "
        "accuracy (true, %) and typographic accuracy (typographic, %: the share predicted as the written class, "
        "what the attack wants). On the test images with no word (where the dataset has them): top-1 (clean, "
        "%), what a method costs when there is no attack. Suppression (`ablate`) removes the latents that track "
        "the written word (or a word being there at all, `text_present`) within a class, chosen on the "
        "validation images. Zero-shot does not depend on the block; it is repeated per block.\n\n" + _markdown(shown)
    )


def per_group_section(done: pd.DataFrame, config: Any) -> list[str]:
    """Per-group test accuracy of every method in the trial that is best by the search metric (if it has groups)."""
    metric = config.search.metrics[0] if config is not None else None
    if metric is None or metric not in done or done[metric].isna().all():
        return []
    best = done.loc[done[metric].idxmax() if config.search.modes[0] == "max" else done[metric].idxmin()]
    text = trial_file(best["trial_dir"], PER_CLASS_FILE)
    accuracies = json.loads(text) if text is not None else {}
    if "per_group_top1" not in accuracies:
        return []
    table = (
        pd.DataFrame(
            {METHOD_LABELS.get(m, m): [100 * a for a in values] for m, values in accuracies["per_group_top1"].items()},
            index=accuracies["groups"],
        )
        .rename_axis("group")
        .reset_index()
    )
    return [
        f"Per-group test accuracy (%) in trial {best['trial_id']} (block {best.get('sae_block', '')}, "
        f"best by `{metric}`), each method at its validation-selected setting:",
        "",
        _markdown(table),
        "",
    ]


def steerability_section(shares: pd.DataFrame, ranked: pd.DataFrame, config: Any) -> str:
    """Share of steerable latents against neurons by block, then the most steerable latents."""
    rule = ""
    if config is not None:
        rule = f" ({describe_settings(SteerabilitySettings.from_keys(config.steerability.model_dump()))})"
    text = (
        f"Share of the sampled SAE latents and of the block's neurons (residual-stream coordinates) that are "
        f"steerable{rule}: clamped alone at the block, they move the output distribution over the concept "
        "vocabulary onto few concepts (S_f = Σ_c (Δ̄p_c)², the authors' score, or the top concepts' gain; "
        "P_f = max_c Δ̄p_c; vs2ray docs/companion.md), with each share's 95% interval over the sampled units."
        "\n\n" + _markdown(shares, "{:.1f}")
    )
    if len(ranked):
        text += "\n\nMost steerable latents over every trial:\n\n" + _markdown(ranked, "{:.3f}")
    return text


def write_report(experiment: str, out: Path) -> Path:
    """Write report.md and the figures for `experiment` into `out`; return the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    trials = load_results(experiment)
    config = load_sweep_config(experiment)
    done = trials[trials["status"] == STATUS_DONE] if len(trials) else trials
    select_by = config.steering.select_by if config is not None else "top1"
    table = method_table(trials, select_by) if len(done) else pd.DataFrame()
    counts = trials["status"].value_counts().to_dict() if len(trials) else {}
    lines = [
        f"# Sweep report: {Path(experiment).name}",
        "",
        f"Experiment: `{experiment}`  ",
        "Trials: " + (", ".join(f"{n} {s.lower()}" for s, n in counts.items()) or "none"),
        "",
    ]
    if config is not None:
        lines += [
            f"Model `{config.model.arch}` / `{config.model.pretrained}` on `{config.dataset.name}`; "
            f"search: {config.search.sampler}, metric `{config.search.metric}` ({config.search.mode}).",
            "",
        ]
    figures: list[tuple[str, Path | None]] = []
    if not table.empty:
        lines += ["## Methods (paper Table 1 layout)", "", method_section(table), ""]
    failed = trials[trials["status"] == STATUS_ERROR] if len(trials) else trials
    if len(failed):
        lines += ["## Failed trials", "", _markdown(failed[["trial_id", *searched_keys(failed), "error"]]), ""]
    stopped = trials[trials["status"] == STATUS_STOPPED] if len(trials) else trials
    if len(stopped):
        metric = config.search.metrics[0] if config is not None else "val_fvu"
        wanted = ["trial_id", *searched_keys(stopped), "stopped_step", metric, "val_fvu"]
        shown = [c for c in dict.fromkeys(wanted) if c in stopped]
        lines += [
            f"## Stopped early by the {config.search.scheduler if config else ''} scheduler",
            "",
            "Each trial's last intermediate result, at the SAE step where it was stopped (its SAE is not cached).",
            "",
            _markdown(stopped[shown], "{:.4g}"),
            "",
        ]
    if len(done) and config is not None:
        metric = config.search.metrics[0]
        best = best_trials(trials, config.search)
        shown = [c for c in ["trial_id", *searched_keys(done), metric, "fvu", "l0", "sae_cache_hit"] if c in best]
        best = best[shown].copy()
        accuracies = [c for c in shown if c.startswith(("val_top", "test_top"))]
        best[accuracies] = 100 * best[accuracies]
        lines += [f"## Best trials by `{metric}` (accuracies in %)", "", _markdown(best, "{:.4g}"), ""]

    figures.append(
        (
            "Validation top-1 of VS2 over γ and λ (paper Figure 3)",
            plots.steering_heatmap(done, out / "heatmap_gamma_lambda.png"),
        )
    )
    figures.append(
        (
            "Reconstruction against accuracy over PASS w_aux (paper Table 12)",
            plots.fvu_vs_accuracy(done, out / "fvu_vs_accuracy.png"),
        )
    )
    figures.append(
        ("Accuracy by SAE k and expansion", plots.accuracy_by_capacity(done, out / "accuracy_by_capacity.png"))
    )
    if config is not None and len(done):
        lines += cards_section(done, config, out)
    kinds = kind_table(trials) if len(done) else pd.DataFrame()
    if len(kinds) > 1:
        lines += ["## By SAE kind", "", kind_section(kinds), ""]
        figures.append(("Sparsity against reconstruction by SAE kind", plots.fvu_vs_l0(done, out / "fvu_vs_l0.png")))
    if config is not None and len(done):
        density, frequencies = density_table(trials, config.search)
        if len(density):
            lines += ["## Latent density", "", density_section(density), ""]
            figures.append(("Latent density", plots.latent_density(frequencies, out / "latent_density.png")))
    blocks = block_table(trials) if len(done) else pd.DataFrame()
    if len(blocks) > 1:
        lines += ["## By block (steering inside the encoder)", "", block_section(blocks), ""]
        figures.append(("Accuracy, FVU and L0 by block", plots.by_block(blocks, out / "by_block.png")))

    attacks = typographic_table(trials) if len(done) else pd.DataFrame()
    # a typographic set's groups are object × written word: hundreds, most with a few images, so its
    # attacked / typographic / clean table stands in for the worst-group one
    groups = worst_group_table(trials) if len(done) and not len(attacks) else pd.DataFrame()
    if len(groups):
        lines += ["## Worst-group accuracy by block (feature suppression)", "", worst_group_section(groups), ""]
        lines += per_group_section(done, config)
    if len(attacks):
        lines += ["## Typographic attacks by block", "", typographic_section(attacks), ""]
    shares = steerability_table(trials) if len(done) else pd.DataFrame()
    if len(shares):
        lines += ["## Steerability by block", "", steerability_section(shares, most_steerable(trials), config), ""]

    selected = dict(zip(table["key"], table["trial_id"], strict=True)) if not table.empty else {}
    trial_dirs = dict(zip(trials["trial_id"], trials["trial_dir"], strict=True)) if len(trials) else {}
    for method in PER_CLASS_METHODS:
        if method not in selected or "zero_shot" not in selected:
            continue
        deltas = per_class_deltas(trial_dirs[selected[method]], method)
        label = METHOD_LABELS[method]
        lines += [f"## Per-class changes: {label} (trial {selected[method]}, paper Table 2 / 15)", ""]
        ranked = deltas.sort_values("delta")
        gains, losses = ranked[ranked["delta"] > 0].tail(5).iloc[::-1], ranked[ranked["delta"] < 0].head(5)
        for title, part in (("gains", gains), ("losses", losses)):
            renamed = part.rename(columns={"corrected": "n corrected", "corrected_from": "zero-shot said (fixed)"})
            lines += [f"Largest {title}:", "", _markdown(renamed) if len(part) else f"No class has {title}.", ""]
        figures.append(
            (
                f"Per-class gains and losses: {label}",
                plots.per_class_changes(deltas, out / f"per_class_{method}.png", method),
            )
        )
    if "vs2_gated" in selected:
        methods = json.loads(trial_file(trial_dirs[selected["vs2_gated"]], METHODS_FILE) or b"{}")
        zero = done[plots.ZERO_SHOT_TEST].iloc[0] if plots.ZERO_SHOT_TEST in done else None
        ungated = methods.get("vs2", {}).get("test_top1", [])
        ungated = ungated[0] if len(ungated) == 1 else None  # plain VS2 at the same γ, λ
        figures.append(
            (
                "FVU gate: accuracy against coverage",
                plots.gate_coverage(methods["vs2_gated"], ungated, zero, out / "gate_coverage.png"),
            )
        )
    if config is not None and len(trials):
        figures.append(
            (
                "Learning curves: search metric and validation FVU against the SAE step",
                plots.learning_curves(learning_curves(trials), config.search.metrics[0], out / "learning_curves.png"),
            )
        )
    if config is not None and len(trials):
        written = plots.optuna_views(
            optuna_study(trials, config), out / "optuna_history.png", out / "optuna_importance.png"
        )
        captions = ("Optuna: optimisation history", "Optuna: parameter importances")
        figures += list(zip(captions, written, strict=False))

    lines += ["## Figures", ""]
    for caption, path in figures:
        if path is not None:
            lines += [f"**{caption}** — `{path.name}`", "", f"![{caption}]({path.name})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vs2ray report", description=__doc__.split("\n")[0])
    parser.add_argument("experiment", help="the sweep's experiment dir (local path or s3:// / gs:// URI)")
    parser.add_argument("--out", help="where to write (default: <experiment>/report, or ./report-<name> for a URI)")
    args = parser.parse_args(argv)
    experiment = args.experiment.rstrip("/")
    if args.out:
        out = Path(args.out)
    elif is_uri(experiment):
        out = Path(f"report-{experiment.rsplit('/', 1)[-1]}")
    else:
        experiment = str(Path(experiment).expanduser().resolve())
        out = Path(experiment) / "report"
    if not is_uri(experiment) and not Path(experiment).is_dir():  # nothing to report, and nothing to create there
        print(f"error: {experiment}: no such experiment dir", file=sys.stderr)
        return 2
    try:
        check_storage(experiment, write=False)
        report = write_report(experiment, out)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except StorageUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"report: {report}")
    return 0
