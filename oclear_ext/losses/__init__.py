"""Losses on the model's embeddings that complement the margin softmax (oclear_ext.nn)."""

from .contrastive import (LabelAwareContrastiveLoss, gathered_label_aware_contrastive_loss,
                          label_aware_contrastive_loss)

__all__ = ["LabelAwareContrastiveLoss", "gathered_label_aware_contrastive_loss", "label_aware_contrastive_loss"]
