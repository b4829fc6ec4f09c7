"""Any image-classification dataset on the Hugging Face Hub, through the optional `datasets` library."""

from __future__ import annotations

from typing import Any

from PIL import Image

from vs2ray.data.base import DatasetUnavailable, ImageDataset, ImageRecord


class HuggingFaceDataset(ImageDataset):
    """`datasets.load_dataset(path, split=...)` with an image column and an integer label column.

    Ids are the row index within the split. Class names come from the label column's
    `ClassLabel` feature, or from `class_names` when the column has none.
    """

    name = "huggingface"

    def __init__(
        self,
        path: str,
        splits: tuple[str, ...],
        cache_dir: str | None = None,
        image_column: str = "image",
        label_column: str = "label",
        class_names: list[str] | None = None,
    ) -> None:
        self.path = path
        self._splits = splits
        self.cache_dir = cache_dir
        self.image_column = image_column
        self.label_column = label_column
        self._class_names = class_names
        self._tables: dict[str, Any] = {}

    def _load(self, split: str) -> Any:
        self.check_split(split)
        if split not in self._tables:
            try:
                import datasets
            except ImportError as error:
                raise DatasetUnavailable(
                    "dataset.name: huggingface needs the `datasets` package: pip install 'vs2ray[hf]'"
                ) from error
            try:
                table = datasets.load_dataset(self.path, split=split, cache_dir=self.cache_dir)
            except Exception as error:  # offline: ConnectionError, OfflineModeIsEnabled, FileNotFoundError
                raise DatasetUnavailable(
                    f"could not load Hugging Face dataset {self.path!r} split {split!r} "
                    f"({type(error).__name__}: {error}). On a machine with network access run "
                    f"`datasets.load_dataset({self.path!r}, cache_dir=...)` once and point "
                    f"dataset.root at that cache directory (with HF_DATASETS_OFFLINE=1 here)."
                ) from error
            for column in (self.image_column, self.label_column):
                if column not in table.column_names:
                    raise ValueError(
                        f"Hugging Face dataset {self.path!r} has no column {column!r}; "
                        f"columns: {table.column_names} (set dataset.image_column / dataset.label_column)"
                    )
            self._tables[split] = table
        return self._tables[split]

    @property
    def classes(self) -> list[str]:
        if self._class_names is not None:
            return list(self._class_names)
        feature = self._load(self._splits[0]).features[self.label_column]
        if not hasattr(feature, "names"):
            raise ValueError(
                f"label column {self.label_column!r} of {self.path!r} has no class names; set dataset.class_names"
            )
        return list(feature.names)

    @property
    def splits(self) -> tuple[str, ...]:
        return self._splits

    def records(self, split: str) -> list[ImageRecord]:
        labels = self._load(split)[self.label_column]
        return [ImageRecord(id=i, label=int(label), ref=str(i)) for i, label in enumerate(labels)]

    def load_image(self, split: str, ref: str) -> Image.Image:
        image = self._load(split)[int(ref)][self.image_column]
        if not isinstance(image, Image.Image):
            raise TypeError(f"column {self.image_column!r} of {self.path!r} does not hold images")
        return image.convert("RGB")
