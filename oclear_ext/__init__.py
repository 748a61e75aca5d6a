"""oclear_ext: fused kernels for image-to-multi-modal retrieval learned by large-scale classification.

Public API:
    oclear_ext.margin_softmax_loss      fused normalised margin softmax (CosFace / ArcFace / SphereFace)
    oclear_ext.nn.MarginSoftmaxLoss     the same as a module that owns the class weights
    oclear_ext.nn.ShardedMarginClassifier   class-sharded over torch.distributed (hybrid parallelism)
    oclear_ext.distributed.*            partition, the sharded softmax algebra, sharded checkpoints
    oclear_ext.optim.RowSparseSGD / RowSparseAdamW   optimizer steps that touch only the sampled class rows
    oclear_ext.concept_attention        fused small cross-attention (text x concept memory, image x text)
    oclear_ext.nn.ConceptAwareFusion    concept-aware image/text fusion of documents
    oclear_ext.hardest_classes          fused top-k of the classes closest to a batch (hard negatives)
    oclear_ext.reference.*              plain-PyTorch references (ground truth, benchmark baselines)
    oclear_ext.cpu_output_cache         the bounded cache of the CPU ops' large outputs (stats, empty, set_limit)
"""

from ._extension import load_extension

build_info = load_extension()

from . import cpu_output_cache, distributed, nn, optim, reference  # noqa: E402
from ._ops.class_topk import hardest_classes  # noqa: E402
from ._ops.concept_attention import concept_attention  # noqa: E402
from ._ops.margin_softmax import margin_softmax_loss  # noqa: E402
from ._ops.negatives import RandomNegatives, TopKNegatives  # noqa: E402

__version__ = "0.1.0"
__all__ = ["margin_softmax_loss", "concept_attention", "hardest_classes", "RandomNegatives", "TopKNegatives", "nn", "optim",
           "distributed", "reference", "cpu_output_cache", "build_info"]
