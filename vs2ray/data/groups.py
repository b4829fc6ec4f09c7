"""Datasets with groups (class × a spurious attribute) read from a metadata CSV: Waterbirds and CelebA.

Neither is downloaded here (both need a manual download); a missing file is a `DatasetUnavailable`
that says which file and layout are expected.

- `waterbirds` (Sagawa et al. 2020, `waterbird_complete95_forest2water2`): `root/metadata.csv` with
  columns img_filename, y (0 landbird, 1 waterbird), split (0 train, 1 val, 2 test) and place
  (0 land, 1 water); images at `root/<img_filename>`.
- `celeba` (the Kaggle CSV layout): `root/list_attr_celeba.csv` (image_id and the 40 attributes as
  -1/1), `root/list_eval_partition.csv` (image_id, partition 0/1/2), images in
  `root/img_align_celeba/` (or the Kaggle zip's doubled `img_align_celeba/img_align_celeba/`). The
  class is `target_attribute` (default Blond_Hair), the group attribute `group_attribute` (Male).
"""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image

from vs2ray.data.base import DatasetUnavailable, ImageDataset, ImageRecord

SPLITS = ("train", "val", "test")  # partition / split codes 0, 1, 2 in both datasets


def _readable(attribute: str) -> str:
    """CelebA's attribute name in words: 'Blond_Hair' -> 'blond hair'."""
    return attribute.replace("_", " ").lower()


def _read_csv(path: Path, dataset: str, hint: str) -> list[dict[str, str]]:
    if not path.is_file():
        raise DatasetUnavailable(f"{dataset}: {path} is missing. {hint}")
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


class GroupRecordsDataset(ImageDataset):
    """Splits train, val, test of image files with a label and an attribute each, from rows (split code 0, 1
    or 2, label, attribute, image path); ids count up within a split in the rows' order."""

    def __init__(self, rows: list[tuple[int, int, int, str]]) -> None:
        self._records: dict[str, list[ImageRecord]] = {split: [] for split in SPLITS}
        for split_code, label, attribute, path in rows:
            records = self._records[SPLITS[split_code]]
            records.append(ImageRecord(id=len(records), label=label, ref=path, attribute=attribute))

    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS

    def records(self, split: str) -> list[ImageRecord]:
        self.check_split(split)
        return list(self._records[split])

    def load_image(self, split: str, ref: str) -> Image.Image:
        with Image.open(ref) as image:
            return image.convert("RGB")


class WaterbirdsDataset(GroupRecordsDataset):
    """Waterbirds: landbird / waterbird on a land / water background (4 groups)."""

    name = "waterbirds"
    attribute_names = ("land background", "water background")
    prompt_templates = ("a photo of a {}.", "a photo of a {}, a type of bird.")

    def __init__(self, root: str) -> None:
        self.root = Path(root).expanduser()
        hint = (
            "Download waterbird_complete95_forest2water2 (Sagawa et al. 2020, github.com/kohpangwei/group_DRO) and "
            "set dataset.root to the folder that holds metadata.csv and the image folders."
        )
        rows = _read_csv(self.root / "metadata.csv", "waterbirds", hint)
        missing = {"img_filename", "y", "split", "place"} - set(rows[0] if rows else {})
        if missing:
            raise DatasetUnavailable(f"waterbirds: {self.root / 'metadata.csv'} lacks the columns {sorted(missing)}")
        super().__init__(
            [(int(r["split"]), int(r["y"]), int(r["place"]), str(self.root / r["img_filename"])) for r in rows]
        )

    @property
    def classes(self) -> list[str]:
        return ["landbird", "waterbird"]


class CelebADataset(GroupRecordsDataset):
    """CelebA with a binary target attribute as the class and another binary attribute as the group."""

    name = "celeba"
    prompt_templates = ("a photo of a person with {}.", "a photo of a celebrity with {}.")

    def __init__(self, root: str, target_attribute: str = "Blond_Hair", group_attribute: str = "Male") -> None:
        self.root = Path(root).expanduser()
        hint = "Download CelebA (Kaggle 'celeba-dataset' layout) and set dataset.root to the folder that holds it."
        attributes = _read_csv(self.root / "list_attr_celeba.csv", "celeba", hint)
        partition = {
            r["image_id"]: int(r["partition"]) for r in _read_csv(self.root / "list_eval_partition.csv", "celeba", hint)
        }
        names = set(attributes[0]) if attributes else set()
        unknown = [a for a in (target_attribute, group_attribute) if a not in names]
        if unknown:
            raise ValueError(
                f"dataset.target_attribute / group_attribute: CelebA has no attribute {unknown}; "
                f"it has {sorted(names - {'image_id'})}"
            )
        images = self.root / "img_align_celeba"
        images = images / "img_align_celeba" if (images / "img_align_celeba").is_dir() else images
        self.target_attribute, self.group_attribute = target_attribute, group_attribute
        group = _readable(group_attribute)
        self.attribute_names = (f"not {group}", group)
        super().__init__(
            [
                (
                    partition[r["image_id"]],
                    int(r[target_attribute] == "1"),
                    int(r[group_attribute] == "1"),
                    str(images / r["image_id"]),
                )
                for r in attributes
            ]
        )

    @property
    def classes(self) -> list[str]:
        target = _readable(self.target_attribute)
        return [f"no {target}", target]
