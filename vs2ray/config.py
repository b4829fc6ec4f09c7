"""Experiment / sweep configuration: the YAML schema, loading, and `--set` overrides.

Every key is documented in docs/reference/config.md, generated from this schema. A value marked
*searchable* is either a constant or a distribution that the sweep samples:

    sae:
      k: {choice: [32, 64, 128]}
      expansion: {int: [2, 16]}
    steering:
      gamma: {uniform: [1.0, 3.0]}
      lambda: {loguniform: [0.1, 10.0]}

Invalid input raises `ConfigError`, whose message has one line per problem naming
the key path, the offending value and what is allowed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from vs2ray.methods import METHODS
from vs2ray.sae import SAE_KINDS, Normalization, SAEKind

DISTRIBUTION_KINDS = ("choice", "uniform", "loguniform", "int")
STEERING_METHODS = tuple(METHODS)  # the registry's names (vs2ray.methods)
BUNDLED_MODEL = "vs2ray-tiny"
BUNDLED_MODELS = (BUNDLED_MODEL, "vs2ray-tiny-reader")  # open_clip configs and weights in vs2ray/assets
BUNDLED_RETRIEVAL_ENCODER = "vs2ray-tiny-retrieval"  # the bundled stand-in for DINOv2 (retrieval.encoder)


class ConfigError(ValueError):
    """An invalid configuration; `problems` holds one readable line per problem."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


