"""scripts/train_retrieval_encoder.py: deterministic, writes fp16 safetensors that the library loads through timm."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from vs2ray.config import RetrievalConfig
from vs2ray.models import load_retrieval_encoder

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_retrieval_encoder.py"


def run_script(out: Path, seed: int) -> dict[str, float]:
    command = [sys.executable, str(SCRIPT), "--out", str(out), "--steps", "3", "--pool-size", "256"]
    command += ["--batch-size", "32", "--knn-pool", "200", "--knn-queries", "50", "--seed", str(seed)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_same_seed_same_weights_without_head_and_loadable(tmp_path):
    first, second, other = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    scores = run_script(first, seed=0)
    run_script(second, seed=0)
    run_script(other, seed=1)
    a, b, c = load_file(first), load_file(second), load_file(other)
    assert a.keys() == b.keys() and all(t.dtype.is_floating_point and t.itemsize == 2 for t in a.values())
    assert not any(name.startswith("head.") for name in a)  # the classifier is not shipped
    assert all(a[name].equal(b[name]) for name in a)
    assert not all(a[name].equal(c[name]) for name in a)
    assert 0.0 <= scores["knn50"] <= 1.0
    encoder = load_retrieval_encoder(RetrievalConfig(encoder="vs2ray-tiny-retrieval", image_size=32), weights=first)
    loaded = encoder.model.state_dict()
    assert all(loaded[name].half().equal(a[name]) for name in a)
