"""Hybrid-parallel training: a small encoder under DDP (or FSDP2), class weights sharded over the ranks.

    torchrun --nproc_per_node 2 -m oclear_ext.examples.hybrid_parallel --steps 200
    torchrun --nproc_per_node 2 -m oclear_ext.examples.hybrid_parallel --fsdp --checkpoint /tmp/ckpt
    # several machines: torchrun's own flags, nothing home-made, e.g. on each of 2 nodes
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        -m oclear_ext.examples.hybrid_parallel

Data: synthetic classes (a random centre per class in input space, samples = centre + noise), so the
example needs nothing but the package. Backend: NCCL when CUDA is available, gloo on CPU. Every rank
draws its own samples; the encoder's gradients are summed over ranks (the loss is the global mean:
ddp_sum_gradients, or with --fsdp fully_shard + fsdp_sum_gradients), the classifier's shard (a DTensor,
never inside DDP / fully_shard) is updated by its own rank only. Rank 0 prints the loss and the throughput
and, with --checkpoint DIR, the encoder and the classifier are saved with torch.distributed.checkpoint
(every rank writes its shards), loadable at any world size, or in one process with no_dist=True.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.nn.parallel import DistributedDataParallel

from oclear_ext.distributed import ddp_sum_gradients, fsdp_sum_gradients
from oclear_ext.nn import ShardedMarginClassifier


def make_encoder(in_dim: int, dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, 256), nn.ReLU(), nn.Linear(256, dim))


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--in-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=128, help="samples per rank and step")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--fsdp", action="store_true", help="shard the encoder with FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--checkpoint", default=None, help="directory for the DCP checkpoint (encoder and classifier)")
    args = p.parse_args(argv)

    if "RANK" not in os.environ:
        raise SystemExit("launch with torchrun, e.g.: torchrun --nproc_per_node 2 -m oclear_ext.examples.hybrid_parallel")
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    # The class centres of the synthetic data are the same on every rank (seed 0); samples differ by rank.
    centres = torch.randn(args.classes, args.in_dim, generator=torch.Generator().manual_seed(0)).to(device)
    sampler = torch.Generator(device=device).manual_seed(1000 + rank)
    torch.manual_seed(0)  # identical encoder initialisation on every rank
    encoder = make_encoder(args.in_dim, args.dim).to(device)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        encoder = fsdp_sum_gradients(fully_shard(encoder))
    else:
        encoder = ddp_sum_gradients(DistributedDataParallel(encoder))
    classifier = ShardedMarginClassifier(args.classes, args.dim, scale=32.0, margin=(1.0, 0.3, 0.0), device=device,
                                         world_size=world)
    # Two parameter groups: the classifier's DTensor weight never shares a (foreach) group with the encoder's.
    optimizer = torch.optim.SGD([{"params": encoder.parameters()}, {"params": [classifier.trainable_weight]}],
                                lr=args.lr, momentum=0.9)

    start, loss = time.perf_counter(), torch.zeros(())
    for step in range(1, args.steps + 1):
        labels = torch.randint(0, args.classes, (args.batch,), device=device, generator=sampler)
        inputs = centres[labels] + 0.5 * torch.randn(args.batch, args.in_dim, device=device, generator=sampler)
        loss = classifier(encoder(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if rank == 0 and (step == 1 or step % 50 == 0 or step == args.steps):
            rate = step * args.batch * world / (time.perf_counter() - start)
            print(f"step {step:5d}  loss {loss.item():.4f}  {rate:,.0f} samples/s on {world} ranks", flush=True)

    if args.checkpoint:
        state = {"encoder": get_model_state_dict(encoder), "classifier": classifier.state_dict()}
        dcp.save(state, checkpoint_id=args.checkpoint)
        if rank == 0:
            print(f"saved the encoder and the sharded classifier to {args.checkpoint}")
    final = loss.item()
    dist.destroy_process_group()
    return final


if __name__ == "__main__":
    main()
