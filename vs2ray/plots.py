"""The report's figures, one function each: a trials DataFrame (vs2ray.results) in, a PNG out.

Every function returns the path it wrote, or None when the sweep has nothing to show
for it (e.g. no PASS trials for the Pareto plot), so the report simply leaves it out.
Accuracies are plotted in %.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a cluster head or in CI
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd

from vs2ray.methods import metric_name
from vs2ray.results import METHOD_LABELS

ZERO_SHOT_TEST = metric_name("test_top1", "zero_shot")

DPI = 130


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def steering_heatmap(trials: pd.DataFrame, out: Path, method: str = "vs2", bins: int = 6) -> Path | None:
    """Mean validation top-1 of `method` over (γ, λ) cells, with every trial as a dot (paper Figure 3 / 5)."""
    column = metric_name("val_top1", method)
    needed = {"steering.gamma", "steering.lambda", column}
    if not needed <= set(trials) or trials[column].notna().sum() < 2:
        return None
    data = trials.dropna(subset=list(needed))
    gamma, lam, acc = data["steering.gamma"], data["steering.lambda"], 100 * data[column]
    if gamma.nunique() < 2 or lam.nunique() < 2:  # a line, not a map: nothing to show over (γ, λ)
        return None
    g_edges = np.linspace(gamma.min(), gamma.max(), bins + 1)
    l_edges = np.linspace(lam.min(), lam.max(), bins + 1)
    g_index = np.clip(np.digitize(gamma, g_edges) - 1, 0, bins - 1)
    l_index = np.clip(np.digitize(lam, l_edges) - 1, 0, bins - 1)
    total, count = np.zeros((bins, bins)), np.zeros((bins, bins))
    np.add.at(total, (l_index, g_index), acc)
    np.add.at(count, (l_index, g_index), 1)
    mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    fig, ax = plt.subplots(figsize=(6.8, 5.4))
    mesh = ax.pcolormesh(g_edges, l_edges, np.ma.masked_invalid(mean), cmap="viridis", shading="flat")
    ax.scatter(gamma, lam, c="white", edgecolors="black", s=22, label="a trial", clip_on=False, zorder=3)
    gammas = np.linspace(max(gamma.min(), 1.01), gamma.max(), 100)
    for product, style in ((2, "--"), (3, ":")):  # the paper's broad optimum lies between λ·γ = 2 and 3
        ax.plot(gammas, product / gammas, style, color="black", lw=1, label=f"λ·γ = {product}")
    ax.set(xlim=(g_edges[0], g_edges[-1]), ylim=(l_edges[0], l_edges[-1]))
    ax.set_xlabel("amplification γ")
    ax.set_ylabel("steering scale λ")
    ax.set_title(f"{_label(method)}: validation top-1 (%) by γ and λ\n(cell = mean of its trials; blank = no trial)")
    fig.colorbar(mesh, ax=ax, label="validation top-1 (%)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=8, frameon=False)
    return _save(fig, out)


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Indices of the points (fvu, accuracy) no other point beats on both (lower FVU, higher accuracy)."""
    order = np.lexsort((-points[:, 1], points[:, 0]))  # by FVU, then best accuracy first
    front, best = [], -np.inf
    for i in order:
        if points[i, 1] > best:
            front.append(i)
            best = points[i, 1]
    return np.asarray(front, dtype=int)


def fvu_vs_accuracy(trials: pd.DataFrame, out: Path, method: str = "vs2") -> Path | None:
    """Test top-1 of `method` against SAE FVU, coloured by PASS w_aux, with the Pareto front (paper Table 12)."""
    column = metric_name("test_top1", method)
    if not {"fvu", column} <= set(trials):
        return None
    data = trials.dropna(subset=["fvu", column])
    if len(data) < 2:
        return None
    w_aux = data["pass.w_aux"] if "pass.w_aux" in data else pd.Series(0.0, index=data.index)
    points = np.column_stack([data["fvu"], 100 * data[column]])
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for value in sorted(w_aux.unique()):
        mask = (w_aux == value).to_numpy()
        ax.scatter(points[mask, 0], points[mask, 1], s=30, label=f"w_aux = {value:g}")
    front = pareto_front(points)
    ax.plot(points[front, 0], points[front, 1], "k--", lw=1, label="Pareto front")
    if ZERO_SHOT_TEST in data:
        ax.axhline(100 * data[ZERO_SHOT_TEST].iloc[0], color="gray", lw=1, ls=":", label="zero-shot")
    ax.set_xlabel("SAE FVU (training rows; lower = better reconstruction)")
    ax.set_ylabel(f"{_label(method)} test top-1 (%)")
    ax.set_title(f"Reconstruction vs accuracy ({_label(method)}), one dot per trial")
    ax.legend(fontsize=8, title="PASS weight", title_fontsize=8)
    return _save(fig, out)


