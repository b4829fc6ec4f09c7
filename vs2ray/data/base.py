"""The dataset interface every source implements.

A dataset is listed cheaply (`records`: id, label and a reference per image, no
pixels) and loaded per image (`load_image`), so a distributed reader can hand out
records to workers and let each worker decode only its own images.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

# Prompt ensemble used when a dataset has no better one (CLIP's short ImageNet set).
GENERIC_PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
)


class DatasetUnavailable(RuntimeError):
    """A dataset's files are missing and cannot be fetched here; the message says how to fix it."""


@dataclass(frozen=True)
class ImageRecord:
    """One image of a split: a stable integer id, its label, and where to load it from.

    `ref` is dataset-specific (a file path, or an index into an in-memory array). `attribute` is the
    nuisance attribute of a dataset with groups (an index into `ImageDataset.attribute_names`), else -1.
    """

    id: int
    label: int
    ref: str
    attribute: int = -1


class ImageDataset(ABC):
    """A labelled image dataset with named splits."""

    name: str = ""
    prompt_templates: tuple[str, ...] = GENERIC_PROMPT_TEMPLATES
    attribute_names: tuple[str, ...] = ()  # a dataset with groups (class × attribute) names its attribute values

    @property
    @abstractmethod
    def classes(self) -> list[str]:
        """Human-readable class names, indexed by label."""

    @property
    @abstractmethod
    def splits(self) -> tuple[str, ...]:
        """The split names this dataset has (e.g. ('train', 'test'))."""

    @abstractmethod
    def records(self, split: str) -> list[ImageRecord]:
        """Every image of `split` as (id, label, ref), in id order, without decoding pixels."""

    @abstractmethod
    def load_image(self, split: str, ref: str) -> Image.Image:
        """Decode one image of `split` as RGB. Raises on a corrupt or unreadable file."""

    @property
    def concept_words(self) -> list[str]:
        """The concept vocabulary steerability measures over by default: class names, then attribute values."""
        return list(dict.fromkeys([*self.classes, *self.attribute_names]))

    def group_of(self, label: int, attribute: int) -> int:
        """The group index of (class, attribute): label · len(attribute_names) + attribute; -1 without groups."""
        return label * len(self.attribute_names) + attribute if attribute >= 0 else -1

    def num_images(self, split: str) -> int:
        """Number of images in `split`."""
        return len(self.records(split))

    def check_split(self, split: str) -> None:
        """Raise a ValueError naming the available splits if `split` is not one of them."""
        if split not in self.splits:
            raise ValueError(f"dataset {self.name!r} has no split {split!r}; available: {list(self.splits)}")

    def iter_images(self, split: str) -> Iterator[tuple[int, int, Image.Image]]:
        """Yield (id, label, RGB image) for every image of `split`, in id order."""
        for record in self.records(split):
            yield record.id, record.label, self.load_image(split, record.ref)


def readable_class_name(folder_name: str) -> str:
    """Turn a folder or label name into words: '001.Black_footed_Albatross' -> 'Black footed Albatross'."""
    name = re.sub(r"^\d+[._-]", "", folder_name)
    return name.replace("_", " ").strip()
