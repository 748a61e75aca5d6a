"""oclear_ext: fused kernels for image-to-multi-modal retrieval learned by large-scale classification.

Public API:
    oclear_ext.margin_softmax_loss      fused normalised margin softmax (CosFace / ArcFace / SphereFace)
    oclear_ext.nn.MarginSoftmaxLoss     the same as a module that owns the class weights
    oclear_ext.reference.*              plain-PyTorch references (ground truth, benchmark baselines)
"""

from ._extension import load_extension

build_info = load_extension()

from . import nn, reference  # noqa: E402
from ._ops.margin_softmax import margin_softmax_loss  # noqa: E402

__version__ = "0.1.0"
__all__ = ["margin_softmax_loss", "nn", "reference", "build_info"]
