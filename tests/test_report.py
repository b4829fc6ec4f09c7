"""vs2ray.plots: the report's figure helpers (the report on a real sweep is tested in test_sweep.py)."""

from __future__ import annotations

import numpy as np
import pytest


def test_pareto_front_keeps_the_points_nothing_beats():
    from vs2ray.plots import pareto_front

    # (fvu, accuracy): (0.3, 70) is beaten by (0.2, 71); (0.5, 69) by everything better
    points = np.array([[0.1, 68.0], [0.2, 71.0], [0.3, 70.0], [0.4, 72.0], [0.5, 69.0]])
    assert sorted(pareto_front(points).tolist()) == [0, 1, 3]


def test_heatmap_needs_both_gamma_and_lambda_to_vary_and_by_block_needs_two_blocks(tmp_path):
    import pandas as pd
    from PIL import Image

    from vs2ray.plots import by_block, steering_heatmap

    rng = np.random.default_rng(0)
    trials = pd.DataFrame({"steering.gamma": rng.uniform(1, 3, 12), "steering.lambda": rng.uniform(0, 5, 12)}).assign(
        val_top1_vs2=lambda t: 0.5 + 0.01 * t["steering.gamma"]
    )
    path = steering_heatmap(trials, tmp_path / "heatmap.png")
    with Image.open(path) as image:
        assert image.size[0] > 300
    assert steering_heatmap(trials.assign(**{"steering.lambda": 2.1}), tmp_path / "line.png") is None
    assert not (tmp_path / "line.png").exists()

    blocks = pd.DataFrame(
        {"block": [1, 3], "tokens": ["cls", "cls"], "fvu": [0.1, 0.05], "l0": [32, 32], "vs2": [57.0, 59.0]}
    )
    assert by_block(blocks.iloc[:1], tmp_path / "one.png") is None
    assert by_block(blocks, tmp_path / "blocks.png").read_bytes().startswith(b"\x89PNG")


def test_a_missing_experiment_dir_is_a_clear_error_that_creates_nothing(tmp_path, capsys):
    from vs2ray.report import main

    missing = tmp_path / "no-such-sweep"
    assert main([str(missing)]) == 2
    assert "no such experiment dir" in capsys.readouterr().err
    assert not missing.exists()


def test_fvu_vs_l0_draws_one_dot_per_distinct_sae_and_needs_two(tmp_path):
    import pandas as pd

    from vs2ray.plots import fvu_vs_l0

    saes = pd.DataFrame(
        {
            "sae_kind": ["topk", "topk", "batchtopk"],
            "sae_dir": ["/a", "/a", "/b"],
            "l0": [16.0, 16.0, 15.2],
            "val_fvu": [0.1, 0.1, 0.09],
        }
    )
    assert fvu_vs_l0(saes.iloc[:2], tmp_path / "one.png") is None  # one SAE, reported twice
    assert fvu_vs_l0(saes, tmp_path / "kinds.png").read_bytes().startswith(b"\x89PNG")
    assert fvu_vs_l0(saes.drop(columns="sae_kind"), tmp_path / "none.png") is None  # trials before sae.kind


def test_latent_density_reads_each_saes_frequencies_and_draws_them(tmp_path):
    import numpy as np
    import pandas as pd
    import torch

    from vs2ray.plots import latent_density
    from vs2ray.results import density_table
    from vs2ray.sae import SparseAutoencoder

    frequencies = {"a": torch.tensor([0.0, 0.0, 0.5, 0.01, 0.02, 0.2]), "b": torch.tensor([0.03, 0.04, 0.0, 0.05])}
    for name, frequency in frequencies.items():  # as training writes them, beside the checkpoint
        SparseAutoencoder(2, len(frequency), 1).save(tmp_path / name, {}, {}, frequency)
    trials = pd.DataFrame(
        {
            "trial_id": ["t1", "t2", "t3"],
            "status": ["TERMINATED"] * 3,
            "sae_dir": [str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "none")],
            "sae_kind": ["topk", "relu_l1", "topk"],
            "val_top1_vs2": [0.7, 0.6, 0.5],
        }
    )
    search = type("Search", (), {"metrics": ["val_top1_vs2"], "modes": ["max"]})()
    table, densities = density_table(trials, search)
    table = table.set_index("SAE")
    assert list(table.index) == ["best trial", "best relu_l1", "best topk"]  # t3's SAE has no file: never chosen
    assert table.loc["best trial", "trial"] == "t1" and table.loc["best trial", "dead %"] == pytest.approx(100 / 3)
    assert table.loc["best trial", "dense %"] == pytest.approx(100 / 3)  # 0.5 and 0.2 fire on > 10% of rows
    assert table.loc["best relu_l1", "median frequency"] == pytest.approx(0.04)
    np.testing.assert_allclose(densities["best relu_l1"], frequencies["b"].numpy())
    assert latent_density(densities, tmp_path / "density.png").read_bytes().startswith(b"\x89PNG")
    assert latent_density({}, tmp_path / "none.png") is None
