"""scripts/train_tiny_clip.py: deterministic, writes fp16 safetensors that the library loads."""

from __future__ import annotations

from pathlib import Path

from conftest import train_with_three_seeds

from vs2ray.config import ModelConfig
from vs2ray.models import load_clip

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_tiny_clip.py"


def test_same_seed_same_weights_and_loadable(tmp_path):
    scores, _ = train_with_three_seeds(SCRIPT, tmp_path, "--eval-limit", "48")
    assert 0.0 <= scores["top1"] <= scores["top5"] <= 1.0
    bundle = load_clip(ModelConfig(pretrained=str(tmp_path / "a.safetensors")), device="cpu")
    assert bundle.model.visual.proj.shape == (128, 64)
