"""The bundled vs2ray-tiny model through the library's own paths, and clear loading errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import vs2ray.models as models
from vs2ray.config import BUNDLED_MODEL, BUNDLED_MODELS, ModelConfig, load_config
from vs2ray.data import get_dataset, prompt_templates_for
from vs2ray.data.shapes import CLASS_BLOCKS, PROMPT_TEMPLATES
from vs2ray.evaluate import accuracy
from vs2ray.models import (
    ModelUnavailable,
    build_text_classifier,
    encode_images,
    load_clip,
)
from vs2ray.stages import zero_shot_evaluate
from vs2ray.steering import logits_from_embeddings

# docs/world.md documents the shipped model's zero-shot top-1 on shapes/test; the issue's
# world-card target is 50-70% (CLIP ViT-B/32 on CIFAR-100: 61-65%), far above chance (1/24 = 4.2%).
DOCUMENTED_TOP1_RANGE = (0.50, 0.70)


@pytest.fixture(scope="module")
def bundle():
    return load_clip(ModelConfig(), device="cpu")


@pytest.fixture(scope="module")
def shapes_test():
    config = load_config(None)
    return config, get_dataset(config.dataset)


@pytest.mark.parametrize("arch", BUNDLED_MODELS)
def test_shipped_weights_are_small_fp16_safetensors(arch):
    weights_file = models.bundled_weights(arch)
    assert weights_file.stat().st_size < 10 * 2**20
    with safe_open(str(weights_file), framework="pt") as weights:
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}  # noqa: SIM118
    assert dtypes == {"F16"}


def test_the_bundled_reader_reads_the_written_word_as_the_world_card_says():
    """Issue 28's typographic targets on shapes_typographic/test: a wrong class's name written costs at least 20
    points of zero-shot top-1 against the images without a word, and is predicted on at least 30% of them; the
    bundled vs2ray-tiny, which has never seen text, is fooled on almost none."""
    config = load_config(None).model_copy(deep=True)
    config.dataset.name, config.dataset.sizes = "shapes_typographic", {"test": 1500}
    config.model.arch = "vs2ray-tiny-reader"
    reader = zero_shot_evaluate(config, "test")
    assert reader["model"] == "vs2ray-tiny-reader/bundled" and reader["images"] == 1500
    assert 0.50 <= reader["clean_top1"] <= 0.70  # the bundled world's zero-shot range
    assert reader["clean_top1"] - reader["attacked_top1"] >= 0.20 and reader["typographic"] >= 0.30, reader
    config.model.arch = BUNDLED_MODEL
    blind = zero_shot_evaluate(config, "test")
    assert blind["typographic"] < 0.05 and blind["attacked_top1"] > reader["attacked_top1"] + 0.1, blind


def test_the_reader_takes_64_px_images_in_the_bundled_models_17_tokens():
    reader = load_clip(ModelConfig(arch="vs2ray-tiny-reader"), device="cpu")
    assert reader.preprocess(Image.new("RGB", (64, 64))).shape == (3, 64, 64)
    tokens = reader.model.visual.positional_embedding.shape[0]
    assert tokens == 17 == load_clip(ModelConfig(), device="cpu").model.visual.positional_embedding.shape[0]


def test_bundled_zero_shot_top1_is_in_documented_range(shapes_test):
    config, _ = shapes_test
    result = zero_shot_evaluate(config, "test")
    assert result["images"] == 5000 and result["classes"] == 24
    low, high = DOCUMENTED_TOP1_RANGE
    assert low <= result["top1"] <= high, result
    assert result["top1"] > 10 / 24  # ten times chance
    assert result["top5"] > result["top1"]


def test_text_classifier_matches_manual_prompt_ensemble(bundle, shapes_test):
    _, dataset = shapes_test
    classifier = build_text_classifier(bundle, dataset.classes, PROMPT_TEMPLATES)
    assert classifier.shape == (24, 64)
    torch.testing.assert_close(classifier.norm(dim=1), torch.ones(24))
    for label in (0, 13, 23):
        texts = [t.format(dataset.classes[label]) for t in PROMPT_TEMPLATES]
        with torch.no_grad():
            per_template = bundle.model.encode_text(bundle.tokenizer(texts))
        per_template = per_template / per_template.norm(dim=1, keepdim=True)
        mean = per_template.mean(dim=0)
        torch.testing.assert_close(classifier[label], mean / mean.norm(), atol=1e-5, rtol=1e-5)


def test_preprocess_is_clip_normalisation_of_raw_pixels(bundle, shapes_test):
    _, dataset = shapes_test
    image = dataset.load_image("test", "7")
    raw = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)  # OpenAI CLIP's statistics
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)
    torch.testing.assert_close(bundle.preprocess(image), (raw - mean) / std, atol=1e-6, rtol=1e-6)


def test_class_order_mix_up_is_caught(bundle, shapes_test):
    config, dataset = shapes_test
    records = dataset.records("test")[:1000]
    pixels = torch.stack([bundle.preprocess(dataset.load_image("test", r.ref)) for r in records])
    labels = torch.tensor([r.label for r in records])
    embeddings = encode_images(bundle, pixels)
    templates = prompt_templates_for(config.dataset, dataset)
    right_classifier = build_text_classifier(bundle, dataset.classes, templates)
    right = accuracy(logits_from_embeddings(embeddings, right_classifier), labels, len(dataset.classes))
    # swap the two colours inside every block: the names stay plausible, the order is wrong
    swapped = list(dataset.classes)
    for block in range(len(CLASS_BLOCKS)):
        i = 4 * block
        swapped[i : i + 4] = swapped[i + 2 : i + 4] + swapped[i : i + 2]
    swapped_classifier = build_text_classifier(bundle, swapped, templates)
    wrong = accuracy(logits_from_embeddings(embeddings, swapped_classifier), labels, len(dataset.classes))
    assert wrong[0] < right[0] / 2, (right[:2], wrong[:2])


def test_unknown_arch_tag_or_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelUnavailable, match="no architecture 'ViT-Q-99'"):
        load_clip(ModelConfig(arch="ViT-Q-99", pretrained="openai"), device="cpu")
    with pytest.raises(ModelUnavailable, match="neither a file nor a pretrained tag of ViT-B-32"):
        load_clip(ModelConfig(arch="ViT-B-32", pretrained="no-such-tag"), device="cpu")
    with pytest.raises(ModelUnavailable, match="is not a file"):
        load_clip(ModelConfig(arch="vs2ray-tiny", pretrained=str(tmp_path / "missing.safetensors")), device="cpu")


def test_missing_bundled_weights_name_the_script_that_makes_them(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "bundled_weights", lambda arch: tmp_path / f"{arch}.safetensors")
    with pytest.raises(ModelUnavailable, match=r"vs2ray-tiny-reader.safetensors are missing.*train_tiny_reader.py"):
        load_clip(ModelConfig(arch="vs2ray-tiny-reader"), device="cpu")
    with pytest.raises(ModelUnavailable, match=r"vs2ray-tiny.safetensors are missing.*train_tiny_clip.py"):
        load_clip(ModelConfig(), device="cpu")


def test_pretrained_tag_offline_fails_fast_from_the_cache(monkeypatch, tmp_path):
    # Treat the Hub as unreachable whatever this machine's network: the loader must read
    # only its (empty) cache and say so, instead of retrying downloads for a minute.
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout_s=3.0: False)
    with pytest.raises(ModelUnavailable, match="unreachable and they are not in the cache") as caught:
        load_clip(ModelConfig(arch="ViT-B-32", pretrained="openai", cache_dir=str(tmp_path)), device="cpu")
    assert "model.pretrained" in str(caught.value)


def test_cuda_device_without_gpu_is_a_clear_error(monkeypatch):
    from vs2ray.devices import GpuUnavailable

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(GpuUnavailable, match="no CUDA device"):
        load_clip(ModelConfig(device="cuda"))


def test_bundled_retrieval_encoder_is_a_small_timm_model_whose_neighbourhoods_beat_zero_shot(bundle, shapes_test):
    import timm
    import torch.nn.functional as F

    from vs2ray.config import RetrievalConfig
    from vs2ray.models import BUNDLED_RETRIEVAL_WEIGHTS, encode_retrieval, load_retrieval_encoder

    assert BUNDLED_RETRIEVAL_WEIGHTS.stat().st_size < 2 * 2**20
    encoder = load_retrieval_encoder(RetrievalConfig(encoder="vs2ray-tiny-retrieval", image_size=32))
    assert isinstance(encoder.model, timm.models.VisionTransformer) and encoder.model.num_classes == 0
    config, dataset = shapes_test

    def load(split: str, count: int):
        records = dataset.records(split)[:count]
        images = [dataset.load_image(split, r.ref) for r in records]
        vectors = encode_retrieval(encoder, torch.stack([encoder.preprocess(i) for i in images]))
        clip = encode_images(bundle, torch.stack([bundle.preprocess(i) for i in images]))
        return vectors, clip, torch.tensor([r.label for r in records])

    pool, _, pool_labels = load("train", 3000)
    queries, query_clip, labels = load("test", 600)
    torch.testing.assert_close(queries.norm(dim=1), torch.ones(len(queries)))
    neighbours = pool_labels[(queries @ pool.T).topk(50, dim=1).indices]
    knn = (F.one_hot(neighbours, 24).sum(1).argmax(1) == labels).float().mean()
    classifier = build_text_classifier(bundle, dataset.classes, prompt_templates_for(config.dataset, dataset))
    zero_shot = (logits_from_embeddings(query_clip, classifier).argmax(1) == labels).float().mean()
    # the property VS2++ relies on: an image-only space far better than the zero-shot head (world card: +15)
    assert knn >= zero_shot + 0.10, (knn, zero_shot)


def test_bundled_retrieval_encoder_errors_are_clear(tmp_path):
    from vs2ray.config import RetrievalConfig
    from vs2ray.models import load_retrieval_encoder

    with pytest.raises(ModelUnavailable, match=r"retrieval.image_size: vs2ray-tiny-retrieval takes 32×32"):
        load_retrieval_encoder(RetrievalConfig(encoder="vs2ray-tiny-retrieval", image_size=224))
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ModelUnavailable, match=r"bundled retrieval weights .* are missing"):
        load_retrieval_encoder(RetrievalConfig(encoder="vs2ray-tiny-retrieval", image_size=32), weights=missing)
    with pytest.raises(ModelUnavailable, match="timm has no model 'no-such-net'"):
        load_retrieval_encoder(RetrievalConfig(encoder="no-such-net"))
    random = load_retrieval_encoder(
        RetrievalConfig(encoder="vs2ray-tiny-retrieval", image_size=32, encoder_pretrained=False)
    )
    shipped = load_retrieval_encoder(RetrievalConfig(encoder="vs2ray-tiny-retrieval", image_size=32))
    name = "patch_embed.proj.weight"
    assert not random.model.state_dict()[name].equal(shipped.model.state_dict()[name])


def test_a_trial_that_never_runs_the_encoder_never_imports_open_clip():
    """open_clip brings timm and torchvision (about 150 MB of private memory per trial process): the modules a
    sweep trial imports leave it out until a model is loaded, and loading one brings it."""
    import subprocess
    import sys

    heavy = ("open_clip", "timm", "torchvision")
    check = (
        "import sys, vs2ray.trainable, vs2ray.tuning, vs2ray.stages, vs2ray.evaluate\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
        "from vs2ray.config import ModelConfig\n"
        "from vs2ray.models import load_clip\n"
        "load_clip(ModelConfig(), device='cpu')\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    output = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert output.returncode == 0, output.stderr[-2000:]
    before, after = output.stdout.strip().splitlines()[-2:]
    assert before == "[]"
    assert after == str(sorted(heavy))
