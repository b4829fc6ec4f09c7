"""The sweep end to end: real Ray Tune, real Optuna, real FAISS actors, on a small shapes world."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from conftest import QUICKSTART, SMALL_WORLD, cli_command, finished_trials, kill_driver_when, run_sweep
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from vs2ray.config import load_config
from vs2ray.results import load_results, method_table, trial_file, trial_predictions
from vs2ray.tuning import SearchSpace, check_sweep


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sweep-storage")


def test_invalid_sweeps_fail_before_ray_starts_and_name_the_key(tmp_path, capsys):
    from vs2ray.cli import main

    cases = {
        "search.metric=val_top1_vs3": "search.metric: 'val_top1_vs3' is not reported",
        "search.points_to_evaluate=[{sae.k: 12, sae.expansion: 4, pass.w_aux: 0.0, steering.gamma: 1.5, "
        "steering.lambda: 2.1}]": "search.points_to_evaluate[0].sae.k: 12 is outside its search space",
        "search.points_to_evaluate=[{sae.q: 3}]": "search.points_to_evaluate[0]: sae.q not searched",
        "sae.k={choice: []}": "sae.k: choice needs a non-empty list",
        "search.sampler=grid": "search.sampler: got 'grid'",
    }
    for assignment, expected in cases.items():  # in-process: the CLI's own entry point, as `python -m vs2ray sweep`
        code = main(["sweep", "--set", f"storage.root={tmp_path}", "--set", assignment])
        output = capsys.readouterr()
        assert code == 2, (assignment, output.err[-2000:])
        assert expected in output.err, (assignment, output.err)
        assert "Traceback" not in output.err and "Ray" not in output.out + output.err
    assert not (tmp_path / "experiments").exists() and not (tmp_path / "activations").exists()


def test_clean_accuracy_is_searchable_only_where_a_dataset_has_images_without_a_word():
    from vs2ray.config import ConfigError

    test_metric = ["search.metric=test_clean_top1_ablate", "search.allow_test_selection=true"]
    check_sweep(load_config(QUICKSTART.with_name("typographic_quickstart.yaml"), test_metric))
    with pytest.raises(ConfigError, match="test_clean_top1_ablate") as error:
        check_sweep(load_config(QUICKSTART.with_name("rta100_vit_b32.yaml"), test_metric))
    assert "test_attacked_top1_ablate" in str(error.value)  # among the allowed names


def test_schedulers_and_trackers_are_checked_before_ray_starts(monkeypatch):
    import importlib.util

    from vs2ray.config import ConfigError

    def problems(*assignments: str) -> str:
        with pytest.raises(ConfigError) as error:
            check_sweep(load_config(QUICKSTART, list(assignments)))
        return str(error.value)

    asha = "search.scheduler=asha"
    assert "stops trials on one metric" in problems(asha, "search.metric=[val_top1_vs2, fvu]", "search.mode=[max, min]")
    assert "set sae.report_every" in problems(asha, "sae.report_every=null")
    assert "search.max_t: set it" in problems(asha, "sae.epochs=3")
    assert "no trial could be stopped" in problems(asha, "search.grace_period=1000")
    check_sweep(load_config(QUICKSTART, [asha]))  # the defaults work together
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else found(name, *a))
    assert "tracking.wandb: true needs the wandb package, which is not installed; pip install 'vs2ray[wandb]'" in (
        problems("tracking.wandb=true")
    )


def test_define_by_run_space_samples_momentum_only_with_pass():
    import optuna

    config = load_config(QUICKSTART, ["pass.w_aux={choice: [0.0, 0.8]}", "pass.momentum={uniform: [0.5, 0.99]}"])
    space = SearchSpace(check_sweep(config), fixed={})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = []
    for _ in range(12):
        trial = study.ask()
        space(trial)
        seen.append(trial.params)
        study.tell(trial, 0.5)
    assert {p["pass.w_aux"] for p in seen} == {0.0, 0.8}
    for params in seen:
        assert ("pass.momentum" in params) == (params["pass.w_aux"] > 0)
        assert params["sae.k"] in (16, 32, 64) and 1.0 <= params["steering.gamma"] <= 3.0


@pytest.fixture(scope="module")
def cache_sweep(storage, ray_session) -> tuple[subprocess.CompletedProcess, Path]:
    """A finished sweep whose trials share one SAE, one of which cannot be built."""
    address = ray_session.get_runtime_context().gcs_address
    good = {"sae.k": 16, "pass.w_aux": 0.0, "steering.gamma": 1.5, "steering.lambda": 2.1}
    points = [{**good, "sae.k": 100000}, good, {**good, "steering.gamma": 2.5}]  # the first cannot be built
    output = run_sweep(
        storage,
        address,
        "cache",
        "sae.k={choice: [16, 100000]}",
        "pass.w_aux={choice: [0.0]}",
        "sae.expansion=2",
        "steering.methods=[zero_shot, vs2, vs2_gated, vs2pp]",
        "search.num_samples=4",
        "search.max_failures=0",
        f"search.points_to_evaluate={json.dumps(points)}",
    )
    return output, storage / "experiments" / "cache"


def test_sweep_shares_the_sae_cache_records_per_class_files_and_survives_a_failing_trial(cache_sweep):
    output, experiment = cache_sweep
    assert output.returncode == 0, output.stderr[-3000:]
    assert f"experiment: {experiment}" in output.stdout
    trials = load_results(experiment)
    assert len(trials) == 4 and trials["trial_id"].is_unique
    failed = trials[trials["status"] == "ERROR"]
    assert len(failed) >= 1 and set(failed["sae.k"]) == {100000}
    assert all("sae.k must be in [1, n_latents=" in error for error in failed["error"])
    assert "failed trial" in output.stdout
    done = trials[trials["status"] == "TERMINATED"]
    assert len(done) == len(trials) - len(failed) and set(done["sae.k"]) == {16}
    assert done["sae_cache_hit"].sum() == len(done) - 1  # one SAE trained, every other trial reused it
    assert done["sae_dir"].nunique() == 1
    sampled = done[["steering.gamma", "steering.lambda"]].drop_duplicates()
    assert len(sampled) == len(done)  # trials differ in steering values only
    for column in ("val_top1_vs2", "test_top1_vs2", "test_top5_vs2pp", "coverage_vs2_gated", "fvu", "l0"):
        assert done[column].notna().all(), column
    assert (done["retrieval_index"].str.startswith("vs2ray-retrieval-")).all()

    # per-class files agree with the predictions they were computed from
    row = done.iloc[0]
    per_class = json.loads(trial_file(row["trial_dir"], "per_class.json"))
    predictions = trial_predictions(row["trial_dir"])
    saved_result = json.loads(trial_file(row["trial_dir"], "metrics.json"))  # what a restarted trial re-reports
    assert saved_result["test_top1_vs2"] == row["test_top1_vs2"] and saved_result["sae_dir"] == row["sae_dir"]
    labels = predictions["labels"]
    assert len(per_class["classes"]) == 24 and len(labels) == 500
    for method in ("zero_shot", "vs2", "vs2pp"):
        hits = predictions[method] == labels
        assert hits.mean() == pytest.approx(row[f"test_top1_{method}"], abs=1e-6)
        by_class = [hits[labels == c].mean() for c in range(24)]
        np.testing.assert_allclose(per_class["per_class_top1"][method], by_class, atol=1e-6)

    table = method_table(trials).set_index("key")
    assert set(table.index) == {"zero_shot", "vs2", "vs2_gated", "vs2pp"}
    best_vs2 = done.loc[done["val_top1_vs2"].idxmax()]
    assert table.loc["vs2", "test_top1"] == pytest.approx(100 * best_vs2["test_top1_vs2"])
    assert table.loc["vs2", "delta"] == pytest.approx(100 * (best_vs2["test_top1_vs2"] - row["test_top1_zero_shot"]))


def test_a_killed_sweep_resumes_without_rerunning_finished_trials(storage, ray_session):
    address = ray_session.get_runtime_context().gcs_address
    assignments = (  # an ASHA sweep whose Optuna study lives in a journal file beside the experiment
        "sae.k={choice: [8, 16, 32]}",
        "sae.expansion={choice: [2, 4]}",
        "sae.steps=120",
        "steering.methods=[zero_shot, vs2]",
        "search.num_samples=4",
        "search.max_concurrent_trials=1",
        "search.scheduler=asha",
        "sae.report_every=30",
        "search.grace_period=30",
        "tracking.optuna_storage=journal",
    )
    command = cli_command(
        "vs2ray.sweep",
        "--name",
        "killed",
        "--address",
        address,
        assignments=(*SMALL_WORLD, f"storage.root={storage}", *assignments),
    )
    experiment = storage / "experiments" / "killed"
    # polled every 20 ms, so the kill comes soon after a report: often before Tune saves its state
    kill_driver_when(command, lambda: len(finished_trials(experiment)) >= 2, timeout=300)
    before = finished_trials(experiment)
    assert 2 <= len(before) < 4

    output = run_sweep(storage, address, "killed", *assignments, extra=("--resume",))
    assert output.returncode == 0, output.stderr[-3000:]
    assert f"resuming {experiment}" in output.stdout
    trials = load_results(experiment)
    assert len(trials) == 4 and trials["trial_id"].is_unique
    assert trials["status"].isin(["TERMINATED", "STOPPED"]).all() and (trials["status"] == "TERMINATED").any()
    after = finished_trials(experiment)
    for name, metrics in before.items():
        # not run again: the same metrics down to the timings. (Tune reruns a trial killed between
        # its report and Tune's state save; the trial then re-reports the result in its checkpoint.)
        assert after[name] == metrics
    saved = yaml.safe_load((experiment / "vs2ray_config.yaml").read_text())
    assert saved["search"]["num_samples"] == 4
    # the persisted study, read with Optuna's own loader, holds every trial that finished
    journal = JournalStorage(JournalFileBackend(str(experiment / "optuna.journal")))
    study = optuna.load_study(study_name="killed", storage=journal)
    completed = {
        (t.params["sae.k"], t.params["sae.expansion"], round(t.value, 6))
        for t in study.trials
        if t.state == optuna.trial.TrialState.COMPLETE
    }
    for _, trial in trials[trials["status"] == "TERMINATED"].iterrows():
        assert (trial["sae.k"], trial["sae.expansion"], round(trial["val_top1_vs2"], 6)) in completed


def test_asha_stops_a_poor_sae_early_never_caches_it_and_mlflow_keeps_every_report(storage, ray_session):
    from mlflow.tracking import MlflowClient

    from vs2ray.tuning import MLFLOW_DB

    address = ray_session.get_runtime_context().gcs_address
    paper = {"pass.w_aux": 0.0, "steering.gamma": 1.5, "steering.lambda": 2.1}
    # one at a time, the good SAE first: ASHA then stops the k = 2 SAE at its first rung on val_fvu
    points = [{**paper, "sae.k": 24}, {**paper, "sae.k": 2}]
    output = run_sweep(
        storage,
        address,
        "asha",
        "sae.k={choice: [2, 24]}",
        "pass.w_aux={choice: [0.0]}",
        "sae.expansion=3",
        "sae.steps=100",
        "sae.report_every=25",
        "steering.methods=[zero_shot, vs2]",
        "search.metric=val_fvu",
        "search.mode=min",
        "search.scheduler=asha",
        "search.grace_period=25",
        "search.reduction_factor=2",
        "search.num_samples=2",
        "search.max_concurrent_trials=1",
        f"search.points_to_evaluate={json.dumps(points)}",
        "tracking.mlflow=true",
        "tracking.tensorboard=true",
    )
    assert output.returncode == 0, output.stderr[-3000:]
    experiment = storage / "experiments" / "asha"
    trials = load_results(experiment).set_index("sae.k")
    assert trials.loc[24, "status"] == "TERMINATED" and trials.loc[2, "status"] == "STOPPED"
    assert trials.loc[2, "stopped_step"] == 25 < 100
    assert trials.loc[2, "val_fvu"] > trials.loc[24, "val_fvu"]
    # only the finished SAE is in the cache
    saes = [d for d in (storage / "saes").iterdir() if (d / "metrics.json").is_file()]
    cached = [json.loads((d / "config.json").read_text()) for d in saes]
    assert any(c["k"] == 24 and c["expansion"] == 3 for c in cached)
    assert not any(c["k"] == 2 for c in cached)
    # MLflow, read with its own client: one run per trial, val_fvu at every reported step
    client = MlflowClient(f"sqlite:///{experiment / MLFLOW_DB}")
    runs = client.search_runs([client.get_experiment_by_name("asha").experiment_id])
    assert len(runs) == 2
    for trial in trials.itertuples():
        reports = [json.loads(line) for line in Path(trial.trial_dir, "result.json").read_text().splitlines()]
        run = next(r for r in runs if r.info.run_name.endswith(trial.trial_id))
        history = sorted(client.get_metric_history(run.info.run_id, "val_fvu"), key=lambda m: m.step)
        assert [(m.step, round(m.value, 6)) for m in history] == [
            (r["training_iteration"], round(r["val_fvu"], 6)) for r in reports
        ]
        assert list(Path(trial.trial_dir).glob("events.out.tfevents.*"))  # TensorBoard
        steps = [r["sae_step"] for r in reports]
        assert steps == ([25, 50, 75, 100] if trial.Index == 24 else [25])


def test_resume_refuses_an_experiment_whose_state_was_cut_short(tmp_path):
    from vs2ray.config import config_to_yaml

    experiment = tmp_path / "experiments" / "cut"
    experiment.mkdir(parents=True)
    config = load_config(QUICKSTART, [f"storage.root={tmp_path}"])
    (experiment / "vs2ray_config.yaml").write_text(config_to_yaml(config))
    (experiment / "experiment_state-2026-11-22_07-31-07.json").write_text('{"trial_data": [["{\\n  \\"stub')
    command = cli_command("vs2ray.sweep", "--resume", "--name", "cut", assignments=(f"storage.root={tmp_path}",))
    output = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert output.returncode == 1
    assert "experiment_state-2026-11-22_07-31-07.json is cut short" in output.stderr
    assert f"python -m analysis.report {experiment}" in output.stderr


@pytest.mark.parametrize("path", sorted((QUICKSTART.parent).glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_is_valid_and_starts_with_its_paper_defaults(path):
    config = load_config(path)
    keys = [key for key, _ in check_sweep(config)]
    assert {"steering.gamma", "steering.lambda"} <= set(keys)
    points = config.search.points_to_evaluate
    assert points and all(point["steering.gamma"] == 1.5 and point["steering.lambda"] == 2.1 for point in points)


@pytest.mark.parametrize(
    ("sweep", "says"),
    [("cub200_vit_b32.yaml", "has no train/ directory"), ("rta100_vit_b32.yaml", "ours/data is missing")],
)
def test_a_paper_sweep_without_its_data_fails_with_a_clear_message(tmp_path, sweep, says):
    config = QUICKSTART.parent / sweep
    assignments = (f"storage.root={tmp_path}", f"dataset.root={tmp_path / 'no-cub-here'}")
    output = subprocess.run(
        cli_command("vs2ray.sweep", "--config", str(config), assignments=assignments),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert output.returncode == 1
    assert "no-cub-here" in output.stderr and says in output.stderr
    assert "Traceback" not in output.stderr


def test_report_writes_valid_figures_and_a_row_per_method_of_the_sweep(cache_sweep, tmp_path):
    from PIL import Image

    _, experiment = cache_sweep
    output = subprocess.run(
        [sys.executable, "-m", "analysis.report", str(experiment), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert output.returncode == 0, output.stderr[-3000:]
    assert f"report: {tmp_path / 'report.md'}" in output.stdout
    figures = {path.name for path in tmp_path.glob("*.png")}
    expected = {
        "fvu_vs_accuracy.png",
        "latent_density.png",
        "per_class_vs2.png",
        "per_class_vs2pp.png",
        "gate_coverage.png",
        "optuna_history.png",
    }
    trials = load_results(experiment)
    done = trials[trials["status"] == "TERMINATED"]
    if len(done) >= 3:  # importances need three finished trials
        expected.add("optuna_importance.png")
    if done["steering.gamma"].nunique() > 1 and done["steering.lambda"].nunique() > 1:
        expected.add("heatmap_gamma_lambda.png")  # a (γ, λ) map needs both to vary
    assert figures == expected  # expansion was not searched: no capacity plot
    for name in figures:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, name
        with Image.open(tmp_path / name) as image:
            assert image.size[0] > 300 and image.size[1] > 200, name
    report = (tmp_path / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|") for line in report.splitlines() if line.startswith("| ")}
    for label in ("zero-shot CLIP", "VS2", "VS2 + FVU gate", "VS2++ (pseudo-labels)"):
        assert label in rows, label
    for absent in ("SAE_REC^F", "VS2 + PASS", "VS2++ (oracle labels)", "weighted RAG", "centroid shift (ours)"):
        assert absent not in rows, absent
    best = trials.loc[trials["val_top1_vs2"].idxmax()]
    assert rows["VS2"][3].strip() == f"{100 * best['test_top1_vs2']:.2f}"
    assert "## Failed trials" in report and "sae.k must be in" in report
    assert "## Feature cards" in report and "## Latent density" in report
    cards = sorted((tmp_path / "cards").glob("latent_*.png"))
    assert cards and all(f"](cards/{card.name})" in report for card in cards)  # embedded, beside the report


def test_a_two_block_sweep_shares_each_blocks_sae_and_reports_by_block(storage, ray_session, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    paper = {"steering.gamma": 1.5, "steering.lambda": 2.1}
    points = [{"sae.layer": 1, **paper}, {"sae.layer": -1, **paper}, {"sae.layer": 1, **paper, "steering.gamma": 2.5}]
    output = run_sweep(
        storage,
        address,
        "layers",
        "sae.layer={choice: [1, -1]}",
        "sae.k=16",
        "sae.expansion=2",
        "pass.w_aux=0.0",
        "steering.methods=[zero_shot, sae_rec_final, vs2]",
        "search.num_samples=3",
        f"search.points_to_evaluate={json.dumps(points)}",
    )
    assert output.returncode == 0, output.stderr[-3000:]
    experiment = storage / "experiments" / "layers"
    trials = load_results(experiment)
    assert (trials["status"] == "TERMINATED").all() and sorted(trials["sae_block"]) == [1, 1, 3]
    by_block = trials.groupby("sae_block")
    assert by_block["sae_dir"].nunique().to_dict() == {1: 1, 3: 1}  # one SAE per block, shared by its trials
    # block 1's SAE is trained once here and reused once (block 3's may come from another test's cache)
    assert trials["sae_dir"].nunique() == 2 and trials[trials["sae_block"] == 1]["sae_cache_hit"].sum() == 1
    # zero-shot through blocks 2-3 of the model agrees with the cached path (a float tie may flip one image)
    assert trials["test_top1_zero_shot"].max() - trials["test_top1_zero_shot"].min() <= 1 / 500
    block_1, block_3 = trials[trials["sae_block"] == 1], trials[trials["sae_block"] == 3]
    assert block_1["fvu"].nunique() == 1 and block_1["fvu"].iloc[0] != block_3["fvu"].iloc[0]

    from analysis.report import write_report

    text = write_report(str(experiment), tmp_path).read_text()  # in-process: the CLI is tested above
    section = text.split("## By block")[1].split("\n## ")[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ")]
    header, body = [cell.strip() for cell in rows[0]], rows[1:]
    assert header[:6] == ["block", "tokens", "trials", "FVU", "val FVU", "L0"] and "VS2" in header
    assert [(row[0].strip(), row[1].strip(), row[2].strip()) for row in body] == [("1", "cls", "2"), ("3", "cls", "1")]
    selected = block_1.loc[block_1["val_top1_vs2"].idxmax()]
    assert body[0][header.index("VS2")].strip() == f"{100 * selected['test_top1_vs2']:.4g}"
    assert (tmp_path / "by_block.png").read_bytes().startswith(b"\x89PNG")


def test_a_spurious_world_sweep_reports_worst_group_accuracy_and_steerability_by_block(storage, tmp_path, ray_session):
    """shapes_spurious end to end: group columns in the stores, ablate selected on validation worst-group
    accuracy at two blocks, steerability measured in every trial, and the report's two new tables."""
    address = ray_session.get_runtime_context().gcs_address
    paper = {"sae.tokens": "cls", "steering.gamma": 1.5, "steering.lambda": 2.1}
    points = [{"sae.layer": 1, **paper}, {"sae.layer": -1, **paper}]
    spurious = str(QUICKSTART.parent / "spurious_quickstart.yaml")
    output = run_sweep(
        storage,
        address,
        "spurious",
        "dataset.sizes={train: 1500, test: 600}",
        "sae.layer={choice: [1, -1]}",
        "sae.k=16",
        "sae.expansion=2",
        "steering.methods=[zero_shot, ablate]",
        "steering.ablate_latents=[1, 4, 16]",
        "steerability.units=6",
        "steerability.probe_images=16",
        "search.num_samples=2",
        f"search.points_to_evaluate={json.dumps(points)}",
        extra=("--config", spurious),
    )
    assert output.returncode == 0, output.stderr[-3000:]
    from vs2ray.config import DatasetConfig
    from vs2ray.data import get_dataset
    from vs2ray.store import load_activations

    dataset = get_dataset(DatasetConfig(name="shapes_spurious", sizes={"train": 1500, "test": 600}))
    manifests = {p.parent: json.loads(p.read_text()) for p in (storage / "activations").glob("*/manifest.json")}
    stores = {
        m["inputs"]["split"]: d for d, m in manifests.items() if m["inputs"]["dataset"]["name"] == "shapes_spurious"
    }
    for split, store in stores.items():
        acts = load_activations(store, layers=[-1], embedding=False)
        records = dataset.records(split)
        assert acts.attributes.tolist() == [r.attribute for r in records]
        assert acts.groups.tolist() == [dataset.group_of(r.label, r.attribute) for r in records]
    assert set(stores) == {"train", "test"}

    trials = load_results(storage / "experiments" / "spurious")
    assert (trials["status"] == "TERMINATED").all() and sorted(trials["sae_block"]) == [1, 3]
    for _, trial in trials.iterrows():
        # selection by validation worst-group accuracy, over the ablate grid
        methods = json.loads(trial_file(trial["trial_dir"], "methods.json"))
        assert len(methods["ablate"]["settings"]) == 6
        steer = json.loads(trial_file(trial["trial_dir"], "steerability.json"))
        assert steer["block"] == trial["sae_block"] and len(steer["units"]) == 12
        latents = [u for u in steer["units"] if u["kind"] == "latent"]
        # the sweep file's earlier rule (top_gain ≥ 0.1); the authors' S_f and P_f are recorded beside it
        assert all(u["steerable"] == (u["score"] >= 0.1) and u["sum_squares"] >= 0 for u in latents)
        assert trial["steerable_latents"] == sum(u["steerable"] for u in latents) / 6
        assert trial["steerable_latents_low"] <= trial["steerable_latents"] <= trial["steerable_latents_high"]
    # vs2ray-tiny's zero-shot follows colour: its worst group is far below its average
    zero = trials.iloc[0]
    assert zero["test_worst_group_zero_shot"] < zero["test_top1_zero_shot"] - 0.25

    from analysis.report import write_report

    text = write_report(str(storage / "experiments" / "spurious"), tmp_path).read_text()
    section = text.split("## Worst-group accuracy by block")[1].split("\n## ")[0]
    tables = [
        [[c.strip() for c in line.split("|")[1:-1]] for line in chunk.splitlines() if line.startswith("| ")]
        for chunk in section.split("\n\n")
        if chunk.startswith("| ")
    ]
    (header, *body), (group_header, *groups) = tables  # by block, then the best trial's groups
    assert header[:3] == ["block", "tokens", "trials"] and "feature suppression worst" in header
    assert group_header == ["group", "zero-shot CLIP", "feature suppression"]
    assert [row[0] for row in groups] == ["circle / warm", "circle / cool", "square / warm", "square / cool"]
    best = trials.loc[trials["val_worst_group_ablate"].idxmax()]
    assert min(float(row[2]) for row in groups) == pytest.approx(100 * best["test_worst_group_ablate"], abs=0.01)
    assert [row[0] for row in body] == ["1", "3"]
    block_3 = trials[trials["sae_block"] == 3].iloc[0]
    assert body[1][header.index("feature suppression worst")] == f"{100 * block_3['test_worst_group_ablate']:.2f}"
    assert body[1][header.index("zero-shot CLIP avg")] == f"{100 * block_3['test_top1_zero_shot']:.2f}"
    steer_section = text.split("## Steerability by block")[1].split("\n## ")[0]
    assert "latents steerable %" in steer_section and "Most steerable latents" in steer_section


