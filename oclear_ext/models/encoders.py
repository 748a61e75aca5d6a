"""Default encoders that train on a CPU in minutes and need no download: a small CNN and a hashing text encoder."""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

_WORD = re.compile(r"[a-z0-9]+")


class SmallCNN(nn.Module):
    """(B, 3, H, W) images in [0, 1] -> (B, out_features): a small conv net that keeps the spatial layout.

    Three conv stages (stride 2) down to a 4 x 4 grid (adaptive pooling, so any input size works), then the
    flattened grid -> a linear layer (conv_features). Keeping the grid instead of global pooling keeps where
    things are, which for icons and product shots carries much of the identity; for the same reason the
    image pooled to pixel_grid x pixel_grid (centred, scaled to the conv features' norm) is appended
    (3 * pixel_grid^2 features; 0 turns it off): a plain 8 x 8 pixel grid is already a strong baseline on
    the emoji data. Inputs are standardised per channel inside (ImageNet statistics).
    """

    def __init__(self, width: int = 32, conv_features: int = 256, grid: int = 4, pixel_grid: int = 8) -> None:
        super().__init__()
        self.pixel_grid = pixel_grid

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*block(3, width, 1), *block(width, width, 2), *block(width, 2 * width, 2),
                                      *block(2 * width, 4 * width, 2), nn.AdaptiveAvgPool2d(grid))
        self.project = nn.Linear(4 * width * grid * grid, conv_features)
        self.out_features = conv_features + 3 * pixel_grid * pixel_grid
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"SmallCNN: images must be (B, 3, H, W), got {tuple(images.shape)}")
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        conv = self.project(self.features(x).flatten(1))
        if not self.pixel_grid:
            return conv
        # The image itself at pixel_grid x pixel_grid, centred and normalised per image (brightness removed),
        # next to the learned features: layout and colour survive whatever the conv stages have learned yet.
        pixels = nn.functional.adaptive_avg_pool2d(images, self.pixel_grid).flatten(1)
        pixels = nn.functional.normalize(pixels - pixels.mean(dim=1, keepdim=True), dim=1)
        return torch.cat([conv, pixels * conv.detach().norm(dim=1, keepdim=True).clamp_min(1e-6)], dim=1)


class HashingTokenizer:
    """Lower-cased alphanumeric words hashed (CRC-32, stable across runs and machines) into `buckets` ids.

    Id 0 is padding; a word maps to 1 + crc32(word) % buckets. Texts longer than max_tokens are cut
    (max_tokens is a model setting, documented, not a silent data loss: titles are short).
    """

    def __init__(self, buckets: int = 8192, max_tokens: int = 32) -> None:
        if buckets < 1 or max_tokens < 1:
            raise ValueError(f"HashingTokenizer: buckets and max_tokens must be >= 1, got {buckets}, {max_tokens}")
        self.buckets = buckets
        self.max_tokens = max_tokens

    def words(self, text: str | None) -> list[str]:
        return _WORD.findall(text.lower())[: self.max_tokens] if text else []

    def __call__(self, texts: Sequence[str | None], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """(ids (B, L) int64, padding mask (B, L) bool, True = padding); L = longest text, at least 1."""
        rows = [[1 + zlib.crc32(w.encode()) % self.buckets for w in self.words(t)] for t in texts]
        length = max([len(r) for r in rows] + [1])
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return ids.to(device), (ids == 0).to(device)


class HashingTextEncoder(nn.Module):
    """texts -> (token embeddings (B, L, dim), padding mask (B, L)): hashed word embeddings plus positions.

    No vocabulary file and no download; 8,192 buckets keep the table small (2M parameters at dim 256); raise it for large vocabularies.
    A text-less document (None or no words) is all padding, which the fusion turns into "no text".
    """

    def __init__(self, dim: int, buckets: int = 8192, max_tokens: int = 32) -> None:
        super().__init__()
        self.tokenizer = HashingTokenizer(buckets, max_tokens)
        self.embed = nn.Embedding(buckets + 1, dim, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(max_tokens, dim))
        self.norm = nn.LayerNorm(dim)
        self.out_features = dim
        nn.init.normal_(self.embed.weight, std=0.02)
        with torch.no_grad():
            self.embed.weight[0].zero_()

    def forward(self, texts: Sequence[str | None]) -> tuple[Tensor, Tensor]:
        ids, mask = self.tokenizer(texts, device=self.embed.weight.device)
        tokens = self.norm(self.embed(ids) + self.position[: ids.shape[1]])
        return tokens, mask
