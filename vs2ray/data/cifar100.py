"""CIFAR-100 through torchvision (50,000 train / 10,000 test images, 100 classes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vs2ray.data.base import DatasetUnavailable, ImageDataset, ImageRecord, readable_class_name

# CLIP's own CIFAR prompt ensemble (Radford et al. 2021, notebooks/Prompt_Engineering).
CIFAR_PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)

_ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


class Cifar100Dataset(ImageDataset):
    """CIFAR-100 stored under `root` (torchvision's `cifar-100-python/` layout).

    Ids are the image's index in torchvision's order for the split.
    """

    name = "cifar100"
    prompt_templates = CIFAR_PROMPT_TEMPLATES

    def __init__(self, root: str, download: bool = False) -> None:
        self.root = Path(root).expanduser()
        self.download = download
        self._arrays: dict[str, tuple[np.ndarray, list[int], list[str]]] = {}

    def _load(self, split: str) -> tuple[np.ndarray, list[int], list[str]]:
        self.check_split(split)
        if split not in self._arrays:
            from torchvision.datasets import CIFAR100

            have_files = (self.root / "cifar-100-python" / split).is_file()
            if not have_files and not self.download:
                raise DatasetUnavailable(self._missing_message("the files are not there and dataset.download is false"))
            try:
                if not have_files:
                    self._download_once()
                data = CIFAR100(str(self.root), train=(split == "train"), download=False)
            except Exception as error:  # torchvision raises URLError, RuntimeError or OSError offline
                raise DatasetUnavailable(self._missing_message(f"{type(error).__name__}: {error}")) from error
            self._arrays[split] = (data.data, list(data.targets), list(data.classes))
        return self._arrays[split]

    def _download_once(self) -> None:
        """Download and extract the archive under `root`, one process at a time: the decode tasks of a node
        (and of every node, when `root` is on a shared file system) start together, and a second writer
        into the same folder would corrupt the first one's files. Whoever waited finds them there."""
        import fcntl

        from torchvision.datasets import CIFAR100

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".cifar100-download.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not all((self.root / "cifar-100-python" / name).is_file() for name in ("train", "test", "meta")):
                    CIFAR100(str(self.root), train=True, download=True)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _missing_message(self, reason: str) -> str:
        return (
            f"CIFAR-100 is not available under dataset.root={str(self.root)!r} ({reason}). "
            f"Either set dataset.download: true on a machine with network access, or download "
            f"{_ARCHIVE_URL}, extract it so that {self.root / 'cifar-100-python'}/train exists, "
            f"and point dataset.root at that directory."
        )

    @property
    def classes(self) -> list[str]:
        return [readable_class_name(name) for name in self._load("test")[2]]

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", "test")

    def records(self, split: str) -> list[ImageRecord]:
        _, labels, _ = self._load(split)
        return [ImageRecord(id=i, label=int(label), ref=str(i)) for i, label in enumerate(labels)]

    def load_image(self, split: str, ref: str) -> Image.Image:
        return Image.fromarray(self._load(split)[0][int(ref)])
