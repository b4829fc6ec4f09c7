"""Dataset registry: `get_dataset(config.dataset)` returns an `ImageDataset`."""

from __future__ import annotations

from collections.abc import Callable

from vs2ray.config import DatasetConfig
from vs2ray.data.base import DatasetUnavailable, ImageDataset, ImageRecord
from vs2ray.data.cifar100 import Cifar100Dataset
from vs2ray.data.groups import CelebADataset, WaterbirdsDataset
from vs2ray.data.huggingface import HuggingFaceDataset
from vs2ray.data.imagefolder import ImageFolderDataset
from vs2ray.data.shapes import ShapesDataset, SpuriousShapesDataset

DATASETS: dict[str, Callable[[DatasetConfig], ImageDataset]] = {
    "shapes": lambda c: ShapesDataset(seed=c.seed, split_sizes=dict(c.sizes)),
    "shapes_spurious": lambda c: SpuriousShapesDataset(
        seed=c.seed, split_sizes=dict(c.sizes), agreement=c.spurious_agreement
    ),
    "waterbirds": lambda c: WaterbirdsDataset(root=c.root),
    "celeba": lambda c: CelebADataset(
        root=c.root, target_attribute=c.target_attribute, group_attribute=c.group_attribute
    ),
    "cifar100": lambda c: Cifar100Dataset(root=c.root, download=c.download),
    "imagefolder": lambda c: ImageFolderDataset(root=c.root, class_names=c.class_names),
    "huggingface": lambda c: HuggingFaceDataset(
        path=c.hf_path,
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
