"""Modules built on the fused ops."""

from .margin_softmax_loss import MarginSoftmaxLoss

__all__ = ["MarginSoftmaxLoss"]
