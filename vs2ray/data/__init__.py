"""Dataset registry: `get_dataset(config.dataset)` returns an `ImageDataset`."""

from __future__ import annotations

from collections.abc import Callable

from vs2ray.config import DatasetConfig
from vs2ray.data.base import DatasetUnavailable, ImageDataset, ImageRecord
from vs2ray.data.cifar100 import Cifar100Dataset
from vs2ray.data.groups import CelebADataset, WaterbirdsDataset
from vs2ray.data.huggingface import HuggingFaceDataset
from vs2ray.data.imagefolder import ImageFolderDataset
from vs2ray.data.shapes import ShapesDataset, SpuriousShapesDataset, TypographicShapesDataset
from vs2ray.data.typographic import PaintTypographicDataset, RTA100Dataset


def _given(config: DatasetConfig, key: str) -> str:
    """The config's `dataset.<key>`, which this dataset needs: a clear error where it is unset."""
    value = getattr(config, key)
    if value is None:
        raise DatasetUnavailable(f"dataset.{key}: dataset {config.name!r} needs it set (a path or a name)")
    return str(value)


DATASETS: dict[str, Callable[[DatasetConfig], ImageDataset]] = {
    "shapes": lambda c: ShapesDataset(seed=c.seed, split_sizes={str(k): v for k, v in c.sizes.items()}),
    "shapes_spurious": lambda c: SpuriousShapesDataset(
        seed=c.seed, split_sizes={str(k): v for k, v in c.sizes.items()}, agreement=c.spurious_agreement
    ),
    "shapes_typographic": lambda c: TypographicShapesDataset(
        seed=c.seed, split_sizes={str(k): v for k, v in c.sizes.items()}
    ),
    "waterbirds": lambda c: WaterbirdsDataset(root=_given(c, "root")),
    "celeba": lambda c: CelebADataset(
        root=_given(c, "root"), target_attribute=c.target_attribute, group_attribute=c.group_attribute
    ),
    "rta100": lambda c: RTA100Dataset(root=_given(c, "root"), seed=c.seed),
    "paint_typographic": lambda c: PaintTypographicDataset(root=_given(c, "root"), seed=c.seed),
    "cifar100": lambda c: Cifar100Dataset(root=_given(c, "root"), download=c.download),
    "imagefolder": lambda c: ImageFolderDataset(root=_given(c, "root"), class_names=c.class_names),
    "huggingface": lambda c: HuggingFaceDataset(
        path=_given(c, "hf_path"),
        splits=(c.train_split, c.test_split),
        cache_dir=c.root,
        image_column=c.image_column,
        label_column=c.label_column,
        class_names=c.class_names,
    ),
}


def get_dataset(config: DatasetConfig) -> ImageDataset:
    """Instantiate the dataset named by `config.name` (files are only touched when first read)."""
    return DATASETS[config.name](config)


def prompt_templates_for(config: DatasetConfig, dataset: ImageDataset) -> list[str]:
    """The zero-shot prompt templates: the config's if set, else the dataset's default ensemble."""
    return list(config.prompt_templates or dataset.prompt_templates)


__all__ = [
    "DATASETS",
    "DatasetUnavailable",
    "ImageDataset",
    "ImageRecord",
    "get_dataset",
    "prompt_templates_for",
]
