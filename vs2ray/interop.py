"""SAEs in and out: read saev, sparsify, SAELens and ViT-Prisma checkpoints into a `SparseAutoencoder`, and
write vs2ray's SAEs in a Hugging Face Hub model layout (`export_sae`). Torch and safetensors only.

Every format becomes the same SAE exactly (no refit): pre-activations a = W_enc (x − b_pre) + b_enc, decoder
x̂ = W_dec z + b_pre, and the peer's activation as a vs2ray kind. Where a peer encodes x without subtracting
its decoder bias (saev; SAELens with `apply_b_dec_to_input: false`), b_enc absorbs it: x·W + b =
(x − b_dec)·W + (b + b_dec·W). What vs2ray cannot represent (gated SAEs, transcoders, skip connections,
group-max activations, a pickled config) is a `CheckpointError` that says so; nothing is unpickled.
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from vs2ray.sae import CheckpointError, SAEKind, SparseAutoencoder, TopKMode

EXPORT_FILE = "vs2ray.json"  # beside an exported SAE's weights: its vs2ray config, metrics and provenance
HUB_ID = re.compile(r"^(hf://)?[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./-]+)?$")


class ImportedSAE(NamedTuple):
    """An SAE read from a checkpoint of any supported format, with what its files said."""

    sae: SparseAutoencoder
    format: str  # vs2ray | sparsify | saelens | vit-prisma | saev
    config: dict[str, Any]  # the checkpoint's own config (vs2ray's config.json for vs2ray and its exports)
    metrics: dict[str, Any]  # metrics.json of a vs2ray SAE or export; {} for the peers


def load_any_sae(source: str | Path, expected_d: int | None = None) -> ImportedSAE:
    """The SAE at `source`: a vs2ray SAE dir or export, a sparsify / SAELens / ViT-Prisma checkpoint dir, a saev
    checkpoint file, or a Hugging Face Hub id (`org/name[/subfolder]`, downloaded when the Hub can be reached).
    A CheckpointError names what is missing or cannot be represented; `expected_d` checks the input width."""
    path = Path(str(source)).expanduser()
    if not path.exists():
        path = _download(str(source))
    imported = _read(path)
    if expected_d is not None and imported.sae.d != expected_d:
        raise CheckpointError(
            f"SAE {source} ({imported.format}) reads d={imported.sae.d} activations, not the store's d={expected_d}"
        )
    return imported


def _read(path: Path) -> ImportedSAE:
    if path.is_file():
        if path.suffix in (".pt", ".pth", ".pkl", ".gz"):
            raise CheckpointError(
                f"{path} is a pickled checkpoint (ViT-Prisma's legacy .pt holds a pickled config object); vs2ray "
                f"never unpickles what it did not write. Re-save it as safetensors with its own library (ViT-Prisma: "
                f"SparseAutoencoder.load_from_pretrained(path).save_model(directory)) and pass that directory"
            )
        with open(path, "rb") as handle:
            if handle.read(1) == b"{":
                return _read_saev(path)
        raise CheckpointError(f"{path} is no SAE checkpoint vs2ray reads (a saev file starts with a JSON header)")
    files = {child.name for child in path.iterdir()}
    if {"config.json", "metrics.json", "sae.safetensors"} <= files:
        checkpoint = SparseAutoencoder.load(path)
        return ImportedSAE(checkpoint.sae, "vs2ray", checkpoint.config, checkpoint.metrics)
    if {"cfg.json", "sae.safetensors"} <= files:
        return _read_sparsify(path)
    if {"cfg.json", "sae_weights.safetensors"} <= files:
        config = json.loads((path / "cfg.json").read_text())
        return _read_saelens(path, config) if "architecture" in config else _read_vit_prisma(path, config)
    inner = sorted(child.name for child in path.iterdir() if child.is_dir())
    hint = f"; it holds directories {', '.join(inner[:8])}: pass the one of the SAE's hook point" if inner else ""
    raise CheckpointError(
        f"{path} holds no SAE checkpoint vs2ray reads (vs2ray: config.json + sae.safetensors + metrics.json; "
        f"sparsify: cfg.json + sae.safetensors; SAELens / ViT-Prisma: cfg.json + sae_weights.safetensors; saev: "
        f"one file){hint}"
    )


def _download(source: str) -> Path:
    """A Hub id's files, downloaded (or from the local Hub cache); a clear error offline."""
    if not HUB_ID.match(source):
        raise CheckpointError(f"sae.from: {source} is neither a file, a directory nor a Hugging Face Hub id")
    parts = source.removeprefix("hf://").split("/")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise CheckpointError(
            f"sae.from: {source} is not a local path, and downloading it needs huggingface_hub "
            f"(pip install huggingface_hub), or download it elsewhere and pass its directory"
        ) from error
    try:
        root = Path(snapshot_download(repo_id, allow_patterns=[f"{subfolder}*"] if subfolder else None))
    except Exception as error:  # offline, unknown repo, no access: all the same to the user
        raise CheckpointError(
            f"sae.from: {source} is not a local path and could not be downloaded from the Hugging Face Hub "
            f"({type(error).__name__}: {error}). Where there is network: huggingface-cli download {repo_id} "
            f"--local-dir DIR, then set sae.from to DIR{'/' + subfolder if subfolder else ''}"
        ) from error
    return root / subfolder if subfolder else root


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {name: tensor.float() for name, tensor in load_file(path).items()}


