"""Sparse autoencoders of five kinds and their training loop (AuxK, PASS). Torch only: no Ray here.

Every kind shares the encoder pre-activations and the decoder (METHOD.md §2, §9):

    a     = W_enc (x − b_pre) + b_enc
    x_hat = W_dec z + b_pre

and makes the code z from a in its own way: `topk` keeps each sample's k largest (Gao et al.);
`batchtopk` the batch's B·k largest in training and one learned threshold θ at inference;
`matryoshka` BatchTopK codes trained to reconstruct from every nested prefix of the dictionary;
`jumprelu` z = a · H(a − θ_i) with a learned threshold per latent; `relu_l1` z = ReLU(a) with an
L1 penalty. With `normalize: layer_norm` the SAE codes and reconstructs x's per-sample layer
norm (x − μ(x)) / σ(x), and its outputs return to x's space (· σ(x) + μ(x)).

Conventions: `W_dec` is stored as (n_latents, d), one decoder row per latent (a "decoder column"
in the paper's notation), unit-norm for every kind but `relu_l1`; `W_enc` is (n_latents, d).
Codes travel as (values, indices) pairs of shape (batch, w): w = k for `topk`, and for the other
kinds the most latents any sample of the batch fires, the others' rows padded with zero values.
The dense n-wide code is only built where a method needs it.

Loss (METHOD.md §2, §5, §9), every term over one batch and divided by the batch's total variance
Σ‖x − x̄‖² so that the reconstruction term is the batch FVU:

    L = FVU + w_aux · Σ_i ‖z_i − z̄_class(i)‖² / Σ‖x − x̄‖²  + auxk_coef · AuxK + sparsity

with the FVU averaged over the prefixes for `matryoshka`, sparsity = l1_coef · Σ_i z_i ‖W_dec[i]‖
/ Σ‖x − x̄‖ for `relu_l1` and l0_coef · mean L0 for `jumprelu` (both scale-free, both warmed up from 0), and AuxK
only for the kinds whose L0 is set by k. z̄_class is a running mean of each class's codes, updated
every step and detached.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vs2ray.devices import bound_heap_growth, free_gpu_bytes, precision_scope, worker_device
from vs2ray.store import advise_access, as_float32, read_rows, release_pages, row_file, write_json, write_tensors

if TYPE_CHECKING:  # shapes in the signatures; jaxtyping is only needed by the type checker
    from jaxtyping import Bool, Float, Int
    from torch import Tensor

TopKMode = Literal["relu", "abs", "signed"]  # signed: the k largest values as they are (saev's TopK)
SAEInit = Literal["linear", "tied"]  # sparsify's initialisation, or the encoder tied to the decoder
SAEKind = Literal["topk", "batchtopk", "matryoshka", "jumprelu", "relu_l1"]
SAE_KINDS: tuple[str, ...] = get_args(SAEKind)
FIXED_L0_KINDS = ("topk", "batchtopk", "matryoshka")  # k sets L0 (per sample, or over a batch); AuxK applies
UNIT_NORM_KINDS = ("topk", "batchtopk", "matryoshka", "jumprelu")  # relu_l1's penalty weighs the row norms instead
Normalization = Literal["none", "layer_norm"]
SAE_FORMAT = 3  # checkpoint layout version, in config.json; a checkpoint of another version is refused
READABLE_FORMATS = (1, 2, 3)  # format 1 had no encoder bias (b_enc = 0); formats 1 and 2 were top-k, unnormalised
SAE_FILES = ("sae.safetensors", "config.json", "metrics.json")  # metrics.json is written last
DENSITY_FILE = "density.safetensors"  # beside a trained SAE: each latent's firing frequency on its training rows
LAYER_NORM_EPS = 1e-5  # added to σ(x), as SAELens's and ViT-Prisma's layer_norm input normalisation do
THRESHOLD_DECAY = 0.99  # BatchTopK's θ: a running mean of each batch's smallest kept activation


class CheckpointError(RuntimeError):
    """An SAE checkpoint is missing a file, is of another format version, or does not fit the activations."""


class SparseCode(NamedTuple):
    """A batch's sparse code: the kept values and their latent indices, each (batch, w); padding values are 0."""

    values: torch.Tensor
    indices: torch.Tensor


class SAEOutput(NamedTuple):
    """What `SparseAutoencoder.forward` returns."""

    reconstruction: torch.Tensor  # (batch, d), in x's space
    values: torch.Tensor  # (batch, w)
    indices: torch.Tensor  # (batch, w)


class SAECheckpoint(NamedTuple):
    """A loaded checkpoint: the SAE, its config.json (training parameters, d, activation key) and metrics.json."""

    sae: SparseAutoencoder
    config: dict[str, Any]
    metrics: dict[str, Any]


DENSE_FIRING_RATE = 0.1  # a latent firing on more than this share of samples counts as dense