def fvu_vs_l0(trials: pd.DataFrame, out: Path) -> Path | None:
    """Validation FVU against mean L0, one dot per distinct SAE, one colour per SAE kind (and normalisation):
    the sparsity-reconstruction trade-off each kind reaches."""
    if not {"val_fvu", "l0", "sae_kind"} <= set(trials):
        return None
    saes = trials.dropna(subset=["val_fvu", "l0"])
    saes = saes.drop_duplicates("sae_dir") if "sae_dir" in saes else saes
    if len(saes) < 2:
        return None
    normalize = saes["sae_normalize"] if "sae_normalize" in saes else pd.Series("none", index=saes.index)
    label = saes["sae_kind"].astype(str) + np.where(normalize == "layer_norm", " (layer norm)", "")
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for i, name in enumerate(sorted(label.unique())):
        group = saes[label == name].sort_values("l0")
        ax.plot(group["l0"], group["val_fvu"], "o-" if len(group) > 1 else "o", color=f"C{i}", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    # plain numbers at 1-2-5 steps: a log axis's own minor labels overlap at this size
    low, high = saes["val_fvu"].min(), saes["val_fvu"].max()
    ax.set_yticks([t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0) if low / 2 <= t <= 2 * high])
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("L0 (mean active latents per sample, training rows)")
    ax.set_ylabel("validation FVU (lower = better reconstruction)")
    ax.set_title("Sparsity against reconstruction by SAE kind, one dot per SAE")
    ax.legend(fontsize=8, title="sae.kind", title_fontsize=8)
    return _save(fig, out)


def latent_density(densities: dict[str, np.ndarray], out: Path) -> Path | None:
    """Histogram of log10 firing frequency over each SAE's live latents (`results.density_table`), its dead
    latents counted in the legend and the dense threshold (10% of rows) marked; None without densities."""
    if not densities:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    live_all = np.concatenate([f[f > 0] for f in densities.values()])
    if not len(live_all):
        plt.close(fig)
        return None
    bins = np.linspace(np.log10(live_all.min()) - 0.1, 0.05, 40).tolist()
    for i, (label, frequency) in enumerate(densities.items()):
        dead = int((frequency == 0).sum())
        ax.hist(np.log10(frequency[frequency > 0]), bins=bins, histtype="step", lw=1.5, color=f"C{i}",
                label=f"{label} ({dead} of {len(frequency)} dead)")  # fmt: skip
    ax.axvline(-1, color="gray", ls=":", lw=1, label="dense: fires on > 10% of rows")
    ax.set_xlabel("log10 firing frequency (share of training rows a latent fires on)")
    ax.set_ylabel("latents")
    ax.set_title("Latent density")
    ax.legend(fontsize=7)
    return _save(fig, out)


def feature_card(
    images: list[np.ndarray | None],
    heatmaps: list[np.ndarray | None],
    captions: list[str],
    title: str,
    out: Path,
) -> Path:
    """One latent's card: its top images in a row (H, W, 3 arrays; None: not readable here), each with its
    caption and, where given, the latent's activation over the patch grid laid over it (side, side)."""
    fig, axes = plt.subplots(1, len(captions), figsize=(1.5 * len(captions), 2.0), squeeze=False)
    top = max((float(h.max()) for h in heatmaps if h is not None), default=0.0)
    for ax, image, heatmap, caption in zip(axes[0], images, heatmaps, captions, strict=True):
        if image is not None:
            ax.imshow(image)
        if heatmap is not None:
            height, width = image.shape[:2] if image is not None else heatmap.shape
            ax.imshow(heatmap, cmap="magma", alpha=0.55, vmin=0, vmax=top or 1, extent=(0, width, height, 0))
        ax.set_title(caption, fontsize=6)
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    return _save(fig, out)


