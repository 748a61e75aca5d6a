"""Catalogue search: a trained run folder -> an index of the catalogue's docs -> searches with photos.

    model = load_model("runs/emoji")                      # the latest checkpoint, in eval mode
    index = CatalogIndex.build(doc_embeddings, metadata, kind="ivfpq", model=model)
    index.save("runs/emoji-index"); index = CatalogIndex.load("runs/emoji-index", model=model)
    ids, scores = index.search_images(model, ["photo.jpg"], k=10)

The console scripts oclear-index, oclear-search and oclear-serve (HTTP + a web page) wrap these.
"""

from .catalog_index import INDEX_KINDS, CatalogIndex, CatalogIndexError, IndexParams
from .embedding import ImageReadError, doc_metadata, embed_catalog_docs, embed_query_images, read_image
from .load_model import load_model, resolve_checkpoint
from .model_identity import ModelIdentity

__all__ = ["CatalogIndex", "CatalogIndexError", "IndexParams", "INDEX_KINDS", "ImageReadError", "ModelIdentity",
           "doc_metadata", "embed_catalog_docs", "embed_query_images", "load_model", "read_image", "resolve_checkpoint"]
