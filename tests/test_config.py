"""Config schema: valid files load, broken files give one readable line per problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vs2ray.config import (
    ConfigError,
    Distribution,
    ExperimentConfig,
    ModelConfig,
    config_to_yaml,
    load_config,
    search_space,
    validate_config,
)

REPO = Path(__file__).resolve().parents[1]


def problems_of(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> list[str]:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    return caught.value.problems


def test_every_shipped_sweep_yaml_is_valid():
    files = sorted((REPO / "sweeps").glob("*.yaml"))
    assert files, "sweeps/ has no YAML"
    for file in files:
        assert isinstance(load_config(file), ExperimentConfig), file


def test_quickstart_declares_its_search_space():
    config = load_config(REPO / "sweeps" / "quickstart.yaml")
    space = dict(search_space(config))
    assert space["sae.k"] == Distribution(kind="choice", values=(16, 32, 64))
    assert space["steering.gamma"] == Distribution(kind="uniform", values=(1.0, 3.0))
    assert "pass.w_aux" in space and "steering.lambda" in space
    assert config.model.arch == "vs2ray-tiny" and config.dataset.name == "shapes"


def test_unknown_keys_and_bad_literals_name_path_value_and_allowed(tmp_path):
    problems = problems_of(
        tmp_path,
        """
model: {precision: fp8}
sae: {topk: max, kk: 4}
dataset: {name: cifar10}
bogus: 1
""",
    )
    assert len(problems) == 5, problems
    text = "\n".join(problems)
    assert "model.precision: got 'fp8'" in text and "'fp32', 'tf32', 'bf16' or 'fp16'" in text
    assert "sae.topk: got 'max'" in text and "'relu' or 'abs'" in text
    assert "sae.kk: unknown key" in text and "expansion" in text  # lists the keys allowed there
    assert "dataset.name: got 'cifar10'" in text and "'cifar100'" in text
    assert any(p.startswith("bogus: unknown key") and "steering" in p for p in problems)


def test_bad_search_values_are_reported_per_key(tmp_path):
    problems = problems_of(
        tmp_path,
        """
sae:
  k: -3
  expansion: {uniform: [2, 8]}
steering:
  gamma: {uniform: [3, 1]}
  lambda: {loguniform: [0, 10]}
  rag_alpha: {choice: [0.5, 2]}
  methods: [vs2, vs3]
retrieval:
  n_neighbors: [10, 50]