def _build(
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_pre: torch.Tensor,
    kind: SAEKind,
    k: int,
    topk: TopKMode = "relu",
    normalize: str = "none",
    jump_threshold: torch.Tensor | None = None,
) -> SparseAutoencoder:
    """A SparseAutoencoder holding exactly these weights: W_enc, W_dec (n, d), b_enc (n,), b_pre (d,)."""
    n_latents, d = W_dec.shape
    if W_enc.shape != (n_latents, d):
        raise CheckpointError(f"encoder {tuple(W_enc.shape)} and decoder {tuple(W_dec.shape)} do not fit together")
    sae = SparseAutoencoder(d, n_latents, min(max(k, 1), n_latents), topk, kind=kind, normalize=normalize)  # type: ignore[arg-type]
    state = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_pre": b_pre}
    if kind == "jumprelu":
        assert jump_threshold is not None  # the readers pass a JumpReLU SAE's thresholds
        state["jump_threshold"] = jump_threshold.clamp_min(0)  # θ < 0 on ReLU'd activations acts as θ = 0
    with torch.no_grad():
        for name, value in state.items():
            getattr(sae, name).copy_(value)
    return sae.eval()


def _read_sparsify(path: Path) -> ImportedSAE:
    config = json.loads((path / "cfg.json").read_text())
    unsupported = [key for key in ("skip_connection", "transcode") if config.get(key)]
    if config.get("activation", "topk") != "topk":
        unsupported.append(f"activation {config['activation']!r}")
    if unsupported:
        raise CheckpointError(f"sparsify checkpoint {path}: {', '.join(unsupported)} cannot be represented in vs2ray")
    tensors = _tensors(path / "sae.safetensors")
    sae = _build(
        tensors["encoder.weight"], tensors["encoder.bias"], tensors["W_dec"], tensors["b_dec"], "topk", config["k"]
    )
    exported = path / EXPORT_FILE
    if exported.is_file():  # a vs2ray export in sparsify's layout: its own record comes back with it
        record = json.loads(exported.read_text())
        return ImportedSAE(sae, "vs2ray", record["config"], record["metrics"])
    return ImportedSAE(sae, "sparsify", config, {})


