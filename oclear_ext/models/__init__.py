"""Models: encoders, heads and OclearModel (docs/design.md#model)."""

from .encoders import HashingTextEncoder, HashingTokenizer, SmallCNN
from .oclear_model import ModelConfig, OclearModel

__all__ = ["OclearModel", "ModelConfig", "SmallCNN", "HashingTextEncoder", "HashingTokenizer"]