def test_a_typographic_sweep_on_rta100_files_reports_true_label_and_typographic_accuracy(
    storage, tmp_path, ray_session
):
    """rta100 end to end on fabricated files in its layout (shapes images named by an object and a written
    word; the images carry no text, so the figures only have to agree with the predictions): the attribute
    reaches the store, every method reports its typographic accuracy, and the report has its table."""
    from PIL import Image

    from vs2ray.data.shapes import CLASS_NAMES, render_shape

    images = tmp_path / "rta" / "ours" / "data"
    images.mkdir(parents=True)
    for i in range(400):  # an object and a wrong class's name, each pair once (a file name is its annotation)
        sample = render_shape(0, "test", i)
        word = CLASS_NAMES[(sample.label + 1 + i % (len(CLASS_NAMES) - 1)) % len(CLASS_NAMES)]
        Image.fromarray(sample.pixels).save(images / f"label={CLASS_NAMES[sample.label]}_text={word}.png")
    assert len(list(images.iterdir())) > 250
    address = ray_session.get_runtime_context().gcs_address
    output = run_sweep(
        storage,
        address,
        "typographic",
        "dataset.name=rta100",
        f"dataset.root={tmp_path / 'rta'}",
        "dataset.val_split=val",
        "sae.layer=-1",
        "sae.tokens=cls",
        "steering.methods=[zero_shot, ablate]",
        "steering.ablate_latents=[1, 4]",
        "search.metric=val_top1_ablate",
        "search.num_samples=1",
    )
    assert output.returncode == 0, output.stderr[-3000:]
    (_, trial), = load_results(storage / "experiments" / "typographic").iterrows()  # fmt: skip
    from vs2ray.config import DatasetConfig
    from vs2ray.data import get_dataset

    dataset = get_dataset(DatasetConfig(name="rta100", root=str(tmp_path / "rta")))
    written = np.array([r.attribute for r in dataset.records("test")])
    predictions = trial_predictions(trial["trial_dir"])
    assert (predictions["labels"] == [r.label for r in dataset.records("test")]).all()
    for method in ("zero_shot", "ablate"):
        assert trial[f"test_typographic_{method}"] == pytest.approx((predictions[method] == written).mean())
        assert 0 <= trial[f"val_typographic_{method}"] <= 1
    from analysis.report import write_report

    text = write_report(str(storage / "experiments" / "typographic"), tmp_path / "report").read_text()
    section = text.split("## Typographic attacks by block")[1].split("\n## ")[0]
    assert "zero-shot CLIP typographic" in section and "feature suppression true" in section


