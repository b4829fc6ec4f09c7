"""The CPU half of extraction: load and resize/crop one chunk of images (a Ray Data task).

It lives apart from `vs2ray.extract` so that a decode worker imports the dataset code
and torchvision's transforms only, never open_clip or the models: on a cluster, decode
tasks start on many CPU-only workers, and each one pays its imports once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np

from vs2ray.config import ExperimentConfig
from vs2ray.data import get_dataset
from vs2ray.data.base import ImageDataset, ImageRecord


@lru_cache(maxsize=4)
def _worker_dataset(config_json: str) -> tuple[ImageDataset, dict[str, list[ImageRecord]]]:
    """The dataset, built once per worker process (CIFAR arrays, folder listings are cached)."""
    config = ExperimentConfig.model_validate_json(config_json)
    return get_dataset(config.dataset), {}


def _records(config_json: str, split: str) -> list[ImageRecord]:
    dataset, cache = _worker_dataset(config_json)
    if split not in cache:
        cache[split] = dataset.records(split)
    return cache[split]


def decode_chunk(
    batch: dict[str, np.ndarray], config_json: str, transforms: dict[str, Callable[[Any], Any]]
) -> dict[str, Any]:
    """Ray Data UDF (CPU task): load and resize/crop the images of one chunk.

    In: {'split', 'store_dir', 'chunk', 'start', 'stop'} with one row. `transforms` maps an output column
    ('pixels' for CLIP, 'retrieval_pixels' for the retrieval encoder) to its PIL steps.
    Out: one row with uint8 (n, H, W, 3) arrays per column, ids, labels, attributes and groups (-1 without
    groups), and the images that failed to load as a JSON list.
    """
    dataset, _ = _worker_dataset(config_json)
    split, start, stop = str(batch["split"][0]), int(batch["start"][0]), int(batch["stop"][0])
    pixels: dict[str, list[np.ndarray]] = {name: [] for name in transforms}
    ids, labels, attributes, groups, failed = [], [], [], [], []
    for record in _records(config_json, split)[start:stop]:
        try:
            image = dataset.load_image(split, record.ref)
            converted = {name: np.asarray(t(image).convert("RGB"), dtype=np.uint8) for name, t in transforms.items()}
        except Exception as error:  # a corrupt or unreadable image is skipped, counted and listed
            failed.append({"id": record.id, "ref": record.ref, "error": f"{type(error).__name__}: {error}"})
            continue
        for name, array in converted.items():
            pixels[name].append(array)
        ids.append(record.id)
        labels.append(record.label)
        attributes.append(record.attribute)
        groups.append(dataset.group_of(record.label, record.attribute))
    return {
        **{key: batch[key] for key in ("split", "store_dir", "chunk")},
        **{name: [np.stack(arrays) if arrays else np.zeros((0, 1, 1, 3), np.uint8)] for name, arrays in pixels.items()},
        "ids": [np.asarray(ids, dtype=np.int64)],
        "labels": [np.asarray(labels, dtype=np.int32)],
        "attributes": [np.asarray(attributes, dtype=np.int32)],
        "groups": [np.asarray(groups, dtype=np.int32)],
        "failed": [json.dumps(failed)],
    }
