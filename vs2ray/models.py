"""CLIP loading (open_clip pretrained or a bundled model) and the zero-shot classifier.

`load_clip` is the one entry point: `arch: ViT-B-32, pretrained: openai` (or a local
checkpoint file) on a cluster, `arch: vs2ray-tiny, pretrained: bundled` offline (or
`vs2ray-tiny-reader`, the bundled model that reads, for `shapes_typographic`). All go
through open_clip's own factory, so the model classes, preprocessing and tokenizer are
open_clip's.

open_clip is imported where it is used, never at the top: it brings timm and torchvision (about
150 MB of private memory and 2 s of imports in every process), which a sweep trial that never runs
the encoder (steering the last block's [CLS] token) does not need.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from vs2ray.config import BUNDLED_MODEL, BUNDLED_MODELS, BUNDLED_RETRIEVAL_ENCODER, ModelConfig, RetrievalConfig
from vs2ray.devices import precision_scope, worker_device

ASSETS = resources.files("vs2ray") / "assets"


def bundled_weights(arch: str) -> Path:
    """Where the package keeps a bundled model's weights (`pretrained: bundled`)."""
    return Path(str(ASSETS / f"{arch}.safetensors"))


BUNDLED_WEIGHTS = bundled_weights(BUNDLED_MODEL)
BUNDLED_RETRIEVAL = Path(str(ASSETS / f"{BUNDLED_RETRIEVAL_ENCODER}.json"))  # timm architecture + normalisation
BUNDLED_RETRIEVAL_WEIGHTS = Path(str(ASSETS / f"{BUNDLED_RETRIEVAL_ENCODER}.safetensors"))


class ModelUnavailable(RuntimeError):
    """The requested model or its weights cannot be loaded here; the message says why and what to do."""


@dataclass
class ClipBundle:
    """A loaded CLIP model with the preprocessing and tokenizer that belong to it."""

    model: Any  # open_clip.CLIP, in eval mode
    preprocess: Callable[[Any], torch.Tensor]  # PIL image -> (3, H, W) float tensor
    tokenizer: Callable[[Sequence[str]], torch.Tensor]  # texts -> (n, context_length) int64
    arch: str
    pretrained: str
    device: torch.device
    precision: str = "fp32"  # of every forward pass through `model` (devices.precision_scope); weights are fp32


def register_bundled_model() -> None:
    """Make the bundled architectures (vs2ray-tiny, vs2ray-tiny-reader) known to open_clip (idempotent)."""
    import open_clip

    for arch in BUNDLED_MODELS:
        if arch not in open_clip.list_models():
            open_clip.add_model_config(Path(str(ASSETS / f"{arch}.json")))


