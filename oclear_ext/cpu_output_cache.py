"""The CPU output cache: large output blocks of the CPU ops are reused instead of faulted in afresh.

glibc maps every large allocation (above its mmap threshold, at most 32 MiB) fresh and unmaps it on
free, so each large output of every training step is page-faulted in again; on a small VM that costs
~22-30 ms per 128 MiB, at the concept-attention benchmark shape ~40% of the op's time. Like the CUDA
caching allocator, the CPU concept-attention op (its out, lse and gradients) takes blocks of 1 MiB
and more from a free list (the smallest cached block that fits and is less than twice the request: a
training step asks for the same sizes every step), holding at most ``limit`` bytes:
``OCLEAR_CPU_OUTPUT_CACHE_MIB`` (default 1024; 0 turns caching off) or :func:`set_limit`. A freed block
that does not fit under the limit evicts *stale* blocks, oldest first: those that have sat through more
large requests than twice the longest wait after which a cached block was ever taken again, plus 8;
then, if still needed, smaller blocks, largest first, when that leaves more bytes cached. So a steady
loop whose outputs exceed the limit keeps its largest blocks cached every step, and after a change of
shapes the new sizes replace the old ones within a few steps. Tensors behave as any CPU
tensor (resizable, shareable, serialisable); only where their memory goes when freed differs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _ops  # noqa: F401  (loads the kernels whose cache this module controls)


class CacheStats(NamedTuple):
    cached_bytes: int  # held, free for reuse
    limit_bytes: int   # the most it holds
    hits: int          # large allocations served from the cache
    misses: int        # large allocations that went to the system


def stats() -> CacheStats:
    """How much the cache holds and how often it was used (counts since the process started)."""
    return CacheStats(*torch.ops.oclear.cpu_output_cache_stats())


def empty() -> None:
    """Gives every cached block back to the system (tensors in use are untouched) and forgets how long
    blocks waited for reuse (the eviction rule's history)."""
    torch.ops.oclear.cpu_output_cache_empty()


def set_limit(limit_bytes: int) -> None:
    """Holds at most ``limit_bytes`` (>= 0; 0 turns caching off), freeing cached blocks above it."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int):
        raise TypeError(f"cpu_output_cache.set_limit: limit_bytes must be an int, got {type(limit_bytes).__name__}")
    torch.ops.oclear.cpu_output_cache_set_limit(limit_bytes)
