"""scripts/train_tiny_clip.py: deterministic, writes fp16 safetensors that the library loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from vs2ray.config import ModelConfig
from vs2ray.models import load_clip

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_tiny_clip.py"


def run_script(out: Path, seed: int) -> dict[str, float]:
    command = [sys.executable, str(SCRIPT), "--out", str(out), "--steps", "3", "--pool-size", "256"]
    command += ["--batch-size", "32", "--eval-limit", "48", "--seed", str(seed)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_same_seed_same_weights_and_loadable(tmp_path):
    first, second, other = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    scores = run_script(first, seed=0)
    run_script(second, seed=0)
    run_script(other, seed=1)
    a, b, c = load_file(first), load_file(second), load_file(other)
    assert a.keys() == b.keys() and all(t.dtype.is_floating_point and t.itemsize == 2 for t in a.values())
    assert all(a[name].equal(b[name]) for name in a)
    assert not all(a[name].equal(c[name]) for name in a)
    assert 0.0 <= scores["top1"] <= scores["top5"] <= 1.0
    bundle = load_clip(ModelConfig(pretrained=str(first)), device="cpu")
    assert bundle.model.visual.proj.shape == (128, 64)
