"""load_model: a trained OclearModel, ready to embed, from an oclear-train run folder or one checkpoint."""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path

import torch

from ..models import ModelConfig, OclearModel
from ..train.checkpoint import latest_checkpoint
from .model_identity import IDENTITY_ATTR, ModelIdentity, config_hash, weights_hash

CONFIG_FILE = "config.json"


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(checkpoint folder, run folder or None) for a run folder (its latest checkpoint), a run's
    checkpoints/ folder, or one checkpoint folder (checkpoints/step-NNNNNNNN)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"load_model: {path} does not exist (expected an oclear-train run folder or a checkpoint)")
    try:
        checkpoint = latest_checkpoint(path).resolve()
    except FileNotFoundError:
        raise FileNotFoundError(f"load_model: no checkpoint in {path} (expected a run folder with checkpoints/latest, "
                                "or a checkpoint folder with state.pt)") from None
    if not (checkpoint / "state.pt").is_file():
        raise FileNotFoundError(f"load_model: {checkpoint} has no state.pt (the latest pointer names a missing checkpoint)")
    run_dir = checkpoint.parent.parent
    return checkpoint, run_dir if (run_dir / CONFIG_FILE).is_file() else None


# Model settings added after configs were first saved; a config without them means their default.
SETTINGS_WITH_LEGACY_DEFAULT = ("composed_queries", "query_composition")


def _model_config(saved: dict, source: str) -> ModelConfig:
    names = {f.name for f in fields(ModelConfig)}
    missing = sorted(names - set(saved) - set(SETTINGS_WITH_LEGACY_DEFAULT))
    if missing:
        raise ValueError(f"load_model: {source} lacks the model settings {missing}")
    try:
        return ModelConfig(**{name: saved[name] for name in names if name in saved})
    except (TypeError, ValueError) as err:
        raise ValueError(f"load_model: {source}: {err}") from None


def load_model(run_dir_or_checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> OclearModel:
    """The model of a training run in eval mode, an EmbeddingFunction (image_size, embed_queries, embed_docs).

    The architecture comes from the run's config.json (or, for a checkpoint folder copied on its own, the
    configuration saved inside it); the weights from the checkpoint, loaded with weights_only=True and
    strictly (a mismatch names the missing and unexpected keys). The model carries its ModelIdentity
    (`model.oclear_identity`), which indexes record so that a search with another model is refused.
    """
    checkpoint, run_dir = resolve_checkpoint(run_dir_or_checkpoint)
    state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    if run_dir is not None:
        config_path = run_dir / CONFIG_FILE
        try:
            saved = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"load_model: {config_path} is not valid JSON ({err})") from None
        config = _model_config(saved, str(config_path))
    else:
        config = _model_config(state.get("config", {}), f"{checkpoint / 'state.pt'} (its saved config)")
    model = OclearModel(config)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(f"load_model: the weights in {checkpoint} do not fit the model of its config: {err}") from None
    model.to(device).eval()
    model.requires_grad_(False)
    config_dict = model.config_dict()
    identity = ModelIdentity(str(run_dir) if run_dir else None, str(checkpoint), config_hash(config_dict),
                             weights_hash(state["model"]), config.dim)
    setattr(model, IDENTITY_ATTR, identity)
    return model
