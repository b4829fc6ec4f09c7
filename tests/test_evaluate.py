"""Evaluation: validation selection, test-oracle best, coverage, neighbours through a real FAISS index."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vs2ray.evaluate import Evaluator, Grid, SplitData, accuracy, format_table, grid_values
from vs2ray.retrieval import IndexShard
from vs2ray.sae import SAETrainParams, train_sae

WIDTH, EMBED, CLASSES = 16, 8, 4


def make_split(name: str, n: int, seed: int, head) -> SplitData:
    """Tokens around per-class centres; embeddings are the head's output, as in a real store."""
    from vs2ray.steering import apply_head

    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, WIDTH, generator=torch.Generator().manual_seed(99)) * 2
    labels = torch.randint(CLASSES, (n,), generator=g)
    cls = centres[labels] + 1.5 * torch.randn(n, WIDTH, generator=g) + 3.0
    return SplitData(name, cls, apply_head(cls, head), labels)


@pytest.fixture(scope="module")
def evaluator():
    g = torch.Generator().manual_seed(0)
    head = {
        "ln_post.weight": torch.ones(WIDTH),
        "ln_post.bias": torch.zeros(WIDTH),
        "proj": torch.randn(WIDTH, EMBED, generator=g),
    }
    pool = make_split("pool", 2000, 1, head)
    # the text classifier: class-mean embeddings of the pool, normalised (a sensible zero-shot)
    classifier = F.normalize(torch.stack([pool.embedding[pool.labels == c].mean(0) for c in range(CLASSES)]), dim=1)
    val, test = make_split("val", 400, 2, head), make_split("test", 600, 3, head)
    sae = train_sae(pool.cls, SAETrainParams(k=4, expansion=4, steps=200, batch_size=256, lr=2e-3, warmup_steps=10)).sae
    index = IndexShard(pool.embedding.numpy(), np.arange(len(pool.labels)))
    return Evaluator(sae, head, classifier, pool, val, test, search=index.search)


GRID = Grid(gammas=(1.5, 3.0), lambdas=(0.0, 1.0, 4.0), gate_quantiles=(0.5, 0.99), n_neighbors=10)


def test_selection_happens_on_validation_and_oracle_is_the_test_maximum(evaluator):
    result = evaluator.evaluate("vs2", GRID)
    assert len(result.settings) == 6 == len(result.val_top1) == len(result.test_top1)
    summary = result.summary()
    i = int(np.argmax(result.val_top1))
    assert summary["val_top1_vs2"] == max(result.val_top1)
    assert summary["test_top1_vs2"] == result.test_top1[i]
    assert summary["test_oracle_top1_vs2"] == max(result.test_top1) >= summary["test_top1_vs2"]
    assert summary["selected_gamma_vs2"] == result.settings[i]["gamma"]
    # the shared-SAE-pass grid gives what one steering.vs2 call per setting gives
    from vs2ray.steering import classify, vs2

    for setting, top1 in zip(result.settings, result.test_top1, strict=True):
        steered = vs2(evaluator.sae, evaluator.test.cls, setting["gamma"], setting["lambda"])
        logits = classify(steered, evaluator.head, evaluator.classifier)
        assert accuracy(logits, evaluator.test.labels, CLASSES)[0] == pytest.approx(top1, abs=1e-9)
    # λ = 0 settings are exactly zero-shot
    zero = evaluator.evaluate("zero_shot", GRID)
    for setting, top1 in zip(result.settings, result.test_top1, strict=True):
        if setting["lambda"] == 0.0:
            assert top1 == zero.test_top1[0]


def test_gated_results_carry_coverage_growing_with_q(evaluator):
    result = evaluator.evaluate("vs2_gated", GRID)
    by_q = {}
    for setting, coverage in zip(result.settings, result.coverage, strict=True):
        by_q.setdefault(setting["quantile"], []).append(coverage)
    assert max(by_q[0.5]) < min(by_q[0.99])
    assert "coverage_vs2_gated" in result.summary()


