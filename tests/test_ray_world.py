"""The bundled world on Ray workers: images rendered in other processes equal the driver's."""

from __future__ import annotations

import numpy as np


def test_shapes_render_identically_on_ray_workers(ray_session):
    ray = ray_session

    @ray.remote(num_cpus=0.5)
    def render(ids: list[int]) -> np.ndarray:
        from vs2ray.data.shapes import ShapesDataset  # imported on the worker: needs the installed package

        dataset = ShapesDataset(seed=5)
        return np.stack([np.asarray(dataset.load_image("train", str(i))) for i in ids])

    from vs2ray.data.shapes import ShapesDataset

    ids = [[0, 1, 2], [19_997, 19_998, 19_999]]
    remote = ray.get([render.remote(chunk) for chunk in ids])
    local = ShapesDataset(seed=5)
    for chunk, pixels in zip(ids, remote, strict=True):
        expected = np.stack([np.asarray(local.load_image("train", str(i))) for i in chunk])
        np.testing.assert_array_equal(pixels, expected)
