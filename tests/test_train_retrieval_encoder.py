"""scripts/train_retrieval_encoder.py: deterministic, writes fp16 safetensors that the library loads through timm."""

from __future__ import annotations

from pathlib import Path

from conftest import train_with_three_seeds

from vs2ray.config import RetrievalConfig
from vs2ray.models import load_retrieval_encoder

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_retrieval_encoder.py"


def test_same_seed_same_weights_without_head_and_loadable(tmp_path):
    scores, (a, _, _) = train_with_three_seeds(SCRIPT, tmp_path, "--knn-pool", "200", "--knn-queries", "50")
    assert not any(name.startswith("head.") for name in a)  # the classifier is not shipped
    assert 0.0 <= scores["knn50"] <= 1.0
    weights = tmp_path / "a.safetensors"
    encoder = load_retrieval_encoder(RetrievalConfig(encoder="vs2ray-tiny-retrieval", image_size=32), weights=weights)
    loaded = encoder.model.state_dict()
    assert all(loaded[name].half().equal(a[name]) for name in a)