def accuracy_by_capacity(trials: pd.DataFrame, out: Path, method: str = "vs2") -> Path | None:
    """Best validation-selected test top-1 of `method` per (k, expansion): one line per expansion."""
    column, val = metric_name("test_top1", method), metric_name("val_top1", method)
    if not {"sae.k", "sae.expansion", column, val} <= set(trials):
        return None
    data = trials.dropna(subset=[column, val])
    if data.empty:
        return None
    best = data.loc[data.groupby(["sae.expansion", "sae.k"])[val].idxmax()]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for expansion, group in best.groupby("sae.expansion"):
        group = group.sort_values("sae.k")
        ax.plot(group["sae.k"], 100 * group[column], "o-", label=f"expansion {expansion}")
    if ZERO_SHOT_TEST in data:
        ax.axhline(100 * data[ZERO_SHOT_TEST].iloc[0], color="gray", lw=1, ls=":", label="zero-shot")
    ax.set_xscale("log", base=2)
    ks = sorted(best["sae.k"].unique())
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("SAE k (active latents per sample)")
    ax.set_ylabel(f"{_label(method)} test top-1 (%)")
    ax.set_title(f"{_label(method)} by SAE capacity\n(per point: the trial with the best validation top-1)")
    ax.legend(fontsize=8)
    return _save(fig, out)


def by_block(table: pd.DataFrame, out: Path) -> Path | None:
    """Test top-1 of each method, SAE FVU and L0 against the block, one line style per token set.

    `table` is `vs2ray.results.block_table`; None when the sweep used a single block and token set.
    """
    if len(table) < 2:
        return None
    methods = [m for m in METHOD_LABELS if m in table]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    styles = {"cls": "o-", "all": "s--", "patches": "d-."}
    for tokens, group in table.groupby("tokens"):
        group = group.sort_values("block")
        for i, method in enumerate(methods):
            axes[0].plot(
                group["block"],
                group[method],
                styles.get(tokens, "^:"),
                color=f"C{i}",
                label=f"{_label(method)} ({tokens})",
            )
        for ax, column in ((axes[1], "fvu"), (axes[2], "l0")):
            if column in group:
                ax.plot(
                    group["block"], group[column], styles.get(tokens, "^:"), color="black", label=f"{tokens} tokens"
                )
        for column, color in (("l0_cls", "C3"), ("l0_patches", "C4")):  # an all-token SAE's L0 by token type
            if column in group and group[column].notna().any():
                name = column.removeprefix("l0_").replace("cls", "[CLS]")
                axes[2].plot(group["block"], group[column], ":", color=color, label=f"{name} of {tokens} tokens")
    axes[0].set(xlabel="block", ylabel="test top-1 (%)", title="Accuracy when steering at each block")
    axes[1].set(xlabel="block", ylabel="FVU (train)", title="SAE reconstruction by block")
    axes[2].set(xlabel="block", ylabel="L0 (active latents)", title="SAE sparsity by block")
    for ax in axes:
        ax.set_xticks(sorted(table["block"].unique()))
        ax.legend(fontsize=7)
    return _save(fig, out)


def learning_curves(curves: pd.DataFrame, metric: str, out: Path) -> Path | None:
    """The search metric and the validation FVU against the SAE step, one line per trial that reported
    more than once; stopped trials dashed. `curves` is `vs2ray.results.learning_curves`."""
    if curves.empty or "sae_step" not in curves or curves.groupby("trial_id").size().max() < 2:
        return None
    columns = [c for c in dict.fromkeys([metric, "val_fvu"]) if c in curves]
    fig, axes = plt.subplots(1, len(columns), figsize=(6 * len(columns), 4), squeeze=False)
    for ax, column in zip(axes[0], columns, strict=True):
        for trial_id, trial in curves.groupby("trial_id", sort=False):
            trial = trial.sort_values("sae_step")
            stopped = (trial["status"] == "STOPPED").any()
            ax.plot(trial["sae_step"], trial[column], "--" if stopped else "-", marker=".", label=trial_id)
        ax.set(xlabel="SAE step", ylabel=column, title=f"{column} during training (dashed: stopped early)")
    if curves["trial_id"].nunique() <= 12:
        axes[0][0].legend(fontsize=7)
    return _save(fig, out)


