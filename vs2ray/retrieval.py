"""FAISS neighbour search inside Ray actors, for VS2++ (METHOD.md §4).

`IndexShard` holds a FAISS inner-product index over unit-normalised vectors (flat by
default, IVF or HNSW by config), on a GPU through `faiss.StandardGpuResources` when the
actor sees one. `RetrievalIndex` is what trials use: it gets or creates one named actor
per shard (`get_if_exists`, so every trial finds the same ones), searches all shards,
merges their top-k, and memoises results per (query-set key, k). Actors restart when
they die (`max_restarts`) and calls are retried (`max_task_retries`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

INDEX_KINDS = ("flat", "ivf", "hnsw")


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)


class IndexShard:
    """One FAISS index over (n, dim) vectors with their int64 ids; cosine similarity via inner product."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray, kind: str = "flat", use_gpu: str = "auto") -> None:
        import faiss

        if kind not in INDEX_KINDS:
            raise ValueError(f"retrieval.index must be one of {INDEX_KINDS}, got {kind!r}")
        vectors = _normalise(vectors)
        self.ids = np.asarray(ids, dtype=np.int64)
        self.dim = vectors.shape[1]
        if kind == "flat":
            index = faiss.IndexFlatIP(self.dim)
        elif kind == "ivf":
            nlist = max(1, int(np.sqrt(len(vectors))))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
            index.nprobe = max(1, nlist // 4)
        else:
            index = faiss.IndexHNSWFlat(self.dim, 32, faiss.METRIC_INNER_PRODUCT)
        self.on_gpu = use_gpu != "no" and kind != "hnsw" and hasattr(faiss, "StandardGpuResources")
        self.on_gpu = self.on_gpu and faiss.get_num_gpus() > 0
        if use_gpu == "yes" and not self.on_gpu:
            raise RuntimeError("retrieval.use_gpu: yes, but this actor sees no GPU that FAISS can use")
        if self.on_gpu:
            self._resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._resources, 0, index)
        index.add(vectors)
        self.index = index
        self._memo: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    def size(self) -> int:
        return len(self.ids)

    def describe(self) -> dict[str, Any]:
        return {"size": len(self.ids), "dim": self.dim, "gpu": self.on_gpu}

    def search(self, queries: np.ndarray, k: int, key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids), each (q, k), by cosine similarity; memoised per (key, k) when `key` is given."""
        if key is not None and (key, k) in self._memo:
            return self._memo[(key, k)]
        queries = np.asarray(queries, dtype=np.float32)
        check_queries(queries, self.dim, k, len(self.ids))
        scores, positions = self.index.search(_normalise(queries), k)
        result = (scores, self.ids[positions])
        if key is not None:
            self._memo[(key, k)] = result
        return result


def check_queries(queries: np.ndarray, dim: int, k: int, size: int) -> None:
    """Reject a wrong dimension, a k the index cannot serve, or NaN queries with a clear message."""
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"retrieval: queries must be (n, {dim}), got shape {tuple(queries.shape)}")
    if not 1 <= k <= size:
        raise ValueError(f"retrieval: k={k} neighbours asked of an index of {size} vectors")
    if not np.isfinite(queries).all():
        bad = np.flatnonzero(~np.isfinite(queries).all(axis=1))
        raise ValueError(f"retrieval: {len(bad)} query rows contain NaN or inf (first: row {bad[0]})")


def merge_topk(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (scores, ids) (q, k_s) into the global top-k, highest score first."""
    scores = np.concatenate([r[0] for r in results], axis=1)
    ids = np.concatenate([r[1] for r in results], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


class RetrievalIndex:
    """Client for a (possibly sharded) FAISS index served by named Ray actors.

    The first client with a given `name` creates the actors from `vectors`/`ids`; later
    clients (other trials) pass `vectors=None` and attach to the same actors by name.
    """

    def __init__(
        self,
        name: str,
        vectors: np.ndarray | None = None,
        ids: np.ndarray | None = None,
        kind: str = "flat",
        num_shards: int = 1,
        use_gpu: str = "auto",
        gpus_per_shard: float = 0.0,
        namespace: str = "vs2ray",
    ) -> None:
        import ray

        self.name, self.namespace = name, namespace
        self._refs: list[Any] = []  # keep constructor arguments alive so that restarted actors can rebuild
        self.actors = []
        remote_shard = ray.remote(IndexShard)
        options = {"max_restarts": 3, "max_task_retries": 3, "num_cpus": 0.25, "num_gpus": gpus_per_shard}
        for shard in range(num_shards):
            actor_name = f"{name}-shard{shard}"
            if vectors is None:
                self.actors.append(ray.get_actor(actor_name, namespace=namespace))
                continue
            part = np.array_split(np.arange(len(vectors)), num_shards)[shard]
            vector_ref, id_ref = ray.put(np.asarray(vectors)[part]), ray.put(np.asarray(ids)[part])
            self._refs += [vector_ref, id_ref]
            self.actors.append(
                remote_shard.options(name=actor_name, namespace=namespace, get_if_exists=True, **options).remote(
                    vector_ref, id_ref, kind, use_gpu
                )
            )
        self.sizes = ray.get([actor.size.remote() for actor in self.actors])
        self.dim = ray.get(self.actors[0].describe.remote())["dim"]

    def search(self, queries: np.ndarray, k: int, key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids), each (q, k), over all shards; errors are raised here, before any remote call."""
        import ray

        queries = np.asarray(queries, dtype=np.float32)
        check_queries(queries, self.dim, k, sum(self.sizes))
        shards = zip(self.actors, self.sizes, strict=True)
        calls = [actor.search.remote(queries, min(k, size), key) for actor, size in shards]
        return merge_topk(ray.get(calls), k)