class Distribution(BaseModel):
    """A search-space distribution: `choice` over values, `uniform`/`loguniform` over floats, `int` range."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["choice", "uniform", "loguniform", "int"]
    values: tuple[Any, ...]

    @model_serializer
    def to_yaml(self) -> dict[str, list[Any]]:
        """The form this distribution is written in, e.g. {'uniform': [1.0, 3.0]} (also in dumps)."""
        return {self.kind: list(self.values)}


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _searchable(scalar: Any, allowed: str, allow: tuple[str, ...] = DISTRIBUTION_KINDS, grid_list: bool = False) -> Any:
    """A field type taking a constant of type `scalar` or a distribution over such values.

    `allowed` describes valid constants in words, for error messages. With `grid_list`, a
    plain list of constants is accepted too (a tuple: every value evaluated inside each trial).
    """
    adapter = TypeAdapter(scalar)
    dist_help = " or a distribution " + " / ".join(f"{{{k}: ...}}" for k in allow)

    def check_scalar(value: Any, where: str = "") -> Any:
        if isinstance(value, bool):  # YAML `yes`/`true` would otherwise pass as 1
            raise PydanticCustomError("search_value", f"{where}got {_describe(value)}; expected {allowed}")
        try:
            return adapter.validate_python(value)
        except ValidationError:
            raise PydanticCustomError("search_value", f"{where}got {_describe(value)}; expected {allowed}") from None

    def validate(value: Any) -> Any:
        if isinstance(value, Distribution):
            return value
        if not isinstance(value, dict):
            if isinstance(value, (list, tuple)) and grid_list and value:
                return tuple(check_scalar(v, "list entry ") for v in value)
            if isinstance(value, (list, tuple)):
                raise PydanticCustomError(
                    "search_value", f"got the list {_describe(value)}; write a choice as {{choice: [...]}}"
                )
            try:
                return check_scalar(value)
            except PydanticCustomError as error:
                raise PydanticCustomError("search_value", error.message() + dist_help) from None
        if len(value) != 1 or next(iter(value)) not in allow:
            raise PydanticCustomError(
                "search_value",
                f"got {_describe(value)}; a distribution has exactly one key, one of: {', '.join(allow)}",
            )
        kind, spec = next(iter(value.items()))
        if kind == "choice":
            if not isinstance(spec, list) or not spec:
                raise PydanticCustomError("search_value", f"choice needs a non-empty list, got {_describe(spec)}")
            return Distribution(kind=kind, values=tuple(check_scalar(v, "choice entry ") for v in spec))
        if not isinstance(spec, list) or len(spec) != 2:
            raise PydanticCustomError("search_value", f"{kind} needs [low, high], got {_describe(spec)}")
        low, high = (check_scalar(v, f"{kind} bound ") for v in spec)
        if kind == "int" and not all(isinstance(v, int) for v in (low, high)):
            raise PydanticCustomError("search_value", f"int needs integer bounds, got {_describe(spec)}")
        if not low < high:
            raise PydanticCustomError("search_value", f"{kind} needs low < high, got {_describe(spec)}")
        if kind == "loguniform" and low <= 0:
            raise PydanticCustomError("search_value", f"loguniform needs low > 0, got {_describe(spec)}")
        return Distribution(kind=kind, values=(low, high))

    return Annotated[Any, PlainValidator(validate), Searchable(allowed, allow, grid_list)]


@dataclass(frozen=True)
class Searchable:
    """What a searchable field accepts, in words (read by the config reference page's generator)."""

    allowed: str  # its constants
    kinds: tuple[str, ...]  # the distributions it takes
    grid_list: bool  # whether a plain list is gridded inside each trial

    def describe(self) -> str:
        distributions = " / ".join(f"{{{kind}: ...}}" for kind in self.kinds)
        listed = ", or a list gridded in each trial" if self.grid_list else ""
        return f"{self.allowed}, or a distribution {distributions}{listed}"


NUMERIC = ("choice", "uniform", "loguniform")
if TYPE_CHECKING:  # to the type checker a searchable field is Any: a constant or a Distribution, checked at runtime
    PositiveInt: TypeAlias = Any
    PositiveFloat: TypeAlias = Any
    NonNegativeFloat: TypeAlias = Any
    AtLeastOneFloat: TypeAlias = Any
    UnitFloat: TypeAlias = Any
    LayerIndex: TypeAlias = Any
    TokenSet: TypeAlias = Any
    SAEKindChoice: TypeAlias = Any
    NormalizationChoice: TypeAlias = Any
    MomentumFloat: TypeAlias = Any
    PositiveRuleChoice: TypeAlias = Any
else:
    PositiveInt = _searchable(Annotated[int, Field(ge=1)], "an integer >= 1", ("choice", "int"))
    PositiveFloat = _searchable(Annotated[float, Field(gt=0)], "a number > 0", NUMERIC)
    NonNegativeFloat = _searchable(Annotated[float, Field(ge=0)], "a number >= 0", NUMERIC)
    AtLeastOneFloat = _searchable(Annotated[float, Field(ge=1)], "a number >= 1", NUMERIC)
    UnitFloat = _searchable(Annotated[float, Field(ge=0, le=1)], "a number in [0, 1]", NUMERIC)
    LayerIndex = _searchable(int, "a block index (negative counts from the end)", ("choice",))
    TokenSet = _searchable(Literal["cls", "all", "patches"], "'cls', 'all' or 'patches'", ("choice",))
    SAEKindChoice = _searchable(SAEKind, "one of " + ", ".join(f"'{kind}'" for kind in SAE_KINDS), ("choice",))
    NormalizationChoice = _searchable(Normalization, "'none' or 'layer_norm'", ("choice",))
    MomentumFloat = _searchable(Annotated[float, Field(ge=0, lt=1)], "a number in [0, 1)", NUMERIC)
    PositiveRuleChoice = _searchable(Literal["query", "majority"], "'query' or 'majority'", ("choice",), grid_list=True)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class ModelConfig(Section):
    arch: str = Field(
        BUNDLED_MODEL,
        description="open_clip architecture, e.g. ViT-B-32, or a bundled one: vs2ray-tiny, or vs2ray-tiny-reader "
        "(64 px; it reads, for shapes_typographic)",
    )
    pretrained: str = Field(
        "bundled", description="open_clip tag (openai), a local checkpoint file, 'bundled', or 'random' (benchmarks)"
    )
    cache_dir: str | None = Field(None, description="where open_clip caches downloaded weights")
    precision: Literal["fp32", "tf32", "bf16", "fp16"] = Field(
        "fp32",
        description="the encoder's forward passes (extraction, zero-shot, steering inside the encoder): fp32, "
        "tf32 (CUDA matmuls in TensorFloat-32), or bf16 / fp16 autocast with fp32 weights; part of the store key",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="auto: the GPUs Ray gives a worker (none: the CPU); cpu: never a GPU; cuda: a GPU or an error",
    )

    @model_validator(mode="after")
    def _bundled_only_for_tiny(self) -> ModelConfig:
        if self.pretrained == "bundled" and self.arch not in BUNDLED_MODELS:
            raise PydanticCustomError(
                "model_pair",
                f"pretrained: bundled goes with arch: {' or '.join(BUNDLED_MODELS)} only; give {self.arch} a tag "
                f"or a file "
                f"(got arch={self.arch!r}, pretrained={self.pretrained!r})",
            )
        return self


DATASETS_WITH_GROUPS = (
    "shapes_spurious",
    "shapes_typographic",
    "waterbirds",
    "celeba",
    "rta100",
    "paint_typographic",
)  # their records carry a nuisance attribute
# their attribute is the class whose name is written on the image (a value past the classes: no word)
TYPOGRAPHIC_DATASETS = ("shapes_typographic", "rta100", "paint_typographic")
WITH_CLEAN_IMAGES = ("shapes_typographic",)  # typographic datasets that also have images without a word


class DatasetConfig(Section):
    name: Literal[
        "shapes",
        "shapes_spurious",
        "shapes_typographic",
        "cifar100",
        "imagefolder",
        "huggingface",
        "waterbirds",
        "celeba",
        "rta100",
        "paint_typographic",
    ] = Field("shapes", description="the dataset (the registry in vs2ray/data/)")
    root: str | None = Field(
        None,
        description="local copy of the data (every dataset but shapes and huggingface; the HF cache)",
    )
    download: bool = Field(False, description="cifar100: download into root when missing")
    seed: int = Field(
        0,
        description="shapes, shapes_spurious, shapes_typographic: generation seed; rta100, paint_typographic: "
        "the train/val/test split",
    )
    sizes: dict[Literal["train", "test", "val", "pretrain"], Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict,
        description="shapes: images per split (default train 20000, test 5000, val 2000; shapes_spurious "
        "10000, 4000, 1000; shapes_typographic 10000, 3000, 2000)",
    )
    spurious_agreement: float = Field(
        0.95, ge=0.0, le=1.0, description="shapes_spurious: share of train images whose colour agrees with the class"
    )
    target_attribute: str = Field("Blond_Hair", description="celeba: the attribute that is the class")
    group_attribute: str = Field("Male", description="celeba: the attribute that makes the groups")
    train_split: str = Field("train", description="the split the SAE trains on and validation rows are carved from")
    test_split: str = Field("test", description="the split test figures are reported on")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of train held out for selection")
    val_split: str | None = Field(
        None,
        description="a split of its own to select on (Waterbirds / CelebA: val, the official one), "
        "every train image then trains; default: dataset.val_fraction of train",
    )
    class_names: list[str] | None = Field(None, description="class names in label order, overriding the dataset's")
    prompt_templates: list[str] | None = Field(None, description="zero-shot prompts with one '{}'")
    hf_path: str | None = Field(None, description="huggingface: dataset id, e.g. 'uoft-cs/cifar100'")
    image_column: str = Field("image", description="huggingface: the image column")
    label_column: str = Field("label", description="huggingface: the label column")

    @model_validator(mode="after")
    def _needs_for_source(self) -> DatasetConfig:
        if (
            self.name in ("cifar100", "imagefolder", "waterbirds", "celeba", "rta100", "paint_typographic")
            and not self.root
        ):
            raise PydanticCustomError("dataset_root", f"dataset.name: {self.name} needs dataset.root (a directory)")
        if self.name == "huggingface" and not self.hf_path:
            raise PydanticCustomError("dataset_hf", "dataset.name: huggingface needs dataset.hf_path")
        if self.val_split is not None and self.val_split in (self.train_split, self.test_split):
            raise PydanticCustomError(
                "dataset_val_split", f"dataset.val_split: {self.val_split!r} is the train or the test split"
            )
        bad = [t for t in self.prompt_templates or [] if t.count("{}") != 1]
        if bad:
            raise PydanticCustomError("dataset_prompt", f"prompt_templates need exactly one '{{}}' each: {bad}")
        return self


class ExtractionConfig(Section):
    layers: list[int] = Field([-1], min_length=1, description="resblock indices; negative counts from the end")
    tokens: Literal["cls", "all"] = Field(
        "cls", description="cls: the [CLS] token of each block; all: every token too (steering inside the encoder)"
    )
    batch_size: int = Field(256, ge=1, description="images per chunk: one encoder forward pass and one part file")
    num_workers: int | None = Field(None, ge=1, description="encoder actors, a fixed pool; default: a pool that grows")
    max_workers: int | None = Field(
        None, ge=1, description="the most GPU encoder actors the pool grows to; default: the cluster's GPUs"
    )
    gpus_per_worker: float = Field(1.0, ge=0.0, le=8.0, description="GPU share of one encoder actor")
    cpus_per_worker: float = Field(
        0.25, gt=0.0, description="CPU share of one encoder actor (fractional, so Ray Data keeps CPUs for decoding)"
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32",
        description="how activation columns (cls_*, tokens_*) are stored; readers up-cast to float32 per batch. "
        "float16/bfloat16 halve the store and are part of its key",
    )


class SAEConfig(Section):
    layer: LayerIndex = Field(-1, description="block whose activations the SAE reads and steering changes")
    from_: str | None = Field(
        None,
        alias="from",
        description="steer with this SAE instead of training one: a vs2ray SAE dir or export, a sparsify, SAELens "
        "or ViT-Prisma checkpoint dir, a saev file, or a Hugging Face Hub id (vs2ray/interop.py)",
    )
    tokens: TokenSet = Field(
        "cls",
        description="train (and steer) on the [CLS] token, on every token, or on the patch tokens without [CLS] "
        "(searchable)",
    )
    kind: SAEKindChoice = Field(
        "topk",
        description="topk (the paper's), batchtopk, matryoshka, jumprelu or relu_l1 (the companion paper's); "
        "searchable (METHOD.md §9)",
    )
    normalize: NormalizationChoice = Field(
        "none", description="layer_norm: the SAE codes each row's layer norm (x − μ)/σ (searchable)"
    )
    k: PositiveInt = Field(
        64, description="active latents per sample; per sample on average for batchtopk / matryoshka (searchable)"
    )
    expansion: PositiveInt = Field(4, description="latent width = expansion × d (searchable)")
    topk: Literal["relu", "abs"] = Field(
        "relu", description="kind topk only; relu: Gao et al.; abs: largest |value| (paper)"
    )
    prefixes: PositiveInt = Field(
        4, description="matryoshka: nested dictionary prefixes n/2^(p−1), …, n/2, n, each trained to reconstruct"
    )
    l1_coef: NonNegativeFloat = Field(
        0.3, description="relu_l1: weight of Σ z_i‖W_dec[i]‖ / Σ‖x − x̄‖ over a batch (searchable)"
    )
    l0_coef: NonNegativeFloat = Field(0.03, description="jumprelu: weight of the mean L0 beside the FVU (searchable)")
    bandwidth: PositiveFloat = Field(1e-3, description="jumprelu: width ε of the straight-through kernel")
    jumprelu_threshold: PositiveFloat = Field(1e-3, description="jumprelu: every latent's threshold θ at the start")
    threshold_lr_scale: PositiveFloat = Field(
        20.0,
        description="jumprelu: θ's learning rate over sae.lr (Adam moves θ by about its learning rate a step: "
        "short runs need it larger)",
    )
    sparsity_warmup_steps: int = Field(
        200, ge=0, description="relu_l1, jumprelu: steps over which the sparsity weight rises from 0"
    )
    init: Literal["linear", "tied"] = Field(
        "linear", description="linear: sparsify's initialisation; tied: encoder = the unit-norm decoder"
    )
    encoder_bias: bool = Field(True, description="a trained encoder bias b_enc, as sparsify's SAEs have")
    precision: Literal["fp32", "tf32", "bf16", "fp16"] = Field(
        "fp32", description="SAE training's forward passes (fp32 master weights and loss); part of the SAE key"
    )
    lr: PositiveFloat = Field(5e-4, description="base learning rate (searchable)")
    lr_scale_with_width: bool = Field(False, description="scale the learning rate with latent width as sparsify does")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps")
    steps: int = Field(2000, ge=1, description="training steps")
    epochs: float | None = Field(None, gt=0, description="passes over the data; overrides steps when set")
    batch_size: int = Field(4096, ge=1, description="activations per step")
    dead_threshold: int = Field(
        100, ge=1, description="samples without firing after which a latent counts as dead and joins the AuxK loss"
    )
    auxk_coef: NonNegativeFloat = Field(1 / 32, description="AuxK loss weight, 0 disables it (searchable)")
    auxk_k: int | None = Field(None, ge=1, description="latents in the AuxK loss; default d/2")
    report_every: int | None = Field(
        250, ge=1, description="SAE steps between a trial's intermediate results (early stopping); null: none"
    )


class PassConfig(Section):
    w_aux: NonNegativeFloat = Field(0.0, description="PASS prototype-alignment weight; 0 = plain top-k SAE")
    momentum: MomentumFloat = Field(
        0.9, description="running class-mean update rate; searched only in trials with w_aux > 0"
    )


class SteeringConfig(Section):
    methods: list[Literal[STEERING_METHODS]] = Field(  # type: ignore[valid-type]
        ["zero_shot", "sae_rec_final", "sae_rec_amplified", "vs2"],
        min_length=1,
        description="the methods every trial evaluates: any of the registry (vs2ray/methods.py)",
    )

    @field_validator("methods")
    @classmethod
    def _methods_are_available(cls, methods: list[str]) -> list[str]:
        for name in methods:
            if METHODS[name].steer is None:
                raise PydanticCustomError(
                    "method_unavailable", f"{name} is not available yet: {METHODS[name].unavailable}"
                )
        return methods

    gamma: AtLeastOneFloat = Field(1.5, description="amplification γ >= 1 (searchable; a range is gridded in a trial)")
    lambda_: NonNegativeFloat = Field(2.1, alias="lambda", description="steering scale λ >= 0 (searchable)")
    gate_quantiles: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        [0.9, 0.95, 0.99, 0.995], description="FVU-gate quantiles q, each evaluated"
    )
    rag_alpha: UnitFloat = Field(0.5, description="weighted-RAG mixing weight a in [0, 1] (searchable)")
    ablate_latents: list[PositiveInt] = Field(
        [1, 2, 4, 8, 16], min_length=1, description="ablate: how many of the top-scoring latents to zero (a grid)"
    )
    ablate_score: list[Literal["within_class", "correlation", "text_present"]] = Field(
        ["within_class", "correlation"],
        min_length=1,
        description="ablate: latent-attribute association (a grid); text_present (typographic datasets with clean "
        "images): a word written or not, within the class",
    )
    select_by: Literal["top1", "worst_group"] = Field(
        "top1", description="pick each method's setting by validation top-1 or worst-group accuracy (groups only)"
    )


