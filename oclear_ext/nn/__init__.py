"""Modules built on the fused ops."""

from .margin_softmax_loss import MarginSoftmaxLoss
from .sharded_margin_classifier import ShardedMarginClassifier

__all__ = ["MarginSoftmaxLoss", "ShardedMarginClassifier"]
