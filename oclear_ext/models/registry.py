"""Encoders by name: the defaults that train on a CPU from scratch, and pretrained ones from PyPI packages."""

from __future__ import annotations

from torch import nn

from .encoders import HashingTextEncoder, SmallCNN

IMAGE_ENCODERS = ("small-cnn", "efficientnet-lite0")
TEXT_ENCODERS = ("hashing", "minilm")


def build_image_encoder(name: str) -> nn.Module:
    """An image encoder with `out_features`; images (B, 3, H, W) in [0, 1]."""
    if name == "small-cnn":
        return SmallCNN()
    if name == "efficientnet-lite0":
        from .pretrained import EfficientNetLite0

        return EfficientNetLite0()
    raise ValueError(f"unknown image encoder {name!r}; expected one of {IMAGE_ENCODERS}")


def build_text_encoder(name: str, dim: int) -> nn.Module:
    """A text encoder: texts -> (tokens (B, L, dim), padding mask (B, L), True = padding)."""
    if name == "hashing":
        return HashingTextEncoder(dim)
    if name == "minilm":
        from .minilm import MiniLMTextEncoder

        return MiniLMTextEncoder(dim)
    raise ValueError(f"unknown text encoder {name!r}; expected one of {TEXT_ENCODERS}")
