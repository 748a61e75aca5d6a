"""Training configuration: one validated dataclass, read from a TOML file and/or command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from ..models.registry import IMAGE_ENCODERS, TEXT_ENCODERS
from ..nn.query_composer import MODES as COMPOSITION_MODES

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig:
    """Everything a run needs; saved as config.json in the run folder. Flags override the TOML file."""

    train_manifest: str = "builtin:emoji"   # a manifest path, or builtin:emoji (training classes of the emoji set)
    val_manifest: str | None = None         # evaluated every eval_every steps; builtin:emoji = held-out classes
    out_dir: str = "runs/oclear"
    # model
    dim: int = 256
    image_encoder: str = "small-cnn"
    text_encoder: str = "hashing"
    fusion: bool = True
    num_concepts: int = 64
    num_heads: int = 4
    image_size: int = 32
    text_dropout: float = 0.8               # training: a doc's text is dropped with this probability
    text_loss_weight: float = 1.0           # fusion: weight of the text loss (what a doc's text adds classifies; 0 = off)
    # composed queries: query rows with a "modifier" text (reference image + modifier -> target class)
    composed_queries: bool = False          # build the query composer (nn.QueryComposer)
    query_composition: str = "adaptive"     # adaptive | sum | text | image (the last three: baselines)
    composition_weight_loss: float = 1.0    # adaptive: weight of the self-supervised loss on the per-query weight
    composition_temperature: float = 5.0    # adaptive: its targets are sigmoid((loss(text) - loss(image)) / T)
    # contrastive term (CLCE, docs/contrastive.md): a label-aware supervised contrastive loss with hard-negative
    # weights on the batch's embeddings (queries and docs), added to the margin softmax; over the global batch
    # when distributed, independent of negatives sampling
    contrastive_weight: float = 0.0         # weight of the term next to the margin softmax (0 = off)
    contrastive_temperature: float = 0.1    # tau: pairs are scored z_i . z_j / tau
    contrastive_hard_negative_beta: float = 0.0  # beta: negative k of anchor i weighs exp(beta s_ik) / its mean
                                                 # over i's negatives (0 = every negative weighs 1: SupCon)
    # classifier
    scale: float = 32.0
    margin: tuple[float, float, float] = (1.0, 0.0, 0.3)
    negatives: str = "none"                 # none | topk:K | random:RATE
    # optimisation
    epochs: int = 4
    batch_size: int = 128                   # per process
    optimizer: str = "adamw"                # adamw | sgd (momentum); row-sparse for the classifier when sampling
    lr: float = 1e-3
    classifier_lr: float | None = None      # default: lr
    momentum: float = 0.9                   # sgd only
    weight_decay: float = 0.05
    schedule: str = "cosine"
    warmup_steps: int = 50
    grad_clip: float | None = 5.0           # max global norm of the model's (not the classifier's) gradients
    weighted_sampling: bool = False         # draw rows by the manifest's "weight" (oclear-govern's long-tail weights)
    skip_bad_images: bool = False           # images that cannot be decoded: False = stop before training, naming
                                            # every bad line; True = train without those rows (a counted warning)
    # run
    seed: int = 0
    device: str = "auto"                    # auto | cpu | cuda
    num_workers: int = 0
    log_every: int = 10
    eval_every: int = 0                     # steps; 0 = at the end only
    checkpoint_every: int = 0               # steps; 0 = at the end only
    resume: str | None = None               # a checkpoint folder to resume from
    max_steps: int | None = None            # stop after this many steps (for tests and smoke runs)
    progress: bool = True

    def __post_init__(self) -> None:
        self.margin = tuple(float(m) for m in self.margin)
        positive_ints = ("dim", "num_concepts", "num_heads", "image_size", "epochs", "batch_size", "log_every")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config: {name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "num_workers", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"config: {name} must be an integer >= 0, got {value!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"config: max_steps must be a positive integer or unset, got {self.max_steps!r}")
        for name in ("lr", "momentum", "weight_decay", "scale", "text_loss_weight", "composition_weight_loss",
                     "contrastive_weight", "contrastive_hard_negative_beta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"config: {name} must be a finite number >= 0, got {value!r}")
        if self.lr <= 0 or (self.classifier_lr is not None and self.classifier_lr <= 0):
            raise ValueError(f"config: lr and classifier_lr must be > 0, got {self.lr}, {self.classifier_lr}")
        if not 0.0 <= self.text_dropout < 1.0:
            raise ValueError(f"config: text_dropout must be in [0, 1), got {self.text_dropout}")
        if not (isinstance(self.composition_temperature, (int, float)) and math.isfinite(self.composition_temperature)
                and self.composition_temperature > 0):
            raise ValueError(f"config: composition_temperature must be a finite number > 0, "
                             f"got {self.composition_temperature!r}")
        if isinstance(self.contrastive_temperature, bool) or not (
                isinstance(self.contrastive_temperature, (int, float)) and math.isfinite(self.contrastive_temperature)
                and self.contrastive_temperature > 0):
            raise ValueError(f"config: contrastive_temperature must be a finite number > 0, "
                             f"got {self.contrastive_temperature!r}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"config: grad_clip must be > 0 or unset, got {self.grad_clip}")
        if self.dim % self.num_heads:
            raise ValueError(f"config: dim = {self.dim} must be divisible by num_heads = {self.num_heads}")
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("image_encoder", IMAGE_ENCODERS),
                              ("text_encoder", TEXT_ENCODERS), ("device", ("auto", "cpu", "cuda")),
                              ("query_composition", COMPOSITION_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"config: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        self.negatives_spec()  # validates the string

    def negatives_spec(self) -> tuple[str, float]:
        """("none", 0) | ("topk", k) | ("random", rate), parsed from `negatives`."""
        kind, _, value = self.negatives.partition(":")
        try:
            if kind == "none" and not value:
                return "none", 0.0
            if kind == "topk" and int(value) >= 0:
                return "topk", int(value)
            if kind == "random" and 0 < float(value) <= 1:
                return "random", float(value)
        except ValueError:
            pass
        raise ValueError(f"config: negatives must be none, topk:K (K >= 0) or random:RATE (0 < RATE <= 1), "
                         f"got {self.negatives!r}")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        """From a TOML file (any subset of the fields) or a saved config.json."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config: no file at {path}")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except ValueError as err:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
            raise ValueError(f"config {path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} ({err})") from None
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"config {path}: unknown keys {unknown}")
        return cls(**data)


def _flag_type(f: dataclasses.Field):
    text = str(f.type)
    if "tuple" in text:
        return None
    if "bool" in text:
        return None
    for name, typ in (("int", int), ("float", float)):
        if text.startswith(name):
            return typ
    return str


def parse_args(argv: list[str] | None = None, description: str = "") -> TrainConfig:
    """--config FILE.toml plus one --flag per field (flags win); bools as --fusion / --no-fusion."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="TOML file with any of the fields below")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if "bool" in str(f.type):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif "tuple" in str(f.type):
            parser.add_argument(flag, dest=f.name, type=float, nargs=3, default=None, metavar=("M1", "M2", "M3"))
        else:
            typ = _flag_type(f)
            parser.add_argument(flag, dest=f.name, type=(lambda s, t=typ: None if s.lower() == "none" else t(s)),
                                default=None)
    args = vars(parser.parse_args(argv))
    base = dataclasses.asdict(TrainConfig.load(args.pop("config"))) if args.get("config") else {}
    args.pop("config", None)
    base.update({k: v for k, v in args.items() if v is not None})
    try:
        return TrainConfig(**base)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
