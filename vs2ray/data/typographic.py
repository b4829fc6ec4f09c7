"""Typographic-attack datasets: photos of objects with a word written on them (RTA-100, PAINT's real set).

Neither is downloaded here. Both keep their annotations in the file name, as Defense-Prefix's loaders
(github.com/azuma164/Defense-Prefix, datasets/rta100.py and paint_ta.py) read them:
`label=<object>_text=<written word>.<ext>`, e.g. `label=dog_text=cat.png`.

- `rta100` (Azuma & Matsui 2023, `rta100.zip` in the Defense-Prefix repository): `root/ours/data/`.
- `paint_typographic` (Ilharco et al. 2022, PAINT's real typographic attacks, github.com/mlfoundations/patching):
  `root/typographic_real_data_from_PAINT/typographic_attacks/`.

The class set is the union of the object and the text labels, sorted (the published loaders' is a set, in
no fixed order), and zero-shot reads "a photo of a {}.". The class is the object; the attribute is the
written word, an index into the same class set, so that "typographic accuracy" is the share of images
predicted as their attribute. Both sets are published as one evaluation set; a sweep needs SAE rows and a
validation split apart from the test images, so the files are split by `seed` into train, val and test
(SPLIT_SHARES), each image in one split.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from vs2ray.data.base import DatasetUnavailable
from vs2ray.data.groups import SPLITS, GroupRecordsDataset
from vs2ray.data.imagefolder import IMAGE_SUFFIXES

SPLIT_SHARES = dict(zip(SPLITS, (0.5, 0.2, 0.3), strict=True))  # train, val, test
# the object may hold underscores or spaces; the written word runs to the extension
ANNOTATED_NAME = re.compile(r"^label=(?P<label>.+?)_text=(?P<text>.+)\.(?P<ext>[A-Za-z]+)$")


def parse_annotated_name(file_name: str) -> tuple[str, str] | None:
    """(object label, written word) of a file named `label=<object>_text=<word>.<ext>`, else None."""
    match = ANNOTATED_NAME.match(file_name)
    if match is None or f".{match['ext'].lower()}" not in IMAGE_SUFFIXES:
        return None
    return match["label"], match["text"]


class WordOnImageDataset(GroupRecordsDataset):
    """Images of `image_dir` annotated in their file names; splits drawn by `seed` (SPLIT_SHARES)."""

    prompt_templates = ("a photo of a {}.",)

    def __init__(self, image_dir: Path, hint: str, seed: int = 0) -> None:
        if not image_dir.is_dir():
            raise DatasetUnavailable(f"{self.name}: {image_dir} is missing. {hint}")
        annotated: list[tuple[Path, str, str]] = []
        self.unannotated: list[str] = []  # skipped and listed, never guessed at
        for path in sorted(p for p in image_dir.iterdir() if p.is_file()):
            labels = parse_annotated_name(path.name)
            if labels is None:
                self.unannotated.append(path.name)
            else:
                annotated.append((path, *labels))
        shown = ", ".join(self.unannotated[:5]) + (" ..." if len(self.unannotated) > 5 else "")
        if not annotated:
            raise DatasetUnavailable(
                f"{self.name}: {image_dir} holds no image named label=<object>_text=<word>.<ext> "
                f"({len(self.unannotated)} other file(s): {shown or 'none'}). {hint}"
            )
        if self.unannotated:
            warnings.warn(f"{self.name}: {len(self.unannotated)} file(s) of {image_dir} skipped, not named "
                          f"label=<object>_text=<word>.<ext>: {shown}", stacklevel=2)  # fmt: skip
        self._classes = sorted({word for _, label, text in annotated for word in (label, text)})
        self.attribute_names = tuple(f"the word {word!r}" for word in self._classes)
        index = {name: i for i, name in enumerate(self._classes)}
        order = np.random.default_rng(seed).permutation(len(annotated))
        bounds = np.cumsum([round(share * len(annotated)) for share in SPLIT_SHARES.values()])[:-1]
        split_of = np.empty(len(annotated), dtype=int)
        for code, positions in enumerate(np.split(order, bounds)):
            split_of[positions] = code
        # in file-name order, so that ids within a split follow the file names
        super().__init__(
            [
                (int(split_of[i]), index[label], index[text], str(path))
                for i, (path, label, text) in enumerate(annotated)
            ]
        )

    @property
    def classes(self) -> list[str]:
        return list(self._classes)

    @property
    def concept_words(self) -> list[str]:
        return list(self._classes)  # the attributes are the same words


class RTA100Dataset(WordOnImageDataset):
    """RTA-100: real photos of objects with a handwritten wrong class name (Defense-Prefix's `rta100.zip`)."""

    name = "rta100"

    def __init__(self, root: str, seed: int = 0) -> None:
        hint = (
            "Download rta100.zip from github.com/azuma164/Defense-Prefix, unzip it and set dataset.root to the "
            "folder that holds ours/data/ (files named label=<object>_text=<word>.png)."
        )
        super().__init__(Path(root).expanduser() / "ours" / "data", hint, seed)


class PaintTypographicDataset(WordOnImageDataset):
    """PAINT's real typographic attacks (Ilharco et al. 2022), in the layout Defense-Prefix reads."""

    name = "paint_typographic"

    def __init__(self, root: str, seed: int = 0) -> None:
        hint = (
            "Get PAINT's real typographic attack images (github.com/mlfoundations/patching) and set dataset.root "
            "to the folder that holds typographic_real_data_from_PAINT/typographic_attacks/ (files named "
            "label=<object>_text=<word>.<ext>)."
        )
        super().__init__(
            Path(root).expanduser() / "typographic_real_data_from_PAINT" / "typographic_attacks", hint, seed
        )
