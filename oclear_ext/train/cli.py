"""oclear-train: train OclearModel with hybrid parallelism (run it under torchrun for several processes)."""

from __future__ import annotations

import json

import torch.distributed as dist

from ..cli_errors import run_cli
from ..distributed.sharded_softmax import world_and_rank
from .config import parse_args
from .trainer import train

EXAMPLE = ("example: torchrun --nproc_per_node 2 -m oclear_ext.train --train-manifest builtin:emoji "
           "--val-manifest builtin:emoji --epochs 10")


def main(argv: list[str] | None = None) -> None:
    run_cli(_main, argv, "oclear-train")


def _main(argv: list[str] | None) -> None:
    config = parse_args(argv, description=f"{__doc__}\n{EXAMPLE}")
    try:
        summary = train(config)
        if world_and_rank()[1] == 0:
            print(json.dumps({k: v for k, v in summary.items() if k not in ("losses", "model")}, indent=2))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