def test_neighbour_methods_run_on_a_faiss_index(evaluator):
    results = evaluator.evaluate_all(["zero_shot", "vs2pp", "vs2pp_oracle", "weighted_rag", "clip_steer"], GRID)
    for result in results.values():
        assert all(0.0 <= v <= 1.0 for v in result.test_top1)
        assert len(result.per_class_test[0]) == CLASSES
    # the cached W_dec Δ scaled per setting gives what the steering functions give directly
    from vs2ray import steering

    rows = torch.from_numpy(evaluator.search(evaluator.test.embedding.numpy(), 10, "check")[1]).long()
    truth = evaluator.pool.labels[rows]
    pseudo = steering.logits_from_embeddings(evaluator.test.embedding, evaluator.classifier).argmax(1)
    positives = steering.positive_mask(pseudo, truth, "query", CLASSES)
    values, indices = evaluator.sae.encode(evaluator.pool.cls[rows.reshape(-1)])
    codes = evaluator.sae.dense_codes(values, indices).reshape(*rows.shape, -1)
    oracle = results["vs2pp_oracle"]
    for setting, top1 in zip(oracle.settings, oracle.test_top1, strict=True):
        direction = steering.vs2pp_direction(evaluator.sae, codes, positives, setting["gamma"])
        logits = steering.classify(
            steering.vs2pp(evaluator.test.cls, direction, setting["lambda"]), evaluator.head, evaluator.classifier
        )
        assert accuracy(logits, evaluator.test.labels, CLASSES)[0] == pytest.approx(top1, abs=2e-3)
    # with well-separated classes, oracle neighbour labels steer at least as well as zero-shot on test
    assert max(results["vs2pp_oracle"].test_top1) >= results["zero_shot"].test_top1[0]
    table = format_table(results)
    assert table.count("\n") == len(results) + 1 and "vs2pp_oracle" in table


def test_accuracy_and_grid_values():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    top1, top5, per_class = accuracy(logits, torch.tensor([1, 2, 2]), 3)
    assert top1 == pytest.approx(2 / 3) and top5 == 1.0 and per_class == [0.0, 1.0, 0.5]
    from vs2ray.config import Distribution

    assert grid_values(2.0) == [2.0]
    assert grid_values(Distribution(kind="choice", values=(1, 3))) == [1.0, 3.0]
    assert grid_values(Distribution(kind="uniform", values=(1.0, 3.0)), 3) == [1.0, 2.0, 3.0]
    assert grid_values(Distribution(kind="loguniform", values=(0.1, 10.0)), 3) == [0.1, 1.0, 10.0]


def test_cli_on_a_small_shapes_world_reports_zero_shot_and_oracle_vs2pp(tmp_path, ray_session):
    import subprocess

    from conftest import cli_command

    address = ray_session.get_runtime_context().gcs_address
    assignments = (
        f"storage.root={tmp_path}",
        "dataset.sizes={train: 3000, test: 1000}",
        "sae.k=16",
        "sae.expansion=2",
        "sae.steps=200",
        "sae.batch_size=512",
        "retrieval.n_neighbors=20",
        "steering.methods=[zero_shot, vs2, vs2pp, vs2pp_oracle]",
    )
    args = ("--address", address, "--gammas", "1.5,2", "--lambdas", "1,3")
    command = cli_command("vs2ray.evaluate", *args, assignments=assignments)
    output = subprocess.run(command, capture_output=True, text=True, timeout=500)
    assert output.returncode == 0, output.stderr[-3000:]
    rows = {
        line.split()[0]: line.split()[1:]
        for line in output.stdout.splitlines()
        if line.startswith(("zero_shot", "vs2"))
    }
    assert set(rows) == {"zero_shot", "vs2", "vs2pp", "vs2pp_oracle"}
    zero_shot_test = float(rows["zero_shot"][1])
    assert 50 < zero_shot_test < 90  # the bundled model on 1,000 test images
    assert float(rows["vs2pp_oracle"][3]) >= 0  # test-oracle column present and numeric
    assert "300 validation rows (carved from train), 1000 test rows" in output.stdout