class SteerabilityConfig(Section):
    enabled: bool = Field(False, description="measure S of sampled latents and neurons in every trial")
    probe_images: PositiveInt = Field(64, description="validation images each steered unit is measured on")
    units: PositiveInt = Field(64, description="latents sampled, and neurons sampled, per trial")
    score: Literal["sum_squares", "top_gain"] = Field(
        "sum_squares",
        description="sum_squares: the authors' S_f = Σ_c (Δ̄p_c)²; top_gain: the mass the `top` top concepts gain",
    )
    clamp: Literal["absolute", "relative"] = Field(
        "absolute", description="amplify sets a unit to `value` (absolute), or to `strength` × its on-level (relative)"
    )
    value: float = Field(
        150.0, description="clamp: absolute: the value a latent or neuron is set to (the authors' 150)"
    )
    strength: PositiveFloat = Field(
        10.0, description="clamp: relative: amplify clamps a unit to strength × its on-level"
    )
    quantile: float = Field(0.9, gt=0.0, le=1.0, description="a unit's on-level: this quantile of its positive values")
    direction: Literal["amplify", "both"] = Field(
        "amplify", description="amplify only (the authors'), or the larger score of amplify and suppress (clamp to 0)"
    )
    top: PositiveInt = Field(1, description="top concepts reported per unit (and whose gain makes S under top_gain)")
    threshold: float = Field(0.1, gt=0.0, le=1.0, description="steerable: S_f > threshold, or top_gain ≥ threshold")
    vocabulary: str | None = Field(
        None,
        description="word list file (one concept per line), or common-words-5k (the authors' 5,000 words, shipped); "
        "default: the dataset's class and attribute words",
    )
    template: str = Field("a photo of a {}.", description="prompt each concept word fills (one '{}'; '{}': bare words)")

    @field_validator("template")
    @classmethod
    def _one_slot(cls, template: str) -> str:
        if template.count("{}") != 1:
            raise PydanticCustomError("model_template", f"steerability.template needs exactly one '{{}}': {template!r}")
        return template


