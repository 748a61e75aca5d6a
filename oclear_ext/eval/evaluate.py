"""Retrieval evaluation of embeddings: search, metrics, per-query results."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .metrics import average_precision, relevance, relevant_counts, retrieval_metrics
from .search import IndexOptions, approximate_recall, l2_normalize, search

KS = (1, 5, 10)
MAP_K = 10


@dataclass
class EvalResult:
    metrics: dict                      # {"instance": {...}, "category": {...}?, "index": {...}}
    scores: np.ndarray                 # (Nq, K) similarity of the ranked docs
    ids: np.ndarray                    # (Nq, K) doc positions (-1: none)
    relevant: np.ndarray               # (Nq, K) bool, same label
    n_relevant: np.ndarray             # (Nq,)
    per_query: list[dict] = field(default_factory=list)


def evaluate(query_emb, doc_emb, query_labels: Sequence[str], doc_labels: Sequence[str],
             query_keys: Sequence | None = None, doc_keys: Sequence | None = None,
             query_categories: Sequence[str | None] | None = None, doc_categories: Sequence[str | None] | None = None,
             options: IndexOptions = IndexOptions(), k: int = MAP_K, normalize: bool = True) -> EvalResult:
    """Ranks docs for every query and scores the ranking; relevant = same label (and same category, at category level).

    query_keys / doc_keys identify items: when queries and docs share items, a query never retrieves
    itself and is not counted as its own relevant doc. With an approximate index (ivf / hnsw) the exact
    search runs too, and its recall of the exact top-k and the exact metrics are reported alongside.
    """
    q = np.asarray(query_emb, dtype=np.float32)
    d = np.asarray(doc_emb, dtype=np.float32)
    if len(query_labels) != len(q) or len(doc_labels) != len(d):
        raise ValueError(f"evaluate: {len(query_labels)} query labels for {len(q)} query embeddings, "
                         f"{len(doc_labels)} doc labels for {len(d)} doc embeddings")
    if normalize:
        q, d = l2_normalize(q), l2_normalize(d)
    k = max(k, *KS, MAP_K)
    scores, ids = search(q, d, k, options, query_keys, doc_keys)
    rel = relevance(ids, query_labels, doc_labels)
    n_rel = relevant_counts(query_labels, doc_labels, query_keys, doc_keys)
    metrics = {"instance": retrieval_metrics(rel, n_rel, KS, MAP_K), "index": {"kind": options.kind}}
    if options.kind != "exact":
        _, exact_ids = search(q, d, k, IndexOptions(), query_keys, doc_keys)
        metrics["index"][f"recall_of_exact_top{k}"] = approximate_recall(ids, exact_ids)
        metrics["instance_exact"] = retrieval_metrics(relevance(exact_ids, query_labels, doc_labels), n_rel, KS, MAP_K)
    if query_categories is not None:
        if doc_categories is None or any(c is None for c in (*query_categories, *doc_categories)):
            raise ValueError("evaluate: category-level metrics need a category on every query and doc")
        metrics["category"] = retrieval_metrics(relevance(ids, query_categories, doc_categories),
                                                relevant_counts(query_categories, doc_categories, query_keys, doc_keys), KS, MAP_K)
    ap = average_precision(rel[:, :MAP_K], n_rel)
    per_query = []
    for r in range(len(q)):
        hits = np.flatnonzero(rel[r])
        per_query.append({
            "query": int(r), "label": query_labels[r], "n_relevant": int(n_rel[r]),
            "first_relevant_rank": int(hits[0]) + 1 if hits.size else None,
            f"ap@{MAP_K}": float(ap[r]) if n_rel[r] > 0 else None,
            "top": [{"doc": int(i), "label": doc_labels[i], "score": float(s), "relevant": bool(x)}
                    for i, s, x in zip(ids[r], scores[r], rel[r]) if i >= 0],
        })
    return EvalResult(metrics, scores, ids, rel, n_rel, per_query)


def format_table(metrics: dict) -> str:
    """A plain-text table: one row per level (instance, category, exact), columns R@1/5/10 and mAP@10."""
    cols = [f"R@{k}" for k in KS] + [f"mAP@{MAP_K}"]
    rows = [(name, metrics[name]) for name in ("instance", "instance_exact", "category") if name in metrics]
    header = f"{'level':<16}{'queries':>8}" + "".join(f"{c:>9}" for c in cols)
    lines = [header, "-" * len(header)]
    for name, m in rows:
        lines.append(f"{name:<16}{m['queries']:>8}" + "".join(f"{m[c]:>9.4f}" for c in cols))
    return "\n".join(lines)