""",
    )
    by_key = {p.split(":", 1)[0]: p for p in problems}
    assert set(by_key) == {
        "sae.k",
        "sae.expansion",
        "steering.gamma",
        "steering.lambda",
        "steering.rag_alpha",
        "steering.methods[1]",
        "retrieval.n_neighbors",
    }
    assert "got -3" in by_key["sae.k"] and "integer >= 1" in by_key["sae.k"]
    assert "choice, int" in by_key["sae.expansion"]  # uniform is not allowed for an integer key
    assert "low < high" in by_key["steering.gamma"]
    assert "low > 0" in by_key["steering.lambda"]
    assert "choice entry got 2" in by_key["steering.rag_alpha"] and "[0, 1]" in by_key["steering.rag_alpha"]
    assert "'vs3'" in by_key["steering.methods[1]"] and "'vs2pp'" in by_key["steering.methods[1]"]
    assert "{choice: [...]}" in by_key["retrieval.n_neighbors"]


def test_cross_field_rules(tmp_path):
    problems = problems_of(tmp_path, "model: {arch: ViT-B-32}\ndataset: {name: imagefolder}\n")
    assert any(p.startswith("model:") and "pretrained: bundled" in p for p in problems), problems
    assert any(p.startswith("dataset:") and "dataset.root" in p for p in problems), problems


def test_suppression_and_worst_group_selection_need_a_dataset_with_groups(tmp_path):
    problems = problems_of(tmp_path, "steering: {methods: [zero_shot, ablate], select_by: worst_group}\n")
    assert any("ablate and select_by: worst_group" in p and "'shapes' has none" in p for p in problems), problems
    valid = tmp_path / "spurious.yaml"
    valid.write_text("dataset: {name: shapes_spurious}\nsteering: {methods: [ablate], select_by: worst_group}\n")
    assert load_config(valid).steering.methods == ["ablate"]
    bad = "dataset: {name: shapes_spurious}\nsteering: {ablate_score: [mutual_information]}\n"
    assert any("steering.ablate_score[0]" in p and "within_class" in p for p in problems_of(tmp_path, bad))
    no_clean_images = "dataset: {name: shapes_spurious}\nsteering: {ablate_score: [text_present]}\n"
    assert any("text_present needs images with and without a word" in p for p in problems_of(tmp_path, no_clean_images))


def test_only_the_bundled_architectures_take_pretrained_bundled(tmp_path):
    assert ModelConfig(arch="vs2ray-tiny-reader").pretrained == "bundled"
    problems = problems_of(tmp_path, "model: {arch: ViT-B-32, pretrained: bundled}\n")
    assert any("bundled goes with arch: vs2ray-tiny or vs2ray-tiny-reader only" in p for p in problems), problems


def test_yaml_syntax_error_and_missing_file(tmp_path):
    problems = problems_of(tmp_path, "sae: {k: [1, 2\n")
    assert len(problems) == 1 and problems[0].startswith("not valid YAML")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    problems = problems_of(tmp_path, "- just\n- a list\n")
    assert "top level must be a mapping" in problems[0]


def test_set_overrides_parse_yaml_values_and_are_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sae: {k: 64}\n")
    config = load_config(path, ["sae.k={choice: [32, 128]}", "steering.lambda=3", "steering.methods=[vs2]"])
    assert config.sae.k == Distribution(kind="choice", values=(32, 128))
    assert config.steering.lambda_ == 3.0 and config.steering.methods == ["vs2"]
    with pytest.raises(ConfigError, match=r"sae\.k: got 0"):
        load_config(path, ["sae.k=0"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(path, ["sae.k.x=1"])
    with pytest.raises(ConfigError, match=r"expected key\.path=value"):
        load_config(path, ["sae.k"])


def test_yaml_and_json_round_trips_keep_distributions():
    config = load_config(None, ["sae.k={int: [8, 64]}", "pass.w_aux={loguniform: [0.01, 2.0]}"])
    again = validate_config(yaml.safe_load(config_to_yaml(config)))
    assert again == config
    assert dict(search_space(again))["pass.w_aux"].values == (0.01, 2.0)
    # Ray workers rebuild the config from JSON
    assert ExperimentConfig.model_validate_json(config.model_dump_json(by_alias=True)) == config


def test_cli_prints_problems_not_a_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sae: {k: zero}\nsteering: {gamma: 0.5}\n")
    result = subprocess.run(
        [sys.executable, "-m", "vs2ray", "zero-shot", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "sae.k: got 'zero'" in result.stderr
    assert "steering.gamma: got 0.5; expected a number >= 1" in result.stderr


def test_storage_defaults_come_from_the_environment(monkeypatch):
    from vs2ray.tuning import experiments_root

    monkeypatch.delenv("VS2RAY_ROOT", raising=False)
    monkeypatch.delenv("VS2RAY_EXPERIMENTS", raising=False)
    config = load_config(None)
    assert config.storage.root == "~/vs2ray" and experiments_root(config).endswith("/vs2ray/experiments")
    monkeypatch.setenv("VS2RAY_ROOT", "/mnt/efs/vs2ray")
    monkeypatch.setenv("VS2RAY_EXPERIMENTS", "s3://bucket/experiments")
    config = load_config(None)
    assert config.storage.root == "/mnt/efs/vs2ray" and experiments_root(config) == "s3://bucket/experiments"
    assert load_config(None, ["storage.root=/elsewhere"]).storage.root == "/elsewhere"


def test_positive_rule_takes_a_rule_a_grid_list_or_a_searched_choice(tmp_path):
    assert load_config(None).retrieval.positive_rule == ("query", "majority")  # both gridded by default
    assert load_config(None, ["retrieval.positive_rule=majority"]).retrieval.positive_rule == "majority"
    searched = load_config(None, ["retrieval.positive_rule={choice: [query, majority]}"])
    assert dict(search_space(searched))["retrieval.positive_rule"].values == ("query", "majority")
    gridded = load_config(None, ["retrieval.positive_rule=[majority]"])
    assert validate_config(yaml.safe_load(config_to_yaml(gridded))) == gridded  # a list survives the saved config
    with pytest.raises(ConfigError, match=r"retrieval\.positive_rule: list entry got 'nearest'; expected 'query' or"):
        load_config(None, ["retrieval.positive_rule=[query, nearest]"])
    with pytest.raises(ConfigError, match=r"retrieval\.positive_rule: .*uniform"):
        load_config(None, ["retrieval.positive_rule={uniform: [0, 1]}"])


def test_selecting_on_test_needs_an_explicit_yes():
    with pytest.raises(ConfigError, match=r"search\.metric: \['test_top1_vs2'\] would make Optuna select on the test"):
        load_config(None, ["search.metric=test_top1_vs2"])
    config = load_config(None, ["search.metric=test_top1_vs2", "search.allow_test_selection=true"])
    assert config.search.metrics == ["test_top1_vs2"]
    with pytest.raises(ConfigError, match=r"search\.allow_test_selection"):
        load_config(None, ["search.metric=[val_top1_vs2, test_top1_vs2]", "search.mode=[max, max]"])


def test_layer_keys_are_checked_against_what_extraction_stores():
    with pytest.raises(ConfigError, match=r"sae_rec_all needs extraction.tokens: all and every block"):
        load_config(None, ["steering.methods=[vs2, sae_rec_all]"])
    with pytest.raises(ConfigError, match=r"sae.tokens: all needs extraction.tokens: all"):
        load_config(None, ["sae.tokens=all"])
    with pytest.raises(ConfigError, match=r"sae.layer: got the list \[0, 1\]; write a choice as \{choice"):
        load_config(None, ["sae.layer=[0, 1]"])
    config = load_config(None, ["extraction.layers=[0, -1]", "extraction.tokens=all", "sae.layer={choice: [0, -1]}"])
    assert config.sae.layer.values == (0, -1)


def test_every_config_key_is_described_for_the_generated_reference():
    # docs/reference/config.md is built from these descriptions (docs/hooks.py): a key without one is a hole there
    from pydantic import BaseModel

    from vs2ray.config import ExperimentConfig

    undescribed = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = prefix + (field.alias or name)
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, key + ".")
            elif not field.description:
                undescribed.append(key)

    walk(ExperimentConfig, "")
    assert not undescribed
