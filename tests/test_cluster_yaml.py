"""cluster/aws.yaml passes Ray's own launcher validation offline and says what a sweep needs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster" / "aws.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_passes_ray_schema_validation(raw):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)  # raises jsonschema.ValidationError on a bad key or type
    assert prepared["available_node_types"]["head"]["max_workers"] == 0


def test_ray_schema_validation_catches_a_broken_config(raw):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_x1"]["resources"] = {"GPU": "one"}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_head_runs_nothing_and_every_worker_type_declares_its_gpus(raw):
    nodes = raw["available_node_types"]
    assert nodes[raw["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {name: node for name, node in nodes.items() if name != raw["head_node_type"]}
    assert workers and any(node["max_workers"] > 0 for node in workers.values())
    for name, node in workers.items():
        assert node["resources"]["GPU"] >= 1, name
        assert node["node_config"]["InstanceType"].startswith(("g5", "g6", "p4", "p5")), name
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    assert {node["resources"]["GPU"] for node in workers.values()} >= {1, 4}  # single- and multi-GPU types


def test_every_node_has_an_explicit_ami_and_installs_vs2ray_with_gpu_and_aws_extras(raw):
    for name, node in raw["available_node_types"].items():
        assert node["node_config"]["ImageId"].startswith("ami-"), name
    setup = "\n".join(raw["setup_commands"])
    assert "python3 -m venv" in setup
    install = next(c for c in raw["setup_commands"] if "pip install" in c and "vs2ray-src" in c)
    extras = install.split("[", 1)[1].split("]", 1)[0].split(",")
    assert set(extras) == {"gpu", "aws"}
    assert raw["file_mounts"]["~/vs2ray-src"] == "."
    assert "export VS2RAY_EXPERIMENTS=s3://" in setup and "export VS2RAY_ROOT=" in setup
    assert any("ray start --head" in c for c in raw["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in raw["worker_start_ray_commands"])
