"""SAEs in and out (vs2ray/interop.py): every peer format read as the SAE its own definition computes, the Hub
export read back weight for weight and by sparsify's own loader, and clear errors for what cannot be read."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vs2ray import steering
from vs2ray.interop import export_sae, load_any_sae
from vs2ray.sae import CheckpointError, SAETrainParams, SparseAutoencoder, train_sae

D, N = 16, 48
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's fused kernels need a GPU


def peer_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights in the SAELens / saev / ViT-Prisma orientation: W_enc (d, n), W_dec (n, d)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D, N, generator=g) / 4,
        "b_enc": torch.randn(N, generator=g) / 10,
        "W_dec": F.normalize(torch.randn(N, D, generator=g), dim=1),
        "b_dec": torch.randn(D, generator=g),
    }


def inputs() -> torch.Tensor:
    return torch.randn(40, D, generator=torch.Generator().manual_seed(1)) * 2 + 0.5


def top_k(pre: torch.Tensor, k: int, relu: bool) -> torch.Tensor:
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu() if relu else values)


def assert_steers(sae: SparseAutoencoder, x: torch.Tensor, direction: torch.Tensor) -> None:
    """VS2 with the imported SAE moves x along the peer's own W_dec c (computed by the test from its formula)."""
    steered = steering.vs2(sae, x, 2.0, 1.0)
    torch.testing.assert_close(steered, steering.norm_preserving(x, direction), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(steered, x)


def test_a_saelens_checkpoint_reads_as_the_sae_its_definition_computes(tmp_path):
    # SAELens: a = (x − b_dec·apply_b_dec_to_input) W_enc + b_enc; standard = ReLU, jumprelu = ReLU·1[· > θ]
    w, x = peer_weights(), inputs()
    threshold = torch.rand(N, generator=torch.Generator().manual_seed(2)) * 0.3
    cases = {
        "standard": ({}, lambda pre: pre.relu()),
        "jumprelu": ({}, lambda pre: pre.relu() * (pre.relu() > threshold)),
        "topk": ({"k": 5}, lambda pre: top_k(pre, 5, relu=True)),
    }
    for architecture, (extra, activation) in cases.items():
        for apply_b_dec in (True, False):
            directory = tmp_path / f"{architecture}-{apply_b_dec}"
            directory.mkdir()
            config = {"architecture": architecture, "d_in": D, "d_sae": N, "apply_b_dec_to_input": apply_b_dec, **extra}
            config["normalize_activations"] = "none"
            (directory / "cfg.json").write_text(json.dumps(config))
            save_file(
                {**w, **({"threshold": threshold} if architecture == "jumprelu" else {})},
                directory / "sae_weights.safetensors",
            )
            imported = load_any_sae(directory, expected_d=D)
            pre = (x - w["b_dec"] * apply_b_dec) @ w["W_enc"] + w["b_enc"]
            expected = activation(pre) @ w["W_dec"] + w["b_dec"]
            assert imported.format == "saelens"
            torch.testing.assert_close(imported.sae(x).reconstruction, expected, atol=1e-5, rtol=1e-5)
            assert_steers(imported.sae, x, activation(pre) @ w["W_dec"])
    (tmp_path / "standard-True" / "cfg.json").write_text(json.dumps({"architecture": "gated", "d_in": D}))
    with pytest.raises(CheckpointError, match="architecture 'gated' cannot be represented"):
        load_any_sae(tmp_path / "standard-True")


def test_a_layer_norm_saelens_sae_codes_the_rows_layer_norm(tmp_path):
    w, x = peer_weights(3), inputs()
    config = {"architecture": "standard", "d_in": D, "d_sae": N, "normalize_activations": "layer_norm"}
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    save_file(w, tmp_path / "sae_weights.safetensors")
    mean, std = x.mean(dim=1, keepdim=True), x.std(dim=1, keepdim=True) + 1e-5  # SAELens's run-time layer norm
    normed = (x - mean) / std
    expected = (((normed - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu() @ w["W_dec"] + w["b_dec"]) * std + mean
    torch.testing.assert_close(load_any_sae(tmp_path).sae(x).reconstruction, expected, atol=1e-4, rtol=1e-4)


def test_a_vit_prisma_checkpoint_reads_and_its_legacy_pickle_is_refused(tmp_path):
    w, x = peer_weights(4), inputs()
    config = {"d_in": D, "d_sae": N, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 6}}
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    save_file(w, tmp_path / "sae_weights.safetensors")
    imported = load_any_sae(tmp_path)
    expected = top_k((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 6, relu=True) @ w["W_dec"] + w["b_dec"]
    assert imported.format == "vit-prisma" and imported.sae.kind == "topk"
    torch.testing.assert_close(imported.sae(x).reconstruction, expected, atol=1e-5, rtol=1e-5)
    assert_steers(imported.sae, x, expected - w["b_dec"])
    legacy = tmp_path / "n_images_2600058.pt"
    legacy.write_bytes(b"\x80\x02not read")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_any_sae(legacy)


@pytest.mark.parametrize("schema", [None, 1, 2])
def test_a_saev_checkpoint_reads_as_the_sae_its_definition_computes(tmp_path, schema):
    # saev: a = x W_enc + b_enc (no b_dec subtracted), TopK keeps the k largest values as they are
    w, x = peer_weights(5), inputs()
    if schema is None:  # before schemas: the config itself, ReLU
        header, activation = {"d_vit": D, "exp_factor": N // D}, lambda pre: pre.relu()
    elif schema == 1:
        header = {"schema": 1, "cls": "TopK", "cfg": {"d_vit": D, "exp_factor": N // D, "top_k": 4}}
        activation = lambda pre: top_k(pre, 4, relu=False)  # noqa: E731
    else:
        activation_config = {"cls": "BatchTopK", "params": {"top_k": 7}}
        header = {"schema": 2, "cfg": {"d_vit": D, "exp_factor": N // D, "activation": activation_config}}
        activation = lambda pre: top_k(pre, 7, relu=False)  # noqa: E731
    buffer = io.BytesIO()
    torch.save(w, buffer)
    path = tmp_path / "sae.pt.saev"
    path.write_bytes((json.dumps(header) + "\n").encode() + buffer.getvalue())
    imported = load_any_sae(path, expected_d=D)
    expected = activation(x @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"]
    assert imported.format == "saev"
    torch.testing.assert_close(imported.sae(x).reconstruction, expected, atol=1e-5, rtol=1e-5)
    assert_steers(imported.sae, x, expected - w["b_dec"])
    with pytest.raises(CheckpointError, match="reads d=16 activations, not the store's d=768"):
        load_any_sae(path, expected_d=768)


def trained(kind: str = "topk", normalize: str = "none") -> SparseAutoencoder:
    x = inputs().repeat(20, 1) + torch.randn(800, D, generator=torch.Generator().manual_seed(6))
    params = SAETrainParams(k=4, expansion=3, steps=30, batch_size=128, warmup_steps=5, kind=kind, normalize=normalize)
    return train_sae(x, params, device="cpu").sae


def test_a_sparsify_checkpoint_written_by_sparsify_reads_as_sparsify_computes(tmp_path):
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    coder = SparseCoder(D, SparseCoderConfig(expansion_factor=3, k=5))
    with torch.no_grad():
        coder.b_dec.normal_()
        coder.encoder.bias.normal_(0, 0.1)
    coder.save_to_disk(tmp_path / "layers.3")
    imported = load_any_sae(tmp_path / "layers.3", expected_d=D)
    x = inputs()
    assert imported.format == "sparsify" and imported.sae.k == 5
    torch.testing.assert_close(imported.sae(x).reconstruction, coder(x).sae_out, atol=1e-5, rtol=1e-5)
    assert_steers(imported.sae, x, (coder(x).sae_out - coder.b_dec).detach())
    with pytest.raises(CheckpointError, match="pass the one of the SAE's hook point"):
        load_any_sae(tmp_path)  # sparsify writes one directory per hook point
    config = json.loads((tmp_path / "layers.3" / "cfg.json").read_text())
    (tmp_path / "layers.3" / "cfg.json").write_text(json.dumps({**config, "transcode": True}))
    with pytest.raises(CheckpointError, match="transcode cannot be represented"):
        load_any_sae(tmp_path / "layers.3")


def test_an_export_reads_back_weight_for_weight_and_a_top_k_one_by_sparsifys_loader(tmp_path):
    from sparsify import SparseCoder

    x = inputs()
    for kind, normalize in (("topk", "none"), ("jumprelu", "layer_norm"), ("batchtopk", "none")):
        source = tmp_path / f"sae-{kind}"
        sae = trained(kind, normalize)
        sae.save(source, {"activation_key": "store-key", "column": "cls_3", "seed": 0}, {"fvu": 0.1, "l0": 4.0})
        out = export_sae(source, tmp_path / f"export-{kind}", {"trial": "abc"})
        back = load_any_sae(out)
        assert back.format == "vs2ray" and back.metrics["fvu"] == 0.1 and back.config["column"] == "cls_3"
        assert (back.sae.kind, back.sae.normalize) == (kind, normalize)
        for name, tensor in back.sae.state_dict().items():
            assert torch.equal(tensor, sae.state_dict()[name]), name
        assert torch.equal(back.sae(x).reconstruction, sae(x).reconstruction)
        card = (out / "README.md").read_text()
        assert card.startswith("---\nlibrary_name: vs2ray") and "store-key" in card and "| fvu | 0.1 |" in card
        if kind == "topk":  # sparsify's layout: its own loader gives the same SAE
            coder = SparseCoder.load_from_disk(out)
            torch.testing.assert_close(coder(x).sae_out, sae(x).reconstruction, atol=1e-5, rtol=1e-5)
        else:
            assert not (out / "cfg.json").exists()


def test_a_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        CheckpointError,
        match=r"(?s)could not be downloaded from the Hugging Face Hub .*download no-such-org/no-such-sae",
    ):
        load_any_sae("no-such-org/no-such-sae/layer_3")
    with pytest.raises(CheckpointError, match="neither a file, a directory nor a Hugging Face Hub id"):
        load_any_sae("not a path")


def test_the_sae_commands_refuse_a_directory_that_is_no_sae_with_its_reason(tmp_path, capsys):
    from vs2ray.cli import main

    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "cards.json").write_text('{"cards": []}')  # cards of no SAE are never read back
    assert main(["features", str(tmp_path)]) == 1
    assert "holds no SAE checkpoint vs2ray reads" in capsys.readouterr().err
    assert main(["export-sae", str(tmp_path), "--out", str(tmp_path / "out")]) == 1  # exports vs2ray's own only
    assert "incomplete: missing sae.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "trial").mkdir()
    (tmp_path / "trial" / "result.json").write_text('{"sae_dir": "/x"')  # cut short: no complete result
    assert main(["features", str(tmp_path / "trial")]) == 2
    assert "no complete result yet" in capsys.readouterr().err