class RetrievalConfig(Section):
    space: Literal["clip", "dinov2"] = Field(
        "clip",
        description="neighbour search in CLIP's embedding, or a retrieval encoder's (the store's retrieval column)",
    )
    encoder: str = Field(
        "vit_base_patch14_dinov2.lvd142m",
        description=f"timm model extracted for space: dinov2, or {BUNDLED_RETRIEVAL_ENCODER} (bundled, 32 px)",
    )
    encoder_pretrained: bool = Field(True, description="false: seeded random weights (tests and benchmarks only)")
    image_size: int = Field(224, ge=14, description="input size of the retrieval encoder")
    n_neighbors: PositiveInt = Field(50, description="neighbours N for VS2++ and the retrieval baselines (searchable)")
    positive_rule: PositiveRuleChoice = Field(
        ("query", "majority"),
        description="how S+ is chosen: query (the query's zero-shot label) or majority (the neighbours' most "
        "frequent label); a list is gridded inside every trial",
    )
    empty_negatives: Literal["pool_mean", "skip"] = Field(
        "pool_mean",
        description="VS2++ and CLIP-space steering when every neighbour is a positive (S− empty): pool_mean steers "
        "toward S+ against the pool's mean code (or embedding); skip leaves the query unsteered",
    )
    index: Literal["flat", "ivf", "hnsw"] = Field("flat", description="the FAISS index")
    num_shards: int = Field(1, ge=1, description="index shards, one Ray actor each")
    use_gpu: Literal["auto", "yes", "no"] = Field(
        "auto", description="auto: on the GPU a shard was given (retrieval.gpus_per_shard); yes: a GPU or an error"
    )
    gpus_per_shard: float = Field(0.0, ge=0.0, le=8.0, description="GPU share each FAISS actor reserves (sweeps)")