def _resolve_weights(arch: str, pretrained: str) -> str | None:
    """Check the (arch, pretrained) pair before any download, returning what open_clip should load.

    None means random initialisation (`pretrained: random`, for benchmarks: accuracies are meaningless).
    """
    if pretrained == "bundled":
        weights = bundled_weights(arch)
        if not weights.is_file():
            script = "train_tiny_reader.py" if arch != BUNDLED_MODEL else "train_tiny_clip.py"
            raise ModelUnavailable(
                f"the bundled weights {weights} are missing; re-create them with "
                f"`python scripts/{script}` or reinstall vs2ray"
            )
        return str(weights)
    import open_clip

    if arch not in open_clip.list_models():
        raise ModelUnavailable(
            f"model.arch: open_clip has no architecture {arch!r}; see open_clip.list_models() "
            f"(e.g. ViT-B-32, ViT-B-16, ViT-L-14)"
        )
    if pretrained == "random":
        return None
    if Path(pretrained).expanduser().is_file():
        return str(Path(pretrained).expanduser())
    if arch in BUNDLED_MODELS:
        raise ModelUnavailable(f"model.pretrained: {pretrained!r} is not a file (and {arch} has no download tags)")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained not in tags:
        raise ModelUnavailable(
            f"model.pretrained: {pretrained!r} is neither a file nor a pretrained tag of {arch}; tags: {tags}"
        )
    return pretrained


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face Hub (where open_clip's tags live) answers a TCP connect."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _hub_cache_only() -> Iterator[None]:
    """Make huggingface_hub read its cache only: offline, its retries would take a minute to fail."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def load_clip(config: ModelConfig, device: torch.device | str | None = None) -> ClipBundle:
    """Load the CLIP model named by `config` in eval mode with its preprocessing and tokenizer.

    Raises ModelUnavailable with a one-line reason (unknown arch or tag, missing file,
    download impossible offline) instead of open_clip's traceback. The weights stay fp32 whatever
    `model.precision` says: the forward passes (`encode_images`, `block_runner`) autocast.
    """
    register_bundled_model()
    import open_clip

    device = torch.device(device) if device is not None else worker_device(config.device, None)
    weights = _resolve_weights(config.arch, config.pretrained)
    is_tag = weights is not None and not Path(weights).is_file()
    offline = is_tag and not _hub_reachable()
    try:
        # fork_rng + a fixed seed: `pretrained: random` gives the same weights in every process
        with _hub_cache_only() if offline else contextlib.nullcontext(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, _, preprocess = open_clip.create_model_and_transforms(
                config.arch,
                pretrained=weights,
                precision="fp32",  # LayerNorm and the weights in fp32; lower precisions are autocast
                device=device,
                cache_dir=config.cache_dir,
                weights_only=True,
            )
    except RuntimeError as error:
        if "download" not in str(error).lower():
            raise
        reason = "the Hugging Face Hub is unreachable and they are not in the cache" if offline else str(error)
        raise ModelUnavailable(
            f"could not download {config.arch}/{config.pretrained} weights ({reason}). Offline, download the "
            f"checkpoint elsewhere and set model.pretrained to its local path, or set model.cache_dir to a "
            f"directory that already holds open_clip's cache."
        ) from None
    model.eval()
    return ClipBundle(
        model=model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(config.arch),
        arch=config.arch,
        pretrained=config.pretrained,
        device=device,
        precision=config.precision,
    )


@dataclass
class RetrievalEncoder:
    """A second image encoder (DINOv2 through timm) whose embeddings serve neighbour search."""

    model: Any  # timm model with its classifier removed (pooled features out)
    preprocess: Callable[[Any], torch.Tensor]  # PIL image -> (3, S, S) float tensor
    name: str
    device: torch.device
    precision: str = "fp32"  # of its forward passes; the weights stay fp32


def _bundled_retrieval_model(config: RetrievalConfig, weights: Path | None) -> Any:
    """The bundled `vs2ray-tiny-retrieval` through timm's own factory, its weights from the package (or `weights`)."""
    import timm

    spec = json.loads(BUNDLED_RETRIEVAL.read_text())
    native = spec["model_args"]["img_size"]
    if config.image_size != native:
        raise ModelUnavailable(
            f"retrieval.image_size: {BUNDLED_RETRIEVAL_ENCODER} takes {native}×{native} images; "
            f"set retrieval.image_size: {native} (got {config.image_size})"
        )
    weights = weights or BUNDLED_RETRIEVAL_WEIGHTS
    if config.encoder_pretrained and not weights.is_file():
        raise ModelUnavailable(
            f"the bundled retrieval weights {weights} are missing; re-create them with "
            f"`python scripts/train_retrieval_encoder.py` or reinstall vs2ray"
        )
    overlay = {"file": str(weights), "mean": tuple(spec["mean"]), "std": tuple(spec["std"]), "num_classes": 0}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model(
            spec["timm_model"],
            pretrained=config.encoder_pretrained,
            pretrained_cfg_overlay=overlay,
            num_classes=0,
            **spec["model_args"],
        )


def _timm_retrieval_model(config: RetrievalConfig) -> Any:
    """`retrieval.encoder` from timm (DINOv2 by default) at `retrieval.image_size`, failing fast and clearly offline."""
    import timm

    if not timm.is_model(config.encoder):
        raise ModelUnavailable(
            f"retrieval.encoder: timm has no model {config.encoder!r} (e.g. vit_base_patch14_dinov2.lvd142m, "
            f"or the bundled {BUNDLED_RETRIEVAL_ENCODER})"
        )
    offline = config.encoder_pretrained and not _hub_reachable()
    try:
        with _hub_cache_only() if offline else contextlib.nullcontext(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return timm.create_model(
                config.encoder, pretrained=config.encoder_pretrained, num_classes=0, img_size=config.image_size
            )
    except Exception as error:  # huggingface_hub raises several kinds of error offline
        if not config.encoder_pretrained:
            raise
        reason = "the Hugging Face Hub is unreachable and they are not in the cache" if offline else str(error)
        raise ModelUnavailable(
            f"could not load pretrained {config.encoder} weights ({reason}). Set HF_HOME to a cache that holds "
            f"them, or use retrieval.space: clip, or retrieval.encoder: {BUNDLED_RETRIEVAL_ENCODER} offline."
        ) from None


def load_retrieval_encoder(
    config: RetrievalConfig, device: torch.device | str = "cpu", weights: Path | None = None, precision: str = "fp32"
) -> RetrievalEncoder:
    """Load `retrieval.encoder` (a timm model, or the bundled one; `weights` overrides its file) in eval mode;
    its forward passes run at `precision` (`model.precision` in extraction)."""
    from timm.data import create_transform, resolve_data_config

    if config.encoder == BUNDLED_RETRIEVAL_ENCODER:
        model = _bundled_retrieval_model(config, weights)
    else:
        model = _timm_retrieval_model(config)
    size = config.image_size
    data_config = resolve_data_config({"input_size": (3, size, size), "crop_pct": 1.0}, model=model)
    return RetrievalEncoder(
        model=model.eval().to(device),
        preprocess=create_transform(**data_config, is_training=False),
        name=config.encoder,
        device=torch.device(device),
        precision=precision,
    )


@torch.no_grad()
def encode_retrieval(encoder: RetrievalEncoder, images: torch.Tensor) -> torch.Tensor:
    """Normalised retrieval embeddings (n, features) float32 of preprocessed images (n, 3, S, S)."""
    with precision_scope(encoder.device, encoder.precision):
        features = encoder.model(images.to(encoder.device, non_blocking=True)).float()
    return features / features.norm(dim=-1, keepdim=True)


@torch.no_grad()
def build_text_classifier(bundle: ClipBundle, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Zero-shot classifier T: (num_classes, embed_dim), rows unit-norm, one per class in label order.

    Each row is the normalised mean of the normalised text embeddings of every template
    filled with the class name (CLIP's prompt ensembling).
    """
    import open_clip

    weights_dc = open_clip.build_zero_shot_classifier(
        bundle.model,
        tokenizer=bundle.tokenizer,
        classnames=list(class_names),
        templates=list(templates),
        num_classes_per_batch=32,
        device=bundle.device,
    )
    return weights_dc.T.contiguous().float()


@torch.no_grad()
def encode_images(bundle: ClipBundle, images: torch.Tensor) -> torch.Tensor:
    """Normalised CLIP image embeddings (n, embed_dim) float32 of preprocessed images (n, 3, H, W), computed at
    the bundle's precision."""
    with precision_scope(bundle.device, bundle.precision):
        embeddings = bundle.model.encode_image(images.to(bundle.device, non_blocking=True))
    return torch.nn.functional.normalize(embeddings.float(), dim=-1)


def num_vision_layers(bundle: ClipBundle) -> int:
    """Number of transformer blocks in the vision tower."""
    return len(bundle.model.visual.transformer.resblocks)


def resolve_layers(bundle: ClipBundle, layers: Sequence[int]) -> list[int]:
    """Map layer indices (negative counts from the end) to block indices, rejecting ones out of range."""
    count = num_vision_layers(bundle)
    bad = [layer for layer in layers if not -count <= layer < count]
    if bad:
        raise ValueError(
            f"extraction.layers: {bad} out of range for {bundle.arch}, which has {count} blocks "
            f"(allowed: {-count} … {count - 1})"
        )
    return sorted({layer % count for layer in layers})


@contextlib.contextmanager
def capture_blocks(
    bundle: ClipBundle, layers: Sequence[int], all_tokens: bool = False
) -> Iterator[dict[int, torch.Tensor]]:
    """Record the residual stream at the output of each of `layers` (block indices) during forward passes.

    Yields a dict that each forward fills with layer -> (batch, width) [CLS] tokens, or with
    `all_tokens` layer -> (batch, tokens, width) (batch first, whatever the model's layout).
    """
    transformer = bundle.model.visual.transformer
    captured: dict[int, torch.Tensor] = {}

    def hook_for(layer: int) -> Callable[..., None]:
        def hook(_module: Any, _inputs: Any, output: torch.Tensor) -> None:
            tokens_ntw = output if transformer.batch_first else output.transpose(0, 1)
            captured[layer] = (tokens_ntw if all_tokens else tokens_ntw[:, 0]).detach()

        return hook

    handles = [transformer.resblocks[layer].register_forward_hook(hook_for(layer)) for layer in layers]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def block_runner(bundle: ClipBundle, batch_size: int = 1024) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """A function running one block of the real vision tower: (tokens (n, T, width) batch first, block) -> tokens.

    It runs on the bundle's device at the bundle's precision in batches of `batch_size` images and
    returns float32 tokens on the input's device; steering inside the encoder calls it for blocks L+1 … end.
    """
    transformer = bundle.model.visual.transformer

    @torch.no_grad()
    def run_block(tokens_ntw: torch.Tensor, block: int) -> torch.Tensor:
        outputs = []
        for start in range(0, len(tokens_ntw), batch_size):
            x = tokens_ntw[start : start + batch_size].to(bundle.device, torch.float32)
            x = x if transformer.batch_first else x.transpose(0, 1)
            with precision_scope(bundle.device, bundle.precision):
                x = transformer.resblocks[block](x)
            outputs.append((x if transformer.batch_first else x.transpose(0, 1)).float().to(tokens_ntw.device))
        return torch.cat(outputs) if outputs else tokens_ntw.clone()

    return run_block


def vision_head(bundle: ClipBundle) -> dict[str, torch.Tensor]:
    """The fixed tensors after the last block: ln_post weight/bias (width,) and proj (width, embed_dim)."""
    visual = bundle.model.visual
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        raise ValueError(f"{bundle.arch}: only [CLS]-token pooling with ln_post before pooling is supported")
    return {
        "ln_post.weight": visual.ln_post.weight.detach().float().cpu().contiguous(),
        "ln_post.bias": visual.ln_post.bias.detach().float().cpu().contiguous(),
        "proj": visual.proj.detach().float().cpu().contiguous(),
    }
