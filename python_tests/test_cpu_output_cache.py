"""The opt-in CPU output cache behind concept attention's large outputs (oclear_ext.cpu_output_cache)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

import oclear_ext
from oclear_ext import cpu_output_cache, reference

# out (8, 4, 64, 128) float32 is exactly 1 MiB, the smallest cached block.
SHAPE = (8, 4, 64, 128)


@pytest.fixture
def cache():
    limit = cpu_output_cache.stats().limit_bytes
    cpu_output_cache.set_limit(1 << 30)
    cpu_output_cache.empty()
    yield cpu_output_cache
    cpu_output_cache.set_limit(limit)


def attention_inputs(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*SHAPE, generator=g).requires_grad_(requires_grad) for _ in range(3))
    return q, k, v


def test_freed_outputs_are_reused(cache):
    q, k, v = attention_inputs()
    out = oclear_ext.concept_attention(q, k, v)
    first_ptr, expected = out.data_ptr(), out.clone()
    del out
    assert cache.stats().cached_bytes >= out_bytes()
    hits = cache.stats().hits
    again = oclear_ext.concept_attention(q, k, v)
    assert cache.stats().hits == hits + 1
    assert again.data_ptr() == first_ptr  # the same block, overwritten with the same result
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


def test_gradients_come_from_the_cache_and_match_a_fresh_run(cache):
    q, k, v = attention_inputs(requires_grad=True)
    grad_out = torch.randn(SHAPE)
    oclear_ext.concept_attention(q, k, v).backward(grad_out)
    want = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    misses = cache.stats().misses
    oclear_ext.concept_attention(q, k, v).backward(grad_out)
    assert cache.stats().misses == misses  # out and the three gradients all reused
    for t, w in zip((q, k, v), want):
        torch.testing.assert_close(t.grad, w, rtol=0, atol=0)


def out_bytes():
    return torch.Size(SHAPE).numel() * 4


def test_limit_zero_caches_nothing_and_empty_gives_back(cache):
    q, k, v = attention_inputs()
    oclear_ext.concept_attention(q, k, v)
    assert cache.stats().cached_bytes >= out_bytes()
    cache.empty()
    assert cache.stats().cached_bytes == 0
    cache.set_limit(0)
    oclear_ext.concept_attention(q, k, v)
    assert cache.stats().cached_bytes == 0


def test_lowering_the_limit_frees_down_to_it(cache):
    q, k, v = attention_inputs()
    outs = [oclear_ext.concept_attention(q, k, v) for _ in range(3)]
    del outs
    assert cache.stats().cached_bytes >= 3 * out_bytes()
    cache.set_limit(out_bytes())
    assert cache.stats().cached_bytes <= out_bytes()


def test_outputs_behave_like_any_cpu_tensor(cache):
    q, k, v = attention_inputs()
    out = oclear_ext.concept_attention(q, k, v)
    expected = out.clone()
    buffer = io.BytesIO()
    torch.save(out, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer), expected, rtol=0, atol=0)
    cache.empty()  # a tensor in use is untouched
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.resize_(2 * out.numel())  # the storage is resizable (it grows through the same allocator)
    torch.testing.assert_close(out[: expected.numel()].view_as(expected), expected, rtol=0, atol=0)
    shared = oclear_ext.concept_attention(q, k, v).share_memory_()
    assert shared.is_shared()
    torch.testing.assert_close(shared, expected, rtol=0, atol=0)


def test_bad_limits_are_refused(cache):
    with pytest.raises(ValueError, match=r"cpu_output_cache.set_limit: limit_bytes must be >= 0 \(0 turns the cache off\), got -1"):
        cache.set_limit(-1)
    with pytest.raises(TypeError, match="cpu_output_cache.set_limit: limit_bytes must be an int, got float"):
        cache.set_limit(1.5)
    with pytest.raises(ValueError, match="cpu_output_cache.enabled: limit_bytes must be >= 0"):
        with cache.enabled(-5):
            pass
    with pytest.raises(ValueError, match="the limit must be >= 0 bytes, got -1"):  # the op itself checks too
        torch.ops.oclear._cpu_output_cache_set_limit(-1)


def test_off_by_default_and_the_old_environment_variable_is_not_read():
    # A fresh process: the op's outputs come from torch's allocator (no cache request at all), and
    # OCLEAR_CPU_OUTPUT_CACHE_MIB, the old switch, is no longer API.
    env = dict(os.environ, OCLEAR_CPU_OUTPUT_CACHE_MIB="64")
    code = ("import torch, oclear_ext\n"
            "q = torch.randn(8, 4, 64, 128, requires_grad=True)\n"
            "for _ in range(3): oclear_ext.concept_attention(q, q, q).sum().backward()\n"
            "print(tuple(oclear_ext.cpu_output_cache.stats()))\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(0, 0, 0, 0)"


def test_enabled_turns_it_on_for_a_block_and_gives_the_blocks_back():
    assert cpu_output_cache.stats().limit_bytes == 0  # the suite leaves it off
    q, k, v = attention_inputs()
    with cpu_output_cache.enabled(4 * out_bytes()):
        assert cpu_output_cache.stats().limit_bytes == 4 * out_bytes()
        hits = cpu_output_cache.stats().hits
        for _ in range(3):
            oclear_ext.concept_attention(q, k, v)
        assert cpu_output_cache.stats().hits == hits + 2  # the second and third calls reuse the first's block
        with cpu_output_cache.enabled(0):  # nested: off within, back on after
            assert cpu_output_cache.stats() == (0, 0, *cpu_output_cache.stats()[2:])
        assert cpu_output_cache.stats().limit_bytes == 4 * out_bytes()
    assert cpu_output_cache.stats().limit_bytes == 0
    assert cpu_output_cache.stats().cached_bytes == 0
    with pytest.raises(RuntimeError, match="inside"):
        with cpu_output_cache.enabled():
            raise RuntimeError("inside")
    assert cpu_output_cache.stats().limit_bytes == 0  # restored on an exception too


def test_cached_outputs_are_visible_to_the_profiler(cache):
    # torch.profiler(profile_memory=True) sees the op's outputs whether or not they come from the cache.
    from torch.profiler import ProfilerActivity, profile

    q, k, v = attention_inputs()
    oclear_ext.concept_attention(q, k, v)  # a block is cached: the next call is a hit
    hits = cache.stats().hits
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = oclear_ext.concept_attention(q, k, v)
        del out
    assert cache.stats().hits == hits + 1
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert out_bytes() in sizes and -out_bytes() in sizes, sizes  # allocated, then freed


@pytest.mark.parametrize("broadcast", [False, True])
def test_reused_blocks_hold_the_right_values(cache, broadcast):
    # Reused blocks are written with non-temporal stores (fresh ones with ordinary stores): the second
    # call, on reused blocks, must match the reference as the first does, padding and shared memory too.
    g = torch.Generator().manual_seed(1)
    (b, h, lq, dh), lk = SHAPE, 96
    q = torch.randn(b, h, lq, dh, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1 if broadcast else b, h, lk, dh, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(b, lk, generator=g) < 0.3
    mask[0] = True  # a batch element without keys
    grad_out = torch.randn(b, h, lq, dh, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    want_out = reference.concept_attention(*leaves, mask)
    want_out.backward(grad_out)
    want = [want_out.detach()] + [t.grad for t in leaves]
    for _ in range(2):
        for t in leaves:
            t.grad = None
        out = oclear_ext.concept_attention(*leaves, mask)
        out.backward(grad_out)
        for got, expected in zip([out.detach()] + [t.grad for t in leaves], want):
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
        del out
    assert cache.stats().hits > 0



def test_a_request_takes_the_smallest_cached_block_that_fits(cache):
    q, k, v = attention_inputs()  # out: 1 MiB
    big = [torch.cat([t, t[:2]]) for t in (q, k, v)]  # out: 1.25 MiB
    outs = [oclear_ext.concept_attention(q, k, v), oclear_ext.concept_attention(*big)]
    del outs  # both blocks cached
    hits = cache.stats().hits
    mid = [torch.cat([t, t[:1]]) for t in (q, k, v)]  # 1.125 MiB: only the 1.25 MiB block fits
    out = oclear_ext.concept_attention(*mid)
    assert cache.stats().hits == hits + 1
    torch.testing.assert_close(out, reference.concept_attention(*mid), rtol=1e-5, atol=1e-5)


def test_a_block_twice_the_request_or_more_is_not_taken(cache):
    q, k, v = attention_inputs()
    triple = [torch.cat([t, t, t]) for t in (q, k, v)]
    out = oclear_ext.concept_attention(*triple)
    del out  # only a 3 MiB block cached
    misses = cache.stats().misses
    out = oclear_ext.concept_attention(q, k, v)  # 1 MiB
    assert cache.stats().misses == misses + 1


def out_of_batch(n):
    """out of a forward call with batch n: n / 8 MiB (SHAPE's batch is 8)."""
    q, k, v = (torch.randn(n, *SHAPE[1:]) for _ in range(3))
    return oclear_ext.concept_attention(q, k, v)


MIB = 1 << 20
# The eviction rule (csrc/cpu/output_cache.cpp): stale = waited more than 2 x the longest reuse wait
# + 8 large requests; empty() (the fixture) resets the longest wait to 0, so a block is stale once 9
# requests came after it was cached.
STALE_AFTER = 9


def test_a_steady_loop_larger_than_the_limit_keeps_its_cached_blocks(cache):
    cache.set_limit(2 * MIB)
    hits_per_step = []
    for _ in range(5):  # per step: two 1 MiB outputs, then a 2 MiB one
        hits = cache.stats().hits
        p, q = out_of_batch(8), out_of_batch(8)
        del p
        r = out_of_batch(16)  # does not fit in the cached 1 MiB block
        del q, r  # the 1 MiB blocks fill the cache; the 2 MiB block is not stale-evicting them
        hits_per_step.append(cache.stats().hits - hits)
    # Evicting by age alone would hit 0 of 3 per step (each free evicting what the next step asks first).
    assert hits_per_step[1:] == [2, 2, 2, 2]


def test_stale_blocks_make_way_for_new_sizes(cache):
    cache.set_limit(2 * MIB)
    outs = [out_of_batch(8) for _ in range(2)]
    del outs  # two 1 MiB blocks fill the cache; nothing below asks for that size
    for step in range(STALE_AFTER + 2):
        hits = cache.stats().hits
        out_of_batch(12)  # 1.5 MiB: a miss until it is cached, then a hit
        if cache.stats().hits > hits:
            break
    assert step == STALE_AFTER, f"the 1.5 MiB block was first reused at step {step}"
    assert cache.stats().cached_bytes == 3 * MIB // 2  # both old blocks evicted


def test_stale_blocks_are_evicted_oldest_first(cache):
    cache.set_limit(19 * MIB // 4)  # 4.75 MiB
    a, b, d = out_of_batch(10), out_of_batch(8), out_of_batch(12)  # 1.25, 1 and 1.5 MiB
    del a, b, d  # cached in that order: 3.75 MiB
    for _ in range(STALE_AFTER):
        out_of_batch(40)  # 5 MiB, above the limit: never cached, but the cached blocks age
    c = out_of_batch(14)  # 1.75 MiB: no cached block fits
    del c  # needs 0.75 MiB: the oldest stale block (1.25 MiB) goes, the 1 and 1.5 MiB ones stay
    assert cache.stats().cached_bytes == (8 + 12 + 14) * MIB // 8  # not 4.0 (largest first) or 4.5 (smallest)


def test_a_larger_block_replaces_smaller_ones_when_that_caches_more(cache):
    cache.set_limit(3 * MIB)
    a, b = out_of_batch(8), out_of_batch(12)
    del a, b  # 1 and 1.5 MiB cached, neither stale
    out_of_batch(16)  # 2 MiB: a miss; freed, it takes the 1.5 MiB block's place (2.5 -> 3 MiB cached)
    assert cache.stats().cached_bytes == 3 * MIB
    hits = cache.stats().hits
    out_of_batch(16)
    assert cache.stats().hits == hits + 1