class SearchConfig(Section):
    num_samples: int = Field(20, ge=1, description="trials")
    max_concurrent_trials: int = Field(4, ge=1, description="trials running at once")
    metric: str | list[str] = Field(
        "val_top1_vs2", description="reported metric Optuna optimises; a list [accuracy, fvu] is multi-objective"
    )
    mode: Literal["max", "min"] | list[Literal["max", "min"]] = Field(
        "max", description="max or min, one per search.metric"
    )
    sampler: Literal["tpe", "random", "nsga2"] = Field("tpe", description="Optuna's sampler")
    seed: int | None = Field(None, description="sampler seed; default: the top-level seed")
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list, description="first trials, e.g. the paper's defaults: {sae.k: 64, ...}"
    )
    max_failures: int = Field(1, ge=0, description="times a failed trial is retried before it counts as failed")
    reuse_actors: bool = Field(
        True, description="run a trial in a finished trial's worker process (no new process, imports and data load)"
    )
    allow_test_selection: bool = Field(
        False, description="let search.metric name a test_* metric (Optuna then selects on test: optimistic)"
    )
    scheduler: Literal["fifo", "asha", "hyperband", "median"] = Field(
        "fifo", description="trial scheduler; asha, hyperband and median stop poor SAE trials early"
    )
    grace_period: int = Field(250, ge=1, description="SAE steps a trial runs before it can be stopped")
    reduction_factor: float = Field(3.0, gt=1.0, description="asha / hyperband: 1/fraction of trials kept per rung")
    max_t: int | None = Field(None, ge=1, description="asha / hyperband: SAE steps of a full trial; default sae.steps")
    brackets: int = Field(3, ge=1, description="hyperband: brackets of the asynchronous HyperBand (asha is one)")

    @property
    def metrics(self) -> list[str]:
        """The objectives, first one first (the one tables rank by)."""
        return self.metric if isinstance(self.metric, list) else [self.metric]

    @property
    def modes(self) -> list[str]:
        return list(self.mode) if isinstance(self.mode, list) else [self.mode]

    @model_validator(mode="after")
    def _metric_and_mode_agree(self) -> SearchConfig:
        if len(self.metrics) != len(self.modes) or not self.metrics:
            raise PydanticCustomError(
                "search_metric",
                f"metric and mode need one entry each per objective, got {self.metrics} and {self.modes}",
            )
        on_test = [m for m in self.metrics if m.startswith("test_")]
        if on_test and not self.allow_test_selection:
            raise PydanticCustomError(
                "search_metric",
                f"search.metric: {on_test} would make Optuna select on the test split, so the reported test "
                f"accuracy is no longer held out; use the val_* metric, or set search.allow_test_selection: true "
                f"to reproduce the paper's test-selected figures knowingly",
            )
        return self