def _saelens_like(
    path: Path, config: dict[str, Any], kind: SAEKind, k: int, topk: TopKMode = "relu"
) -> SparseAutoencoder:
    """SAELens's and ViT-Prisma's weights (W_enc (d, n), W_dec (n, d), b_enc, b_dec, threshold) as a vs2ray SAE."""
    tensors = _tensors(path / "sae_weights.safetensors")
    W_enc, b_enc, W_dec, b_dec = (tensors[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec"))
    W_enc = W_enc.T
    if not config.get("apply_b_dec_to_input", True):
        b_enc = b_enc + W_enc @ b_dec
    if config.get("rescale_acts_by_decoder_norm"):  # top-k over a·‖W_dec[i]‖, decoded with unit rows: folded in
        norms = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    normalize = config.get("normalize_activations") or "none"
    if normalize not in ("none", "layer_norm"):
        raise CheckpointError(
            f"{path}: normalize_activations {normalize!r} cannot be represented in vs2ray (none or layer_norm)"
        )
    threshold = tensors.get("threshold")
    if threshold is None and "log_threshold" in tensors:
        threshold = tensors["log_threshold"].exp()
    return _build(W_enc, b_enc, W_dec, b_dec, kind, k, topk, normalize, threshold)


SAELENS_KINDS: dict[str, SAEKind] = {"standard": "relu_l1", "topk": "topk", "jumprelu": "jumprelu"}


def _read_saelens(path: Path, config: dict[str, Any]) -> ImportedSAE:
    architecture = config["architecture"]
    if architecture not in SAELENS_KINDS:
        raise CheckpointError(
            f"SAELens checkpoint {path}: architecture {architecture!r} cannot be represented in vs2ray (it reads "
            f"{', '.join(SAELENS_KINDS)}; BatchTopK and Matryoshka SAEs are saved by SAELens as jumprelu)"
        )
    kind = SAELENS_KINDS[architecture]
    sae = _saelens_like(path, config, kind, int(config.get("k") or 1))
    return ImportedSAE(sae, "saelens", config, {})


def _read_vit_prisma(path: Path, config: dict[str, Any]) -> ImportedSAE:
    activation = config.get("activation_fn_str", "relu")
    if activation == "relu":
        kind: SAEKind = "relu_l1"
        k = 1
    elif activation == "topk":
        kind, k = "topk", int((config.get("activation_fn_kwargs") or {}).get("k", 0))
        if k < 1:
            raise CheckpointError(f"ViT-Prisma checkpoint {path}: a topk activation without activation_fn_kwargs.k")
    else:
        raise CheckpointError(f"ViT-Prisma checkpoint {path}: activation {activation!r} cannot be represented")
    return ImportedSAE(_saelens_like(path, config, kind, k), "vit-prisma", config, {})


def _read_saev(path: Path) -> ImportedSAE:
    """saev's file: one JSON header line, then torch.save of the state dict (read with weights_only=True)."""
    with open(path, "rb") as handle:
        header = json.loads(handle.readline())
        state = torch.load(io.BytesIO(handle.read()), weights_only=True, map_location="cpu")
    config = header.get("cfg", header)
    activation = config.get("activation")
    if isinstance(activation, dict):  # schema 2, and schema 1's later files
        name, params = activation.get("cls", "Relu"), activation.get("params", {})
    else:  # schema 1's first files name the activation in `cls`; files before schemas had ReLU only
        name, params = header.get("cls", "Relu"), config
    if name not in ("Relu", "TopK", "BatchTopK"):
        raise CheckpointError(f"saev checkpoint {path}: activation {name!r} cannot be represented in vs2ray")
    W_enc, b_enc, W_dec, b_dec = (state[key].float() for key in ("W_enc", "b_enc", "W_dec", "b_dec"))
    W_enc = W_enc.T
    b_enc = b_enc + W_enc @ b_dec  # saev encodes x, not x − b_dec
    # saev's TopK (and BatchTopK at inference, per sample) keeps the k largest values as they are: no ReLU
    kind: SAEKind = "relu_l1" if name == "Relu" else "topk"
    sae = _build(W_enc, b_enc, W_dec, b_dec, kind, int(params.get("top_k", 1)), "relu" if name == "Relu" else "signed")
    return ImportedSAE(sae, "saev", header, {})


# ---------------------------------------------------------------- export


def export_sae(source: str | Path, out: Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write the vs2ray SAE at `source` to `out` in a Hugging Face Hub model layout: the weights as
    safetensors, a config, `vs2ray.json` (vs2ray's config.json and metrics.json, the store key, provenance)
    and a model card (README.md). A top-k SAE without normalisation is written in sparsify's layout
    (cfg.json + sae.safetensors), so sparsify's `SparseCoder.load_from_disk` reads it too; the other kinds in
    vs2ray's own. `load_any_sae(out)` gives the same SAE back, weight for weight."""
    checkpoint = SparseAutoencoder.load(source)
    sae, config, metrics = checkpoint
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    sparsify_layout = sae.kind == "topk" and sae.topk == "relu" and sae.normalize == "none"
    if sparsify_layout:
        weights = {"encoder.weight": sae.W_enc, "encoder.bias": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_pre}
        save_file({name: tensor.detach().contiguous() for name, tensor in weights.items()}, out / "sae.safetensors")
        sparsify = {
            "activation": "topk",
            "expansion_factor": sae.n_latents // sae.d,
            "normalize_decoder": True,
            "num_latents": sae.n_latents,
            "k": sae.k,
            "multi_topk": False,
            "skip_connection": False,
            "transcode": False,
            "d_in": sae.d,
        }
        (out / "cfg.json").write_text(json.dumps(sparsify, indent=2) + "\n")
    else:
        sae.save(out, {k: v for k, v in config.items() if k not in sae.shape()}, metrics)
    record = {
        "config": config,
        "metrics": metrics,
        "provenance": {
            "source": str(source),
            "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(provenance or {}),
        },
    }
    (out / EXPORT_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    (out / "README.md").write_text(model_card(config, metrics, sparsify_layout, record["provenance"]))
    return out


def model_card(
    config: dict[str, Any], metrics: dict[str, Any], sparsify_layout: bool, provenance: dict[str, Any]
) -> str:
    """The Hub model card of an exported SAE: what it is, how it was trained, its metrics, how to load it."""
    kind = config.get("kind", "topk")
    shown = ("fvu", "val_fvu", "l0", "l0_p10", "l0_p90", "dead_fraction", "dense_fraction")
    rows = "\n".join(
        f"| {name} | {metrics[name]:.4g} |" for name in shown if isinstance(metrics.get(name), float | int)
    )
    load = (
        "    from sparsify import SparseCoder\n    sae = SparseCoder.load_from_disk('.')   # or vs2ray, below\n"
        if sparsify_layout
        else ""
    )
    return f"""---
library_name: vs2ray
tags: [sparse-autoencoder, vision, clip, {kind}]
---

# vs2ray SAE: {kind}, {config.get("n_latents")} latents over d = {config.get("d")}

A sparse autoencoder trained by [vs2ray](https://github.com/) on the activations
`{config.get("activation_key")}` (column `{config.get("column")}`): kind `{kind}`, k {config.get("k")},
expansion {config.get("expansion")}, normalisation `{config.get("normalize", "none")}`, seed {config.get("seed")}.
Every training parameter is in `vs2ray.json` (`config`); provenance: {json.dumps(provenance)}.

| metric (training rows; val_: held out) | value |
|---|---|
{rows}

## Load

{load}    from vs2ray.interop import load_any_sae
    sae = load_any_sae('.').sae                # a vs2ray SparseAutoencoder, weight for weight

or in a sweep, `sae.from: <this directory or its Hub id>` steers with it instead of training one.
"""
