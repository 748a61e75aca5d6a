"""A torch Dataset over a manifest: decoded, resized images; text kept as strings; contiguous class ids."""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .manifest import ROLES, ClassIndex, Manifest, load_manifest

# augment(image (3, H, W) float32 in [0, 1], generator) -> image. The generator is seeded from
# (seed, epoch, index), so an item gets the same augmentation whatever worker or order loads it.
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def decode_image(path: str, size: int | tuple[int, int] | None, background: tuple[int, int, int] = (255, 255, 255)) -> torch.Tensor:
    """Image file -> (3, H, W) float32 in [0, 1]. Transparency is composited over `background`.

    size: an int (square) or (height, width) to resize to (bilinear with antialiasing), None to keep.
    """
    from PIL import Image

    with Image.open(path) as im:
        return pil_to_tensor(im, size, background)


def pil_to_tensor(im, size: int | tuple[int, int] | None, background: tuple[int, int, int] = (255, 255, 255)) -> torch.Tensor:
    """A PIL image -> (3, H, W) float32 in [0, 1], exactly as decode_image does for a file."""
    from PIL import Image

    if im.mode in ("RGBA", "LA", "P") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.new("RGB", rgba.size, background)
        im.paste(rgba, mask=rgba.getchannel("A"))
    else:
        im = im.convert("RGB")
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else size
        if im.size != (w, h):
            im = im.resize((w, h), Image.BILINEAR, reducing_gap=None)
    array = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class ManifestDataset(Dataset):
    """Items of a manifest as dicts: image (3, H, W) float32 in [0, 1], text (str or None), label (int64
    contiguous class id), role, weight, index (position in the manifest), modifier (str or None: a composed
    query's text).

    manifest:    a Manifest or a path to one (validated on load).
    image_size:  int or (H, W) to resize every image to; None keeps sizes (then batch with care).
    roles:       keep only these roles (e.g. ("query",)); indices stay positions in the manifest.
    class_index: the label -> id mapping to use (e.g. the training one when evaluating); default: the
                 manifest's own sorted labels. Save it with `dataset.class_index.save(path)`.
    transform:   replaces decoding: transform(path) -> tensor (e.g. a torchvision pipeline on PIL).
    augment:     augment(image, generator) -> image after decoding, deterministic per (seed, epoch, index).
    """

    def __init__(
        self,
        manifest: Manifest | str | os.PathLike,
        image_size: int | tuple[int, int] | None = 224,
        roles: Sequence[str] | None = None,
        class_index: ClassIndex | None = None,
        transform: Callable[[str], torch.Tensor] | None = None,
        augment: Augment | None = None,
        background: tuple[int, int, int] = (255, 255, 255),
        seed: int = 0,
    ):
        self.manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        if roles is not None:
            bad = [r for r in roles if r not in ROLES]
            if bad:
                raise ValueError(f"ManifestDataset: roles must be among {ROLES}, got {list(roles)}")
        if isinstance(image_size, int) and image_size <= 0:
            raise ValueError(f"ManifestDataset: image_size must be positive, got {image_size}")
        self.positions = [i for i, it in enumerate(self.manifest.items) if roles is None or it.role in roles]
        if not self.positions:
            raise ValueError(f"ManifestDataset: no items with roles {list(roles)} in {self.manifest.path}")
        self.class_index = class_index or self.manifest.class_index
        unknown = sorted({self.manifest.items[i].label for i in self.positions} - set(self.class_index.labels))
        if unknown:
            raise ValueError(f"ManifestDataset: {len(unknown)} label(s) not in the given class_index, e.g. {unknown[:3]}")
        self.image_size = image_size
        self.transform = transform
        self.augment = augment
        self.background = background
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Changes the augmentation draw (call once per epoch, like DistributedSampler.set_epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def labels(self) -> torch.Tensor:
        """(len,) int64 class ids of the items, without decoding any image."""
        return torch.tensor([self.class_index.id(self.manifest.items[i].label) for i in self.positions], dtype=torch.int64)

    def __getitem__(self, idx: int) -> dict:
        pos = self.positions[idx]
        item = self.manifest.items[pos]
        image = self.transform(item.image) if self.transform else decode_image(item.image, self.image_size, self.background)
        if self.augment is not None:
            digest = hashlib.blake2b(f"{self.seed}:{self.epoch}:{pos}".encode(), digest_size=8).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
            image = self.augment(image, gen)
        return {
            "image": image,
            "text": item.text,
            "label": torch.tensor(self.class_index.id(item.label), dtype=torch.int64),
            "role": item.role,
            "weight": torch.tensor(item.weight, dtype=torch.float32),
            "index": pos,
            "modifier": item.modifier,
        }


def collate(batch: list[dict]) -> dict:
    """Stacks tensors and keeps texts, modifiers and roles as lists (texts and modifiers may be None)."""
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "text": [b["text"] for b in batch],
        "label": torch.stack([b["label"] for b in batch]),
        "role": [b["role"] for b in batch],
        "weight": torch.stack([b["weight"] for b in batch]),
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.int64),
        "modifier": [b.get("modifier") for b in batch],
    }


def random_flip_and_shift(max_shift: int = 2) -> Augment:
    """A small example augmentation: horizontal flip with p = 0.5 and a circular shift of up to max_shift px."""

    def augment(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if torch.rand((), generator=gen) < 0.5:
            image = image.flip(-1)
        dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=gen).tolist()
        return torch.roll(image, shifts=(dy, dx), dims=(-2, -1))

    return augment
