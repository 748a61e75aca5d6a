"""Row-sparse optimizer steps for class weights (touch only the rows a sampled softmax used)."""

from .row_sparse import RowSparseAdamW, RowSparseSGD

__all__ = ["RowSparseSGD", "RowSparseAdamW"]