class TrackingConfig(Section):
    mlflow: bool = Field(False, description="log every trial to MLflow (Tune's MLflowLoggerCallback)")
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else <experiment>/mlflow.db (SQLite)"
    )
    wandb: bool = Field(False, description="log every trial to Weights & Biases (Tune's WandbLoggerCallback)")
    wandb_project: str = Field("vs2ray", description="the W&B project")
    wandb_mode: Literal["offline", "online"] = Field("offline", description="offline needs no account")
    tensorboard: bool = Field(False, description="TensorBoard event files in every trial dir (tensorboardX)")
    optuna_storage: Literal["none", "journal", "sqlite"] = Field(
        "none", description="persist the Optuna study next to the experiment (optuna-dashboard opens it)"
    )


class ResourcesConfig(Section):
    cpus_per_trial: float = Field(1.0, gt=0.0, description="CPUs per trial")
    gpus_per_trial: float = Field(
        0.0, ge=0.0, description="GPU share per trial (fractions allowed; 0: the CPU, even on a GPU node)"
    )


class StorageConfig(Section):
    root: str = Field(
        default_factory=lambda: os.environ.get("VS2RAY_ROOT", "~/vs2ray"),
        description="activation stores and SAE checkpoints; a path every node sees (default $VS2RAY_ROOT or ~/vs2ray)",
    )
    experiments: str | None = Field(
        default_factory=lambda: os.environ.get("VS2RAY_EXPERIMENTS"),
        description="Tune experiment dir, local or s3:// / gs:// (default $VS2RAY_EXPERIMENTS or <root>/experiments)",
    )


