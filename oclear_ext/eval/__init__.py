"""Retrieval evaluation: faiss search (exact inner product, IVF / HNSW), Recall@K and mAP@10,
per-query results, a visual report, and the embedding-function interface models plug into."""

from .embedders import EmbeddingFunction, PixelEmbedding, embed_manifest, load_embedder, load_embeddings
from .evaluate import EvalResult, evaluate, format_table
from .metrics import average_precision, relevance, relevant_counts, retrieval_metrics
from .search import IndexOptions, approximate_recall, search

__all__ = [
    "EmbeddingFunction", "PixelEmbedding", "embed_manifest", "load_embedder", "load_embeddings",
    "EvalResult", "evaluate", "format_table", "average_precision", "relevance", "relevant_counts",
    "retrieval_metrics", "IndexOptions", "approximate_recall", "search",
]