class _JumpReLU(torch.autograd.Function):
    """z = a · H(a − θ): the gradient reaches a where the unit fires and θ through the straight-through
    pseudo-derivative −(θ/ε)·K((a − θ)/ε) with a rectangle kernel K of width 1 (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        pre, threshold = ctx.saved_tensors
        window = ((pre - threshold).abs() < ctx.bandwidth / 2).to(grad)
        grad_threshold = -(threshold / ctx.bandwidth) * (window * grad).sum(dim=0)
        return grad * (pre > threshold), grad_threshold, None


class _Step(torch.autograd.Function):
    """H(a − θ): no gradient to a, −(1/ε)·K((a − θ)/ε) to θ (the L0 penalty's pseudo-derivative)."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        pre, threshold = ctx.saved_tensors
        window = ((pre - threshold).abs() < ctx.bandwidth / 2).to(grad)
        return None, -(window * grad).sum(dim=0) / ctx.bandwidth, None


def sparse_of(dense: Float[Tensor, "batch latents"]) -> SparseCode:
    """A dense non-negative code (batch, n) as (values, indices) of width w = the most latents a row fires
    (at least 1), rows with fewer padded with zero values."""
    width = max(1, int((dense != 0).sum(dim=1).max())) if len(dense) else 1
    values, indices = dense.topk(min(width, dense.shape[1]), dim=-1, sorted=False)
    return SparseCode(values, indices)


def batch_topk(pre: Float[Tensor, "batch latents"], k: int) -> Float[Tensor, "batch latents"]:
    """BatchTopK's training code: the batch's B·k largest ReLU pre-activations kept, the rest 0 (batch, n)."""
    flat = F.relu(pre).flatten()
    kept = flat.topk(min(k * pre.shape[0], flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter_(0, kept.indices, kept.values).reshape(pre.shape)


def matryoshka_prefixes(n_latents: int, count: int) -> list[int]:
    """Nested prefix sizes m_1 < … < m_count = n: halving from the whole dictionary (n/8, n/4, n/2, n for 4)."""
    return sorted({max(1, n_latents >> shift) for shift in range(count)})


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder of one of `SAE_KINDS` with a pre-encoder bias `b_pre` (see the module docstring)."""

    threshold: torch.Tensor  # batchtopk, matryoshka: θ (a buffer)
    jump_threshold: nn.Parameter  # jumprelu: θ_i (n,)

    def __init__(
        self,
        d: int,
        n_latents: int,
        k: int,
        topk: TopKMode = "relu",
        init: SAEInit = "linear",
        encoder_bias: bool = True,
        kind: SAEKind = "topk",
        normalize: Normalization = "none",
        jumprelu_threshold: float = 1e-3,
    ) -> None:
        super().__init__()
        if kind not in SAE_KINDS:
            raise ValueError(f"sae.kind must be one of {', '.join(SAE_KINDS)}; got {kind!r}")
        if kind in FIXED_L0_KINDS and not 1 <= k <= n_latents:
            raise ValueError(f"sae.k must be in [1, n_latents={n_latents}] (expansion × d), got {k}")
        if topk not in get_args(TopKMode):
            raise ValueError(f"sae.topk must be 'relu', 'abs' or 'signed', got {topk!r}")
        if topk != "relu" and kind != "topk":
            raise ValueError(f"sae.topk: {topk!r} is a top-k selection; sae.kind {kind!r} codes ReLU activations")
        if init not in ("linear", "tied"):
            raise ValueError(f"sae.init must be 'linear' or 'tied', got {init!r}")
        if normalize not in get_args(Normalization):
            raise ValueError(f"sae.normalize must be 'none' or 'layer_norm', got {normalize!r}")
        self.d, self.n_latents, self.k, self.topk = d, n_latents, k, topk
        self.kind, self.normalize = kind, normalize
        self.b_pre = nn.Parameter(torch.zeros(d))
        self.W_enc = nn.Parameter(torch.empty(n_latents, d))
        if init == "linear":
            # sparsify's start: nn.Linear's default encoder (rows of norm ≈ 1/√3), the decoder its normalised copy.
            # Its smaller encoder scale trains to a lower FVU than the tied start (benchmarks/sae_peer.py).
            nn.init.kaiming_uniform_(self.W_enc, a=math.sqrt(5))
            self.W_dec = nn.Parameter(self.W_enc.detach().clone())
            self.normalize_decoder()
        else:  # "tied": the encoder an exact copy of the unit-norm decoder (Gao et al.; the companion paper's start)
            self.W_dec = nn.Parameter(torch.randn(n_latents, d))
            self.normalize_decoder()
            with torch.no_grad():
                self.W_enc.copy_(self.W_dec)
        # sparsify's encoder bias, zero at the start; frozen at zero without it (METHOD.md's formula exactly)
        self.b_enc = nn.Parameter(torch.zeros(n_latents), requires_grad=encoder_bias)
        if kind == "jumprelu":  # θ_i itself, as dictionary_learning trains it (kept >= 0 after every step)
            self.jump_threshold = nn.Parameter(torch.full((n_latents,), float(jumprelu_threshold)))
        if kind in ("batchtopk", "matryoshka"):  # −1 until training has estimated it
            self.register_buffer("threshold", torch.tensor(-1.0))

    def extra_tensors(self) -> tuple[str, ...]:
        """The checkpoint's tensors beyond W_enc, b_enc, W_dec and b_pre, by kind."""
        return {"jumprelu": ("jump_threshold",), "batchtopk": ("threshold",), "matryoshka": ("threshold",)}.get(
            self.kind, ()
        )

    @property
    def unit_norm_decoder(self) -> bool:
        return self.kind in UNIT_NORM_KINDS

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Drop the gradient component along each decoder row, so a step keeps rows near unit norm."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
            self.W_dec.grad.sub_(parallel * self.W_dec)

    # ------------------------------------------------ input normalisation

    def _input_stats(self, x: Float[Tensor, "batch d"]) -> tuple[torch.Tensor, torch.Tensor]:
        mean = x.mean(dim=-1, keepdim=True)
        return mean, (x - mean).std(dim=-1, keepdim=True) + LAYER_NORM_EPS

    def to_sae_space(self, x: Float[Tensor, "batch d"]) -> Float[Tensor, "batch d"]:
        """What the SAE codes: x itself, or its per-sample layer norm (x − μ) / σ. (batch, d) -> (batch, d)."""
        if self.normalize == "none":
            return x
        mean, scale = self._input_stats(x)
        return (x - mean) / scale

    def from_sae_space(self, y: Float[Tensor, "batch d"], x: Float[Tensor, "batch d"]) -> Float[Tensor, "batch d"]:
        """A point y of the SAE's space (batch, d) back in the space of the rows x it came from (batch, d)."""
        if self.normalize == "none":
            return y
        mean, scale = self._input_stats(x)
        return y * scale + mean

    def input_scale(self, x: Float[Tensor, "batch d"]) -> Float[Tensor, "batch 1"] | float:
        """How far a unit step in the SAE's space moves x: 1, or σ(x) per row (batch, 1)."""
        return 1.0 if self.normalize == "none" else self._input_stats(x)[1]

    # ------------------------------------------------ codes

    def pre_activations(self, x_sae: Float[Tensor, "batch d"]) -> Float[Tensor, "batch latents"]:
        """a = W_enc (x − b_pre) + b_enc of rows in the SAE's space (`to_sae_space`): (batch, d) -> (batch, n)."""
        return (x_sae - self.b_pre) @ self.W_enc.T + self.b_enc

    def select(self, pre: Float[Tensor, "batch latents"], k: int | None = None) -> SparseCode:
        """TopK of pre-activations (batch, n) -> values, indices (batch, k)."""
        k = self.k if k is None else k
        if self.topk != "abs":  # largest values, then ReLU (Gao et al., sparsify) or as they are (saev)
            values, indices = pre.topk(k, dim=-1, sorted=False)
            return SparseCode(F.relu(values) if self.topk == "relu" else values, indices)
        indices = pre.abs().topk(k, dim=-1, sorted=False).indices  # largest |value| (the paper)
        return SparseCode(pre.gather(-1, indices), indices)

    def activate(self, pre: Float[Tensor, "batch latents"]) -> Float[Tensor, "batch latents"]:
        """The inference code of a kind other than top-k from pre-activations (batch, n): dense (batch, n)."""
        if self.kind == "jumprelu":
            return pre * (pre > self.jump_threshold)
        relu = F.relu(pre)
        if self.kind == "relu_l1":
            return relu
        if float(self.threshold) < 0:  # an untrained BatchTopK has no θ yet: the batch's top-k stands in
            return batch_topk(pre, self.k)
        return relu * (relu > self.threshold)

    def encode(self, x: Float[Tensor, "batch d"]) -> SparseCode:
        """Sparse codes of rows x (batch, d): values and latent indices, each (batch, w)."""
        pre = self.pre_activations(self.to_sae_space(x))
        return self.select(pre) if self.kind == "topk" else sparse_of(self.activate(pre))

    def decode(
        self, values: Float[Tensor, "batch k"], indices: Int[Tensor, "batch k"] | None = None
    ) -> Float[Tensor, "batch d"]:
        """D(c) = W_dec c + b_pre, in the SAE's space, from a sparse code (values, indices: (batch, w)) or a dense
        one (batch, n)."""
        return self.decode_without_bias(values, indices) + self.b_pre

    def decode_without_bias(
        self, values: Float[Tensor, "batch k"], indices: Int[Tensor, "batch k"] | None = None
    ) -> Float[Tensor, "batch d"]:
        """W_dec c, without b_pre: (batch, d)."""
        if indices is None:
            return values @ self.W_dec
        # embedding_bag sums w decoder rows per sample without a (batch, w, d) intermediate
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum")

    def dense_codes(
        self, values: Float[Tensor, "batch k"], indices: Int[Tensor, "batch k"]
    ) -> Float[Tensor, "batch latents"]:
        """Scatter a sparse code into its dense (batch, n_latents) form."""
        return torch.zeros(values.shape[0], self.n_latents, dtype=values.dtype, device=values.device).scatter_(
            -1, indices, values
        )

    def forward(self, x: Float[Tensor, "batch d"]) -> SAEOutput:
        """Reconstruction (batch, d) in x's space and the sparse code (values, indices)."""
        values, indices = self.encode(x)
        return SAEOutput(self.from_sae_space(self.decode(values, indices), x), values, indices)

    # ------------------------------------------------ checkpoints

    def shape(self) -> dict[str, Any]:
        """What config.json records of the SAE itself (format, sizes, kind, normalisation)."""
        return {
            "format": SAE_FORMAT,
            "d": self.d,
            "n_latents": self.n_latents,
            "k": self.k,
            "topk": self.topk,
            "kind": self.kind,
            "normalize": self.normalize,
        }

    def save(
        self,
        directory: Path,
        config: dict[str, Any],
        metrics: dict[str, Any],
        frequencies: torch.Tensor | None = None,
    ) -> None:
        """Write a checkpoint: sae.safetensors (W_enc, b_enc, W_dec, b_pre and the kind's thresholds),
        config.json (with `shape()` added), `frequencies` (n_latents,) as density.safetensors when given, then
        metrics.json, the completion mark."""
        directory.mkdir(parents=True, exist_ok=True)
        if frequencies is not None:
            write_tensors(directory / DENSITY_FILE, {"frequency": frequencies.detach().float().cpu()}, {})
        shape = self.shape()
        names = ("W_enc", "b_enc", "W_dec", "b_pre", *self.extra_tensors())
        tensors = {name: getattr(self, name).detach() for name in names}
        write_tensors(directory / "sae.safetensors", tensors, {k: str(v) for k, v in shape.items()})
        write_json(directory / "config.json", {**config, **shape})
        write_json(directory / "metrics.json", metrics)

    @classmethod
    def load(cls, directory: str | Path, expected_d: int | None = None) -> SAECheckpoint:
        """Read a checkpoint written by `save`; a missing file, another format version or a different `d`
        is a CheckpointError that says which."""
        from safetensors.torch import load_file

        directory = Path(directory).expanduser()
        missing = [name for name in SAE_FILES if not (directory / name).is_file()]
        if missing:
            raise CheckpointError(f"SAE checkpoint {directory} is incomplete: missing {', '.join(missing)}")
        config = json.loads((directory / "config.json").read_text())
        if config.get("format") not in READABLE_FORMATS:
            raise CheckpointError(
                f"SAE checkpoint {directory} has format {config.get('format')!r}; this vs2ray reads formats "
                f"{', '.join(map(str, READABLE_FORMATS))}. Delete the directory to retrain it, or use the vs2ray "
                f"version that wrote it."
            )
        if expected_d is not None and config["d"] != expected_d:
            raise CheckpointError(
                f"SAE checkpoint {directory} was trained on d={config['d']} activations, not d={expected_d} "
                f"(activations {config.get('activation_key')!r})"
            )
        tensors = load_file(directory / "sae.safetensors")
        sae = cls(
            config["d"],
            config["n_latents"],
            config["k"],
            config["topk"],
            encoder_bias="b_enc" in tensors,
            kind=config.get("kind", "topk"),
            normalize=config.get("normalize", "none"),
        )
        tensors.setdefault("b_enc", torch.zeros(config["n_latents"]))
        names = ("W_enc", "b_enc", "W_dec", "b_pre", *sae.extra_tensors())
        sae.load_state_dict({name: tensors[name].float() for name in names})
        return SAECheckpoint(sae, config, json.loads((directory / "metrics.json").read_text()))


KIND_PARAMS: dict[str, tuple[str, ...]] = {  # the training parameters that only one kind reads
    "topk": ("topk",),
    "batchtopk": (),
    "matryoshka": ("prefixes",),
    "jumprelu": ("l0_coef", "bandwidth", "jumprelu_threshold", "threshold_lr_scale", "sparsity_warmup_steps"),
    "relu_l1": ("l1_coef", "sparsity_warmup_steps"),
}
FIXED_L0_PARAMS = ("k", "auxk_coef", "auxk_k", "dead_threshold")  # read by the kinds whose L0 k sets


def kind_reads(kind: str, name: str) -> bool:
    """Whether an SAE of `kind` reads the training parameter `name` (a parameter of no kind in particular: yes)."""
    if name in FIXED_L0_PARAMS:
        return kind in FIXED_L0_KINDS
    owners = [owner for owner, names in KIND_PARAMS.items() if name in names]
    return not owners or kind in owners


@dataclass
class SAETrainParams:
    """Every parameter of one SAE training run (the SAE checkpoint key hashes the ones its kind reads)."""

    k: int = 64
    expansion: int = 4
    kind: SAEKind = "topk"
    topk: TopKMode = "relu"
    normalize: Normalization = "none"
    lr: float = 5e-4
    lr_scale_with_width: bool = False
    warmup_steps: int = 100
    steps: int = 2000
    epochs: float | None = None  # when set, overrides steps: ceil(epochs × N / batch_size)
    batch_size: int = 4096
    dead_threshold: int = 100
    auxk_coef: float = 1 / 32
    auxk_k: int | None = None
    prefixes: int = 4  # matryoshka: nested prefixes n/2^(p−1), …, n/2, n
    l1_coef: float = 0.3  # relu_l1: weight of Σ z_i ‖W_dec[i]‖ / Σ‖x − x̄‖
    l0_coef: float = 0.03  # jumprelu: weight of the mean L0
    bandwidth: float = 1e-3  # jumprelu: ε of the straight-through kernel
    jumprelu_threshold: float = 1e-3  # jumprelu: every θ_i at the start
    # jumprelu: θ's learning rate over the weights'. Adam moves θ by about its lr a step, so at vs2ray's
    # 10^3–10^4 steps the thresholds would stay near their start without it (the reference trains 10^5 steps)
    threshold_lr_scale: float = 20.0
    sparsity_warmup_steps: int = 200  # relu_l1, jumprelu: the penalty's coefficient rises from 0 over these
    w_aux: float = 0.0
    pass_momentum: float = 0.9
    init: SAEInit = "linear"
    encoder_bias: bool = True
    precision: str = "fp32"  # the forward passes' precision (devices.precision_scope); weights stay fp32
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def key_dict(self) -> dict[str, Any]:
        """The parameters an SAE checkpoint's key hashes: those the kind reads, without the defaults added after
        a key existed (an fp32 precision, the top-k kind, no normalisation), so that earlier SAEs keep their keys."""
        values = {name: value for name, value in self.as_dict().items() if kind_reads(self.kind, name)}
        for name, default in (("precision", "fp32"), ("kind", "topk"), ("normalize", "none")):
            if values.get(name) == default:
                del values[name]
        return values


@dataclass
class TrainResult:
    """A trained SAE and how training went."""

    sae: SparseAutoencoder
    metrics: dict[str, float]
    losses: list[float]
    frequencies: torch.Tensor | None = None  # (n_latents,): the share of training rows each latent fires on


class ActivationRows:
    """n activation rows of width d, read in batches from an (N, d) array: a store column memory-mapped
    (`Activations.stored`), an in-memory array or a CPU tensor, restricted to the groups `rows` (m,) when given:
    of an image's `stride` consecutive rows (its tokens), the `group` from `offset` on (every token, or the
    patches without [CLS]); n = m · group. An index per image, not per token, so that what the selection holds
    is small beside the column.

    Every read is a float32 copy of just the rows asked for (float16 and bfloat16 bit patterns are
    up-cast per batch), and a mapped array's pages are handed back every RELEASE_BYTES read, so what a
    reader holds stays at a few batches whatever the store's size; the pages stay in the node's page
    cache, shared by every process that maps the column.
    """

    RELEASE_BYTES = 32 * 2**20  # of mapped pages touched
    PAGE = 64 * 2**10  # what a fault on a mapped page maps: the kernel maps the page cache around it too
    CHUNK_BYTES = 16 * 2**20  # rows per chunk of `to` and `mean`: this much float32

    def __init__(
        self,
        array: np.ndarray | torch.Tensor,
        rows: np.ndarray | None = None,
        group: int = 1,
        stride: int | None = None,
        offset: int = 0,
    ) -> None:
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        if array.ndim != 2:
            raise ValueError(f"activation rows must be (N, d); got an array of shape {array.shape}")
        stride = group if stride is None else stride
        if rows is None and (group != 1 or stride != 1):
            raise ValueError("groups of rows need the groups chosen (rows)")
        if not 0 <= offset <= stride - group:
            raise ValueError(f"{group} rows from row {offset} do not fit in groups of {stride}")
        bound_heap_growth()  # batch buffers freed and reallocated must not grow the heap
        self.array, self.rows, self.group, self.stride, self.offset = array, rows, group, stride, offset
        self._ordered = rows is None or bool(np.all(rows[1:] >= rows[:-1]))
        self._read_since_release = 0
        self._scattered: bool | None = None  # how the mapping was last advised to be read
        # scattered rows of a mapped column larger than a release are read with pread: each would map the page
        # cache around it (up to a large folio), so that mapping them costs a release every few dozen rows
        self._read_scattered = array.nbytes > self.RELEASE_BYTES and row_file(array) is not None

    def __len__(self) -> int:
        return len(self.array) if self.rows is None else len(self.rows) * self.group

    def _index(self, positions: np.ndarray) -> np.ndarray:
        """The array rows of `positions` (batch,) of these n rows."""
        if self.rows is None:
            return positions
        if self.stride == 1:
            return np.asarray(self.rows[positions])
        groups, within = np.divmod(positions, self.group)
        return np.asarray(self.rows[groups] * self.stride + self.offset + within)

    @property
    def width(self) -> int:
        return int(self.array.shape[1])

    def without_first(self) -> ActivationRows:
        """The same images' rows without the first of each group (every token but [CLS])."""
        if self.rows is None or self.group < 2:
            raise ValueError("only rows in groups of an image's tokens have a first token to leave out")
        return ActivationRows(self.array, self.rows, self.group - 1, self.stride, self.offset + 1)

    @property
    def row_bytes(self) -> int:
        """Bytes of one stored row (float16 and bfloat16 rows are half a float32 one)."""
        return int(self.array.dtype.itemsize) * self.width

    def take(self, positions: np.ndarray) -> Float[Tensor, "batch d"]:
        """The rows at `positions` (batch,) of these n rows, in that order, as a float32 CPU tensor."""
        index = self._index(positions)
        if self._read_scattered:  # a large mapped column: read from the file, nothing mapped
            return self._tensor(read_rows(self.array, index), touched=0)
        self._advise(scattered=True)
        touched = max(self.PAGE, self.row_bytes)  # a scattered row maps the pages around it too
        per_release = max(1, self.RELEASE_BYTES // touched)
        if len(index) <= per_release:
            return self._tensor(self.array[index], touched=len(index) * touched)
        # a large batch is gathered a release's worth of rows at a time into one buffer
        out = np.empty((len(index), self.width), dtype=np.float32)
        for start in range(0, len(index), per_release):
            part = index[start : start + per_release]
            out[start : start + len(part)] = as_float32(self.array[part])
            self._touched(len(part) * touched)
        return torch.from_numpy(out)

    def chunks(self, size: int) -> Iterator[Float[Tensor, "chunk d"]]:
        """All n rows in order, `size` at a time, as float32 CPU tensors."""
        self.release()  # a pass starts from nothing mapped, whatever the reads before it left
        self._advise(scattered=not self._ordered)
        for start in range(0, len(self), size):
            stop = min(start + size, len(self))
            if self.rows is None:
                # a slice is a view: copied here
                yield self._tensor(np.array(self.array[start:stop]), touched=self.row_bytes * (stop - start))
            else:
                index = self._index(np.arange(start, stop))  # in order; a sparse scan maps the span it covers
                span = int(index[-1] - index[0]) + 1 if self._ordered else len(index) * self.PAGE // self.row_bytes
                yield self._tensor(self.array[index], touched=self.row_bytes * max(len(index), span))

    @property
    def chunk_rows(self) -> int:
        return max(1, self.CHUNK_BYTES // (4 * self.width))

    def to(self, device: torch.device, chunk: int | None = None) -> Float[Tensor, "n d"]:
        """All n rows on `device` as one float32 tensor, filled a chunk at a time (no whole host copy)."""
        chunk = chunk or self.chunk_rows
        out = torch.empty(len(self), self.width, dtype=torch.float32, device=device)
        for start, values in zip(range(0, len(self), chunk), self.chunks(chunk), strict=True):
            out[start : start + len(values)] = values.to(device)
        return out

    def mean(self, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Float[Tensor, " d"]:
        """The rows' mean (d,), accumulated in float64 a chunk at a time; with `transform`, the mean of
        transform(chunk) (chunk, d) -> (chunk, d), each chunk on the host."""
        total = torch.zeros(self.width, dtype=torch.float64)
        for values in self.chunks(self.chunk_rows):
            values = values if transform is None else transform(values)
            total += values.sum(dim=0).double()  # float32 within a chunk: no float64 copy of it
        return (total / max(1, len(self))).float()

    def release(self) -> None:
        """Hand the mapped pages read so far back to the page cache (a no-op for an in-memory array)."""
        release_pages(self.array)
        self._read_since_release = 0

    def _advise(self, scattered: bool) -> None:
        if scattered != self._scattered:
            advise_access(self.array, scattered)
            self._scattered = scattered

    def _touched(self, nbytes: int) -> None:
        """Count `nbytes` of mapped pages touched; hand them back once RELEASE_BYTES are."""
        self._read_since_release += nbytes
        if self._read_since_release >= self.RELEASE_BYTES:
            self.release()

    def _tensor(self, values: np.ndarray, touched: int) -> torch.Tensor:
        # `values` is this read's own copy; up-casting makes another only for float16 / bfloat16
        values = np.ascontiguousarray(as_float32(values)).view(np.ndarray)
        self._touched(touched)
        return torch.from_numpy(values)


class BatchOrder:
    """Seeded batches of row positions over n rows in groups of `group` consecutive rows: each epoch a
    permutation of the n rows, drawn whole when n <= SHUFFLE_ROWS and otherwise a window at a time (the
    groups permuted, then the rows of SHUFFLE_ROWS / group groups at once), so that what the order holds
    stays small whatever n. A window's last rows short of a batch are left out, as an epoch's are."""

    SHUFFLE_ROWS = 2**22  # 32 MiB of int64 positions

    def __init__(self, n: int, group: int, generator: torch.Generator) -> None:
        if n % group:
            raise ValueError(f"{n} rows are not whole groups of {group}")
        self.n, self.group, self.generator = n, group, generator
        self._windows: Iterator[Int[Tensor, " window"]] = iter(())
        self._window = torch.zeros(0, dtype=torch.long)
        self._cursor = 0

    def next(self, batch_size: int) -> Int[Tensor, " batch"]:
        """The next `batch_size` positions (batch_size <= n), a new window or epoch begun when needed."""
        if self._cursor + batch_size > len(self._window):
            window = next(self._windows, None)
            if window is None:
                self._windows = self._epoch()
                window = next(self._windows)
            self._window, self._cursor = window, 0
        batch = self._window[self._cursor : self._cursor + batch_size]
        self._cursor += batch_size
        return batch.long()

    def _epoch(self) -> Iterator[Int[Tensor, " window"]]:
        if self.n <= self.SHUFFLE_ROWS:
            yield torch.randperm(self.n, generator=self.generator)
            return
        groups = torch.randperm(self.n // self.group, generator=self.generator)
        per_window = max(1, self.SHUFFLE_ROWS // self.group)
        # the same positions as int32 where they fit: a window's copies take 16 MiB each, not 32
        narrow = torch.int32 if self.n < 2**31 else torch.long
        for chosen in torch.split(groups, per_window):
            rows = (chosen[:, None].to(narrow) * self.group + torch.arange(self.group, dtype=narrow)).reshape(-1)
            yield rows[torch.randperm(len(rows), generator=self.generator)]


def as_rows(acts: Float[Tensor, "n d"] | ActivationRows) -> ActivationRows:
    """`acts` as ActivationRows (a tensor is read in place)."""
    return acts if isinstance(acts, ActivationRows) else ActivationRows(acts)


def fvu(x: Float[Tensor, "n d"], x_hat: Float[Tensor, "n d"]) -> Float[Tensor, ""]:
    """Fraction of variance unexplained over a batch: ‖X − X̂‖²_F / ‖X − mean(X)‖²_F (scalar)."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()


def per_sample_fvu(
    x: Float[Tensor, "n d"], x_hat: Float[Tensor, "n d"], mean: Float[Tensor, " d"]
) -> Float[Tensor, " n"]:
    """Per-sample FVU ‖x̂ − x‖² / ‖x − μ‖²: (batch, d) -> (batch,), μ the data mean (d,)."""
    return (x_hat - x).pow(2).sum(dim=1) / (x - mean).pow(2).sum(dim=1)


def effective_lr(params: SAETrainParams, n_latents: int) -> float:
    """Base LR, or sparsify's width rule 2e-4 / sqrt(n / 2^14) when `lr_scale_with_width`."""
    return 2e-4 / math.sqrt(n_latents / 2**14) if params.lr_scale_with_width else params.lr


def lr_factor(step: int, params: SAETrainParams) -> float:
    """Linear warm-up to 1, then linear decay to 0 at the last step."""
    if step < params.warmup_steps:
        return (step + 1) / params.warmup_steps
    remaining = params.steps - params.warmup_steps
    return max(0.0, 1.0 - (step - params.warmup_steps) / max(1, remaining))


class ClassMeans:
    """Running mean of each class's dense code, updated per step from the batch (detached)."""

    def __init__(self, num_classes: int, n_latents: int, momentum: float, device: torch.device) -> None:
        self.means = torch.zeros(num_classes, n_latents, device=device)
        self.seen = torch.zeros(num_classes, dtype=torch.bool, device=device)
        self.momentum = momentum

    @torch.no_grad()
    def update(self, dense: Float[Tensor, "batch latents"], labels: Int[Tensor, " batch"]) -> None:
        sums = torch.zeros_like(self.means).index_add_(0, labels, dense)
        counts = torch.bincount(labels, minlength=self.means.shape[0]).to(dense.dtype)
        present = counts > 0
        batch_means = sums[present] / counts[present, None]
        first = present & ~self.seen
        blended = self.momentum * self.means[present] + (1 - self.momentum) * batch_means
        self.means[present] = torch.where(first[present, None], batch_means, blended)
        self.seen |= present

    def dispersion(
        self, values: Float[Tensor, "batch w"], indices: Int[Tensor, "batch w"] | None, labels: Int[Tensor, " batch"]
    ) -> Float[Tensor, ""]:
        """Σ_i ‖z_i − z̄_class(i)‖² from sparse codes, without building (batch, n) tensors with gradients, or
        from dense codes `values` (batch, n) when `indices` is None."""
        prototypes = self.means[labels]  # (batch, n), no gradient
        if indices is None:
            return (values - prototypes).pow(2).sum()
        cross = (values * prototypes.gather(1, indices)).sum()
        return values.pow(2).sum() - 2 * cross + prototypes.pow(2).sum()


def auxk_loss(
    sae: SparseAutoencoder,
    pre: Float[Tensor, "batch latents"],
    residual: Float[Tensor, "batch d"],
    dead: Bool[Tensor, " latents"],
    auxk_k: int,
    total_variance: Float[Tensor, ""],
) -> Float[Tensor, ""]:
    """Gao et al.'s AuxK: reconstruct the residual x − x̂ from the top `auxk_k` dead latents.

    Divided by the batch's total variance of x, like the FVU term, and scaled down while
    fewer than `auxk_k` latents are dead (as sparsify does). The target is the residual,
    so its reconstruction uses W_dec alone: adding b_pre here would count the decoder
    bias twice (the pitfall the issue warns about).
    """
    # no host sync (a GPU step never waits for the CPU here): always `auxk_k` latents, and when fewer are dead
    # the live ones picked beside them carry a value of 0 (relu of -inf, or the masked 0), so they add nothing
    num_dead = dead.sum()
    # detached: AuxK trains the dead latents' decoder rows only, as sparsify's fused encoder does (its backward
    # drops the pre-activations' gradient); with the encoder trained too, 11% of latents stayed dead at expansion 8
    masked = pre.detach().masked_fill(~dead, -torch.inf if sae.topk == "relu" else 0.0)
    values, indices = sae.select(masked, min(auxk_k, sae.n_latents))  # relu maps the -inf of live latents to 0
    residual_hat = sae.decode_without_bias(values, indices)
    scale = (num_dead / auxk_k).clamp(max=1.0)
    return scale * (residual_hat - residual).pow(2).sum() / total_variance


def train_sae(
    acts: Float[Tensor, "n d"] | ActivationRows,
    params: SAETrainParams,
    labels: Int[Tensor, " n"] | None = None,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
    log_every: int = 0,
    log: Callable[[str], None] = print,
    init: SparseAutoencoder | None = None,
    on_report: Callable[[int, SparseAutoencoder, float], None] | None = None,
    report_every: int = 0,
    val_acts: Float[Tensor, "m d"] | ActivationRows | None = None,
    stage: bool | None = None,
) -> TrainResult:
    """Train a top-k SAE on activations (N, d), deterministically for a given `params.seed`.

    `acts` is a tensor or ActivationRows (a store column read in batches: memory stays at a few
    batches whatever its size); the same rows in either form give the same SAE. Batches are drawn
    by a seeded permutation of the N rows per epoch (`BatchOrder`). On CUDA, rows that fit in half of what the process
    may still allocate there (`devices.free_gpu_bytes`) are staged once; otherwise each batch is read
    from the host (`stage` True / False forces either).
    `labels` (N,) are needed only for PASS (`params.w_aux > 0`) and never used otherwise.
    `init` continues training from a copy of an existing SAE (its b_pre is kept).
    `on_report(step, sae, dead_fraction)` is called after every `report_every` steps (not
    after the last one), with the SAE as it is; it must not change it.
    `val_acts` (M, d), held-out rows, add `val_<metric>` figures measured on the training device.
    `device` defaults to CUDA when torch sees one (a Ray worker passes the device of the GPU it was given).
    On CUDA the loop never waits for the host between log steps, Adam is fused, and deterministic
    kernels are used, so the same seed gives the same SAE on the same GPU.
    """
    device = torch.device(device) if device is not None else worker_device("auto", None)
    if params.w_aux > 0 and labels is None:
        raise ValueError("pass.w_aux > 0 needs labels for the training activations")
    generator = torch.Generator().manual_seed(params.seed)
    torch.manual_seed(params.seed)
    rows = as_rows(acts)
    n, d = len(rows), rows.width
    if params.epochs is not None:
        params = SAETrainParams(**{**params.as_dict(), "steps": math.ceil(params.epochs * n / params.batch_size)})
    n_latents = params.expansion * d
    with _deterministic_kernels(device):
        sae = SparseAutoencoder(
            d,
            n_latents,
            params.k,
            params.topk,
            params.init,
            params.encoder_bias,
            params.kind,
            params.normalize,
            params.jumprelu_threshold,
        ).to(device)
        with torch.no_grad():
            if init is not None:
                sae.load_state_dict(init.state_dict())
            else:
                sae.b_pre.copy_(sae_space_mean(sae, rows))  # b_pre starts at the empirical mean
        batches = _batches_on(device, rows, stage)
        order = BatchOrder(n, rows.group, generator)
        losses, seconds = _train_loop(
            sae, batches, params, labels, num_classes, device, log_every, log, on_report, report_every, order
        )
        metrics, fire_counts = measure_sae(sae, batches, labels if params.w_aux > 0 else None)
        if val_acts is not None and len(val_acts):
            metrics.update({f"val_{name}": value for name, value in evaluate_sae(sae, val_acts).items()})
    metrics.update(
        {
            "final_loss": losses[-1],
            "train_seconds": seconds,
            "samples_per_second": params.steps * min(params.batch_size, n) / seconds,
            "lr": effective_lr(params, n_latents),
        }
    )
    frequencies = (fire_counts / max(1, n)).cpu()
    return TrainResult(sae=sae.cpu(), metrics=metrics, losses=losses, frequencies=frequencies)


def sae_space_mean(sae: SparseAutoencoder, rows: ActivationRows) -> Float[Tensor, " d"]:
    """The mean (d,) of the rows in the SAE's space (`to_sae_space`), accumulated a chunk at a time."""
    # the layer norm reads no parameter: it runs on the host chunks, wherever the SAE lives
    return rows.mean() if sae.normalize == "none" else rows.mean(sae.to_sae_space)


class StepLoss(NamedTuple):
    """One training step's loss and codes: sparse (values, indices (batch, k)) for top-k, else dense
    `values` (batch, n) with `indices` None."""

    loss: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor | None
    reconstruction: torch.Tensor  # (batch, d), in the SAE's space


def kind_loss(
    sae: SparseAutoencoder,
    x: Float[Tensor, "batch d"],
    pre: Float[Tensor, "batch latents"],
    params: SAETrainParams,
    step: int,
    total_variance: Float[Tensor, ""],
) -> StepLoss:
    """The reconstruction and sparsity terms of one step for the SAE's kind (module docstring), from rows x and
    their pre-activations (batch, n), both in the SAE's space."""

    def batch_fvu(x_hat: torch.Tensor) -> torch.Tensor:
        return (x - x_hat).pow(2).sum() / total_variance

    if sae.kind == "topk":
        values, indices = sae.select(pre)
        x_hat = sae.decode(values, indices)
        return StepLoss(batch_fvu(x_hat), values, indices, x_hat)
    warm = min(1.0, (step + 1) / params.sparsity_warmup_steps) if params.sparsity_warmup_steps else 1.0
    if sae.kind == "jumprelu":
        thresholds = sae.jump_threshold
        codes = _JumpReLU.apply(pre, thresholds, params.bandwidth)
        x_hat = sae.decode(codes)
        l0 = _Step.apply(pre, thresholds, params.bandwidth).sum(dim=1).mean()
        loss = batch_fvu(x_hat) + warm * params.l0_coef * l0
        return StepLoss(loss, codes, None, x_hat)
    if sae.kind == "relu_l1":
        codes = F.relu(pre)
        x_hat = sae.decode(codes)
        # over Σ‖x − x̄‖, in units of x like the numerator: l1_coef does not depend on the activations' scale
        l1 = (codes * sae.W_dec.norm(dim=1)).sum() / (x - x.mean(dim=0)).norm(dim=1).sum()
        return StepLoss(batch_fvu(x_hat) + warm * params.l1_coef * l1, codes, None, x_hat)
    codes = batch_topk(pre, sae.k)
    _update_threshold(sae, codes.detach())
    if sae.kind == "batchtopk":
        x_hat = sae.decode(codes)
        return StepLoss(batch_fvu(x_hat), codes, None, x_hat)
    # matryoshka: each prefix's latents alone reconstruct x; the prefixes' FVUs averaged
    x_hat, losses, start = sae.b_pre.expand_as(x), [], 0
    for stop in matryoshka_prefixes(sae.n_latents, params.prefixes):
        x_hat = x_hat + codes[:, start:stop] @ sae.W_dec[start:stop]
        losses.append(batch_fvu(x_hat))
        start = stop
    return StepLoss(torch.stack(losses).mean(), codes, None, x_hat)


@torch.no_grad()
def _update_threshold(sae: SparseAutoencoder, codes: Float[Tensor, "batch latents"]) -> None:
    """BatchTopK's θ: a running mean of the batch's smallest kept activation (on the device: no host sync)."""
    smallest = codes.masked_fill(codes <= 0, torch.inf).min()
    blended = torch.where(
        sae.threshold < 0, smallest, THRESHOLD_DECAY * sae.threshold + (1 - THRESHOLD_DECAY) * smallest
    )
    sae.threshold.copy_(torch.where(torch.isfinite(smallest), blended, sae.threshold))


def _batches_on(device: torch.device, rows: ActivationRows, stage: bool | None) -> torch.Tensor | ActivationRows:
    """Where training batches come from: the rows staged on a GPU they fit (half of what this process may
    still allocate there), else the host rows, read batch by batch (on the CPU a gather from memory or the
    page cache is as fast)."""
    if stage is None:
        stage = device.type == "cuda" and len(rows) * rows.width * 4 <= free_gpu_bytes(device) // 2
    if stage:
        return rows.to(device)
    return rows


@contextlib.contextmanager
def _deterministic_kernels(device: torch.device) -> Iterator[None]:
    """On CUDA, deterministic kernels while the SAE trains (embedding_bag's and index_add_'s backward use
    atomics otherwise); the CPU kernels are deterministic already."""
    if device.type != "cuda":
        yield
        return
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's own condition for determinism
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def _train_loop(
    sae: SparseAutoencoder,
    data: torch.Tensor | ActivationRows,
    params: SAETrainParams,
    labels: torch.Tensor | None,
    num_classes: int | None,
    device: torch.device,
    log_every: int,
    log: Callable[[str], None],
    on_report: Callable[[int, SparseAutoencoder, float], None] | None,
    report_every: int,
    order: BatchOrder,
) -> tuple[list[float], float]:
    """The optimisation steps of `train_sae`: (loss per step, seconds). `data`: rows on the device, or on
    the host, gathered per batch."""
    n = len(data)
    n_latents = sae.n_latents
    base_lr = effective_lr(params, n_latents)
    thresholds = [sae.jump_threshold] if sae.kind == "jumprelu" else []
    weights = [p for p in sae.parameters() if all(p is not t for t in thresholds)]
    groups = [{"params": weights, "scale": 1.0}, {"params": thresholds, "scale": params.threshold_lr_scale}]
    optimizer = torch.optim.Adam(
        [g for g in groups if g["params"]],
        lr=base_lr,
        betas=(0.9, 0.999),
        eps=6.25e-10,
        fused=device.type == "cuda" or None,
    )
    auxk_k = params.auxk_k or sae.d // 2
    samples_since_fired = torch.zeros(n_latents, dtype=torch.long, device=device)
    class_means = None
    if params.w_aux > 0:
        assert labels is not None  # train_sae refused w_aux > 0 without labels
        labels = labels.to(device)
        class_means = ClassMeans(num_classes or int(labels.max()) + 1, n_latents, params.pass_momentum, device)
    losses = torch.zeros(params.steps, device=device)  # read back at log steps and at the end only
    # fp16 gradients underflow without loss scaling (bf16 has fp32's range and needs none)
    scaler = torch.amp.GradScaler(device.type, enabled=params.precision == "fp16")
    batch_size = min(params.batch_size, n)
    # on the CPU, skipping AuxK while nothing is dead saves its top-k; on CUDA that test would sync every step
    check_dead = device.type != "cuda"
    started = time.perf_counter()
    for step in range(params.steps):
        batch_idx = order.next(batch_size)
        if isinstance(data, torch.Tensor):
            x = data[batch_idx.to(device)]
        else:
            x = data.take(batch_idx.numpy()).to(device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = group["scale"] * base_lr * lr_factor(step, params)

        x = sae.to_sae_space(x)
        with precision_scope(device, params.precision):
            pre = sae.pre_activations(x)
        pre = pre.float()  # the codes, the loss and every update in fp32
        total_variance = (x - x.mean(dim=0)).pow(2).sum()
        loss, values, indices, x_hat = kind_loss(sae, x, pre, params, step, total_variance)

        if indices is None:
            fired = (values != 0).sum(dim=0)
        else:
            fired = torch.zeros(n_latents, device=device).index_add_(
                0, indices.flatten(), (values != 0).flatten().float()
            )
        samples_since_fired += batch_size
        samples_since_fired.masked_fill_(fired > 0, 0)
        dead = samples_since_fired > params.dead_threshold
        auxk = sae.kind in FIXED_L0_KINDS and params.auxk_coef > 0
        if auxk and (not check_dead or bool(dead.any())):
            loss = loss + params.auxk_coef * auxk_loss(sae, pre, (x - x_hat).detach(), dead, auxk_k, total_variance)
        if class_means is not None and labels is not None:
            batch_labels = labels[batch_idx.to(device)]
            dense = values.detach() if indices is None else sae.dense_codes(values.detach(), indices)
            class_means.update(dense, batch_labels)
            loss = loss + params.w_aux * class_means.dispersion(values, indices, batch_labels) / total_variance

        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(scaler.scale(loss))
        scaler.unscale_(optimizer)  # the projection below needs the true gradient
        if sae.unit_norm_decoder:
            sae.remove_parallel_decoder_grad()
        scaler.step(optimizer)
        scaler.update()
        if sae.unit_norm_decoder:
            sae.normalize_decoder()
        if sae.kind == "jumprelu":
            with torch.no_grad():
                sae.jump_threshold.clamp_(min=0)
        losses[step] = loss.detach()
        if on_report and report_every and (step + 1) % report_every == 0 and step + 1 < params.steps:
            with torch.no_grad():
                on_report(step + 1, sae, dead.float().mean().item())
        if log_every and (step % log_every == 0 or step == params.steps - 1):
            elapsed = time.perf_counter() - started
            rate = (step + 1) * batch_size / elapsed
            eta = (params.steps - step - 1) * batch_size / rate
            log(
                f"step {step + 1:6d}/{params.steps}  loss {losses[step].item():.4f}  "
                f"dead {dead.float().mean().item():.3f}  {rate:,.0f} samples/s  ETA {eta:.0f} s"
            )
    loss_list = losses.tolist()  # one host sync for the whole run
    return loss_list, time.perf_counter() - started


def evaluate_sae(
    sae: SparseAutoencoder,
    acts: Float[Tensor, "n d"] | ActivationRows,
    labels: Int[Tensor, " n"] | None = None,
    batch_size: int = 8192,
) -> dict[str, float]:
    """`measure_sae`'s metrics without the firing counts."""
    return measure_sae(sae, acts, labels, batch_size)[0]


def _count_statistics(counts: Int[Tensor, " values"], shares: Sequence[float]) -> tuple[float, float, list[float]]:
    """(mean, standard deviation (n − 1), nearest-rank percentiles at `shares`) of the integers whose histogram
    is `counts` (counts[v]: how many are v): what sorting them would give, without them."""
    n = int(counts.sum())
    values = torch.arange(len(counts), dtype=torch.float64, device=counts.device)
    weights = counts.double()
    mean = float((weights * values).sum()) / n
    std = math.sqrt(float((weights * (values - mean) ** 2).sum()) / (n - 1)) if n > 1 else 0.0
    ends = counts.cumsum(0)  # the sorted position after each value's last
    ranks = torch.tensor([int(share * (n - 1)) for share in shares], device=counts.device)
    return mean, std, torch.searchsorted(ends, ranks, right=True).double().tolist()


def _lower_median(values: Float[Tensor, " n"]) -> float:
    """torch.median's median (the lower of the two middle values) of `values` (n,), which it reorders in place
    on the CPU (torch.median sorts a copy with int64 positions: 12 bytes a value)."""
    if values.device.type != "cpu":
        return values.median().item()
    array = values.numpy()
    middle = (len(array) - 1) // 2
    array.partition(middle)
    return float(array[middle])


@torch.no_grad()
def measure_sae(
    sae: SparseAutoencoder,
    acts: Float[Tensor, "n d"] | ActivationRows,
    labels: Int[Tensor, " n"] | None = None,
    batch_size: int = 8192,
) -> tuple[dict[str, float], Float[Tensor, " latents"]]:
    """(metrics, how many rows each latent fired on (n_latents,)). The metrics: FVU, per-sample FVU (mean,
    median), L0 (mean, standard deviation, 10th / 50th / 90th percentile), dead and dense fractions over all
    of `acts` (N, d), a tensor (on any device) or ActivationRows read `batch_size` rows at a time. Rows in
    groups of an image's every token (ActivationRows.group > 1, [CLS] first) also give `l0_cls` and
    `l0_patches`, the mean L0 of the [CLS] and of the other tokens.

    Dead here: never fired on `acts`. Dense: fired on more than 10% of the samples.
    With `labels` (N,), also the within-class code dispersion that PASS penalises:
    `class_dispersion` = mean_i ‖z_i − z̄_class(i)‖² and `class_dispersion_relative` =
    Σ‖z_i − z̄_class(i)‖² / Σ‖z_i‖² (0 when every class's codes collapse onto its mean),
    in one pass through Σ‖z − z̄_c‖² = Σ‖z‖² − Σ_c n_c ‖z̄_c‖².
    """
    device = sae.W_dec.device
    if isinstance(acts, torch.Tensor):
        acts = acts.to(device=device, dtype=torch.float32)
        mean = acts.mean(dim=0, dtype=torch.float64).float()  # as ActivationRows.mean
        chunks: Iterator[torch.Tensor] = iter(torch.split(acts, batch_size))
        first_token_every = 0
    else:
        mean = acts.mean().to(device)
        chunks = (chunk.to(device) for chunk in acts.chunks(batch_size))
        first_token_every = acts.group if acts.group > 1 and acts.offset == 0 else 0
    n = len(acts)
    residual_sq, total_sq, code_sq = 0.0, 0.0, 0.0
    fire_counts = torch.zeros(sae.n_latents, device=device)
    # filled in place: a list of parts and their cat is two copies
    sample_fvu = torch.empty(n, device=device)
    # L0 is a count: its histogram gives its mean, spread and percentiles with nothing kept per row (a sort of
    # 16M every-token rows' L0 took 200 MB)
    l0_counts = torch.zeros(sae.n_latents + 1, dtype=torch.long, device=device)
    cls_l0 = torch.zeros(2, dtype=torch.long, device=device)  # ([CLS] rows' L0 sum, [CLS] rows)
    if labels is not None:
        labels = labels.to(device)
        num_classes = int(labels.max()) + 1
        class_sums = torch.zeros(num_classes, sae.n_latents, device=device)
    for start, x in zip(range(0, n, batch_size), chunks, strict=True):
        x_hat, values, indices = sae(x)
        residual_sq += (x - x_hat).pow(2).sum().item()
        total_sq += (x - mean).pow(2).sum().item()
        active = values != 0
        row_l0 = active.sum(dim=1)
        l0_counts += torch.bincount(row_l0, minlength=len(l0_counts))
        if first_token_every:
            is_cls = torch.arange(start, start + len(x), device=device) % first_token_every == 0
            cls_l0 += torch.stack([row_l0[is_cls].sum(), is_cls.sum()])
        fire_counts.index_add_(0, indices[active], torch.ones_like(values[active]))
        sample_fvu[start : start + len(x)] = per_sample_fvu(x, x_hat, mean)
        if labels is not None:
            class_sums.index_add_(0, labels[start : start + batch_size], sae.dense_codes(values, indices))
            code_sq += values.pow(2).sum().item()
    l0_mean, l0_std, l0_quantiles = _count_statistics(l0_counts, (0.1, 0.5, 0.9))
    metrics = {
        "fvu": residual_sq / total_sq,
        "fvu_per_sample_mean": sample_fvu.mean().item(),
        "fvu_per_sample_median": _lower_median(sample_fvu),
        "l0": l0_mean,
        "l0_std": l0_std,
        "l0_p10": l0_quantiles[0],
        "l0_median": l0_quantiles[1],
        "l0_p90": l0_quantiles[2],
        "dead_fraction": (fire_counts == 0).float().mean().item(),
        "dense_fraction": (fire_counts > DENSE_FIRING_RATE * n).float().mean().item(),
    }
    if first_token_every:
        cls_sum, cls_rows = cls_l0.tolist()
        total = float((l0_counts * torch.arange(len(l0_counts), device=device)).sum())
        metrics["l0_cls"] = cls_sum / cls_rows
        metrics["l0_patches"] = (total - cls_sum) / (n - cls_rows)
    if labels is not None:
        counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).float()
        between = (class_sums.pow(2).sum(dim=1) / counts).sum().item()  # Σ_c n_c ‖z̄_c‖²
        metrics["class_dispersion"] = (code_sq - between) / n
        metrics["class_dispersion_relative"] = (code_sq - between) / code_sq
    return metrics, fire_counts
