"""Which trained model produced a set of embeddings: recorded in an index, checked before searching it.

Embeddings of two models (or two checkpoints of one run) live in different spaces: a query embedded by
one and searched against docs embedded by the other returns confident nonsense. The identity is the
hash of the model's configuration (architecture) and of its weights, plus where it came from (for
messages and as oclear-search's default checkpoint).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import torch

IDENTITY_ATTR = "oclear_identity"  # set on a model by load_model


@dataclass(frozen=True)
class ModelIdentity:
    run_dir: str | None        # the run folder (absolute), when the checkpoint came from one
    checkpoint: str            # the checkpoint folder (absolute)
    config_hash: str           # sha256 of the model configuration (canonical JSON), 16 hex digits
    weights_hash: str          # sha256 of the state dict (names, dtypes, shapes, bytes), 16 hex digits
    dim: int                   # embedding dimension

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ModelIdentity":
        return cls(**data)

    def describe(self) -> str:
        return f"checkpoint {self.checkpoint} (config {self.config_hash}, weights {self.weights_hash})"


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # reshape: a 0-d tensor cannot be viewed as bytes
    return h.hexdigest()[:16]


def model_identity(model: Any) -> ModelIdentity | None:
    """The identity load_model attached to `model` (or `model` itself if it is one); None if unknown."""
    if model is None or isinstance(model, ModelIdentity):
        return model
    return getattr(model, IDENTITY_ATTR, None)


def check_same_model(expected: ModelIdentity | None, given: ModelIdentity | None, what: str) -> None:
    """Raises ValueError naming what differs when both identities are known and are not the same model."""
    if expected is None or given is None:
        return
    if expected.dim != given.dim:
        problem = f"its embedding dimension is {given.dim}, not {expected.dim}"
    elif expected.config_hash != given.config_hash:
        problem = "its model configuration differs"
    elif expected.weights_hash != given.weights_hash:
        problem = "its weights differ (another checkpoint or run)"
    else:
        return
    raise ValueError(f"{what} was built with {expected.describe()}, but the model given is {given.describe()}: "
                     f"{problem}; rebuild the index with this model (oclear-index) or use the index's checkpoint")
