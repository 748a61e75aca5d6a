"""Models: encoders, heads and OclearModel (DESIGN section 6)."""

from .encoders import HashingTextEncoder, HashingTokenizer, SmallCNN
from .oclear_model import ModelConfig, OclearModel

__all__ = ["OclearModel", "ModelConfig", "SmallCNN", "HashingTextEncoder", "HashingTokenizer"]
