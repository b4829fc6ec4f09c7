"""cluster/aws.yaml passes Ray's own launcher validation offline, says what a sweep needs, and its node types
run a sweep on Ray's own autoscaler."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import QUICKSTART, SMALL_WORLD, run_sweep

from vs2ray.config import load_config
from vs2ray.results import load_results

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


def test_every_node_starts_ray_with_token_authentication_and_a_private_dashboard(raw):
    starts = {"head": raw["head_start_ray_commands"], "worker": raw["worker_start_ray_commands"]}
    for role, commands in starts.items():
        ray_starts = [c for c in commands if "ray start" in c]
        assert ray_starts, role
        assert all("RAY_AUTH_MODE=token ray start" in c for c in ray_starts), role
    head_start = next(c for c in raw["head_start_ray_commands"] if "ray start --head" in c)
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    # drivers (ray exec, the sweep) use the token too
    assert any("export RAY_AUTH_MODE=token" in c for c in raw["setup_commands"])


def test_the_token_travels_from_outside_the_repository_and_never_in_clear(raw):
    mounts = raw["file_mounts"]
    assert mounts["~/.ray/auth_token"] == "~/.ray/auth_token"  # Ray's default token path on each machine
    repo = CLUSTER_YAML.parents[1]
    for remote, local in mounts.items():
        if remote != "~/vs2ray-src":
            assert local.startswith("~/") or Path(local).is_absolute(), local
            assert not Path(local).expanduser().resolve().is_relative_to(repo), local
    commands = "\n".join(str(c) for key in raw if key.endswith("commands") for c in (raw[key] or []))
    assert "RAY_AUTH_TOKEN=" not in commands and "get-auth-token" not in commands  # no token on a command line
    assert "auth_token" in (repo / ".gitignore").read_text()  # a token copied into the tree is never committed


def test_ssh_is_the_only_way_in_and_only_from_the_operators_cidr(raw):
    import json

    for name, node in raw["available_node_types"].items():
        assert node["node_config"]["SecurityGroupIds"] == ["sg-0123456789abcdef0"], name  # CHANGE-ME
    template = json.loads((CLUSTER_YAML.parent / "security-group.json").read_text())
    group = template["Resources"]["ClusterGroup"]["Properties"]
    assert group["SecurityGroupIngress"] == [
        {
            "IpProtocol": "tcp",
            "FromPort": 22,
            "ToPort": 22,
            "CidrIp": {"Ref": "SshCidr"},
            "Description": "SSH from the operator",
        }
    ]
    assert template["Parameters"]["SshCidr"]["Default"] == "CHANGE-ME"
    internal = template["Resources"]["IntraClusterIngress"]["Properties"]
    assert internal["SourceSecurityGroupId"] == internal["GroupId"] == {"Fn::GetAtt": ["ClusterGroup", "GroupId"]}


def _change_me_values(raw: dict) -> dict[str, str]:
    """The account, region, bucket, prefix, EFS id and roles the YAML names (its CHANGE-ME values)."""
    import re

    text = CLUSTER_YAML.read_text()
    experiments = re.search(r"VS2RAY_EXPERIMENTS=s3://([^/]+)/(\S+?)'", text)
    efs = re.search(r"(fs-[0-9a-f]+)\.efs\.([a-z0-9-]+)\.amazonaws\.com", text)
    arns = {n["node_config"]["IamInstanceProfile"]["Arn"] for n in raw["available_node_types"].values()}
    accounts = {arn.split(":")[4] for arn in arns}
    assert len(accounts) == 1
    return {
        "account": accounts.pop(),
        "region": raw["provider"]["region"],
        "bucket": experiments.group(1),
        "prefix": experiments.group(2),
        "efs": efs.group(1),
        "efs_region": efs.group(2),
        "cluster": raw["cluster_name"],
    }


def test_iam_policies_parse_and_name_only_the_yamls_resources(raw):
    import json

    values = _change_me_values(raw)
    assert values["efs_region"] == values["region"]
    allowed = {
        f"arn:aws:s3:::{values['bucket']}",
        f"arn:aws:s3:::{values['bucket']}/{values['prefix']}/*",
        f"arn:aws:elasticfilesystem:{values['region']}:{values['account']}:file-system/{values['efs']}",
        f"arn:aws:ec2:{values['region']}:{values['account']}:instance/*",
        f"arn:aws:iam::{values['account']}:role/vs2ray-node",
        "*",  # EC2 Describe* and RunInstances accept no narrower resource; RunInstances is held to the region
    }
    for name in ("iam-policy.json", "iam-policy-head.json"):
        policy = json.loads((CLUSTER_YAML.parent / name).read_text())
        assert policy["Version"] == "2012-10-17"
        for statement in policy["Statement"]:
            resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
            assert set(resources) <= allowed, (name, statement["Sid"])
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            assert not any(a.endswith("*") or a == "*" for a in actions), (name, statement["Sid"])  # no wildcards
            if resources == ["*"]:
                assert all(a.startswith("ec2:") for a in actions), (name, statement["Sid"])
    node = json.loads((CLUSTER_YAML.parent / "iam-policy.json").read_text())
    assert {a for s in node["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])} <= {
        "s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
        "elasticfilesystem:ClientMount", "elasticfilesystem:ClientWrite",
    }  # fmt: skip
    head = json.loads((CLUSTER_YAML.parent / "iam-policy-head.json").read_text())
    stop = next(s for s in head["Statement"] if "ec2:TerminateInstances" in s["Action"])
    assert stop["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"] == values["cluster"]


def _pins() -> dict[str, str]:
    text = (CLUSTER_YAML.parent / "constraints.txt").read_text()
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    return dict(line.split("==") for line in lines if line)


def test_every_node_installs_from_one_constraints_file_that_pins_what_must_match(raw):
    from importlib.metadata import version

    pins = _pins()
    for package in ("ray", "torch", "torchvision", "open_clip_torch", "faiss-gpu-cu12"):
        assert package in pins, package
    assert pins["ray"] == version("ray")  # the Ray this code is written and tested against (nodes must match)
    assert pins["open_clip_torch"] == version("open_clip_torch")
    install = next(c for c in raw["setup_commands"] if "pip install" in c and "vs2ray-src" in c)
    assert "-c" in install.split() and "cluster/constraints.txt" in install


def test_the_pinned_torch_build_runs_on_the_amis_driver_and_workers_check_it_at_setup(raw):
    from vs2ray.devices import MIN_DRIVER_FOR_CUDA

    # PyPI's default Linux build of each torch release: CUDA 12.8 up to 2.10, CUDA 13 from 2.11
    major, minor = (int(part) for part in _pins()["torch"].split(".")[:2])
    cuda_major = "12" if (major, minor) <= (2, 10) else "13"
    constraints = (CLUSTER_YAML.parent / "constraints.txt").read_text()
    ami_driver = 570  # the driver of the AMI pinned in aws.yaml (Deep Learning Base OSS Nvidia Driver GPU AMI, 2025-05)
    assert "2025-05" in CLUSTER_YAML.read_text() and "ships a 570 driver" in constraints
    assert MIN_DRIVER_FOR_CUDA[cuda_major] <= ami_driver
    assert any("vs2ray devices --require-cuda" in command for command in raw["worker_setup_commands"])
    setup = "\n".join(raw["setup_commands"])
    assert "export HF_HOME=/mnt/efs/" in setup  # weights downloaded once onto the shared file system


def test_the_shipped_cluster_shape_extracts_on_gpu_actors_it_asks_the_autoscaler_for(
    tmp_path, monkeypatch, ray_session
):
    """cluster/aws.yaml's node types on Ray's own autoscaler: a head with CPU 0 and GPU workers from
    min_workers 0, so the cluster has no GPU when the sweep starts. The extraction must ask for GPU
    actors (half a GPU each) and wait for the nodes (not start one CPU actor), the trials must land on
    GPU workers, and the all-token store the worker nodes wrote must be the one a single process writes."""
    from conftest import LocalAutoscalingCluster

    from vs2ray.extract import extract
    from vs2ray.store import load_activations

    shipped = yaml.safe_load((QUICKSTART.parents[1] / "cluster" / "aws.yaml").read_text())
    nodes = shipped["available_node_types"]
    gpu_x1 = nodes["gpu_x1"]
    assert nodes[shipped["head_node_type"]]["resources"] == {"CPU": 0} and gpu_x1["min_workers"] == 0
    # the shipped type, capped at 2 nodes so that this 2-core machine can hold them
    workers = {"gpu_x1": {"resources": gpu_x1["resources"], "node_config": {}, "min_workers": 0, "max_workers": 2}}
    cluster = LocalAutoscalingCluster({"CPU": 0}, workers)
    monkeypatch.setenv("VS2RAY_FAKE_GPUS", "1")  # the drivers below, like the cluster's processes, are told
    world = (
        "dataset.sizes={train: 600, test: 200}",
        "extraction.gpus_per_worker=0.5",
        "model.device=cuda",  # GPU work by the config, whatever the cold cluster shows
    )
    try:
        address = cluster.start(tmp_path)
        output = run_sweep(
            tmp_path,
            address,
            "autoscaled",
            *world,
            "extraction.max_workers=2",
            "sae.k={choice: [8, 16]}",
            "sae.expansion=2",
            "steering.methods=[zero_shot, vs2, vs2pp]",
            "resources.gpus_per_trial=0.5",
            "search.num_samples=2",
            "search.max_concurrent_trials=2",
            timeout=500,
        )
        assert output.returncode == 0, output.stdout[-3000:] + output.stderr[-3000:]
        list_nodes = f"import json, ray; ray.init(address={address!r}); print(json.dumps(ray.nodes()))"
        nodes = json.loads(subprocess.run([sys.executable, "-c", list_nodes], capture_output=True, text=True).stdout)
    finally:
        cluster.shutdown()
    gpu_nodes = {node["NodeID"] for node in nodes if node["Resources"].get("GPU")}
    head = {node["NodeID"] for node in nodes if not node["Resources"].get("GPU")}
    assert gpu_nodes and len(head) == 1  # the autoscaler started GPU workers; the head has none
    assert "1 to 2 encoder actor(s) (0.5 GPU" in output.stdout, output.stdout[-3000:]
    stores = {split: next((tmp_path / "activations").glob(f"*-{split}-*")) for split in ("train", "test")}
    for store in stores.values():
        workers = json.loads((store / "manifest.json").read_text())["workers"]
        assert workers and all(w["gpus"] and w["device"] == "cpu" and w["fake_gpus"] for w in workers)
        assert {w["node"] for w in workers} <= gpu_nodes  # GPU encoder actors, on the nodes they asked for
    # the same store, written by one local process: the same key (resources are not part of it), the same rows
    monkeypatch.delenv("VS2RAY_FAKE_GPUS")
    local = load_config(QUICKSTART, [*SMALL_WORLD, *world[:1], f"storage.root={tmp_path / 'local'}"])
    single = extract(local, "test").store_dir
    assert single.name == stores["test"].name
    here, there = load_activations(single, layers=[1, -1]), load_activations(stores["test"], layers=[1, -1])
    for name in ("cls_1", "cls_3", "embedding"):
        np.testing.assert_array_equal(here[name], there[name])
    np.testing.assert_array_equal(here["tokens_1"], there["tokens_1"])
    trials = load_results(tmp_path / "experiments" / "autoscaled")
    assert len(trials) == 2 and (trials["status"] == "TERMINATED").all()
    assert set(trials["node_id"]) <= gpu_nodes  # trials on the GPU workers (the head has CPU 0)
    assert (trials["gpu_ids"].astype(str).str.len() > 0).all()  # each trial was given a (fake) GPU share
    assert trials["retrieval_index"].nunique() == 1 and trials["test_top1_vs2pp"].notna().all()
    assert (trials["device"] == "cpu").all() and trials["env_fake_gpus"].all()  # fake, and recorded as such
    assert (trials["env_torch"] == __import__("torch").__version__).all()
