"""Evaluation: validation selection, test-oracle best, coverage, neighbours through a real FAISS index."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vs2ray.evaluate import Evaluator, Grid, PoolData, PoolRows, SplitData, Tally, accuracy, format_table
from vs2ray.retrieval import IndexShard
from vs2ray.sae import ActivationRows, SAETrainParams, train_sae
from vs2ray.stages import grid_values

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


def test_intermediate_validation_matches_the_full_evaluation_and_follows_the_sae(evaluator):
    # what a scheduler sees mid-training: the validation-selected figures of evaluate(), never the test split
    for method in ("vs2", "vs2_gated", "vs2pp"):
        full = evaluator.evaluate(method, GRID)
        i = int(np.argmax(full.val_top1))
        assert evaluator.validate(method, GRID) == {
            f"val_top1_{method}": full.val_top1[i],
            f"val_top5_{method}": full.val_top5[i],
        }
    # with_sae: the same splits with another SAE, nothing cached from the first one
    other = train_sae(evaluator.pool.cls.rows, SAETrainParams(k=1, expansion=1, steps=5, batch_size=256, seed=1)).sae
    swapped = evaluator.with_sae(other)
    fresh = Evaluator(other, evaluator.head, evaluator.classifier, evaluator.pool, evaluator.val, evaluator.test)
    rec = "sae_rec_final"  # the reconstruction alone: its accuracy depends on the SAE and nothing else
    assert swapped.validate(rec, GRID) == fresh.validate(rec, GRID) != evaluator.validate(rec, GRID)


def test_a_pool_read_from_host_rows_evaluates_as_the_pool_held_on_the_device(evaluator):
    # on the CPU the pool's [CLS] rows and embeddings stay in the store, read by chunks and gathers (PoolRows)
    pool = evaluator.pool
    cls_rows, embedding_rows = pool.cls.rows, pool.embedding.rows
    host_cls, host_embedding = (PoolRows(ActivationRows(rows.numpy())) for rows in (cls_rows, embedding_rows))
    host = PoolData("pool", host_cls, host_embedding, pool.labels)
    assert isinstance(host.cls.rows, ActivationRows) and isinstance(pool.cls.rows, torch.Tensor)
    index = torch.tensor([[3, 1999], [0, 3]])
    torch.testing.assert_close(host.cls.take(index), cls_rows[index], atol=0, rtol=0)
    torch.testing.assert_close(torch.cat(list(host.embedding.chunks(300))), embedding_rows, atol=0, rtol=0)
    torch.testing.assert_close(host.cls.mean(), cls_rows.mean(0))
    streamed = Evaluator(evaluator.sae, evaluator.head, evaluator.classifier, host, evaluator.val, evaluator.test,
                         search=evaluator.search)  # fmt: skip
    torch.testing.assert_close(streamed.calibration_fvu, evaluator.calibration_fvu)
    methods = ["vs2", "vs2_gated", "vs2pp", "vs2pp_oracle", "weighted_rag", "clip_steer"]
    for method in methods:
        expected, got = evaluator.evaluate(method, GRID), streamed.evaluate(method, GRID)
        assert got.test_top1 == pytest.approx(expected.test_top1, abs=1 / 600) and got.settings == expected.settings
    torch.testing.assert_close(streamed.pool_mean_code(), evaluator.pool_mean_code())
    torch.testing.assert_close(streamed.zero_shot_labels(host), evaluator.zero_shot_labels(pool), atol=0, rtol=0)


def test_gated_results_carry_coverage_growing_with_q(evaluator):
    result = evaluator.evaluate("vs2_gated", GRID)
    by_q = {}
    for setting, coverage in zip(result.settings, result.coverage, strict=True):
        by_q.setdefault(setting["quantile"], []).append(coverage)
    assert max(by_q[0.5]) < min(by_q[0.99])
    assert "coverage_vs2_gated" in result.summary()


def test_neighbour_methods_run_on_a_faiss_index(evaluator):
    methods = ["zero_shot", "vs2pp", "vs2pp_oracle", "vs2pp_oracle_neighbours", "weighted_rag", "clip_steer"]
    results = evaluator.evaluate_all(methods, GRID)
    for result in results.values():
        assert all(0.0 <= v <= 1.0 for v in result.test_top1)
        assert len(result.per_class_test[0]) == CLASSES
    # the cached W_dec Δ scaled per setting gives what the steering functions give directly
    from vs2ray import steering

    rows = torch.from_numpy(evaluator.search(evaluator.test.embedding.numpy(), 10, "check")[1]).long()
    truth = evaluator.pool.labels[rows]
    pseudo = steering.logits_from_embeddings(evaluator.test.embedding, evaluator.classifier).argmax(1)
    values, indices = evaluator.sae.encode(evaluator.pool.cls.rows[rows.reshape(-1)])
    codes = evaluator.sae.dense_codes(values, indices).reshape(*rows.shape, -1)
    pool_mean_code = evaluator.sae.dense_codes(*evaluator.sae.encode(evaluator.pool.cls.rows)).mean(0)
    positives_of = {
        "vs2pp_oracle": lambda _rule: truth == evaluator.test.labels[:, None],  # the query's true label
        "vs2pp_oracle_neighbours": lambda rule: steering.positive_mask(pseudo, truth, rule, CLASSES),
    }
    for method, positives_for in positives_of.items():
        result = results[method]
        for setting, top1, coverage in zip(result.settings, result.test_top1, result.coverage, strict=True):
            positives = positives_for(setting.get("rule", "query"))
            # an empty S− takes the pool's mean code; an empty S+ stays unsteered
            mean_negative = (~positives).float().sum(1, keepdim=True).clamp_min(1)
            negatives = torch.where(
                positives.all(1, keepdim=True),
                pool_mean_code,
                ((~positives)[..., None] * codes).sum(1) / mean_negative,
            )
            positive = (positives[..., None] * codes).sum(1) / positives.float().sum(1, keepdim=True).clamp_min(1)
            direction = (setting["gamma"] - 1) * (positive - negatives) @ evaluator.sae.W_dec
            moved = steering.vs2pp(evaluator.test.cls, direction, setting["lambda"])
            steerable = positives.any(1)
            steered = torch.where(steerable[:, None], moved, evaluator.test.cls)
            logits = steering.classify(steered, evaluator.head, evaluator.classifier)
            assert accuracy(logits, evaluator.test.labels, CLASSES)[0] == pytest.approx(top1, abs=2e-3)
            assert coverage == pytest.approx(steerable.float().mean().item())
        assert result.empty_negatives[0] == pytest.approx(positives.all(1).float().mean().item())
    # both positive rules are gridded by default, the oracle has none
    assert {s["rule"] for s in results["vs2pp"].settings} == {"query", "majority"}
    assert all("rule" not in s for s in results["vs2pp_oracle"].settings)
    # with well-separated classes, the oracle steers at least as well as zero-shot on test
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


def test_cli_on_a_small_shapes_world_oracle_vs2pp_corrects_errors_and_reinforcing_rules_do_not(tmp_path, ray_session):
    """The real path: bundled model, Ray Data extraction, FAISS actors, the evaluate CLI.

    Neighbours in CLIP space: in the bundled retrieval encoder's space most neighbourhoods are pure, so the
    oracle leaves most queries unsteered (an empty S−; see docs/stages/steering.md) and has little to show.
    """
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
        "retrieval.positive_rule=query",  # the rule that can only reinforce the current prediction
        "steering.methods=[zero_shot, vs2, vs2pp, vs2pp_oracle, vs2pp_oracle_neighbours]",
    )
    args = ("--address", address, "--gammas", "1.5,2", "--lambdas", "1,3,5")
    command = cli_command("vs2ray", "evaluate", *args, assignments=assignments)
    output = subprocess.run(command, capture_output=True, text=True, timeout=500)
    assert output.returncode == 0, output.stderr[-3000:]
    rows = {
        line.split()[0]: [float(v) for v in line.split()[1:5]]
        for line in output.stdout.splitlines()
        if line.startswith(("zero_shot", "vs2"))
    }
    assert set(rows) == {"zero_shot", "vs2", "vs2pp", "vs2pp_oracle", "vs2pp_oracle_neighbours"}
    zero_shot_test = rows["zero_shot"][1]
    assert 40 < zero_shot_test < 80  # the bundled model on 1,000 test images
    assert "300 validation rows (carved from train), 1000 test rows" in output.stdout
    # the paper's oracle (S+ = neighbours of the query's true class) corrects errors at the setting chosen on
    # validation; S+ from the query's zero-shot label (true or pseudo neighbour labels) cannot
    assert rows["vs2pp_oracle"][2] >= 4.0, output.stdout  # Δ zero-shot, validation-selected
    for reinforcing in ("vs2pp_oracle_neighbours", "vs2pp"):  # not even the best test setting gains
        assert rows[reinforcing][3] <= zero_shot_test + 1.0, output.stdout


@pytest.fixture(scope="module")
def confused_world():
    """Tokens of four classes, a retrieval space that separates them, and a text head that confuses the
    pairs (0, 1) and (2, 3)."""
    g = torch.Generator().manual_seed(5)
    head = {
        "ln_post.weight": torch.ones(WIDTH),
        "ln_post.bias": torch.zeros(WIDTH),
        "proj": torch.randn(WIDTH, EMBED, generator=g),
    }
    splits = {
        name: make_split(name, n, seed, head)
        for name, n, seed in (("pool", 2000, 11), ("val", 400, 12), ("test", 600, 13))
    }
    for split in splits.values():  # retrieval vectors: the class centre plus noise, as an image-only encoder gives
        split.retrieval = F.one_hot(split.labels, CLASSES).float() * 3 + torch.randn(
            len(split.labels), CLASSES, generator=g
        )
    pool = splits["pool"]
    means = torch.stack([pool.embedding[pool.labels == c].mean(0) for c in range(CLASSES)])
    partner = torch.tensor([1, 0, 3, 2])
    classifier = F.normalize(means + 0.9 * means[partner], dim=1)  # each class's text row leans on its partner
    sae = train_sae(pool.cls, SAETrainParams(k=4, expansion=4, steps=300, batch_size=256, lr=2e-3, warmup_steps=10)).sae
    return sae, head, classifier, splits


@pytest.mark.parametrize("empty_negatives", ["skip", "pool_mean"])
def test_a_unanimous_neighbourhood_is_skipped_or_steered_against_the_pool_mean(
    ray_session, confused_world, empty_negatives
):
    from vs2ray.retrieval import RetrievalIndex

    sae, head, classifier, splits = confused_world
    pool = splits["pool"]
    index = RetrievalIndex("test-oracle-world-empty", pool.retrieval.numpy(), np.arange(len(pool.labels)))
    evaluator = Evaluator(
        sae, head, classifier, pool, splits["val"], splits["test"], index.search, empty_negatives=empty_negatives
    )
    # with 5 neighbours in a space that separates the classes, most queries have no negative neighbour
    grid = Grid(gammas=(3.0,), lambdas=(8.0,), n_neighbors=5, positive_rules=("query",))
    result = evaluator.evaluate("vs2pp_oracle", grid)
    coverage = result.coverage[0]
    rows = torch.from_numpy(index.search(splits["test"].retrieval.numpy(), 5)[1]).long()
    same_class = pool.labels[rows] == splits["test"].labels[:, None]
    unanimous = same_class.all(1)
    assert unanimous.float().mean() > 0.5
    assert result.summary()["empty_negatives_vs2pp_oracle"] == pytest.approx(unanimous.float().mean().item())
    steered = same_class.any(1) & ~unanimous if empty_negatives == "skip" else same_class.any(1)
    assert coverage == pytest.approx(steered.float().mean().item())
    zero_shot = evaluator.evaluate("zero_shot", grid)
    unsteered = ~steered.numpy()
    np.testing.assert_array_equal(result.test_predictions[0][unsteered], zero_shot.test_predictions[0][unsteered])
    assert result.summary()["coverage_vs2pp_oracle"] == coverage
    moved = result.test_predictions[0][unanimous.numpy()] != zero_shot.test_predictions[0][unanimous.numpy()]
    assert moved.any() == (empty_negatives == "pool_mean")  # a unanimous query is steered only against the pool mean


def _fixed_neighbours(rows: np.ndarray):
    """A search callable that returns the same pool rows (q, N) for the q queries (cosines of 1)."""

    def search(queries: np.ndarray, k: int, key: str) -> tuple[np.ndarray, np.ndarray]:
        return np.ones(rows.shape, dtype=np.float32), rows

    return search


def test_empty_s_minus_steers_against_the_pool_mean_code_and_empty_s_plus_stays_unsteered(evaluator):
    from vs2ray.methods import METHODS

    pool, sae, test = evaluator.pool, evaluator.sae, evaluator.test
    labels = pool.labels.numpy()
    queries = SplitData("hand", test.cls[:3], test.embedding[:3], test.labels[:3])
    own = np.flatnonzero(labels == int(queries.labels[0]))[:6]
    other = np.flatnonzero(labels != int(queries.labels[1]))[:6]
    same, different = (labels == int(queries.labels[2])), (labels != int(queries.labels[2]))
    mixed = np.concatenate([np.flatnonzero(same)[:3], np.flatnonzero(different)[:3]])
    rows = np.stack([own, other, mixed])  # query 0: all its own class; query 1: none; query 2: half
    hand = Evaluator(sae, evaluator.head, evaluator.classifier, pool, evaluator.val, test, _fixed_neighbours(rows))
    gamma, lam = 2.0, 1.5
    steered = METHODS["vs2pp_oracle"].steer(hand, queries, {"gamma": gamma, "lambda": lam, "n_neighbors": 6})
    # by hand: dense codes of every pool row at once, the mean of the query's neighbours' codes, W_dec
    pool_codes = sae.dense_codes(*sae.encode(pool.cls.rows))
    pool_mean = pool_codes.mean(0)
    toward = (gamma - 1) * (pool_codes[torch.from_numpy(own)].mean(0) - pool_mean) @ sae.W_dec
    x = queries.cls[0]
    expected = (x + lam * toward) * x.norm() / (x + lam * toward).norm()
    torch.testing.assert_close(steered.rows[0], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(steered.rows[0], x)
    torch.testing.assert_close(steered.rows[1], queries.cls[1], atol=0, rtol=0)  # empty S+: unchanged
    half = pool_codes[torch.from_numpy(mixed[:3])].mean(0) - pool_codes[torch.from_numpy(mixed[3:])].mean(0)
    move = (gamma - 1) * half @ sae.W_dec
    x = queries.cls[2]
    expected = (x + lam * move) * x.norm() / (x + lam * move).norm()
    torch.testing.assert_close(steered.rows[2], expected, atol=1e-5, rtol=1e-5)
    assert steered.coverage == pytest.approx(2 / 3) and steered.empty_negatives == pytest.approx(1 / 3)


def test_neighbours_are_memoised_per_split_and_count(evaluator):
    few = evaluator.neighbours(evaluator.test, 5)
    many = evaluator.neighbours(evaluator.test, 12)  # not the 5 memoised above, cut or padded
    assert few[1].shape == (len(evaluator.test.labels), 5) and many[1].shape == (len(evaluator.test.labels), 12)
    torch.testing.assert_close(many[1][:, :5], few[1])


def test_centroid_shift_is_vs2_minus_the_sae_error_term(evaluator):
    from vs2ray import steering

    x, sae = evaluator.test.cls, evaluator.sae
    setting = {"gamma": 2.0, "lambda": 0.7}
    logits, _ = evaluator.logits("centroid_shift", evaluator.test, setting)
    expected = steering.centroid_shift(x, sae.b_pre, 0.7)  # METHOD.md's closed form: the SAE's centroid b_pre
    torch.testing.assert_close(logits, steering.classify(expected, evaluator.head, evaluator.classifier))
    # VS2's unnormalised shift minus the centroid shift's is exactly α·ε(x), the SAE's error term
    alpha, epsilon = 0.7, sae(x).reconstruction - x
    vs2_shift = alpha * steering.code_direction(sae, x)
    torch.testing.assert_close(vs2_shift - alpha * (x - sae.b_pre), alpha * epsilon, atol=1e-5, rtol=1e-5)


def test_sae_rec_all_without_the_encoder_and_one_sae_per_block_is_refused(evaluator):
    with pytest.raises(ValueError, match="sae_rec_all needs the encoder and one SAE per block"):
        evaluator.logits("sae_rec_all", evaluator.test, {})


def test_a_tally_counted_part_by_part_gives_the_whole_splits_accuracies():
    g = torch.Generator().manual_seed(5)
    labels, attributes = torch.randint(CLASSES, (500,), generator=g), torch.randint(2, (500,), generator=g)
    logits = torch.randn(500, CLASSES, generator=g) + 2.0 * F.one_hot(labels, CLASSES)
    split = SplitData("s", torch.zeros(500, 1), torch.zeros(500, 1), labels, attributes=attributes,
                      groups=2 * labels + attributes)  # fmt: skip
    # a typographic split: no word (a value past the classes), the image's own class or another class written
    condition = torch.randint(3, (500,), generator=g)
    other = (labels + 1 + torch.randint(CLASSES - 1, (500,), generator=g)) % CLASSES
    written = torch.where(condition == 0, CLASSES, torch.where(condition == 1, labels, other))
    logits[condition == 2] += 1.5 * F.one_hot(other, CLASSES)[condition == 2]  # the attack works, sometimes
    tally = Tally(CLASSES, 2 * CLASSES, keep_predictions=True)
    for start, stop in ((0, 123), (123, 400), (400, 500)):
        part = split.rows(start, stop)
        tally.add(logits[start:stop], part.labels, part.groups, written=written[start:stop])
    top1, top5, per_class = accuracy(logits, labels, CLASSES)
    assert (tally.top1(), tally.top5(), tally.per_class()) == (top1, top5, per_class)
    predicted = logits.argmax(dim=1)
    # by hand as well: accuracy() is a one-part tally
    assert top1 == (predicted == labels).double().mean().item()
    assert top5 == (logits.topk(min(5, CLASSES), dim=1).indices == labels[:, None]).any(dim=1).double().mean().item()
    by_class = [(predicted[labels == c] == c).double().mean().item() for c in range(CLASSES)]
    assert per_class == pytest.approx(by_class, rel=1e-6)  # float32 shares
    for group in range(2 * CLASSES):  # by hand, group by group
        in_group = split.groups == group
        assert tally.per_group()[group] == (predicted[in_group] == labels[in_group]).double().mean().item()
    attacked, clean = condition == 2, condition == 0
    assert tally.typographic() == (predicted[attacked] == other[attacked]).double().mean().item()
    assert tally.attacked_top1() == (predicted[attacked] == labels[attacked]).double().mean().item()
    assert tally.clean_top1() == (predicted[clean] == labels[clean]).double().mean().item()
    assert 0.1 < tally.typographic() < 0.9 and tally.attacked_top1() < tally.clean_top1()
    torch.testing.assert_close(torch.cat(tally.predictions), predicted)
    assert Tally(CLASSES).typographic() is None and Tally(CLASSES).per_group() is None
    every_image_attacked = Tally(CLASSES)  # RTA-100, PAINT: a word on every image, so no clean top-1
    every_image_attacked.add(logits[attacked], labels[attacked], written=other[attacked])
    assert every_image_attacked.clean_top1() is None and every_image_attacked.typographic() == tally.typographic()
