"""A directory of class subfolders per split: `root/train/<class>/*.jpg`, `root/test/...` or `root/val/...`.

CUB-200 and Tiny-ImageNet are used this way (see docs/datasets.md for how to lay them out).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from vs2ray.data.base import DatasetUnavailable, ImageDataset, ImageRecord, readable_class_name

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SPLIT_DIRS = ("train", "val", "test")


class ImageFolderDataset(ImageDataset):
    """Images in `root/<split>/<class folder>/`; labels follow the sorted class folders of `train/`.

    Ids are the position of the file in the split's sorted (class folder, file name) order,
    so they are stable as long as the files do not change. Class names come from
    `class_names` if given, else from a Tiny-ImageNet style `words.txt` in `root`, else
    from the folder names ('001.Black_footed_Albatross' -> 'Black footed Albatross').
    """

    name = "imagefolder"

    def __init__(self, root: str, class_names: list[str] | None = None) -> None:
        self.root = Path(root).expanduser()
        if not (self.root / "train").is_dir():
            raise DatasetUnavailable(
                f"imagefolder: dataset.root={str(self.root)!r} has no train/ directory. Expected "
                f"root/train/<class>/<image> and root/test/ or root/val/ with the same class folders."
            )
        self._folders = sorted(p.name for p in (self.root / "train").iterdir() if p.is_dir())
        if not self._folders:
            raise DatasetUnavailable(f"imagefolder: {self.root / 'train'} has no class subfolders")
        if class_names is not None and len(class_names) != len(self._folders):
            raise ValueError(
                f"dataset.class_names has {len(class_names)} names but {self.root / 'train'} "
                f"has {len(self._folders)} class folders"
            )
        self._class_names = list(class_names) if class_names is not None else self._names_from_folders()
        self._records: dict[str, list[ImageRecord]] = {}

    def _names_from_folders(self) -> list[str]:
        words_file = self.root / "words.txt"  # Tiny-ImageNet: "n01443537\tgoldfish, Carassius auratus"
        if words_file.is_file():
            words = dict(line.split("\t", 1) for line in words_file.read_text().splitlines() if "\t" in line)
            return [words.get(f, f).split(",")[0].strip() for f in self._folders]
        return [readable_class_name(f) for f in self._folders]

    @property
    def classes(self) -> list[str]:
        return list(self._class_names)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(s for s in SPLIT_DIRS if (self.root / s).is_dir())

    def records(self, split: str) -> list[ImageRecord]:
        self.check_split(split)
        if split not in self._records:
            label_of = {folder: i for i, folder in enumerate(self._folders)}
            split_dir = self.root / split
            files: list[tuple[int, Path]] = []
            for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
                if folder.name not in label_of:
                    raise ValueError(f"imagefolder: {folder} is a class folder that train/ does not have")
                files.extend(
                    (label_of[folder.name], path)
                    for path in sorted(folder.rglob("*"))
                    if path.suffix.lower() in IMAGE_SUFFIXES
                )
            self._records[split] = [
                ImageRecord(id=i, label=label, ref=str(path)) for i, (label, path) in enumerate(files)
            ]
        return self._records[split]

    def load_image(self, split: str, ref: str) -> Image.Image:
        with Image.open(ref) as image:
            return image.convert("RGB")
