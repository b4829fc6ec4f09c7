"""results.py on a hand-made experiment dir: statuses, start order, and each method at its validation-selected
trial, with the registry's labels and VS2 split by PASS."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vs2ray.methods import METHODS
from vs2ray.results import load_results, method_table


def write_trial(experiment: Path, trial_id: str, started: float, params: dict, result: dict | None, error: str = ""):
    trial = experiment / f"trial_{trial_id}"
    trial.mkdir(parents=True)
    (trial / "params.json").write_text(json.dumps(params))
    os.utime(trial / "params.json", (started, started))
    if result is not None:
        (trial / "result.json").write_text(json.dumps({**result, "vs2ray_complete": True}) + "\n")
    if error:
        (trial / "error.txt").write_text(error)


def metrics(method: str, val: float, test: float, best_test: float, **selected) -> dict:
    out = {f"val_top1_{method}": val, f"test_top1_{method}": test, f"test_oracle_top1_{method}": best_test}
    return {**out, **{f"selected_{k}_{method}": v for k, v in selected.items()}}


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    zero = metrics("zero_shot", 0.50, 0.52, 0.52)
    write_trial(
        tmp_path, "b", 200.0, {"sae.k": 32, "pass.w_aux": 0.8},
        {**zero, **metrics("vs2", 0.61, 0.55, 0.58, gamma=1.5), **metrics("vs2pp", 0.60, 0.59, 0.60, rule="majority")},
    )  # fmt: skip
    write_trial(
        tmp_path, "a", 100.0, {"sae.k": 16, "pass.w_aux": 0.0},
        {**zero, **metrics("vs2", 0.60, 0.57, 0.57, gamma=2.0), **metrics("vs2pp", 0.62, 0.58, 0.61, rule="query")},
    )  # fmt: skip
    write_trial(
        tmp_path, "c", 300.0, {"sae.k": 100000, "pass.w_aux": 0.0}, None, "Traceback ...\nValueError: k too big"
    )
    write_trial(tmp_path, "d", 400.0, {"sae.k": 64, "pass.w_aux": 0.0}, None)
    return tmp_path


def test_trials_in_start_order_with_their_status(experiment):
    trials = load_results(experiment)
    assert list(trials["trial_id"]) == ["a", "b", "c", "d"]
    assert list(trials["status"]) == ["TERMINATED", "TERMINATED", "ERROR", "INCOMPLETE"]
    assert trials.loc[2, "error"] == "ValueError: k too big"
    assert trials.loc[0, "sae.k"] == 16 and trials.loc[1, "val_top1_vs2"] == 0.61


def test_method_table_selects_each_method_on_validation_and_splits_vs2_by_pass(experiment):
    table = method_table(load_results(experiment)).set_index("key")
    assert list(table.index) == ["zero_shot", "vs2", "vs2_pass", "vs2pp"]  # registry order, PASS after VS2
    assert table.loc["vs2", "trial_id"] == "a" and table.loc["vs2_pass", "trial_id"] == "b"  # w_aux 0 vs > 0
    assert table.loc["vs2pp", "trial_id"] == "a"  # the best validation top-1, not the best test
    assert table.loc["vs2pp", "test_top1"] == pytest.approx(58.0)
    assert table.loc["vs2pp", "test_oracle_top1"] == pytest.approx(61.0)  # best test over every trial
    assert table.loc["vs2pp", "delta"] == pytest.approx(6.0)
    assert "rule=query" in table.loc["vs2pp", "selected"] and "gamma=2" in table.loc["vs2", "selected"]
    assert table.loc["vs2pp", "method"] == METHODS["vs2pp"].label
    assert table.loc["zero_shot", "selected"] == ""  # zero-shot depends on no sampled SAE value


def test_a_dir_that_is_no_experiment_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a vs2ray experiment dir"):
        load_results(tmp_path)


def test_kind_table_averages_each_kinds_distinct_saes_and_selects_each_method_on_validation(tmp_path):
    from vs2ray.results import kind_table

    def trial(trial_id, kind, sae, fvu, l0, val, test, started, normalize="none"):
        sae_metrics = {"fvu": fvu, "val_fvu": fvu + 0.01, "l0": l0, "l0_p10": l0 - 1, "l0_p90": l0 + 1}
        result = {**sae_metrics, "dead_fraction": 0.0, "sae_dir": sae, "sae_kind": kind, "sae_normalize": normalize}
        write_trial(tmp_path, trial_id, started, {"sae.kind": kind}, {**result, **metrics("vs2", val, test, test)})

    trial("a", "topk", "/saes/t16", 0.10, 16.0, 0.60, 0.58, 100.0)
    trial("b", "topk", "/saes/t16", 0.10, 16.0, 0.62, 0.57, 101.0)  # the same SAE, other steering: counted once
    trial("c", "topk", "/saes/t32", 0.06, 32.0, 0.61, 0.59, 102.0)
    trial("d", "relu_l1", "/saes/l1", 0.20, 9.0, 0.55, 0.54, 103.0)
    table = kind_table(load_results(tmp_path)).set_index("kind")
    assert table.loc["topk", "trials"] == 3 and table.loc["topk", "SAEs"] == 2
    assert table.loc["topk", "fvu"] == pytest.approx(0.08)  # (0.10 + 0.06) / 2, not (0.10 + 0.10 + 0.06) / 3
    assert table.loc["topk", "l0"] == pytest.approx(24.0)
    assert table.loc["topk", "vs2"] == pytest.approx(57.0)  # trial b: the best validation top-1
    assert table.loc["relu_l1", "vs2"] == pytest.approx(54.0) and table.loc["relu_l1", "SAEs"] == 1
    assert list(table["normalize"]) == ["none", "none"]


def test_card_latents_are_what_ablate_removed_then_the_most_steerable(tmp_path):
    from vs2ray.results import card_latents

    trial = tmp_path / "trial_x"
    (trial / "checkpoint_000000").mkdir(parents=True)
    units = [
        {"kind": "latent", "unit": 9, "score": 0.2, "concepts": ["cat"]},
        {"kind": "neuron", "unit": 1, "score": 0.9, "concepts": ["dog"]},  # a neuron is no latent of the SAE
        {"kind": "latent", "unit": 4, "score": 0.7, "concepts": ["dog"]},
        {"kind": "latent", "unit": 5, "score": 0.1, "concepts": []},
    ]
    (trial / "checkpoint_000000" / "steerability.json").write_text(json.dumps({"block": 11, "units": units}))
    result = {"latents_ablate": "4,2", "selected_score_ablate": "within_class", "selected_n_latents_ablate": 2}
    chosen = card_latents(result, str(trial), steerable=2)
    assert list(chosen) == [4, 2, 9]
    assert chosen[4] == "ablate removed it (within_class, 2 latents); steerable (S 0.70 toward dog)"
    assert chosen[9] == "steerable (S 0.20 toward cat)"
    assert card_latents({"latents_ablate": float("nan")}, str(tmp_path / "none")) == {}  # no ablate, no file


def test_typographic_table_gives_each_method_at_its_validation_selected_trial_per_block(tmp_path):
    from vs2ray.report import write_report
    from vs2ray.results import typographic_table

    def trial(trial_id, block, started, ablate_val, ablate_attacked, ablate_typographic, ablate_clean):
        result = {
            "sae_block": block,
            "sae_tokens": "cls",
            "sae_dir": f"/saes/{trial_id}",
            **{"fvu": 0.1, "val_fvu": 0.11, "l0": 8.0},
            "test_typographic_zero_shot": 0.7,
            "test_attacked_top1_zero_shot": 0.1,
        }  # zero-shot without clean images (as on RTA-100): no clean column for it
        result |= {**metrics("zero_shot", 0.25, 0.2, 0.2), **metrics("ablate", ablate_val, 0.4, 0.9)}
        result |= {"test_typographic_ablate": ablate_typographic, "val_typographic_ablate": 0.1}
        result |= {"test_attacked_top1_ablate": ablate_attacked, "test_clean_top1_ablate": ablate_clean}
        write_trial(tmp_path, trial_id, started, {"sae.layer": block}, result)

    trial("a", 11, 100.0, 0.60, 0.55, 0.15, 0.58)
    trial("b", 11, 101.0, 0.70, 0.50, 0.20, 0.61)  # the better validation top-1 at block 11: its test figures count
    trial("c", 6, 102.0, 0.40, 0.45, 0.30, 0.52)
    table = typographic_table(load_results(tmp_path)).set_index("block")
    assert list(table.index) == [6, 11] and table.loc[11, "trials"] == 2
    assert table.loc[11, ["ablate true", "ablate typographic", "ablate clean"]].tolist() == pytest.approx([50, 20, 61])
    assert table.loc[6, "ablate typographic"] == pytest.approx(30.0)
    assert table.loc[6, ["zero_shot true", "zero_shot typographic"]].tolist() == pytest.approx([10, 70])
    assert typographic_table(load_results(tmp_path).drop(columns=["test_typographic_ablate"])).columns.tolist() == [
        "block", "tokens", "trials", "zero_shot true", "zero_shot typographic"
    ]  # fmt: skip
    report = write_report(str(tmp_path), tmp_path / "report").read_text()
    section = report.split("## Typographic attacks by block")[1].split("\n## ")[0]
    assert "feature suppression typographic" in section and "feature suppression clean" in section
    assert "| 11 |" in section
