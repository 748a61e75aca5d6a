"""Training: config, the hybrid-parallel loop, checkpoints, the oclear-train CLI and the oclear-demo job."""

from .config import TrainConfig, parse_args
from .trainer import train

__all__ = ["TrainConfig", "parse_args", "train"]
