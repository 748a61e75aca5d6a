"""Data: the manifest format (docs/design.md#data), a torch Dataset over it, the built-in emoji data,
and category-oriented data governance (interaction logs -> clean classes)."""

from .manifest import ClassIndex, Manifest, ManifestError, ManifestItem, load_manifest, write_manifest

__all__ = ["ClassIndex", "Manifest", "ManifestError", "ManifestItem", "load_manifest", "write_manifest"]
