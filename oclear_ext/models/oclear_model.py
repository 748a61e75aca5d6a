"""OclearModel: shared image encoder, separate query and doc heads, text encoder, concept-aware fusion for docs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import ConceptAwareFusion
from .registry import build_image_encoder, build_text_encoder


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 256                      # output embedding dimension D
    image_encoder: str = "small-cnn"
    text_encoder: str = "hashing"
    fusion: bool = True                 # False: docs are image-only (the ablation baseline)
    num_concepts: int = 64
    num_heads: int = 4
    image_size: int = 32                # what the data pipeline resizes images to

    def __post_init__(self) -> None:
        for name in ("dim", "num_concepts", "num_heads", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig: {name} must be a positive int, got {value!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"ModelConfig: dim = {self.dim} must be divisible by num_heads = {self.num_heads}")


class ProjectionHead(nn.Sequential):
    """Linear -> GELU -> Linear: a domain-specific head on the shared image features."""

    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__(nn.Linear(in_features, in_features), nn.GELU(), nn.Linear(in_features, dim))


class OclearModel(nn.Module):
    """Query and document embeddings for image-to-multi-modal retrieval, L2-normalised, (B, D).

    queries: q = normalize(query_head(encoder(image)))                  (never sees text)
    docs:    d = fusion(doc_head(encoder(image)), text tokens)            (DESIGN section 6)
         or  d = normalize(doc_head(encoder(image)))                       with fusion=False
    The image encoder is shared; the two heads absorb the domain gap between a shopper's photo and a
    catalogue image. Implements the evaluation's embedding-function interface (oclear_ext.eval).
    """

    def __init__(self, config: ModelConfig | None = None, **overrides) -> None:
        super().__init__()
        config = config or ModelConfig(**overrides)
        self.config = config
        self.image_size = config.image_size
        self.encoder = build_image_encoder(config.image_encoder)
        self.query_head = ProjectionHead(self.encoder.out_features, config.dim)
        self.doc_head = ProjectionHead(self.encoder.out_features, config.dim)
        # The heads start identical (an untrained model embeds a query and a doc of the same image alike) and
        # drift apart in training as far as the domain gap between shopper photos and catalogue images needs.
        self.doc_head.load_state_dict(self.query_head.state_dict())
        self.text_encoder = build_text_encoder(config.text_encoder, config.dim) if config.fusion else None
        self.fusion = (ConceptAwareFusion(config.dim, num_concepts=config.num_concepts, num_heads=config.num_heads)
                       if config.fusion else None)
        if self.fusion is not None:
            # The text context W c starts small: text joins a fresh model's docs only slightly and as far as
            # training finds it useful. Not zero: the text loss classifies normalize(W c), whose direction
            # is undefined (and its gradient unbounded) at W = 0.
            nn.init.normal_(self.fusion.context.weight, std=0.02)

    def embed_queries(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [0, 1] -> (B, D)."""
        return F.normalize(self.query_head(self.encoder(images)), dim=1)

    def embed_docs(self, images: Tensor, texts: Sequence[str | None]) -> Tensor:
        """images (B, 3, H, W) in [0, 1], texts (B strings or None) -> (B, D)."""
        if len(texts) != images.shape[0]:
            raise ValueError(f"OclearModel.embed_docs: {images.shape[0]} images but {len(texts)} texts")
        v = self.doc_head(self.encoder(images))
        if self.fusion is None:
            return F.normalize(v, dim=1)
        tokens, padding = self.text_encoder(texts)
        return self.fusion(v, tokens, padding)

    def forward(self, images: Tensor, texts: Sequence[str | None], is_query: Tensor, text_keep: Tensor | None = None,
                return_text: bool = False) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """A mixed batch (training): rows with is_query (B,) bool take the query path, the others the doc path.

        The encoder runs once over all images; text is read for doc rows only. text_keep (B,) bool (default
        all): doc rows whose text joins their embedding; the others are embedded image-only, exactly
        (text dropout). return_text=True also returns the text embeddings normalize(W c) (B, D) of every doc
        with text, kept or not (zero rows elsewhere), and which rows have one (B,) bool: trained to classify
        on their own, they make the text path learn what a title says about the class.
        """
        features = self.encoder(images)
        out = torch.empty(images.shape[0], self.config.dim, device=images.device, dtype=features.dtype)
        text_emb = torch.zeros_like(out)
        has_text = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
        q = is_query.nonzero().squeeze(1)
        d = (~is_query).nonzero().squeeze(1)
        if q.numel():
            out[q] = F.normalize(self.query_head(features[q]), dim=1).to(out.dtype)
        if d.numel():
            v = self.doc_head(features[d])
            if self.fusion is None:
                docs = F.normalize(v, dim=1)
            else:
                tokens, padding = self.text_encoder([texts[i] for i in d.tolist()])
                c = self.fusion.read_text(v, tokens, padding)
                kept = c if text_keep is None else c * text_keep[d, None].to(c.dtype)
                docs, _ = self.fusion.mix(v, kept)  # a dropped text: c = 0, the image-only doc exactly
                present = ~padding.all(dim=1)
                # What the doc adds to its image embedding (up to the gate), trained to classify on its own.
                text_emb[d[present]] = F.normalize(self.fusion.context(c[present]), dim=1).to(out.dtype)
                has_text[d[present]] = True
            out[d] = docs.to(out.dtype)
        return (out, text_emb, has_text) if return_text else out

    def config_dict(self) -> dict:
        return asdict(self.config)
