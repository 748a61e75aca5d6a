"""Retrieval metrics against same-label relevance: Recall@K (hit rate) and mAP@K.

Definitions (per query, averaged over queries that have at least one relevant doc in the collection):
    Recall@K = 1 if a relevant doc is among the top K, else 0 (the hit-rate form used in image retrieval).
    AP@K     = (1 / min(R, K)) * sum_{i <= K} P@i * rel_i, R = relevant docs in the collection (self
               excluded), so a query with R relevant docs all ranked first scores 1 even when R < K.
Queries without any relevant doc are excluded and counted (`queries_without_relevant`).
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np


def relevance(ids: np.ndarray, query_labels: Sequence, doc_labels: Sequence) -> np.ndarray:
    """(Nq, K) bool: retrieved doc ids[r, i] has the query's label (-1 ids are never relevant)."""
    doc_labels = np.asarray(doc_labels, dtype=object)
    query_labels = np.asarray(query_labels, dtype=object)
    return (ids >= 0) & (doc_labels[np.maximum(ids, 0)] == query_labels[:, None])


def relevant_counts(query_labels: Sequence, doc_labels: Sequence, query_keys: Sequence | None = None,
                    doc_keys: Sequence | None = None) -> np.ndarray:
    """(Nq,) number of docs with the query's label, not counting the query itself (same key)."""
    per_label = Counter(doc_labels)
    counts = np.array([per_label.get(l, 0) for l in query_labels], dtype=np.int64)
    if query_keys is not None:
        label_of_doc_key = {}
        for key, label in zip(doc_keys, doc_labels):
            label_of_doc_key.setdefault(key, []).append(label)
        for r, (key, label) in enumerate(zip(query_keys, query_labels)):
            counts[r] -= sum(1 for l in label_of_doc_key.get(key, ()) if l == label)
    return counts


def retrieval_metrics(rel: np.ndarray, n_relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10), map_k: int = 10) -> dict:
    """Recall@k for each k and mAP@map_k from a (Nq, K) relevance matrix (K >= max(ks, map_k))."""
    if rel.shape[1] < max(*ks, map_k):
        raise ValueError(f"retrieval_metrics: need at least {max(*ks, map_k)} ranked docs per query, got {rel.shape[1]}")
    if len(n_relevant) != len(rel):
        raise ValueError(f"retrieval_metrics: {len(n_relevant)} relevant counts for {len(rel)} queries")
    valid = n_relevant > 0
    out = {"queries": int(valid.sum()), "queries_without_relevant": int((~valid).sum())}
    if not valid.any():
        raise ValueError("retrieval_metrics: no query has a relevant doc in the collection")
    r = rel[valid]
    for k in ks:
        out[f"R@{k}"] = float(r[:, :k].any(axis=1).mean())
    out[f"mAP@{map_k}"] = float(average_precision(r[:, :map_k], n_relevant[valid]).mean())
    return out


def average_precision(rel: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """(Nq,) AP over the K ranks of rel, normalised by min(R, K)."""
    k = rel.shape[1]
    hits = np.cumsum(rel, axis=1)
    precision = hits / np.arange(1, k + 1)
    denom = np.minimum(n_relevant, k).astype(np.float64)
    return (precision * rel).sum(axis=1) / np.maximum(denom, 1)