def test_the_typographic_world_sweep_reports_attacked_typographic_and_clean_accuracy(storage, tmp_path, ray_session):
    """shapes_typographic read by vs2ray-tiny-reader end to end, suppression at block 2 by the text_present
    score: each method's attacked, typographic and clean test figures are those of its saved predictions,
    and the report's table has all three."""
    address = ray_session.get_runtime_context().gcs_address
    output = run_sweep(
        storage,
        address,
        "typographic-world",
        "model.arch=vs2ray-tiny-reader",
        "dataset.name=shapes_typographic",
        "dataset.sizes={train: 800, test: 450}",
        "extraction.layers=[2]",  # every token (SMALL_WORLD's), so that steering at block 2 finishes the forward
        "sae.layer=2",
        "sae.tokens=cls",
        "steering.methods=[zero_shot, ablate]",
        "steering.ablate_score=[text_present]",
        "steering.ablate_latents=[1, 8]",
        "search.metric=val_top1_ablate",
        "search.num_samples=1",
    )
    assert output.returncode == 0, output.stderr[-3000:]
    (_, trial), = load_results(storage / "experiments" / "typographic-world").iterrows()  # fmt: skip
    from vs2ray.config import DatasetConfig
    from vs2ray.data import get_dataset

    records = get_dataset(DatasetConfig(name="shapes_typographic", sizes={"test": 450})).records("test")
    labels, written = np.array([r.label for r in records]), np.array([r.attribute for r in records])
    attacked, clean = (written != labels) & (written < 24), written == 24
    predictions = trial_predictions(trial["trial_dir"])
    assert (predictions["labels"] == labels).all() and attacked.sum() > 100 and clean.sum() > 100
    for method in ("zero_shot", "ablate"):
        predicted = predictions[method]
        assert trial[f"test_typographic_{method}"] == pytest.approx((predicted == written)[attacked].mean())
        assert trial[f"test_attacked_top1_{method}"] == pytest.approx((predicted == labels)[attacked].mean())
        assert trial[f"test_clean_top1_{method}"] == pytest.approx((predicted == labels)[clean].mean())
    assert trial["test_typographic_zero_shot"] > 0.3  # the reader reads
    assert trial["selected_score_ablate"] == "text_present"
    from analysis.report import write_report

    text = write_report(str(storage / "experiments" / "typographic-world"), tmp_path / "report").read_text()
    section = text.split("## Typographic attacks by block")[1].split("\n## ")[0]
    assert "feature suppression clean" in section and "zero-shot CLIP typographic" in section
    assert "## Worst-group accuracy" not in text  # 24 × 25 object × word groups: the typographic table instead
