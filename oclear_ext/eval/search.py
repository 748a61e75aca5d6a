"""Nearest-neighbour search with faiss: exact inner product, or IVF / HNSW for large doc sets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

IndexKind = Literal["exact", "ivf", "hnsw"]


@dataclass(frozen=True)
class IndexOptions:
    """kind: "exact" (IndexFlatIP), "ivf" (IndexIVFFlat: nlist cells, nprobe visited; nlist defaults to
    about 4 sqrt(N_docs)), or "hnsw" (IndexHNSWFlat: M links per node, ef_search candidate list)."""

    kind: IndexKind = "exact"
    nlist: int | None = None
    nprobe: int = 16
    hnsw_m: int = 32
    ef_search: int = 128


def _as_float32(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().float().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"search: {name} must be 2-D (N, D), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"search: {name} contains NaN or inf")
    return x


def _object_array(values: Sequence) -> np.ndarray:
    """1-D object array of arbitrary hashable keys (np.asarray would split tuples into columns)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def build_index(docs: np.ndarray, options: IndexOptions = IndexOptions()):
    import faiss

    d = docs.shape[1]
    if options.kind == "exact":
        index = faiss.IndexFlatIP(d)
    elif options.kind == "ivf":
        nlist = options.nlist or max(1, min(len(docs) // 39, int(4 * np.sqrt(len(docs)))))  # faiss wants >= 39 points per cell
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(docs)
        index.nprobe = min(options.nprobe, nlist)
    elif options.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = options.ef_search
    else:
        raise ValueError(f"search: index kind must be 'exact', 'ivf' or 'hnsw', got {options.kind!r}")
    index.add(docs)
    return index


def search(queries, docs, k: int, options: IndexOptions = IndexOptions(),
           query_keys: Sequence | None = None, doc_keys: Sequence | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k docs by inner product for each query: (scores (Nq, k) float32, ids (Nq, k) int64, -1 = none).

    query_keys / doc_keys: item identities; a doc with the same key as the query (the same item, when
    queries and docs overlap) is never returned. Inputs are used as given: normalise them first for cosine.
    """
    q = _as_float32(queries, "queries")
    d = _as_float32(docs, "docs")
    if q.shape[1] != d.shape[1]:
        raise ValueError(f"search: queries have dimension {q.shape[1]} but docs have {d.shape[1]}")
    if k < 1:
        raise ValueError(f"search: k must be >= 1, got {k}")
    if len(d) == 0:
        raise ValueError("search: the doc set is empty")
    if (query_keys is None) != (doc_keys is None):
        raise ValueError("search: give both query_keys and doc_keys, or neither")
    extra = 0
    if doc_keys is not None:
        if len(query_keys) != len(q) or len(doc_keys) != len(d):
            raise ValueError(f"search: {len(query_keys)} query_keys / {len(doc_keys)} doc_keys for {len(q)} queries / {len(d)} docs")
        counts: dict = {}
        for key in doc_keys:
            counts[key] = counts.get(key, 0) + 1
        extra = max((counts.get(key, 0) for key in query_keys), default=0)  # enough slack to drop every self-match
    index = build_index(d, options)
    kk = min(k + extra, len(d))
    scores, ids = index.search(q, kk)
    if doc_keys is not None and extra:
        # Move self-matches (and empty slots) to the end of each row, keeping the rank order of the rest.
        dk, qk = _object_array(doc_keys), _object_array(query_keys)
        drop = (ids < 0) | (dk[np.maximum(ids, 0)] == qk[:, None])
        order = np.argsort(drop, axis=1, kind="stable")[:, :k]
        drop = np.take_along_axis(drop, order, axis=1)
        scores = np.where(drop, -np.inf, np.take_along_axis(scores, order, axis=1)).astype(np.float32)
        ids = np.where(drop, -1, np.take_along_axis(ids, order, axis=1))
        kk = ids.shape[1]
    if kk < k:
        scores = np.pad(scores, ((0, 0), (0, k - kk)), constant_values=-np.inf)
        ids = np.pad(ids, ((0, 0), (0, k - kk)), constant_values=-1)
    return scores.astype(np.float32), ids.astype(np.int64)


def approximate_recall(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of |approx top-k & exact top-k| / |exact top-k|: how much of the exact answer the index finds."""
    hits = total = 0
    for a, e in zip(approx_ids, exact_ids):
        exact = set(int(i) for i in e if i >= 0)
        hits += len(exact & set(int(i) for i in a if i >= 0))
        total += len(exact)
    return hits / total if total else 1.0
