"""Activation extraction with real Ray Data and the bundled model, on small `shapes` splits."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_command
from safetensors.torch import load_file

from vs2ray.config import load_config
from vs2ray.data import DatasetUnavailable, get_dataset
from vs2ray.extract import extract
from vs2ray.models import (
    ModelUnavailable,
    build_text_classifier,
    encode_images,
    encode_retrieval,
    load_clip,
    load_retrieval_encoder,
)
from vs2ray.steering import apply_head, logits_from_embeddings
from vs2ray.store import StoreIncomplete, load_activations, read_manifest

TEST_ROWS = 600


def small_config(root: Path, *extra: str):
    return load_config(
        None,
        [f"storage.root={root}", f"dataset.sizes.test={TEST_ROWS}", "extraction.batch_size=128", *extra],
    )


@pytest.fixture(scope="module")
def test_store(ray_session, tmp_path_factory):
    """One extraction of shapes/test (600 images, 5 chunks) with every token of the first and the last block."""
    root = tmp_path_factory.mktemp("store")
    config = small_config(root, "extraction.layers=[0, -1]", "extraction.tokens=all")
    return config, extract(config, "test")


@pytest.fixture(scope="module")
def reference(test_store):
    """Independent model-path outputs for the same images: preprocess + encode_image per image."""
    config, _ = test_store
    bundle = load_clip(config.model, device="cpu")
    dataset = get_dataset(config.dataset)
    records = dataset.records("test")
    pixels = torch.stack([bundle.preprocess(dataset.load_image("test", r.ref)) for r in records])
    return bundle, dataset, records, pixels, encode_images(bundle, pixels)


def test_rows_and_ids_match_the_split(test_store, reference):
    _, result = test_store
    _, _, records, _, _ = reference
    acts = load_activations(result.store_dir, layers=[-1])
    assert result.rows == TEST_ROWS and not result.reused and result.failed == []
    assert len(np.unique(acts.ids)) == TEST_ROWS
    np.testing.assert_array_equal(acts.ids, [r.id for r in records])
    np.testing.assert_array_equal(acts.labels, [r.label for r in records])
    assert len(list(result.store_dir.glob("part-*.parquet"))) == 5
    manifest = read_manifest(result.store_dir)
    assert manifest["complete"] is True and list(manifest)[-1] == "complete"
    assert manifest["columns"] == {
        "cls_0": [128],
        "cls_3": [128],
        "tokens_0": [17, 128],  # [CLS] + 4×4 patches of 8 px
        "tokens_3": [17, 128],
        "embedding": [64],
    }
    assert manifest["classes"] == get_dataset(load_config(None).dataset).classes


def test_head_reproduces_stored_and_independent_embeddings(test_store, reference):
    _, result = test_store
    _, _, _, _, independent = reference
    acts = load_activations(result.store_dir, layers=[-1])
    head = load_file(result.store_dir / "head.safetensors")
    from_head = apply_head(torch.from_numpy(np.array(acts["cls_3"])), head)
    torch.testing.assert_close(from_head, torch.from_numpy(np.array(acts["embedding"])), atol=1e-5, rtol=0)
    torch.testing.assert_close(from_head, independent, atol=1e-5, rtol=0)


def test_first_block_hook_matches_a_manual_forward(test_store, reference):
    _, result = test_store
    bundle, _, _, pixels, _ = reference
    visual = bundle.model.visual
    with torch.no_grad():
        tokens = visual.conv1(pixels[:64]).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.expand(tokens.shape[0], 1, -1)
        tokens = visual.ln_pre(torch.cat([cls, tokens], dim=1) + visual.positional_embedding)
        expected = visual.transformer.resblocks[0](tokens)[:, 0]
    stored = load_activations(result.store_dir, layers=[0], embedding=False)["cls_0"][:64]
    torch.testing.assert_close(torch.from_numpy(np.array(stored)), expected, atol=1e-5, rtol=0)


def test_stored_tokens_are_the_models_own_block_outputs(test_store, reference):
    _, result = test_store
    bundle, _, _, pixels, _ = reference
    visual = bundle.model.visual
    with torch.no_grad():  # open_clip's own forward, block by block, without the extraction's hooks
        tokens = visual._embeds(pixels[:64])
        outputs = []
        for block in visual.transformer.resblocks:
            tokens = block(tokens)
            outputs.append(tokens)
    acts = load_activations(result.store_dir, layers=[0, -1], embedding=False, token_layers=[0, -1])
    for layer in (0, 3):
        stored = torch.from_numpy(np.array(acts[f"tokens_{layer}"][:64]))
        torch.testing.assert_close(stored, outputs[layer], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(acts[f"cls_{layer}"], acts[f"tokens_{layer}"][:, 0])


def test_store_classifier_gives_the_model_paths_predictions(test_store, reference):
    config, result = test_store
    bundle, dataset, _, _, independent = reference
    from vs2ray.data import prompt_templates_for

    model_classifier = build_text_classifier(bundle, dataset.classes, prompt_templates_for(config.dataset, dataset))
    stored_classifier = load_file(result.store_dir / "classifier.safetensors")["classifier"]
    acts = load_activations(result.store_dir)
    stored_pred = logits_from_embeddings(torch.from_numpy(np.array(acts["embedding"])), stored_classifier).argmax(1)
    model_pred = logits_from_embeddings(independent, model_classifier).argmax(1)
    assert torch.equal(stored_pred, model_pred)
    assert (stored_pred.numpy() == acts.labels).mean() > 0.4  # the bundled model: 50-70% on 5,000 (world card)


def test_second_run_reuses_the_store(test_store):
    config, result = test_store
    parts = {p: p.stat().st_mtime_ns for p in result.store_dir.glob("part-*.parquet")}
    again = extract(config, "test")
    assert again.reused and again.store_dir == result.store_dir and again.rows == TEST_ROWS
    assert {p: p.stat().st_mtime_ns for p in result.store_dir.glob("part-*.parquet")} == parts


def test_bad_inputs_fail_before_any_work(tmp_path, ray_session):
    with pytest.raises(ValueError, match=r"extraction.layers: \[7\] out of range .* 4 blocks"):
        extract(small_config(tmp_path, "extraction.layers=[7]"), "test")
    with pytest.raises(DatasetUnavailable, match="no train/ directory"):
        extract(small_config(tmp_path, "dataset.name=imagefolder", f"dataset.root={tmp_path / 'nope'}"), "test")
    with pytest.raises(ModelUnavailable, match="neither a file nor a pretrained tag"):
        extract(small_config(tmp_path, "model.arch=ViT-B-32", "model.pretrained=nope"), "test")
    with pytest.raises(ValueError, match="has no split 'validation'"):
        extract(small_config(tmp_path), "validation")
    assert not (tmp_path / "activations").exists()


def test_corrupt_images_are_skipped_counted_and_listed(tmp_path, ray_session):
    shapes = get_dataset(load_config(None).dataset)
    root = tmp_path / "folder"
    for split in ("train", "test"):
        for index in range(24):
            record = shapes.records("test")[index]
            folder = root / split / shapes.classes[record.label].replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            shapes.load_image("test", record.ref).save(folder / f"{index:03d}.png")
    test_files = sorted((root / "test").rglob("*.png"))
    broken = [test_files[1], test_files[10], test_files[17]]
    broken[0].write_bytes(b"definitely not a png")
    broken[1].write_bytes(broken[1].read_bytes()[:40])  # truncated
    broken[2].write_bytes(b"")
    config_file = tmp_path / "folder.yaml"
    config_file.write_text(
        f"dataset: {{name: imagefolder, root: {root}}}\nstorage: {{root: {tmp_path / 'store'}}}\n"
        "extraction: {batch_size: 8}\n"
    )
    address = ray_session.get_runtime_context().gcs_address
    command = cli_command("vs2ray", "extract", "--config", str(config_file), "--split", "all")
    output = subprocess.run([*command, "--address", address], capture_output=True, text=True, timeout=300)
    assert output.returncode == 0, output.stderr[-3000:]
    # both splits in one pipeline: the encoder actors start once
    assert output.stdout.count("encoder actor(s)") == 1 and "(train, test)" in output.stdout, output.stdout
    records = get_dataset(load_config(config_file).dataset).records("test")
    broken_ids = sorted(r.id for r in records if Path(r.ref) in broken)
    assert len(broken_ids) == 3
    stores = {read_manifest(s)["inputs"]["split"]: s for s in (tmp_path / "store" / "activations").iterdir()}
    assert read_manifest(stores["train"])["complete"] and read_manifest(stores["train"])["rows"] == 24
    store = stores["test"]
    manifest = read_manifest(store)
    assert manifest["rows"] == len(records) - 3 and manifest["num_failed"] == 3
    assert sorted(entry["id"] for entry in manifest["failed"]) == broken_ids
    assert {entry["ref"] for entry in manifest["failed"]} == {str(p) for p in broken}
    assert "3 image(s) could not be read" in output.stdout
    for path in broken:
        assert str(path) in output.stdout
    assert set(load_activations(store).ids) == {r.id for r in records} - set(broken_ids)


def test_killed_extraction_resumes_without_duplicates(tmp_path, ray_session):
    config_args = [f"storage.root={tmp_path}", "dataset.sizes.test=2400", "extraction.batch_size=60"]
    address = ray_session.get_runtime_context().gcs_address
    command = cli_command("vs2ray", "extract", "--split", "test", "--address", address, assignments=config_args)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        parts: list[Path] = []
        while time.monotonic() < deadline and len(parts) < 4:
            time.sleep(0.5)
            parts = list(tmp_path.glob("activations/*/part-*.parquet"))
            assert process.poll() is None, "extraction finished before it could be interrupted"
        assert len(parts) >= 4, "no progress before the deadline"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    store = parts[0].parent
    written = len(list(store.glob("part-*.parquet")))
    assert 4 <= written < 40 and read_manifest(store)["complete"] is False
    with pytest.raises(StoreIncomplete):
        load_activations(store)

    lines: list[str] = []
    result = extract(load_config(None, config_args), "test", lines.append)
    assert result.store_dir == store and not result.reused
    assert any("resuming" in line for line in lines), lines
    acts = load_activations(store)
    np.testing.assert_array_equal(acts.ids, np.arange(2400))
    assert len(list(store.glob("part-*.parquet"))) == 40


def test_dinov2_retrieval_column_matches_an_independent_timm_forward(tmp_path, ray_session):
    # random DINOv2 weights (no download here) at a small input size: the path, not the features
    retrieval = [
        "retrieval.space=dinov2",
        "retrieval.encoder=vit_small_patch14_dinov2.lvd142m",
        "retrieval.encoder_pretrained=false",
        "retrieval.image_size=56",
    ]
    config = load_config(
        None, [f"storage.root={tmp_path}", "dataset.sizes.test=96", "extraction.batch_size=48", *retrieval]
    )
    result = extract(config, "test")
    acts = load_activations(result.store_dir, retrieval=True)
    assert read_manifest(result.store_dir)["columns"]["retrieval"] == [384]
    encoder = load_retrieval_encoder(config.retrieval)
    dataset = get_dataset(config.dataset)
    pixels = torch.stack([encoder.preprocess(dataset.load_image("test", str(i))) for i in acts.ids])
    torch.testing.assert_close(
        torch.from_numpy(np.array(acts["retrieval"])), encode_retrieval(encoder, pixels), atol=1e-5, rtol=0
    )
    # the retrieval settings are part of the key: a CLIP-only store is a different one
    assert extract(small_config(tmp_path, "dataset.sizes.test=96"), "test").store_dir != result.store_dir


def test_bundled_retrieval_weights_are_part_of_the_store_key(tmp_path, monkeypatch):
    import vs2ray.extract as extract_module
    from vs2ray.config import RetrievalConfig

    bundled = RetrievalConfig(space="dinov2", encoder="vs2ray-tiny-retrieval", image_size=32)
    shipped = extract_module._retrieval_inputs(bundled)
    retrained = tmp_path / "retrained.safetensors"
    retrained.write_bytes(b"other weights")
    monkeypatch.setattr(extract_module, "BUNDLED_RETRIEVAL_WEIGHTS", retrained)
    assert extract_module._retrieval_inputs(bundled)["weights"] != shipped["weights"]
    assert shipped["encoder"] == "vs2ray-tiny-retrieval" and shipped["image_size"] == 32


def test_dinov2_weights_offline_fail_before_any_work(tmp_path, monkeypatch):
    import vs2ray.models as models

    monkeypatch.setattr(models, "_hub_reachable", lambda timeout_s=3.0: False)
    with pytest.raises(ModelUnavailable, match=r"vit_base_patch14_dinov2\.lvd142m weights"):
        extract(small_config(tmp_path, "retrieval.space=dinov2"), "test")
    assert not (tmp_path / "activations").exists()
