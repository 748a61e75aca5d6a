"""Plain-PyTorch references: the ground truth of the tests and the baseline of the benchmarks.

They materialise everything (the N x C logits included) and import nothing else of oclear_ext.
"""

from .class_topk import hardest_classes
from .margin_softmax import margin_softmax_loss

__all__ = ["hardest_classes", "margin_softmax_loss"]
from .concept_attention import concept_attention  # noqa: E402

__all__ += ["concept_attention"]
from .contrastive import label_aware_contrastive_loss  # noqa: E402

__all__ += ["label_aware_contrastive_loss"]
