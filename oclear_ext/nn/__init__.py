"""Modules built on the fused ops."""

from .concept_attention import ConceptAttention
from .concept_aware_fusion import ConceptAwareFusion
from .margin_softmax_loss import MarginSoftmaxLoss
from .query_composer import QueryComposer
from .sharded_margin_classifier import ShardedMarginClassifier

__all__ = ["MarginSoftmaxLoss", "ShardedMarginClassifier", "ConceptAttention", "ConceptAwareFusion", "QueryComposer"]
