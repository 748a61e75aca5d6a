"""oclear_ext: fused kernels for image-to-multi-modal retrieval learned by large-scale classification.

Public API:
    oclear_ext.margin_softmax_loss      fused normalised margin softmax (CosFace / ArcFace / SphereFace)
    oclear_ext.nn.MarginSoftmaxLoss     the same as a module that owns the class weights
    oclear_ext.nn.ShardedMarginClassifier   class-sharded over torch.distributed (hybrid parallelism)
    oclear_ext.distributed.*            partition, the sharded softmax algebra, sharded checkpoints
    oclear_ext.optim.RowSparseSGD / RowSparseAdamW   optimizer steps that touch only the sampled class rows
    oclear_ext.concept_attention        fused small cross-attention (text x concept memory, image x text)
    oclear_ext.concept_attention_backend   context manager: its kernel family ("auto", "cuda_core", "tensor_core")
    oclear_ext.nn.ConceptAwareFusion    concept-aware image/text fusion of documents
    oclear_ext.hardest_classes          fused top-k of the classes closest to a batch (hard negatives)
    oclear_ext.reference.*              plain-PyTorch references (ground truth, benchmark baselines)
    oclear_ext.cpu_output_cache         opt-in bounded cache of the CPU op's large outputs (enabled, set_limit, stats, empty)
"""

import importlib
from typing import Any

__version__ = "0.1.0"

# The compiled kernels load on first use, not at `import oclear_ext`: the pure-Python layers (data, eval and
# their console scripts) work without a build, or with a build made for another torch, and the first use of an
# op (or of a module built on the ops) raises the readable build error of oclear_ext._extension.
_LAZY_NAMES = {
    "margin_softmax_loss": "._ops.margin_softmax",
    "concept_attention": "._ops.concept_attention",
    "concept_attention_backend": "._ops.concept_attention",
    "hardest_classes": "._ops.class_topk",
    "RandomNegatives": "._ops.negatives",
    "TopKNegatives": "._ops.negatives",
    "build_info": "._ops",
    "margin_softmax_options": "._ops.options",
}
_SUBMODULES = ("nn", "losses", "optim", "distributed", "reference", "cpu_output_cache", "data", "eval", "models", "search", "train")

__all__ = ["margin_softmax_loss", "margin_softmax_options", "concept_attention", "concept_attention_backend", "hardest_classes", "RandomNegatives", "TopKNegatives", "nn", "losses", "optim",
           "distributed", "reference", "cpu_output_cache", "build_info"]


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(_LAZY_NAMES[name], __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'oclear_ext' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_NAMES, *_SUBMODULES})
