"""OclearModel: shared image encoder, separate query and doc heads, text encoder, concept-aware fusion for docs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import ConceptAwareFusion, QueryComposer
from ..nn.query_composer import MODES as COMPOSITION_MODES
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
    composed_queries: bool = False      # queries may carry a modifier text (QueryComposer)
    query_composition: str = "adaptive" # composed_queries: adaptive | sum | text | image (baselines)

    def __post_init__(self) -> None:
        for name in ("dim", "num_concepts", "num_heads", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig: {name} must be a positive int, got {value!r}")
        if self.query_composition not in COMPOSITION_MODES:
            raise ValueError(f"ModelConfig: query_composition must be one of {COMPOSITION_MODES}, "
                             f"got {self.query_composition!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"ModelConfig: dim = {self.dim} must be divisible by num_heads = {self.num_heads}")


class ProjectionHead(nn.Sequential):
    """Linear -> GELU -> Linear: a domain-specific head on the shared image features."""

    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__(nn.Linear(in_features, in_features), nn.GELU(), nn.Linear(in_features, dim))


class OclearModel(nn.Module):
    """Query and document embeddings for image-to-multi-modal retrieval, L2-normalised, (B, D).

    queries: q = normalize(query_head(encoder(image)))                  (no modifier)
         or  q = composer(query_head(encoder(image)), modifier tokens)     with composed_queries and a modifier
    docs:    d = fusion(doc_head(encoder(image)), text tokens)            (docs/design.md#model)
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
        needs_text = config.fusion or config.composed_queries
        self.text_encoder = build_text_encoder(config.text_encoder, config.dim) if needs_text else None
        self.fusion = (ConceptAwareFusion(config.dim, num_concepts=config.num_concepts, num_heads=config.num_heads)
                       if config.fusion else None)
        if self.fusion is not None:
            # The text context W c starts small: text joins a fresh model's docs only slightly and as far as
            # training finds it useful. Not zero: the text loss classifies normalize(W c), whose direction
            # is undefined (and its gradient unbounded) at W = 0.
            nn.init.normal_(self.fusion.context.weight, std=0.02)
        self.composer = (QueryComposer(config.dim, config.num_heads, config.query_composition)
                         if config.composed_queries else None)

    def embed_queries(self, images: Tensor, modifiers: Sequence[str | None] | None = None) -> Tensor:
        """images (B, 3, H, W) in [0, 1], modifiers (B strings or None, optional) -> (B, D).

        Rows without a modifier are the image-only query normalize(query_head(encoder(image))) exactly."""
        return self._queries(self.query_head(self.encoder(images)), modifiers)[0]

    def _queries(self, v: Tensor, modifiers: Sequence[str | None] | None) -> tuple[Tensor, dict | None]:
        """(query embeddings (B, D), the composer's parts or None) from query-head vectors v (B, D)."""
        if modifiers is not None and len(modifiers) != v.shape[0]:
            raise ValueError(f"OclearModel: {v.shape[0]} query images but {len(modifiers)} modifiers")
        if modifiers is None or all(m is None for m in modifiers):
            return F.normalize(v, dim=1), None
        if self.composer is None:
            raise ValueError("OclearModel: queries carry modifier texts but the model was built without "
                             "composed_queries=True")
        rows = [i for i, m in enumerate(modifiers) if m is not None]
        tokens, padding = self.text_encoder([modifiers[i] for i in rows])
        index = torch.tensor(rows, device=v.device)
        composed, parts = self.composer(v[index], tokens, padding, return_parts=True)
        out = F.normalize(v, dim=1).index_copy(0, index, composed.to(v.dtype))
        return out, {"rows": index, **parts}

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
                return_text: bool = False, modifiers: Sequence[str | None] | None = None,
                return_query_parts: bool = False) -> Tensor | tuple:
        """A mixed batch (training): rows with is_query (B,) bool take the query path, the others the doc path.

        The encoder runs once over all images; text is read for doc rows only. text_keep (B,) bool (default
        all): doc rows whose text joins their embedding; the others are embedded image-only, exactly
        (text dropout). return_text=True also returns the text embeddings normalize(W c) (B, D) of every doc
        with text, kept or not (zero rows elsewhere), and which rows have one (B,) bool: trained to classify
        on their own, they make the text path learn what a title says about the class.

        modifiers (B strings or None, optional): query rows' modifier texts (composed queries; doc rows' entries
        are ignored). return_query_parts=True appends the composer's parts for the composed rows (a dict with
        "rows" (R,) batch indices, "image", "text" (R, D) and, adaptive, "alpha" (R,)) or None without any.
        """
        features = self.encoder(images)
        out = torch.empty(images.shape[0], self.config.dim, device=images.device, dtype=features.dtype)
        text_emb = torch.zeros_like(out)
        has_text = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
        q = is_query.nonzero().squeeze(1)
        d = (~is_query).nonzero().squeeze(1)
        query_parts = None
        if q.numel():
            q_modifiers = None if modifiers is None else [modifiers[i] for i in q.tolist()]
            queries, query_parts = self._queries(self.query_head(features[q]), q_modifiers)
            out[q] = queries.to(out.dtype)
            if query_parts is not None:
                query_parts["rows"] = q[query_parts["rows"]]
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
        result = (out, text_emb, has_text) if return_text else (out,)
        if return_query_parts:
            result = (*result, query_parts)
        return result if len(result) > 1 else out

    def config_dict(self) -> dict:
        return asdict(self.config)