class ExperimentConfig(Section):
    name: str = Field("quickstart", description="experiment name (experiment dirs are <name>-<date>-<time>)")
    seed: int = Field(0, description="seed of every random choice that has no seed of its own")
    model: ModelConfig = Field(default_factory=ModelConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    extraction: ExtractionConfig = Field(default_factory=ExtractionConfig)
    sae: SAEConfig = Field(default_factory=SAEConfig)
    pass_: PassConfig = Field(default_factory=PassConfig, alias="pass")
    steering: SteeringConfig = Field(default_factory=SteeringConfig)
    steerability: SteerabilityConfig = Field(default_factory=SteerabilityConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _stored_tokens_serve_the_sae(self) -> ExperimentConfig:
        # whether sae.layer's blocks are among extraction.layers needs the model's depth: stages.blocks_to_load
        if "sae_rec_all" in self.steering.methods and (
            self.extraction.tokens != "all" or 0 not in self.extraction.layers
        ):
            raise PydanticCustomError(
                "model_tokens",
                "steering.methods: sae_rec_all needs extraction.tokens: all and every block in extraction.layers "
                "(from 0 to -1), since it replaces every block's output in one forward pass",
            )
        if self.sae.from_ is not None and "sae_rec_all" in self.steering.methods:
            raise PydanticCustomError(
                "model_tokens",
                "sae.from: one SAE cannot be every block's: sae_rec_all trains one SAE per block; drop one of them",
            )
        token_sets = {"all", "patches"} & set(values_of(self.sae.tokens))
        if token_sets and self.extraction.tokens != "all":
            raise PydanticCustomError(
                "model_tokens",
                f"sae.tokens: {' and '.join(sorted(token_sets))} needs extraction.tokens: all (the store must hold "
                f"every token)",
            )
        needs_groups = ["ablate"] * ("ablate" in self.steering.methods)
        needs_groups += ["select_by: worst_group"] * (self.steering.select_by == "worst_group")
        if needs_groups and self.dataset.name not in DATASETS_WITH_GROUPS:
            raise PydanticCustomError(
                "model_groups",
                f"steering: {' and '.join(needs_groups)}: needs group labels, and dataset.name "
                f"{self.dataset.name!r} has none (datasets with groups: {', '.join(DATASETS_WITH_GROUPS)})",
            )
        if "text_present" in self.steering.ablate_score and self.dataset.name not in WITH_CLEAN_IMAGES:
            raise PydanticCustomError(
                "model_text_present",
                f"steering.ablate_score: text_present needs images with and without a word written on them "
                f"(dataset.name: {', '.join(WITH_CLEAN_IMAGES)}); {self.dataset.name!r} has no such images",
            )
        return self


def full_steps(config: ExperimentConfig) -> int:
    """The SAE steps of a fully trained trial: the schedulers' `max_t` (default `sae.steps`)."""
    return config.search.max_t or config.sae.steps


def values_of(value: Any) -> list[Any]:
    """Every value a searchable key takes: a distribution's choices, or the one constant."""
    return list(value.values) if isinstance(value, Distribution) else [value]


def search_space(config: BaseModel, prefix: str = "") -> Iterator[tuple[str, Distribution]]:
    """Yield (key path, distribution) for every searchable value that is not a constant."""
    for field_name, field in type(config).model_fields.items():
        key = f"{prefix}{field.alias or field_name}"
        value = getattr(config, field_name)
        if isinstance(value, Distribution):
            yield key, value
        elif isinstance(value, BaseModel):
            yield from search_space(value, key + ".")


def _model_at(model_cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section class reached by following `loc` (aliases) from `model_cls`, if any."""
    current = model_cls
    for part in loc:
        fields = {f.alias or name: f for name, f in current.model_fields.items()}
        annotation = fields[part].annotation if part in fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        current = annotation
    return current


def _format_error(error: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        section = _model_at(ExperimentConfig, loc[:-1])
        allowed = sorted(f.alias or n for n, f in section.model_fields.items()) if section else []
        return f"{path}: unknown key; allowed keys here: {', '.join(allowed)}"
    if kind == "missing":
        return f"{path}: required key is missing"
    message = error["msg"]
    if kind.startswith(("search_", "model_", "dataset_")):
        return f"{path}: {message}"
    return f"{path}: got {_describe(error.get('input'))}; {message[0].lower() + message[1:]}"


def validate_config(raw: Any, source: str = "config") -> ExperimentConfig:
    """Validate a parsed YAML mapping into an ExperimentConfig, or raise ConfigError."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"the top level must be a mapping of sections, got {type(raw).__name__}"], source)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError([_format_error(dict(e)) for e in error.errors()], source) from None


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override to a raw config mapping in place.

    The value is parsed as YAML, so `--set sae.k=128`, `--set steering.methods=[vs2]`
    and `--set "sae.k={choice: [32, 64]}"` all work.
    """
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"--set {assignment!r}: expected key.path=value"], "--set")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError([f"--set {key}: value {text!r} is not valid YAML ({error})"], "--set") from None
    _set_path(raw, key.strip(), value, source="--set")


def _set_path(raw: dict[str, Any], key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError([f"{source} {key}: {where} is a value, not a section"], source)
        node = child
    node[parts[-1]] = value


def config_with(config: ExperimentConfig, values: dict[str, Any], source: str = "trial") -> ExperimentConfig:
    """A copy of `config` with dotted keys set to fixed values (a trial's sampled parameters), validated."""
    raw = config.model_dump(mode="json", by_alias=True)
    for key, value in values.items():
        _set_path(raw, key, value, source)
    return validate_config(raw, source)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML config (defaults only if `path` is None), apply `key=value` overrides, validate.

    Raises ConfigError (one line per problem) for a missing file, bad YAML or bad values.
    """
    source = str(path) if path is not None else "defaults"
    raw: Any = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError([f"config file {str(file)!r} does not exist"], source)
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError([f"not valid YAML: {error}"], source) from None
    if overrides and not isinstance(raw, dict):
        raise ConfigError(["the top level must be a mapping of sections"], source)
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate_config(raw, source)


def config_to_yaml(config: ExperimentConfig) -> str:
    """Serialise a config back to YAML that `load_config` reads into an equal config."""
    return str(yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False))
