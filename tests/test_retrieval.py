"""FAISS retrieval: in-process and in Ray actors, exact against brute force, sharded, restarted."""

from __future__ import annotations

import numpy as np
import pytest

from vs2ray.retrieval import IndexShard, RetrievalIndex


def brute_force(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int):
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = q @ unit.T
    order = np.argsort(-scores, axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3000, 32)).astype(np.float32)
    ids = rng.permutation(100_000)[:3000].astype(np.int64)  # ids are not positions
    queries = rng.normal(size=(64, 32)).astype(np.float32)
    return vectors, ids, queries


def test_flat_index_equals_brute_force(data):
    vectors, ids, queries = data
    scores, found = IndexShard(vectors, ids).search(queries, 10)
    expected_scores, expected_ids = brute_force(vectors, ids, queries, 10)
    np.testing.assert_array_equal(found, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_recall(data, kind):
    vectors, ids, queries = data
    _, found = IndexShard(vectors, ids, kind=kind).search(queries, 10)
    _, expected = brute_force(vectors, ids, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, expected, strict=True)])
    assert recall > 0.7, recall


def test_sharded_actors_equal_brute_force_and_are_found_by_name(ray_session, data):
    vectors, ids, queries = data
    index = RetrievalIndex("test-sharded", vectors, ids, num_shards=3)
    assert index.sizes == [1000, 1000, 1000]
    scores, found = index.search(queries, 25)
    expected_scores, expected_ids = brute_force(vectors, ids, queries, 25)
    np.testing.assert_array_equal(found, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    attached = RetrievalIndex("test-sharded", num_shards=3)  # another trial: no vectors, same actors
    np.testing.assert_array_equal(attached.search(queries, 25)[1], expected_ids)


def test_results_are_memoised_per_query_set_key(ray_session, data):
    vectors, ids, queries = data
    index = RetrievalIndex("test-memo", vectors, ids)
    first = index.search(queries[:4], 5, key="val")
    again = index.search(queries[4:8], 5, key="val")  # same key and k: the stored answer
    np.testing.assert_array_equal(first[1], again[1])
    fresh = index.search(queries[4:8], 5, key="test")
    assert not np.array_equal(fresh[1], first[1])


def test_bad_queries_are_clear_errors(ray_session, data):
    vectors, ids, queries = data
    index = RetrievalIndex("test-errors", vectors[:100], ids[:100])
    with pytest.raises(ValueError, match=r"queries must be \(n, 32\), got shape \(64, 16\)"):
        index.search(queries[:, :16], 5)
    with pytest.raises(ValueError, match="k=101 neighbours asked of an index of 100 vectors"):
        index.search(queries, 101)
    broken = queries.copy()
    broken[3, 0] = np.nan
    with pytest.raises(ValueError, match="1 query rows contain NaN or inf"):
        index.search(broken, 5)


def test_killed_actor_is_restarted_and_the_call_retried(ray_session, data):
    ray = ray_session
    vectors, ids, queries = data
    index = RetrievalIndex("test-restart", vectors, ids, num_shards=2)
    before = index.search(queries, 10)
    ray.kill(index.actors[1], no_restart=False)
    after = index.search(queries, 10)
    np.testing.assert_array_equal(before[1], after[1])
