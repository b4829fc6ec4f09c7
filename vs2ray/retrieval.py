"""FAISS neighbour search inside Ray actors, for VS2++ (METHOD.md §4).

`IndexShard` holds a FAISS inner-product index over unit-normalised vectors (flat by
default, IVF or HNSW by config), on a GPU through `faiss.StandardGpuResources` when Ray gave
the actor one (`retrieval.gpus_per_shard`): an actor given no GPU builds a CPU index even on a
GPU node, and one given a GPU that its FAISS build cannot use stops with a message naming the
build (faiss-cpu, or a GPU build without kernels for the card) instead of reserving it idle.
`RetrievalIndex` is what trials use: it gets or creates one named actor
per shard (`get_if_exists`, so every trial finds the same ones), searches all shards,
merges their top-k, and memoises results per (query-set key, k). Actors restart when
they die (`max_restarts`) and calls are retried (`max_task_retries`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vs2ray.devices import FAKE_GPUS_ENV, cuda_diagnosis, fake_gpus

INDEX_KINDS = ("flat", "ivf", "hnsw")


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)


class FaissGpuUnavailable(RuntimeError):
    """A FAISS shard was meant to run on a GPU and its FAISS build cannot; the message says which and why."""


def _faiss_has_gpu(faiss: Any) -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _shard_gpu_ids() -> list[Any] | None:
    """The GPUs Ray gave this shard's actor, or None outside a Ray worker (a local index in a test or script)."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None
    return list(ray.get_gpu_ids())


def _on_gpu(faiss: Any, kind: str, use_gpu: str, gpu_ids: list[Any] | None) -> bool:
    """Whether to build the index on a GPU: given one by Ray (or, outside Ray, one FAISS sees), and a GPU kind."""
    if use_gpu == "no" or kind == "hnsw":  # FAISS has no GPU HNSW
        if use_gpu == "yes":
            raise ValueError("retrieval.use_gpu: yes, but FAISS has no GPU HNSW index; use index: flat or ivf")
        return False
    if gpu_ids is not None and not gpu_ids:  # a Ray actor given no GPU: never the node's GPU 0 unreserved
        if use_gpu == "yes":
            raise FaissGpuUnavailable(
                "retrieval.use_gpu: yes, but Ray gave this shard no GPU (retrieval.gpus_per_shard)"
            )
        return False
    if gpu_ids is None:
        if use_gpu == "yes" and not _faiss_has_gpu(faiss):
            raise FaissGpuUnavailable("retrieval.use_gpu: yes, but this process sees no GPU that FAISS can use")
        return _faiss_has_gpu(faiss)
    if fake_gpus():
        return False
    if not hasattr(faiss, "StandardGpuResources"):
        raise FaissGpuUnavailable(
            f"Ray gave this FAISS shard GPU {gpu_ids}, but the installed FAISS is a CPU build (faiss-cpu): install "
            f"vs2ray[gpu] on the GPU nodes (never beside faiss-cpu), or set retrieval.gpus_per_shard: 0. If the GPU "
            f"resources are fake (a test cluster), set {FAKE_GPUS_ENV}=1."
        )
    if faiss.get_num_gpus() == 0:
        raise FaissGpuUnavailable(f"Ray gave this FAISS shard GPU {gpu_ids}, but FAISS sees none ({cuda_diagnosis()})")
    return True


def _fill_on_gpu(faiss: Any, index: Any, vectors: np.ndarray) -> None:
    """Add `vectors` to a GPU index and search once: a FAISS build without kernels for this card fails here,
    with a message that says so, not in the middle of a trial (faiss-gpu-cu12 has sm_70 / sm_80 code only,
    so Hopper fails, at the first add or search)."""
    try:
        index.add(vectors)
        index.search(vectors[:1], 1)
    except RuntimeError as error:
        raise FaissGpuUnavailable(
            f"FAISS {faiss.__version__} cannot search on this GPU ({str(error).splitlines()[-1][:200]}): its build "
            f"has no kernels for the card's compute capability; install vs2ray[gpu-hopper] on H100/H200 nodes, or "
            f"set retrieval.use_gpu: no"
        ) from None


class IndexShard:
    """One FAISS index over (n, dim) vectors with their int64 ids; cosine similarity via inner product."""

    def __init__(
        self,
        vectors: np.ndarray,
        ids: np.ndarray,
        kind: str = "flat",
        use_gpu: str = "auto",
        gpu_ids: list[Any] | None = None,
    ) -> None:
        """`gpu_ids`: the GPUs Ray gave the actor (default: asked of Ray inside a worker, None outside one)."""
        import faiss

        if kind not in INDEX_KINDS:
            raise ValueError(f"retrieval.index must be one of {INDEX_KINDS}, got {kind!r}")
        vectors = _normalise(vectors)
        self.ids = np.asarray(ids, dtype=np.int64)
        self.dim = vectors.shape[1]
        index: Any  # flat, IVF, HNSW or a GPU index: FAISS's classes share no declared base
        if kind == "flat":
            index = faiss.IndexFlatIP(self.dim)
        elif kind == "ivf":
            nlist = max(1, int(np.sqrt(len(vectors))))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
            index.nprobe = max(1, nlist // 4)
        else:
            index = faiss.IndexHNSWFlat(self.dim, 32, faiss.METRIC_INNER_PRODUCT)
        self.on_gpu = _on_gpu(faiss, kind, use_gpu, gpu_ids if gpu_ids is not None else _shard_gpu_ids())
        if self.on_gpu:
            self._resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._resources, 0, index)  # device 0: Ray limits the visible GPUs
            _fill_on_gpu(faiss, index, vectors)
        else:
            index.add(vectors)
        self.index = index
        where = "GPU" if self.on_gpu else "CPU"
        print(f"FAISS shard: {type(index).__name__} over {len(self.ids)} vectors of dim {self.dim} on the {where}")
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
        self.actors: list[Any] = []  # actor handles of IndexShard
        remote_shard: Any = ray.remote(IndexShard)
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
