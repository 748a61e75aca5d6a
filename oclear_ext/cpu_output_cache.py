"""The CPU output cache, opt-in: large output blocks of the CPU concept-attention op reused instead of faulted in afresh.

Off by default. Which allocator a process uses is the application's choice, so by default the op's outputs
come from torch's CPU allocator like every other op's. Turn the cache on for a process with
:func:`set_limit` or for a block with :func:`enabled`::

    with oclear_ext.cpu_output_cache.enabled(1 << 30):   # hold up to 1 GiB of freed outputs
        train()

Why it exists: glibc maps every large allocation (above its mmap threshold, at most 32 MiB) fresh and
unmaps it on free, so each large output of every training step is page-faulted in again, a cost that
grows with the output's size (measured in benchmarks/README.md, allocator section). A general allocator that keeps freed pages mapped (jemalloc or tcmalloc
through LD_PRELOAD, or glibc tuned with GLIBC_TUNABLES; see benchmarks/README.md) removes those faults for
every op in the process, not only this one, and is the first thing to try; the cache is for processes
that cannot change their allocator.

How it works: like the CUDA caching allocator, the op (its out, lse and gradients) takes blocks of 1 MiB
and more from a free list (the smallest cached block that fits and is less than twice the request: a
training step asks for the same sizes every step), holding at most ``limit`` bytes. A freed block that
does not fit under the limit evicts *stale* blocks, oldest first: those that have sat through more large
requests than twice the longest wait after which a cached block was ever taken again, plus 8; then, if
still needed, smaller blocks, largest first, when that leaves more bytes cached. So a steady loop whose
outputs exceed the limit keeps its largest blocks cached every step, and after a change of shapes the new
sizes replace the old ones within a few steps. Tensors behave as any CPU tensor (resizable, shareable,
serialisable) and are reported to torch.profiler(profile_memory=True) as torch's allocator reports its
own; only where their memory goes when freed differs. The cached free blocks are resident memory that no
tensor holds: :func:`stats` says how much.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch

from . import _ops  # noqa: F401  (loads the kernels whose cache this module controls)

DEFAULT_LIMIT_BYTES = 1 << 30  # enabled()'s default: 1 GiB, one step of the fusion's largest shapes


class CacheStats(NamedTuple):
    cached_bytes: int  # held, free for reuse
    limit_bytes: int   # the most it holds (0: off)
    hits: int          # large allocations served from the cache
    misses: int        # large allocations that went to the system while the cache was on


def stats() -> CacheStats:
    """How much the cache holds and how often it was used (counts since the process started)."""
    return CacheStats(*torch.ops.oclear._cpu_output_cache_stats())


def empty() -> None:
    """Gives every cached block back to the system (tensors in use are untouched) and forgets how long
    blocks waited for reuse (the eviction rule's history)."""
    torch.ops.oclear._cpu_output_cache_empty()


def _check_limit(limit_bytes: object, where: str) -> int:
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int):
        raise TypeError(f"cpu_output_cache.{where}: limit_bytes must be an int, got {type(limit_bytes).__name__}")
    if limit_bytes < 0:
        raise ValueError(f"cpu_output_cache.{where}: limit_bytes must be >= 0 (0 turns the cache off), got {limit_bytes}")
    return limit_bytes


def set_limit(limit_bytes: int) -> None:
    """Holds at most ``limit_bytes`` (> 0 turns the cache on; 0, the default, turns it off), freeing
    cached blocks above it."""
    torch.ops.oclear._cpu_output_cache_set_limit(_check_limit(limit_bytes, "set_limit"))


@contextlib.contextmanager
def enabled(limit_bytes: int = DEFAULT_LIMIT_BYTES) -> Iterator[None]:
    """The cache on (holding at most ``limit_bytes``) within the block; on exit the previous limit comes
    back (by default 0: the cached blocks are given back to the system)."""
    _check_limit(limit_bytes, "enabled")
    previous = stats().limit_bytes
    set_limit(limit_bytes)
    try:
        yield
    finally:
        set_limit(previous)
