"""SAEs of every kind and PASS training on synthetic data with a known answer (torch only, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vs2ray.sae import SAETrainParams, SparseAutoencoder, auxk_loss, evaluate_sae, fvu, per_sample_fvu, train_sae


def planted(num_atoms: int = 64, d: int = 32, active: int = 4, n: int = 20_000, seed: int = 0, classes: int = 0):
    """x = Σ (active random atoms × coefficients in [0.5, 2.5]) + noise + offset; optional class structure.

    With `classes`, each class draws its atoms from its own preferred subset half the time,
    so codes of a class share latents.
    """
    g = torch.Generator().manual_seed(seed)
    atoms = F.normalize(torch.randn(num_atoms, d, generator=g), dim=1)
    labels = torch.randint(max(classes, 1), (n,), generator=g)
    chosen = torch.stack([torch.randperm(num_atoms, generator=g)[:active] for _ in range(n)])
    if classes:
        per_class = num_atoms // classes
        own = labels[:, None] * per_class + torch.randint(per_class, (n, active), generator=g)
        chosen = torch.where(torch.rand(n, 1, generator=g) < 0.5, own, chosen)
    coefficients = torch.rand(n, active, generator=g) * 2 + 0.5
    x = (atoms[chosen] * coefficients[..., None]).sum(1) + 0.01 * torch.randn(n, d, generator=g) + 1.0
    return x, atoms, labels


FAST = {"k": 4, "expansion": 4, "steps": 1500, "batch_size": 512, "lr": 2e-3, "warmup_steps": 50}


@pytest.fixture(scope="module")
def planted_run():
    x, atoms, _ = planted()
    return x, atoms, train_sae(x, SAETrainParams(**FAST), device="cpu")


def test_planted_dictionary_is_recovered(planted_run):
    # 64 unit atoms in 32 dims, 4 active per sample, 128 latents with k=4. The fit is
    # well-posed (noise 0.01 against coefficients >= 0.5): a correct SAE reaches FVU about
    # 0.08 and matches every atom at cosine > 0.99; a broken decoder, encoder or TopK
    # gives FVU near 1 and cosines near the random-direction level (~0.5 at best of 128).
    _, atoms, result = planted_run
    assert result.metrics["fvu"] < 0.15
    best_cosine = (F.normalize(result.sae.W_dec, dim=1) @ atoms.T).max(dim=0).values
    assert (best_cosine > 0.9).float().mean() >= 0.9
    assert result.metrics["l0"] == pytest.approx(4.0, abs=0.05)
    assert result.losses[-1] < result.losses[0] / 3


def test_decoder_rows_stay_unit_norm(planted_run):
    _, _, result = planted_run
    torch.testing.assert_close(result.sae.W_dec.norm(dim=1), torch.ones(128), atol=1e-5, rtol=0)


def test_encode_decode_shapes_and_sparse_dense_agree():
    sae = SparseAutoencoder(d=16, n_latents=64, k=5)
    x = torch.randn(7, 16)
    values, indices = sae.encode(x)
    assert values.shape == indices.shape == (7, 5)
    dense = sae.dense_codes(values, indices)
    assert dense.shape == (7, 64) and ((dense != 0).sum(dim=1) <= 5).all()
    torch.testing.assert_close(sae.decode(values, indices), sae.decode(dense), atol=1e-5, rtol=1e-5)
    x_hat, _, _ = sae(x)
    assert x_hat.shape == (7, 16)


def test_initialisations_linear_is_sparsifys_and_tied_copies_the_decoder():
    torch.manual_seed(0)
    linear = SparseAutoencoder(d=128, n_latents=512, k=8)
    reference = torch.nn.Linear(128, 512)  # what sparsify's SparseCoder starts its encoder from
    torch.manual_seed(0)
    reference.reset_parameters()
    torch.manual_seed(0)
    torch.testing.assert_close(SparseAutoencoder(d=128, n_latents=512, k=8).W_enc, reference.weight)
    assert 0.55 < linear.W_enc.norm(dim=1).mean().item() < 0.61  # nn.Linear's rows: norm ≈ 1/√3
    torch.testing.assert_close(linear.W_dec, linear.W_enc / linear.W_enc.norm(dim=1, keepdim=True))
    tied = SparseAutoencoder(d=128, n_latents=512, k=8, init="tied")
    assert torch.equal(tied.W_enc, tied.W_dec)
    torch.testing.assert_close(tied.W_dec.norm(dim=1), torch.ones(512))
    with pytest.raises(ValueError, match=r"sae\.init must be 'linear' or 'tied'"):
        SparseAutoencoder(d=4, n_latents=8, k=2, init="zeros")
    # the initialisation is a training parameter, so an SAE of the other start is never reused from the cache
    assert SAETrainParams().as_dict()["init"] == "linear" and SAETrainParams(init="tied").as_dict()["init"] == "tied"


def test_topk_variants_keep_largest_values_or_largest_magnitudes():
    sae = SparseAutoencoder(d=3, n_latents=4, k=2, topk="relu")
    pre = torch.tensor([[3.0, -5.0, 1.0, 2.0]])
    values, indices = sae.select(pre)
    assert sorted(zip(indices[0].tolist(), values[0].tolist(), strict=True)) == [(0, 3.0), (3, 2.0)]
    sae_abs = SparseAutoencoder(d=3, n_latents=4, k=2, topk="abs")
    values, indices = sae_abs.select(pre)
    assert sorted(zip(indices[0].tolist(), values[0].tolist(), strict=True)) == [(0, 3.0), (1, -5.0)]


def test_k_larger_than_the_latent_width_is_rejected():
    with pytest.raises(ValueError, match=r"sae.k must be in \[1, n_latents=64\]"):
        SparseAutoencoder(d=16, n_latents=64, k=65)
    with pytest.raises(ValueError, match=r"sae\.k"):
        train_sae(torch.randn(100, 8), SAETrainParams(k=40, expansion=4, steps=1), device="cpu")


def test_epochs_set_the_number_of_steps():
    x, _, _ = planted(n=1000)
    result = train_sae(x, SAETrainParams(k=4, expansion=2, epochs=2.5, batch_size=100, warmup_steps=5), device="cpu")
    assert len(result.losses) == 25


def test_same_seed_same_weights_other_seed_other_weights():
    x, _, _ = planted(n=2000)
    params = SAETrainParams(k=4, expansion=2, steps=30, batch_size=256, warmup_steps=5)
    first, second = train_sae(x, params, device="cpu"), train_sae(x, params, device="cpu")
    other = train_sae(x, SAETrainParams(**{**params.as_dict(), "seed": 1}), device="cpu")
    for name, tensor in first.sae.state_dict().items():
        assert torch.equal(tensor, second.sae.state_dict()[name]), name
    assert not torch.equal(first.sae.W_dec, other.sae.W_dec)


def test_w_aux_zero_is_exactly_plain_training_and_ignores_labels():
    x, _, labels = planted(n=2000, classes=8)
    params = SAETrainParams(k=4, expansion=2, steps=30, batch_size=256, warmup_steps=5)
    plain = train_sae(x, params, device="cpu")
    with_labels = train_sae(x, params, labels=labels, device="cpu")
    for name, tensor in plain.sae.state_dict().items():
        assert torch.equal(tensor, with_labels.sae.state_dict()[name]), name
    with pytest.raises(ValueError, match="needs labels"):
        train_sae(x, SAETrainParams(**{**params.as_dict(), "w_aux": 0.5}), device="cpu")


def test_pass_tightens_classes_at_a_measured_fvu_cost():
    x, _, labels = planted(classes=8)
    base = dict(FAST, steps=800)
    plain = train_sae(x, SAETrainParams(**base), labels=labels, device="cpu")
    aligned = train_sae(x, SAETrainParams(**base, w_aux=1.0), labels=labels, device="cpu")
    plain_metrics = evaluate_sae(plain.sae, x, labels)
    aligned_metrics = evaluate_sae(aligned.sae, x, labels)
    # independent check of the reported dispersion on the aligned SAE
    values, indices = aligned.sae.encode(x)
    codes = aligned.sae.dense_codes(values, indices)
    means = torch.stack([codes[labels == c].mean(0) for c in range(8)])
    within = (codes - means[labels]).pow(2).sum(dim=1)
    assert aligned_metrics["class_dispersion"] == pytest.approx(within.mean().item(), rel=1e-3)
    assert aligned_metrics["class_dispersion_relative"] == pytest.approx(
        (within.sum() / codes.pow(2).sum()).item(), rel=1e-3
    )
    # Measured here: dispersion 8.1 -> 2.4 at FVU 0.065 -> 0.228. With unit-norm decoder rows
    # the penalty mostly shrinks the codes (the relative dispersion stays near 0.87 until
    # w_aux ~ 16), which is where the FVU cost comes from.
    assert aligned_metrics["class_dispersion"] < 0.5 * plain_metrics["class_dispersion"]
    assert aligned_metrics["fvu"] > plain_metrics["fvu"] + 0.05


def test_fvu_definitions():
    x = torch.randn(50, 6)
    x_hat = x + 0.1 * torch.randn(50, 6)
    expected = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    torch.testing.assert_close(fvu(x, x_hat), expected)
    assert fvu(x, x.mean(0).expand_as(x)).item() == pytest.approx(1.0)
    per_sample = per_sample_fvu(x, x_hat, x.mean(0))
    torch.testing.assert_close(per_sample[3], ((x_hat[3] - x[3]) ** 2).sum() / ((x[3] - x.mean(0)) ** 2).sum())


def test_auxk_trains_the_dead_latents_decoder_rows_on_the_residual_and_nothing_else():
    # sparsify's AuxK (its fused encoder's backward drops the pre-activations' gradient): the loss moves
    # only the decoder rows of the top dead latents, toward the residual of the live ones
    torch.manual_seed(0)
    sae = SparseAutoencoder(d=8, n_latents=16, k=2)
    x = torch.randn(64, 8)
    pre = sae.pre_activations(x)
    values, indices = sae.select(pre)
    residual = (x - sae.decode(values, indices)).detach()
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[3, 7, 11]] = True
    loss = auxk_loss(sae, pre, residual, dead, auxk_k=4, total_variance=(x - x.mean(0)).pow(2).sum())
    loss.backward()
    assert sae.W_enc.grad is None or not sae.W_enc.grad.any()
    assert sae.b_enc.grad is None or not sae.b_enc.grad.any()
    moved = sae.W_dec.grad.abs().sum(dim=1) > 0
    assert moved[[3, 7, 11]].any() and not moved[~dead].any()


def test_checkpoint_round_trip_and_clear_errors(tmp_path):
    import json

    from vs2ray.sae import CheckpointError, SAECheckpoint, SAEOutput
    from vs2ray.store import sae_dir_for

    x, _, _ = planted(n=1000)
    params = SAETrainParams(k=4, expansion=2, steps=20, batch_size=128, warmup_steps=5)
    result = train_sae(x, params, device="cpu")
    directory = sae_dir_for(tmp_path, "acts-key", params.as_dict())
    assert directory != sae_dir_for(tmp_path, "acts-key", {**params.as_dict(), "lr": 1e-3})
    assert directory == sae_dir_for(tmp_path, "acts-key", dict(reversed(params.as_dict().items())))
    result.sae.save(directory, {**params.as_dict(), "activation_key": "acts-key"}, result.metrics)
    loaded = SparseAutoencoder.load(directory, expected_d=32)
    assert isinstance(loaded, SAECheckpoint) and loaded.config["format"] == 3 and loaded.config["n_latents"] == 64
    output = loaded.sae(x[:50])
    assert isinstance(output, SAEOutput) and output.values.shape == (50, 4)
    torch.testing.assert_close(output.reconstruction, result.sae(x[:50]).reconstruction)
    assert loaded.metrics["fvu"] == pytest.approx(result.metrics["fvu"])
    with pytest.raises(CheckpointError, match="trained on d=32 activations, not d=768"):
        SparseAutoencoder.load(directory, expected_d=768)
    assert result.sae.b_enc.abs().sum() > 0  # the encoder bias is trained ...
    frozen = train_sae(x, SAETrainParams(**{**params.as_dict(), "encoder_bias": False}), device="cpu")
    assert not frozen.sae.b_enc.any()  # ... or held at zero: METHOD.md's encoder exactly

    from safetensors.torch import load_file, save_file

    config = json.loads((directory / "config.json").read_text())
    old = {n: t for n, t in load_file(directory / "sae.safetensors").items() if n != "b_enc"}
    save_file(old, directory / "sae.safetensors")  # a format-1 checkpoint had no encoder bias
    (directory / "config.json").write_text(json.dumps({**config, "format": 1}))
    legacy = SparseAutoencoder.load(directory).sae
    assert not legacy.b_enc.any() and not legacy.b_enc.requires_grad
    torch.testing.assert_close(legacy.W_enc, result.sae.W_enc)
    (directory / "config.json").write_text(json.dumps({**config, "format": 0}))  # written by another version
    with pytest.raises(CheckpointError, match="has format 0; this vs2ray reads formats 1, 2, 3"):
        SparseAutoencoder.load(directory)
    (directory / "metrics.json").unlink()  # as if training had been interrupted before the end
    with pytest.raises(CheckpointError, match=r"incomplete: missing metrics\.json"):
        SparseAutoencoder.load(directory)


# ---------------------------------------------------------------- the other kinds (METHOD.md §9)

KIND_RUNS = {  # every kind on the planted data of `planted_run`; what each must recover
    "batchtopk": {},
    "matryoshka": {"prefixes": 2},  # prefixes 64 and 128: the first 64 latents alone must span the 64 atoms
    "jumprelu": {"threshold_lr_scale": 5.0},  # θ's learning rate 1e-2, as at the defaults (FAST's lr is 4× theirs)
    "relu_l1": {},
}


@pytest.mark.parametrize("kind", sorted(KIND_RUNS))
def test_every_kind_recovers_the_planted_dictionary(kind):
    # the same well-posed fit as the top-k test: 64 unit atoms, 4 active per sample, 128 latents. A kind whose code,
    # loss or update is wrong leaves FVU near 1 or atoms unmatched (best cosine ~0.5 for random directions)
    x, atoms, _ = planted()
    result = train_sae(x, SAETrainParams(**{**FAST, "kind": kind, **KIND_RUNS[kind]}), device="cpu")
    best_cosine = (F.normalize(result.sae.W_dec, dim=1) @ atoms.T).max(dim=0).values
    assert (best_cosine > 0.9).float().mean() >= 0.8
    assert result.metrics["fvu"] < 0.25
    # L0: k on average for the BatchTopK kinds; measured for the penalised ones, and sparse (4 atoms, 128 latents)
    if kind in ("batchtopk", "matryoshka"):
        assert result.metrics["l0"] == pytest.approx(4.0, rel=0.15)
        assert result.metrics["l0_std"] > 0.3  # per-sample L0 varies: θ, not a per-sample top-k
    else:
        assert 2 < result.metrics["l0"] < 16
    if kind == "relu_l1":  # decoder rows are free: the penalty weighs their norms
        assert result.sae.W_dec.norm(dim=1).std() > 1e-3
    else:
        torch.testing.assert_close(result.sae.W_dec.norm(dim=1), torch.ones(128), atol=1e-5, rtol=0)


def test_batch_topk_keeps_exactly_k_per_sample_over_the_batch_with_a_varying_per_sample_l0():
    from vs2ray.sae import batch_topk

    pre = torch.randn(64, 50) + torch.linspace(-1, 1, 64)[:, None]  # later rows have larger activations
    codes = batch_topk(pre, 5)
    assert int((codes != 0).sum()) == 64 * 5  # B·k kept over the batch: mean L0 exactly k
    per_sample = (codes != 0).sum(dim=1)
    assert per_sample[:16].float().mean() < 5 < per_sample[-16:].float().mean()
    kept = codes[codes != 0]
    assert kept.min() >= F.relu(pre).flatten().topk(64 * 5).values.min()  # the largest ones, unchanged
    assert torch.equal(codes[codes != 0], pre[codes != 0])


def test_a_trained_batch_topk_codes_by_its_threshold_at_inference():
    x, _, _ = planted(n=4000)
    sae = train_sae(x, SAETrainParams(**{**FAST, "kind": "batchtopk", "steps": 300}), device="cpu").sae
    theta = float(sae.threshold)
    assert theta > 0  # estimated in training
    values, indices = sae.encode(x[:500])
    pre = sae.pre_activations(x[:500])
    expected = F.relu(pre) * (F.relu(pre) > theta)
    torch.testing.assert_close(sae.dense_codes(values, indices), expected)
    assert values.shape[1] == int((expected != 0).sum(dim=1).max())  # width: the most a sample fires


def test_jumprelu_thresholds_receive_the_straight_through_gradient_and_nothing_else_does():
    from vs2ray.sae import _JumpReLU, _Step

    eps = 0.1
    threshold = torch.tensor([1.0, 2.0], requires_grad=True)
    pre = torch.tensor([[1.02, 0.5], [0.97, 2.04], [3.0, 1.5]], requires_grad=True)
    codes = _JumpReLU.apply(pre, threshold, eps)
    assert torch.equal(codes.detach(), torch.tensor([[1.02, 0.0], [0.0, 2.04], [3.0, 0.0]]))
    codes.sum().backward()
    # by hand: dz/dθ_i = −(θ_i/ε)·1[|a − θ_i| < ε/2]; latent 0 has a = 1.02 and 0.97 in the window, latent 1 a = 2.04
    torch.testing.assert_close(threshold.grad, torch.tensor([-2 * 1.0 / eps, -1 * 2.0 / eps]))
    assert torch.equal(pre.grad, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))  # where the unit fires

    threshold.grad, pre.grad = None, None
    _Step.apply(pre, threshold, eps).sum().backward()  # the L0 term: only θ learns from it
    torch.testing.assert_close(threshold.grad, torch.tensor([-2 / eps, -1 / eps]))
    assert pre.grad is None or not pre.grad.any()


def test_a_jumprelu_sae_trains_its_thresholds_up_from_their_start():
    x, _, _ = planted(n=4000)
    sae = train_sae(x, SAETrainParams(**{**FAST, "kind": "jumprelu", "steps": 300}), device="cpu").sae
    assert sae.jump_threshold.min() >= 0 and sae.jump_threshold.mean() > 10 * 1e-3


def test_layer_norm_saes_code_the_rows_layer_norm_and_answer_in_the_rows_space():
    # (x − μ)/σ is the same for a·x + b, so the reconstruction of a·x + b is a·x̂ + b and the codes are equal
    from vs2ray import steering

    torch.manual_seed(0)
    sae = SparseAutoencoder(16, 64, 5, normalize="layer_norm")
    x = torch.randn(9, 16) * 3 + 1
    moved = 2.5 * x - 4.0
    torch.testing.assert_close(sae(moved).reconstruction, 2.5 * sae(x).reconstruction - 4.0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sae.encode(moved).values, sae.encode(x).values, atol=1e-4, rtol=1e-4)
    # a code change of 1 along latent f moves x by σ(x)·W_dec[f], the latent's unit in the SAE's space
    sigma = (x - x.mean(dim=1, keepdim=True)).std(dim=1, keepdim=True)
    values, indices = sae.encode(x)
    latent = int(indices[0, 0])
    current = (values * (indices == latent)).sum(dim=1, keepdim=True)
    clamped = steering.clamp_latent(sae, x, latent, 7.0)
    torch.testing.assert_close(clamped - x, (7.0 - current) * sigma * sae.W_dec[latent], atol=1e-4, rtol=1e-4)
    # VS2's direction and the SAE pass agree with the SAE's own reconstruction
    direction, reconstruction = steering.direction_and_reconstruction(sae, x)
    torch.testing.assert_close(reconstruction, sae(x).reconstruction)
    torch.testing.assert_close(direction, sigma * sae.decode_without_bias(values, indices), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["batchtopk", "jumprelu", "relu_l1"])
def test_checkpoints_keep_the_kind_its_thresholds_and_normalisation(tmp_path, kind):
    x, _, _ = planted(n=2000)
    params = SAETrainParams(
        k=4, expansion=2, steps=30, batch_size=256, warmup_steps=5, kind=kind, normalize="layer_norm"
    )
    result = train_sae(x, params, device="cpu")
    result.sae.save(tmp_path, params.as_dict(), result.metrics)
    loaded = SparseAutoencoder.load(tmp_path).sae
    assert (loaded.kind, loaded.normalize) == (kind, "layer_norm")
    torch.testing.assert_close(loaded(x[:100]).reconstruction, result.sae(x[:100]).reconstruction)


def test_the_cache_key_holds_a_kinds_own_parameters_and_keeps_top_k_keys_as_they_were():
    topk = SAETrainParams().key_dict()
    before = {  # the fields a top-k SAE's key hashed before sae.kind existed
        "k", "expansion", "topk", "lr", "lr_scale_with_width", "warmup_steps", "steps", "epochs", "batch_size",
        "dead_threshold", "auxk_coef", "auxk_k", "w_aux", "pass_momentum", "init", "encoder_bias", "seed",
    }  # fmt: skip
    assert set(topk) == before
    relu_l1 = SAETrainParams(kind="relu_l1").key_dict()
    assert relu_l1["kind"] == "relu_l1" and "l1_coef" in relu_l1 and "sparsity_warmup_steps" in relu_l1
    assert not {"k", "topk", "auxk_coef", "l0_coef", "prefixes"} & set(relu_l1)  # L0 is measured: k changes nothing
    assert SAETrainParams(kind="relu_l1", k=8).key_dict() == SAETrainParams(kind="relu_l1", k=64).key_dict()
    matryoshka = SAETrainParams(kind="matryoshka", normalize="layer_norm").key_dict()
    assert {"k", "prefixes", "normalize"} <= set(matryoshka) and "l1_coef" not in matryoshka


def test_l0_is_measured_per_row_with_its_spread_and_on_cls_apart_from_the_patches():
    from vs2ray.sae import ActivationRows, evaluate_sae

    # an identity-like SAE whose latents fire wherever a coordinate is positive: L0 of a row = its positive count
    sae = SparseAutoencoder(4, 4, 4, kind="relu_l1")
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
        sae.b_enc.zero_()
        sae.b_pre.zero_()
    cls_row, patch_row = [1.0, 1.0, 1.0, -1.0], [1.0, -1.0, -1.0, -1.0]  # 3 and 1 active latents
    tokens = torch.tensor([cls_row, patch_row, patch_row] * 10)  # 10 images of 3 tokens, [CLS] first
    metrics = evaluate_sae(sae, ActivationRows(tokens, np.arange(10), group=3))
    assert metrics["l0"] == pytest.approx(5 / 3) and metrics["l0_cls"] == 3.0 and metrics["l0_patches"] == 1.0
    assert (metrics["l0_p10"], metrics["l0_median"], metrics["l0_p90"]) == (1.0, 1.0, 3.0)
    assert metrics["l0_std"] == pytest.approx(float(torch.tensor([3.0, 1.0, 1.0] * 10).std()))
    assert "l0_cls" not in evaluate_sae(sae, tokens)  # plain rows: no token types


def test_l0_and_fvu_statistics_without_per_row_l0_are_what_sorting_every_row_gives():
    from vs2ray.sae import ActivationRows, measure_sae, per_sample_fvu

    g = torch.Generator().manual_seed(3)
    sae = SparseAutoencoder(8, 32, 4, kind="relu_l1").eval()  # L0 varies row by row, from 0 to 32
    rows = torch.randn(1001, 8, generator=g) * torch.rand(1001, 1, generator=g) * 3
    metrics, _ = measure_sae(sae, ActivationRows(rows), batch_size=97)  # batches that cut the rows unevenly
    with torch.no_grad():
        x_hat, values, _ = sae(rows)
    l0 = (values != 0).sum(dim=1).double()
    ranked = l0.sort().values
    assert len(torch.unique(l0)) > 5
    assert metrics["l0"] == pytest.approx(l0.mean().item(), abs=1e-12)
    assert metrics["l0_std"] == pytest.approx(l0.std().item(), abs=1e-12)
    assert [metrics[k] for k in ("l0_p10", "l0_median", "l0_p90")] == [
        ranked[int(q * 1000)].item() for q in (0.1, 0.5, 0.9)
    ]
    fvu = per_sample_fvu(rows, x_hat, rows.mean(dim=0, dtype=torch.float64).float())
    assert metrics["fvu_per_sample_median"] == pytest.approx(fvu.median().item(), rel=1e-5)
    even = measure_sae(sae, ActivationRows(rows[:1000]), batch_size=97)[0]  # torch.median: the lower middle
    fvu = per_sample_fvu(rows[:1000], x_hat[:1000], rows[:1000].mean(dim=0, dtype=torch.float64).float())
    assert even["fvu_per_sample_median"] == pytest.approx(fvu.median().item(), rel=1e-5)
    assert fvu.median() < fvu.sort().values[500]  # the two middle values differ: the lower one is taken