def per_class_changes(deltas: pd.DataFrame, out: Path, method: str, top: int = 5) -> Path | None:
    """Horizontal bars: the `top` classes `method` helped most and hurt most (test top-1 points vs zero-shot)."""
    if deltas.empty:
        return None
    ranked = deltas.sort_values("delta")
    shown = pd.concat([ranked.head(top), ranked.tail(top)]).drop_duplicates("class")
    shown = shown.sort_values("delta")
    fig, ax = plt.subplots(figsize=(6.8, 0.35 * len(shown) + 1.4))
    colours = ["tab:red" if d < 0 else "tab:green" for d in shown["delta"]]
    ax.barh(shown["class"], shown["delta"], color=colours)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(f"test top-1 change vs zero-shot (points), {_label(method)} at its selected setting")
    ax.set_title(f"Largest per-class gains and losses: {_label(method)}")
    return _save(fig, out)


def gate_coverage(settings: dict, ungated: float | None, zero_shot: float | None, out: Path) -> Path | None:
    """Test top-1 against coverage (share steered) for each gate quantile q of the selected trial.

    `ungated` is plain VS2's test top-1 at the same γ, λ (coverage 1), `zero_shot` coverage 0.
    """
    points = [
        (cov, 100 * acc, s["quantile"])
        for s, cov, acc in zip(settings["settings"], settings["coverage"], settings["test_top1"], strict=True)
        if cov is not None
    ]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    coverage, accuracy, _ = zip(*sorted(points), strict=True)
    ax.plot(coverage, accuracy, "o-", label="VS2 + FVU gate")
    for i, (x, y, q) in enumerate(sorted(points)):
        ax.annotate(f"q={q:g}", (x, y), textcoords="offset points", xytext=(-8, 8 if i % 2 else -14), fontsize=8)
    if ungated is not None:
        ax.scatter([1.0], [100 * ungated], marker="s", color="tab:orange", zorder=3, label="VS2, no gate (coverage 1)")
    if zero_shot is not None:
        ax.axhline(100 * zero_shot, color="gray", lw=1, ls=":", label="zero-shot (coverage 0)")
    ax.set_xlabel("coverage (share of test images steered)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("FVU gate: accuracy vs coverage (one SAE, γ and λ fixed)")
    ax.legend(fontsize=8)
    return _save(fig, out)


def optuna_views(study, out_history: Path, out_importance: Path) -> list[Path]:
    """Optuna's own matplotlib plots: optimisation history and (with enough trials) parameter importances."""
    import warnings

    from optuna.exceptions import ExperimentalWarning
    from optuna.visualization import matplotlib as optuna_plots

    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        ax = optuna_plots.plot_optimization_history(study)
        ax.set_ylabel(f"{study.study_name} (search objective)")
        ax.set_xlabel("trial (in start order)")
        figure = plt.gcf()  # the figure Optuna just drew into
        figure.set_size_inches(7.6, 4.2)
        written.append(_save(figure, out_history))
        complete = [t for t in study.trials if t.state.name == "COMPLETE"]
        varied = [name for name in study.best_params if len({t.params.get(name) for t in complete}) > 1]
        if len(complete) >= 3 and varied:
            ax = optuna_plots.plot_param_importances(study)
            ax.set_title(f"Parameter importances for {study.study_name} (fANOVA)")
            legend = ax.get_legend()
            if legend is not None:
                legend.remove()
            figure = plt.gcf()
            figure.set_size_inches(6.8, 0.45 * len(study.best_params) + 2)
            written.append(_save(figure, out_importance))
    return written
