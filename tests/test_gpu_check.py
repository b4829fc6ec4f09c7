"""scripts/gpu_check.py in its CPU mode, so that the GPU check cannot rot between GPU sessions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def test_gpu_check_runs_every_section_on_the_cpu_and_writes_its_table(tmp_path, capsys):
    # in-process (the script's own main): the same code `make gpu-check` runs, without a second interpreter
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--small", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["environment"]["torch"] == torch.__version__ and report["environment"]["device"] == "cpu"
    assert not report["skipped"], report["skipped"]  # every package is installed here
    models = {(row["model"], row["precision"]) for row in report["extraction"]}
    assert {(m, p) for m in ("vs2ray-tiny/bundled", "ViT-B-32/random") for p in ("fp32", "tf32", "bf16")} == models
    assert all(
        row["encode_path_images_per_s"] > 0 and row["bare_loop_images_per_s"] > 0 for row in report["extraction"]
    )
    assert {row["precision"] for row in report["sae"]} == {"fp32", "bf16"}
    assert all(0 < row["held_out_fvu"] < 1 for row in report["sae"])
    assert [row["same_weights_as_staged"] for row in report["sae"] if "same_weights_as_staged" in row] == [True]
    assert any(row.get("on_gpu") is False and row["queries_per_s"] > 0 for row in report["faiss"])
    from vs2ray.methods import METHODS

    checked = {row["method"]: row for row in report["steering"]}
    assert set(checked) == set(METHODS)
    for name, row in checked.items():  # CPU against CPU: the same logits; on a GPU these are the figures to read
        if name != "sae_rec_all":
            assert row["max_abs_delta"] == 0 and row["argmax_agreement"] == 1, name
    assert "steering" in stdout and "written:" in stdout
