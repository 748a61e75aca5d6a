"""Catalogue search on CPU: flat vs hnsw vs two-tier ivfpq + re-rank, and the HTTP service under load.

    python benchmarks/bench_search.py [--docs 1000000] [--queries 10000] [--dim 256] [--quick]
        [--skip-hnsw] [--opq] [--skip-service] [--out benchmarks/results/search_cpu]

Writes <out>.json (environment, data generator, every setting's numbers and samples) and <out>.png
(recall@10 vs single-query p50 latency; bytes per doc; the service's latency vs clients).

Synthetic data (clustered, seeded; the generator is recorded in the JSON):
    S = C / 64 "super" centres s_j, random unit vectors in R^D;
    C = N / 250 cluster centres c_i = normalise(s_{j(i)} + tau * g / sqrt(D)), j(i) uniform, tau = 0.4,
        g ~ N(0, I): sibling clusters (same super centre) have centres at cosine ~0.86, so a query's
        true top-10 mixes its own cluster with its siblings';
    cluster i has a noise scale sigma_i, log-uniform in [0.6, 0.9], and a popularity w_i ~ lognormal(0, 0.5);
    a doc: cluster i ~ w, x = normalise(c_i + sigma_i * g / sqrt(D)) (so |noise| ~ sigma_i);
    a query: drawn the same way, independently (fresh samples, not copies of docs).
The JSON reports the mean top-1 / top-10 cosine, the share of the true top-10 that lies in the query's
own cluster, and the median margin between the 10th true neighbour and the best doc of another cluster.
The generator's constants were fixed before any index was measured, from these difficulty statistics
only (on a 200k-doc sample), and not changed afterwards.

Exact ground truth: faiss.knn (blocked brute-force inner product, independent of CatalogIndex), top-11,
checked against a numpy matmul on a few queries (and top-100 on a 1000-query sample, for the margin).

Variants, all through oclear_ext.search.CatalogIndex, in this one process on the same data:
    flat                   IndexFlatIP (exact), the reference for memory and latency
    hnsw                   one build (M = 32, efConstruction = 80), searched at efSearch 64 / 128 / 256
    ivfpq                  builds IVF (nlist = the API's default, 4096 at 1M; k-means trained on 64 docs per
                           list, `--ivf-train-per-list`) + PQ32x8 and PQ16x8 (and, with --opq, OPQ32 + PQ32x8),
                           each searched at nprobe {16, 32, 64, 128} x rerank_factor {10, 20, 50}, and nprobe 32
                           with rerank_factor 1 (the first stage's own top-10, re-sorted: what the re-rank buys).
                           Each is saved and re-loaded with mmap=True before it is measured, so the float16
                           re-rank store (2 D bytes per doc) is read from a memory-mapped file (the page
                           cache), as a served index reads it.
Per setting: build time (per build), bytes per doc of the faiss index in RAM (faiss.serialize_index size,
CatalogIndex.memory_bytes), bytes per doc of the re-rank store on disk, recall@10 against exact over all
queries (batched), single-query latency (one query per search call, p50 / p99) with faiss's default OpenMP
threads (the targets' numbers) and again with faiss at 1 thread, batch-64 throughput (default threads).
Flat scans every doc per query, so it gets fewer samples (300 single queries, 8 batches of 64; the other
settings 1000 and 32). Latency and throughput run round-robin over all settings in `--rounds` rounds (each round every setting
runs its share of the queries), so load drifting on this shared machine hits all settings alike.
Each phase records the load average and the CPU-seconds other processes took meanwhile (/proc/stat minus
this run's own). Before the warm measurements each ivfpq build is also searched cold: its vectors.f16.npy evicted from the
page cache (posix_fadvise DONTNEED, checked with mincore), then single queries; the JSON records the store's
resident share after them (the disk's readahead, /sys/block/*/queue/read_ahead_kb, can page in far more than
the candidates' rows).

Memory target: "1/8 of flat fp32's memory" is judged on RAM: the faiss index (IVF lists, PQ codes, ids,
centroids, codebooks) against flat's 4 D bytes per doc. The re-rank store is NOT in that number: it lives on
disk and is paged in through the page cache on demand (its resident part after the runs is reported too).

Service: oclear-serve in a subprocess on a free loopback port, serving the PQ32 ivfpq index (all docs, the
default nprobe 32 / rerank_factor 10) with a tiny trained model (oclear-train --max-steps 1 --dim 256,
small-cnn image encoder, 32 px): for 1, 4, 16 concurrent clients (httpx, async, one connection each), a
fixed number of requests per level, on POST /search/embedding (no model) and POST /search (a 256 x 256
JPEG upload; decode + model + index). Client and server share the same 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import dataclasses
import gc
import io
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import faiss  # noqa: E402
import torch  # noqa: E402

from oclear_ext.search import CatalogIndex, IndexParams  # noqa: E402

K = 10
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_seconds() -> tuple[float, float]:
    """(CPU-seconds the whole machine has been busy, CPU-seconds of this process) since boot / start."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    t = os.times()  # this process's threads, and its children once waited for (oclear-train, oclear-serve)
    return (sum(fields[:8]) - idle) / tick, t.user + t.system + t.children_user + t.children_system


# ---- data ------------------------------------------------------------------------------------------------------
GENERATOR = {"docs_per_cluster": 250, "clusters_per_super": 64, "tau": 0.4, "sigma_range": [0.6, 0.9],
             "popularity_lognormal_sigma": 0.5}


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_data(n_docs: int, n_queries: int, dim: int, seed: int) -> dict:
    g = GENERATOR
    rng = np.random.default_rng(seed)
    n_clusters = max(1, round(n_docs / g["docs_per_cluster"]))
    n_super = max(1, n_clusters // g["clusters_per_super"])
    supers = _unit(rng.standard_normal((n_super, dim), dtype=np.float32))
    parent = rng.integers(0, n_super, n_clusters)
    centres = _unit(supers[parent] + g["tau"] * rng.standard_normal((n_clusters, dim), dtype=np.float32) / np.sqrt(dim))
    lo, hi = g["sigma_range"]
    sigma = np.exp(rng.uniform(np.log(lo), np.log(hi), n_clusters)).astype(np.float32)
    weight = rng.lognormal(0.0, g["popularity_lognormal_sigma"], n_clusters)
    weight /= weight.sum()

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        cluster = rng.choice(n_clusters, n, p=weight)
        x = np.empty((n, dim), np.float32)
        for start in range(0, n, 65536):  # blocks: no float64 or full-size temporaries
            c = cluster[start:start + 65536]
            block = rng.standard_normal((len(c), dim), dtype=np.float32)
            block *= sigma[c, None] / np.sqrt(dim)
            block += centres[c]
            x[start:start + len(c)] = _unit(block)
        return x, cluster

    docs, doc_cluster = draw(n_docs)
    queries, query_cluster = draw(n_queries)
    return {"docs": docs, "doc_cluster": doc_cluster, "queries": queries, "query_cluster": query_cluster,
            "n_clusters": n_clusters, "n_super": n_super, "mean_cos_sibling_centres": _sibling_cos(centres, parent, rng)}


def _sibling_cos(centres: np.ndarray, parent: np.ndarray, rng) -> float | None:
    """Mean cosine between two cluster centres under the same super centre (a sample of pairs)."""
    a = rng.integers(0, len(centres), 4000)
    cos = []
    for i in a:
        sib = np.flatnonzero(parent == parent[i])
        sib = sib[sib != i]
        if len(sib):
            cos.append(float(centres[i] @ centres[rng.choice(sib)]))
    return float(np.mean(cos)) if cos else None


def ground_truth(docs: np.ndarray, queries: np.ndarray, depth: int = K + 1, block: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    scores = np.empty((len(queries), depth), np.float32)
    ids = np.empty((len(queries), depth), np.int64)
    for start in range(0, len(queries), block):
        s, i = faiss.knn(queries[start:start + block], docs, depth, metric=faiss.METRIC_INNER_PRODUCT)
        scores[start:start + block], ids[start:start + block] = s, i
        log(f"  ground truth {min(start + block, len(queries))}/{len(queries)}")
    # independent check on a few queries: numpy matmul over all docs
    for qi in np.linspace(0, len(queries) - 1, 8).astype(int):
        exact = docs @ queries[qi]
        top = np.argsort(-exact, kind="stable")[:K]
        if not np.allclose(np.sort(exact[top])[::-1], scores[qi, :K], atol=1e-5):
            raise SystemExit(f"ground truth check failed at query {qi}")
    return ids, scores


def difficulty(data: dict, gt_ids: np.ndarray, gt_scores: np.ndarray, sample: int = 1000) -> dict:
    own = data["doc_cluster"][gt_ids] == data["query_cluster"][:, None]
    # the best doc of another cluster: within the exact top-100 of a sample of queries
    sq = np.linspace(0, len(gt_ids) - 1, min(sample, len(gt_ids))).astype(int)
    s100, i100 = faiss.knn(data["queries"][sq], data["docs"], 100, metric=faiss.METRIC_INNER_PRODUCT)
    other = data["doc_cluster"][i100] != data["query_cluster"][sq, None]
    other_best = np.where(other, s100, -np.inf).max(1)
    return {"mean_top1_cos": float(gt_scores[:, 0].mean()), "mean_top10_cos": float(gt_scores[:, K - 1].mean()),
            "median_gap_10th_11th": float(np.median(gt_scores[:, K - 1] - gt_scores[:, K])),
            "share_of_true_top10_in_query_cluster": float(own[:, :K].mean()),
            "queries_with_all_top10_in_own_cluster": float(own[:, :K].all(1).mean()),
            "median_margin_10th_minus_best_other_cluster_doc": float(np.median(s100[:, K - 1] - other_best)),
            "margin_sample_queries": int(len(sq)),
            "note": "margin: over a sample of queries, the 10th exact score minus the best score of a doc from another "
                    "cluster (within the exact top-100, +inf where all 100 are in the query's cluster); negative: another cluster's doc is in the top-10"}


def recall_at(ids: np.ndarray, gt_ids: np.ndarray, k: int) -> float:
    hits = [len(np.intersect1d(a[:k], b[:k], assume_unique=True)) for a, b in zip(ids, gt_ids)]
    return float(np.mean(hits) / k)


# ---- page cache ------------------------------------------------------------------------------------------------
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_fraction(path: Path) -> float:
    """Share of the file's pages in the page cache (mincore on a fresh read-only mapping)."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        if addr in (None, ctypes.c_void_p(-1).value):
            return float("nan")
        pages = (size + os.sysconf("SC_PAGE_SIZE") - 1) // os.sysconf("SC_PAGE_SIZE")
        vec = (ctypes.c_ubyte * pages)()
        ok = _libc.mincore(addr, size, vec) == 0
        _libc.munmap(addr, size)
        return float(np.frombuffer(vec, np.uint8).astype(bool).mean()) if ok else float("nan")
    finally:
        os.close(fd)


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def mapping_rss_bytes(path: Path) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def proc_status(pid: int | str = "self") -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[name + "_MiB"] = round(int(value.split()[0]) / 1024, 1)
    return out


# ---- timing ----------------------------------------------------------------------------------------------------
def pct(samples_s: list[float]) -> dict:
    a = np.asarray(samples_s) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "min_ms": float(a.min()),
            "max_ms": float(a.max()), "n": int(len(a))}


def single_latencies(index: CatalogIndex, queries: np.ndarray) -> list[float]:
    out = []
    for i in range(len(queries)):
        q = queries[i:i + 1]
        t0 = time.perf_counter()
        index.search(q, K)
        out.append(time.perf_counter() - t0)
    return out


def batch_times(index: CatalogIndex, queries: np.ndarray, batch: int) -> list[float]:
    out = []
    for start in range(0, len(queries) - batch + 1, batch):
        q = queries[start:start + batch]
        t0 = time.perf_counter()
        index.search(q, K)
        out.append(time.perf_counter() - t0)
    return out


class Setting:
    """One searchable configuration: an index object + the search parameters to set before each use."""

    def __init__(self, kind: str, build: str, label: str, index: CatalogIndex, search_params: dict) -> None:
        self.kind, self.build, self.label, self.index, self.search_params = kind, build, label, index, search_params
        self.record: dict = {"kind": kind, "build": build, "setting": label, "search_params": search_params}

    def use(self) -> CatalogIndex:
        if self.search_params:
            self.index.set_search_params(**self.search_params)
        return self.index


# ---- builds ----------------------------------------------------------------------------------------------------
def metadata(n: int) -> list[dict]:
    return [{"id": str(i)} for i in range(n)]


def build_index(kind: str, docs: np.ndarray, params: IndexParams) -> tuple[CatalogIndex, float]:
    gc.collect()
    t0 = time.perf_counter()
    index = CatalogIndex.build(docs, metadata(len(docs)), kind=kind, params=params)
    return index, time.perf_counter() - t0


def build_record(index: CatalogIndex, build_s: float) -> dict:
    mem = index.memory_bytes()
    return {"build_s": build_s, "index_bytes_per_doc_in_ram": mem["index_bytes_per_doc"],
            "rerank_bytes_per_doc_on_disk": mem.get("rerank_bytes_per_doc", 0.0),
            "params": dataclasses.asdict(index.params)}


def build_and_reload_ivfpq(name: str, docs: np.ndarray, params: IndexParams, folder: Path, queries_cold: np.ndarray) -> tuple[CatalogIndex, dict]:
    index, build_s = build_index("ivfpq", docs, params)
    rec = build_record(index, build_s)
    log(f"  {name}: built in {build_s:.1f} s, {rec['index_bytes_per_doc_in_ram']:.1f} B/doc in RAM + "
        f"{rec['rerank_bytes_per_doc_on_disk']:.0f} B/doc re-rank store; saving")
    t0 = time.perf_counter()
    index.save(folder)
    rec["save_s"] = time.perf_counter() - t0
    del index
    gc.collect()
    vectors = folder / "vectors.f16.npy"
    rec["vectors_file_bytes"] = vectors.stat().st_size
    rec["vectors_resident_after_save"] = resident_fraction(vectors)
    evict(vectors)
    rec["vectors_resident_after_evict"] = resident_fraction(vectors)
    rss0 = proc_status()
    t0 = time.perf_counter()
    loaded = CatalogIndex.load(folder, mmap=True)
    rec["load_s"] = time.perf_counter() - t0
    rss1 = proc_status()
    rec["rss_anon_growth_on_load_bytes_per_doc"] = (rss1["RssAnon_MiB"] - rss0["RssAnon_MiB"]) * 2**20 / len(loaded)
    rec["loaded_vectors_is_memmap"] = isinstance(loaded.vectors, np.memmap)
    # cold: the re-rank store evicted from the page cache, then single queries at the build's own setting
    cold = single_latencies(loaded, queries_cold)
    rec["cold_single_query"] = {**pct(cold), "samples_ms": [round(s * 1e3, 4) for s in cold],
                                "vectors_resident_after": resident_fraction(vectors),
                                "search_params": {"nprobe": loaded.params.nprobe, "rerank_factor": loaded.params.rerank_factor}}
    log(f"  {name}: cold single-query p50 {rec['cold_single_query']['p50_ms']:.3f} ms p99 "
        f"{rec['cold_single_query']['p99_ms']:.3f} ms (resident {rec['vectors_resident_after_evict']:.3f} -> "
        f"{rec['cold_single_query']['vectors_resident_after']:.3f})")
    return loaded, rec


# ---- service ---------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_images(n: int, seed: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(small).resize((256, 256), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


async def drive(base: str, endpoint: str, clients: int, n_requests: int, payloads: list, k: int) -> dict:
    import httpx

    counter = itertools.count()
    latencies: list[float] = []
    failures: list[str] = []
    warmup_failures: list[str] = []
    ready = 0
    go = asyncio.Event()

    async def request(client, i: int):
        if endpoint == "embedding":
            return await client.post("/search/embedding", content=payloads[i % len(payloads)],
                                     headers={"content-type": "application/json"})
        return await client.post(f"/search?k={k}", files={"image": (f"q{i % len(payloads)}.jpg", payloads[i % len(payloads)],
                                                                    "image/jpeg")})

    async def one_client(ci: int) -> None:
        nonlocal ready
        async with httpx.AsyncClient(base_url=base, timeout=120.0) as client:
            try:
                await request(client, ci)  # warm-up: connection set up, not measured
            except Exception as err:  # noqa: BLE001
                warmup_failures.append(f"{type(err).__name__}: {err}")
            ready += 1
            if ready == clients:
                go.set()
            await go.wait()
            while (i := next(counter)) < n_requests:
                t0 = time.perf_counter()
                try:
                    r = await request(client, i)
                    ok = r.status_code == 200 and len(r.json()["results"]) == k
                    why = None if ok else f"status {r.status_code}: {r.text[:200]}"
                except Exception as err:  # noqa: BLE001 - every failure is counted and named
                    why = f"{type(err).__name__}: {err}"
                dt = time.perf_counter() - t0
                if why is None:
                    latencies.append(dt)
                else:
                    failures.append(why)

    tasks = [asyncio.create_task(one_client(c)) for c in range(clients)]
    await go.wait()
    t0 = time.perf_counter()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    return {"latencies": latencies, "failures": failures, "warmup_failures": warmup_failures, "wall_s": wall}


def run_service(args, index_dir: Path, work: Path, queries: np.ndarray, expected: CatalogIndex | None) -> dict:
    import httpx

    run_dir = work / "model_run"
    log("service: training the tiny model (oclear-train --max-steps 1 --dim 256)")
    t0 = time.perf_counter()
    subprocess.run([shutil.which("oclear-train") or "oclear-train", "--out-dir", str(run_dir), "--max-steps", "1",
                    "--dim", str(args.dim), "--no-progress"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    train_s = time.perf_counter() - t0
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server_log = open(work / "server.log", "w")
    cmd = [shutil.which("oclear-serve") or "oclear-serve", "--index", str(index_dir), "--checkpoint", str(run_dir),
           "--port", str(port), "--log-level", "warning"]
    log(f"service: {' '.join(cmd)}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
    out: dict = {"command": cmd, "model_train_s": train_s, "index": str(index_dir.name), "levels": []}
    try:
        while True:
            if proc.poll() is not None:
                server_log.flush()
                raise SystemExit(f"oclear-serve exited with {proc.returncode}:\n{(work / 'server.log').read_text()[-3000:]}")
            try:
                health = httpx.get(base + "/healthz", timeout=2.0).json()
                break
            except httpx.HTTPError:
                time.sleep(0.5)
            if time.perf_counter() - t0 > 600:
                raise SystemExit("oclear-serve did not answer /healthz within 600 s")
        out["startup_s"] = time.perf_counter() - t0
        out["health"] = health
        out["server_memory_after_start"] = proc_status(proc.pid)
        log(f"service: up in {out['startup_s']:.1f} s: {health}; server {out['server_memory_after_start']}")
        # the embedding endpoint must return what the index returns in-process
        # (scores compared, not ids: a batch and a single query may order exact ties differently)
        if expected is not None:
            want_ids, want_scores = expected.search(queries[:5], K)
            same_ids = 0
            for i in range(5):
                got = httpx.post(base + "/search/embedding", json={"embedding": queries[i].tolist(), "k": K}, timeout=60).json()
                got_scores = np.array([r["score"] for r in got["results"]], np.float32)
                if len(got_scores) != K or not np.allclose(got_scores, want_scores[i], atol=1e-4):
                    raise SystemExit(f"service result differs from the in-process search on query {i}: "
                                     f"{got_scores} vs {want_scores[i]}")
                same_ids += [int(r["id"]) for r in got["results"]] == want_ids[i].tolist()
            out["checked_against_in_process_search"] = {"queries": 5, "identical_ids": same_ids}
        embed_payloads = [json.dumps({"embedding": [float(v) for v in q], "k": K}).encode() for q in queries[:256]]
        images = make_images(16, args.seed + 1)
        out["image_upload_bytes_mean"] = float(np.mean([len(b) for b in images]))
        for clients in args.clients:
            for endpoint, payloads in (("embedding", embed_payloads), ("image", images)):
                before = httpx.get(base + "/healthz", timeout=10).json()
                load0 = load_average()
                res = asyncio.run(drive(base, endpoint, clients, args.service_requests, payloads, K))
                after = httpx.get(base + "/healthz", timeout=10).json()
                batches = after["batches"] - before["batches"]
                queries_served = after["queries"] - before["queries"]
                lat = res["latencies"]
                level = {"endpoint": "POST /search/embedding" if endpoint == "embedding" else "POST /search (image)",
                         "model_in_loop": endpoint == "image", "clients": clients, "requests": args.service_requests,
                         "ok": len(lat), "failures": len(res["failures"]), "failure_examples": res["failures"][:5],
                         "warmup_failures": res["warmup_failures"],
                         **(pct(lat) if lat else {}), "requests_per_s": args.service_requests / res["wall_s"],
                         "wall_s": res["wall_s"], "server_batches": batches,
                         "mean_server_batch": queries_served / batches if batches else None,
                         "load_average_before": load0, "samples_ms": [round(s * 1e3, 3) for s in lat]}
                out["levels"].append(level)
                log(f"service {level['endpoint']:24s} clients {clients:2d}: {level['ok']}/{level['requests']} ok, "
                    f"{level['failures']} failed, p50 {level.get('p50_ms', float('nan')):.2f} ms p99 "
                    f"{level.get('p99_ms', float('nan')):.2f} ms, {level['requests_per_s']:.1f} req/s, "
                    f"mean server batch {level['mean_server_batch'] or 0:.2f}")
        out["server_memory_after_load"] = proc_status(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        server_log.close()
        out["server_exit_code"] = proc.returncode
        out["server_log_tail"] = (work / "server.log").read_text()[-2000:]
    return out


# ---- the plot --------------------------------------------------------------------------------------------------
def draw(payload: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_service = bool(payload.get("service"))
    fig, axes = plt.subplots(1, 3 if has_service else 2, figsize=(19 if has_service else 13, 6.2))
    ax = axes[0]
    colors = {"flat": "black", "hnsw": "tab:green"}
    ivf_colors = iter(["tab:blue", "tab:orange", "tab:purple", "tab:red"])
    markers = {}
    for r in payload["settings"]:
        key = r["build"]
        if key not in markers:
            markers[key] = colors.get(r["kind"]) or next(ivf_colors)
    for build, color in markers.items():
        rows = [r for r in payload["settings"] if r["build"] == build]
        ax.scatter([r["single_query"]["p50_ms"] for r in rows], [r["recall_at_10"] for r in rows], color=color, label=build,
                   s=30, zorder=3)
        ax.scatter([r["single_query_1_thread"]["p50_ms"] for r in rows], [r["recall_at_10"] for r in rows],
                   facecolors="none", edgecolors=color, s=30, zorder=2, lw=0.8,
                   label=f"{build}, faiss 1 thread" if build == "flat" else None)
        series: dict = {}
        for r in rows:  # ivfpq: one line per rerank_factor, nprobe along it; hnsw: efSearch along one line
            series.setdefault(r["search_params"].get("rerank_factor"), []).append(r)
        for rf, line in series.items():
            xs = [r["single_query"]["p50_ms"] for r in line]
            ys = [r["recall_at_10"] for r in line]
            if len(line) > 1:
                ax.plot(xs, ys, color=color, lw=0.8, alpha=0.7)
            for r, x, y in zip(line, xs, ys):
                p = r["search_params"]
                tag = f"ef{p['ef_search']}" if "ef_search" in p else (f"np{p['nprobe']}" if "nprobe" in p else "exact")
                ax.annotate(tag, (x, y), fontsize=6, xytext=(2, -7), textcoords="offset points", color=color)
            if rf is not None:
                ax.annotate(f"rf={rf}", (xs[-1], ys[-1]), fontsize=7, xytext=(4, 2), textcoords="offset points",
                            color=color, weight="bold")
    flat = next(r for r in payload["settings"] if r["kind"] == "flat")
    ax.axhline(0.95, color="grey", ls="--", lw=0.8)
    ax.axvline(flat["single_query"]["p50_ms"] / 5, color="grey", ls=":", lw=0.8)
    ax.text(flat["single_query"]["p50_ms"] / 5, 0.951, " flat p50 / 5", fontsize=7, color="grey", va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("single-query latency p50 (ms, log); hollow: faiss at 1 thread")
    ax.set_ylabel("recall@10 vs exact")
    ax.set_title("recall@10 vs single-query p50")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, which="both")

    ax = axes[1]
    builds = payload["builds"]
    names = list(builds)
    ram = [builds[n]["index_bytes_per_doc_in_ram"] for n in names]
    disk = [builds[n]["rerank_bytes_per_doc_on_disk"] for n in names]
    xs = np.arange(len(names))
    ax.bar(xs - 0.2, ram, 0.4, label="faiss index in RAM", color="tab:blue")
    ax.bar(xs + 0.2, disk, 0.4, label="float16 re-rank store on disk (mmap, page cache)", color="tab:orange", hatch="//")
    for x, v in zip(xs, ram):
        ax.text(x - 0.2, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    for x, v in zip(xs, disk):
        if v:
            ax.text(x + 0.2, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(builds["flat"]["index_bytes_per_doc_in_ram"] / 8, color="grey", ls="--", lw=0.8)
    ax.text(-0.45, builds["flat"]["index_bytes_per_doc_in_ram"] / 8, "flat / 8", fontsize=7, color="grey",
            ha="left", va="bottom")
    ax.set_yscale("log")
    ax.set_xticks(xs, names, rotation=20, fontsize=7, ha="right")
    ax.set_ylabel("bytes per doc (log)")
    ax.set_title("memory per doc")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")

    if has_service:
        ax = axes[2]
        levels = payload["service"]["levels"]
        for endpoint, color in (("POST /search/embedding", "tab:blue"), ("POST /search (image)", "tab:red")):
            rows = [lv for lv in levels if lv["endpoint"] == endpoint and "p50_ms" in lv]
            c = [lv["clients"] for lv in rows]
            ax.plot(c, [lv["p50_ms"] for lv in rows], "o-", color=color, label=f"{endpoint} p50")
            ax.plot(c, [lv["p99_ms"] for lv in rows], "s--", color=color, label=f"{endpoint} p99")
            for lv in rows:
                ax.annotate(f"{lv['requests_per_s']:.0f} req/s", (lv["clients"], lv["p50_ms"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points", color=color)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({lv["clients"] for lv in levels}), [str(c) for c in sorted({lv["clients"] for lv in levels})])
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("request latency (ms, log)")
        ax.set_title("oclear-serve on loopback (client + server on 2 cores)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    d = payload["config"]
    common.save_figure(fig, path, f"catalogue search, CPU ({d['threads']} threads): {d['docs']:,} docs x {d['dim']} dims, "
                                  f"{d['queries']:,} queries (recall over all), load average {payload['environment']['load_average_start']} -> "
                                  f"{payload['environment'].get('load_average_end')}")


# ---- main ------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=None, help="catalogue size (default 1,000,000; --quick 50,000)")
    p.add_argument("--queries", type=int, default=None, help="queries with exact ground truth (default 10,000; --quick 2,000)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--quick", action="store_true", help="small sizes for development")
    p.add_argument("--single-queries", type=int, default=None, help="single-query latency samples per setting (default 1000)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=None, help="batches per setting for throughput (default 32, i.e. 2048 queries)")
    p.add_argument("--cold-queries", type=int, default=200, help="single queries on a cold page cache per ivfpq build")
    p.add_argument("--rounds", type=int, default=4, help="round-robin rounds for latency / throughput")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--service-requests", type=int, default=None, help="requests per (endpoint, clients) level (default 400)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-hnsw", action="store_true")
    p.add_argument("--opq", action="store_true", help="also an OPQ32 + PQ32 build (its OPQ training takes minutes here)")
    p.add_argument("--ivf-train-per-list", type=int, default=64,
                   help="ivfpq k-means training docs per inverted list (default 64: 262,144 docs at nlist 4096; "
                        "the API's default, 256, quadruples the k-means time)")
    p.add_argument("--flat-single-queries", type=int, default=None,
                   help="single-query latency samples for flat (default 300): each scans every doc")
    p.add_argument("--flat-batches", type=int, default=None, help="batches of --batch for flat's throughput (default 8)")
    p.add_argument("--skip-service", action="store_true")
    p.add_argument("--workdir", help="where index folders go (default: a temporary folder, removed at the end)")
    p.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "search_cpu"),
                   help="output prefix: <out>.json and <out>.png (default benchmarks/results/search_cpu)")
    args = p.parse_args(argv)
    quick = args.quick
    args.docs = args.docs or (50_000 if quick else 1_000_000)
    args.queries = args.queries or (2_000 if quick else 10_000)
    args.single_queries = args.single_queries or (300 if quick else 1000)
    args.flat_single_queries = min(args.flat_single_queries or 300, args.single_queries)
    args.batches = args.batches or (8 if quick else 32)
    args.flat_batches = min(args.flat_batches or (4 if quick else 8), args.batches)
    args.service_requests = args.service_requests or (100 if quick else 400)
    if args.single_queries > args.queries or args.batches * args.batch > args.queries:
        p.error("--single-queries and --batches x --batch must not exceed --queries")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    env = common.environment(torch.device("cpu"))
    env.update({"faiss": faiss.__version__, "numpy": np.__version__, "faiss_omp_threads": faiss.omp_get_max_threads(),
                "faiss_compile_options": faiss.get_compile_options(), "faiss_simd_level": int(faiss.cvar.SIMDConfig_level),
                "faiss_distance_compute_blas_threshold": int(faiss.cvar.distance_compute_blas_threshold),
                "os_cpu_count": os.cpu_count(), "load_average_start": load_average(),
                "mem_total_GiB": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)})
    if hasattr(common, "_configure_glibc_malloc"):
        env["malloc_note"] = ("benchmarks/common.py set glibc mallopt M_MMAP_THRESHOLD = M_TRIM_THRESHOLD = 128 KiB at import "
                              "(blocks over 128 KiB are fresh mmaps, page-faulted on each allocation) in this process; "
                              "the oclear-serve subprocess runs with glibc's defaults")
    else:
        env["malloc_note"] = "benchmarks/common.py changes no allocator setting; glibc defaults (see environment.allocator)"
    try:
        import fastapi
        import httpx
        import uvicorn

        env.update({"fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__, "httpx": httpx.__version__})
    except ImportError:
        pass
    log(f"environment: {json.dumps({k: v for k, v in env.items() if k != 'oclear_ext_build'})}")
    config = {"docs": args.docs, "queries": args.queries, "dim": args.dim, "k": K, "single_queries": args.single_queries,
              "flat_single_queries": args.flat_single_queries, "flat_batches": args.flat_batches, "batch": args.batch, "batches": args.batches,
              "ivf_train_per_list": args.ivf_train_per_list, "cold_queries": args.cold_queries, "rounds": args.rounds,
              "seed": args.seed, "threads": faiss.omp_get_max_threads(), "argv": sys.argv[1:]}
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_search_"))
    work.mkdir(parents=True, exist_ok=True)
    phases: dict = {}
    try:
        _run(args, env, config, work, phases)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def _run(args, env: dict, config: dict, work: Path, phases: dict) -> None:
    marks = {"cpu": cpu_seconds()}

    def phase(name: str, t0: float) -> None:
        now = cpu_seconds()
        before, marks["cpu"] = marks["cpu"], now
        machine, own = now[0] - before[0], now[1] - before[1]
        phases[name] = {"s": time.perf_counter() - t0, "load_average_after": load_average(),
                        "machine_busy_cpu_s": machine, "this_run_cpu_s": own, "other_processes_cpu_s": machine - own}

    # data + ground truth
    t0 = time.perf_counter()
    data = make_data(args.docs, args.queries, args.dim, args.seed)
    phase("data", t0)
    log(f"data: {args.docs:,} docs, {args.queries:,} queries, {data['n_clusters']} clusters under {data['n_super']} "
        f"super centres, {phases['data']['s']:.1f} s")
    docs, queries = data["docs"], data["queries"]
    t0 = time.perf_counter()
    gt_ids, gt_scores = ground_truth(docs, queries)
    phase("ground_truth", t0)
    stats = difficulty(data, gt_ids, gt_scores)
    log(f"ground truth in {phases['ground_truth']['s']:.1f} s; difficulty {json.dumps(stats)}")
    generator = {**GENERATOR, "seed": args.seed, "clusters": data["n_clusters"], "super_centres": data["n_super"],
                 "description": "super centres: random unit; cluster centre = normalise(super + tau g / sqrt(D)); "
                                "doc or query = normalise(centre + sigma_cluster g / sqrt(D)), cluster drawn by "
                                "lognormal popularity, sigma_cluster log-uniform in sigma_range; queries are fresh draws",
                 "mean_cos_sibling_centres": data["mean_cos_sibling_centres"], **stats}

    single_q = queries[:args.single_queries]
    batch_q = queries[:args.batches * args.batch]
    cold_q = queries[-args.cold_queries:]  # not the warm-latency queries
    builds: dict = {}
    settings: list[Setting] = []

    # flat
    t0 = time.perf_counter()
    flat, build_s = build_index("flat", docs, IndexParams())
    builds["flat"] = build_record(flat, build_s)
    settings.append(Setting("flat", "flat", "exact", flat, {}))
    log(f"flat: built in {build_s:.2f} s, {builds['flat']['index_bytes_per_doc_in_ram']:.1f} B/doc")
    # does faiss use both threads for one query? (it parallelises over queries)
    probe = {}
    for threads in (1, faiss.omp_get_max_threads()):
        faiss.omp_set_num_threads(threads)
        probe[f"threads_{threads}"] = pct(single_latencies(flat, queries[:30]))["p50_ms"]
    faiss.omp_set_num_threads(config["threads"])
    builds["flat"]["single_query_p50_ms_by_faiss_threads"] = probe
    log(f"flat single-query p50 by faiss threads: {probe}")
    phase("flat", t0)

    # hnsw
    if not args.skip_hnsw:
        t0 = time.perf_counter()
        hp = IndexParams(hnsw_m=32, ef_construction=80)
        log("hnsw: building M=32 efConstruction=80 ...")
        hnsw, build_s = build_index("hnsw", docs, hp)
        name = "hnsw M32 efC80"
        builds[name] = build_record(hnsw, build_s)
        log(f"hnsw: built in {build_s:.1f} s, {builds[name]['index_bytes_per_doc_in_ram']:.1f} B/doc")
        for ef in (64, 128, 256):
            settings.append(Setting("hnsw", name, f"efSearch={ef}", hnsw, {"ef_search": ef}))
        phase("hnsw_build", t0)

    # ivfpq builds
    nlist = IndexParams().resolved(args.docs, args.dim).nlist
    train = min(args.docs, args.ivf_train_per_list * nlist)
    ivf_builds = [("ivfpq PQ32", IndexParams(pq_m=32, train_size=train)), ("ivfpq PQ16", IndexParams(pq_m=16, train_size=train))]
    if args.opq:
        ivf_builds.append(("ivfpq OPQ32,PQ32", IndexParams(pq_m=32, opq=True, train_size=train)))
    headline_dir = None
    for name, params in ivf_builds:
        t0 = time.perf_counter()
        folder = work / re.sub(r"[^A-Za-z0-9]+", "_", name)
        log(f"{name}: building {params} ...")
        loaded, rec = build_and_reload_ivfpq(name, docs, params, folder, cold_q)
        nlist = loaded.params.nlist
        rec["nlist"] = nlist
        builds[name] = rec
        if headline_dir is None:
            headline_dir = folder
        for nprobe, rf in [*itertools.product((16, 32, 64, 128), (10, 20, 50)), (32, 1)]:
            settings.append(Setting("ivfpq", name, f"nprobe={nprobe} rf={rf}", loaded, {"nprobe": nprobe, "rerank_factor": rf}))
        phase(f"build {name}", t0)

    # recall over all queries (batched)
    t0 = time.perf_counter()
    for s in settings:
        idx = s.use()
        t1 = time.perf_counter()
        ids = np.concatenate([idx.search(queries[i:i + 1000], K)[0] for i in range(0, len(queries), 1000)])
        s.record["recall_search_s"] = time.perf_counter() - t1
        s.record["recall_at_10"] = recall_at(ids, gt_ids, K)
        s.record["recall_at_1"] = float((ids[:, 0] == gt_ids[:, 0]).mean())
        log(f"recall {s.build:18s} {s.label:18s} recall@10 {s.record['recall_at_10']:.4f} "
            f"({s.record['recall_search_s']:.1f} s for {len(queries)} queries in batches of 1000)")
    phase("recall", t0)

    # warm latency + throughput, round-robin
    t0 = time.perf_counter()
    for s in settings:  # warm-up
        idx = s.use()
        idx.search(single_q[:1], K)
        idx.search(batch_q[:args.batch], K)
    single: dict = {id(s): [] for s in settings}
    single_round_p50: dict = {id(s): [] for s in settings}
    batches: dict = {id(s): [] for s in settings}
    round_qps: dict = {id(s): [] for s in settings}
    sq_chunks = np.array_split(np.arange(len(single_q)), args.rounds)
    bq_chunks = np.array_split(np.arange(args.batches), args.rounds)
    flat_bq_chunks = np.array_split(np.arange(args.flat_batches), args.rounds)
    single_1t: dict = {id(s): [] for s in settings}
    flat_chunks = np.array_split(np.arange(args.flat_single_queries), args.rounds)
    threads = config["threads"]
    for r in range(args.rounds):
        for s in settings:
            idx = s.use()
            chunk = single_q[(flat_chunks if s.kind == "flat" else sq_chunks)[r]]
            lat = single_latencies(idx, chunk)
            single[id(s)] += lat
            single_round_p50[id(s)].append(float(np.median(lat) * 1e3))
            faiss.omp_set_num_threads(1)
            single_1t[id(s)] += single_latencies(idx, chunk)
            faiss.omp_set_num_threads(threads)
            b = (flat_bq_chunks if s.kind == "flat" else bq_chunks)[r]
            bt = batch_times(idx, batch_q[b[0] * args.batch:(b[-1] + 1) * args.batch], args.batch) if len(b) else []
            batches[id(s)] += bt
            if bt:
                round_qps[id(s)].append(len(bt) * args.batch / sum(bt))
        log(f"latency round {r + 1}/{args.rounds} done, load {load_average()}")
    for s in settings:
        lat, bt = single[id(s)], batches[id(s)]
        s.record["single_query"] = {**pct(lat), "faiss_threads": threads, "per_round_p50_ms": single_round_p50[id(s)],
                                    "samples_ms": [round(x * 1e3, 4) for x in lat]}
        s.record["single_query_1_thread"] = {**pct(single_1t[id(s)]), "faiss_threads": 1,
                                             "samples_ms": [round(x * 1e3, 4) for x in single_1t[id(s)]]}
        s.record["batch64"] = {"queries_per_s": len(bt) * args.batch / sum(bt), "per_round_queries_per_s": round_qps[id(s)],
                               "median_batch_ms": float(np.median(bt) * 1e3), "batches": len(bt),
                               "batch_ms": [round(x * 1e3, 3) for x in bt]}
        b = builds[s.build]
        s.record.update({"build_s": b["build_s"], "index_bytes_per_doc_in_ram": b["index_bytes_per_doc_in_ram"],
                         "rerank_bytes_per_doc_on_disk": b["rerank_bytes_per_doc_on_disk"]})
        log(f"{s.build:18s} {s.label:18s} p50 {s.record['single_query']['p50_ms']:9.3f} ms p99 "
            f"{s.record['single_query']['p99_ms']:9.3f} ms (1 thread: p50 {s.record['single_query_1_thread']['p50_ms']:9.3f} "
            f"p99 {s.record['single_query_1_thread']['p99_ms']:9.3f})  batch-64 {s.record['batch64']['queries_per_s']:9.1f} q/s")
    phase("latency", t0)
    for name, rec in builds.items():
        if name.startswith("ivfpq"):
            path = work / re.sub(r"[^A-Za-z0-9]+", "_", name) / "vectors.f16.npy"
            rec["vectors_resident_after_runs"] = resident_fraction(path)
            rec["vectors_mapping_rss_bytes_after_runs"] = mapping_rss_bytes(path)

    # targets
    flat_rec = settings[0].record
    flat_bytes, flat_p50 = flat_rec["index_bytes_per_doc_in_ram"], flat_rec["single_query"]["p50_ms"]
    flat_p50_1t = flat_rec["single_query_1_thread"]["p50_ms"]
    ivf = []
    for s in settings:
        if s.kind != "ivfpq":
            continue
        r = s.record
        checks = {"recall_at_10>=0.95": r["recall_at_10"] >= 0.95,
                  "ram_bytes<=flat/8": r["index_bytes_per_doc_in_ram"] <= flat_bytes / 8,
                  "p50<=flat_p50/5": r["single_query"]["p50_ms"] <= flat_p50 / 5}
        r["targets"] = checks
        ivf.append({"build": s.build, "setting": s.label, "all_met": all(checks.values()), **checks,
                    "memory_ratio_to_flat": r["index_bytes_per_doc_in_ram"] / flat_bytes,
                    "memory_ratio_to_flat_incl_rerank_store": (r["index_bytes_per_doc_in_ram"] + r["rerank_bytes_per_doc_on_disk"]) / flat_bytes,
                    "p50_ratio_to_flat": r["single_query"]["p50_ms"] / flat_p50,
                    "p50_ratio_to_flat_both_at_1_thread": r["single_query_1_thread"]["p50_ms"] / flat_p50_1t})
    targets = {"ivfpq_rerank": {"rule": "recall@10 >= 0.95 of exact, faiss index bytes per doc in RAM <= flat fp32 / 8 "
                                        "(the float16 re-rank store is on disk, memory-mapped, paged through the page cache, "
                                        "and not counted), single-query p50 <= flat p50 / 5",
                                "flat_bytes_per_doc": flat_bytes, "flat_p50_ms": flat_p50, "flat_p50_ms_1_thread": flat_p50_1t,
                                "met_by_some_setting": any(x["all_met"] for x in ivf),
                                "settings_meeting_all": [f"{x['build']} {x['setting']}" for x in ivf if x["all_met"]],
                                "per_setting": ivf}}
    log(f"target ivfpq+rerank met: {targets['ivfpq_rerank']['met_by_some_setting']} by {targets['ivfpq_rerank']['settings_meeting_all']}")

    payload = {"benchmark": "bench_search", "environment": env, "config": config, "generator": generator,
               "builds": builds, "settings": [s.record for s in settings], "targets": targets, "phases": phases}

    # service
    if not args.skip_service:
        headline = next(s.index for s in settings if s.kind == "ivfpq")
        headline.set_search_params(nprobe=IndexParams().nprobe, rerank_factor=IndexParams().rerank_factor)
        # free the in-process indexes the service test does not need (memory and page cache for the server)
        keep = headline
        settings.clear()
        del flat
        if not args.skip_hnsw:
            del hnsw
        gc.collect()
        t0 = time.perf_counter()
        payload["service"] = run_service(args, headline_dir, work, queries, keep)
        phase("service", t0)
        sixteen = [lv for lv in payload["service"]["levels"] if lv["clients"] == 16]
        targets["service"] = {"rule": "no failed request under 16 concurrent clients; p99 with and without the model",
                              "no_failures_at_16_clients": bool(sixteen) and all(lv["failures"] == 0 for lv in sixteen),
                              "p99_ms_at_16_clients": {lv["endpoint"]: lv.get("p99_ms") for lv in sixteen},
                              "tested_16_clients": bool(sixteen)}
        log(f"target service: {targets['service']}")
    env["load_average_end"] = load_average()
    payload["total_s"] = time.perf_counter() - T0
    for key in ("docs", "doc_cluster", "queries", "query_cluster"):
        data.pop(key)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = common.write_json(out.name + ".json", payload, str(out.parent))
    draw(payload, str(out) + ".png")
    log(f"wrote {json_path} and {out}.png; total {payload['total_s']:.0f} s")
    print_tables(payload)


def print_tables(payload: dict) -> None:
    print("\n| kind | build | setting | build s | bytes/doc in RAM | re-rank bytes/doc on disk | recall@10 | p50 ms | p99 ms "
          "| 1-thread p50 ms | 1-thread p99 ms | batch-64 q/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in payload["settings"]:
        print(f"| {r['kind']} | {r['build']} | {r['setting']} | {r['build_s']:.1f} | {r['index_bytes_per_doc_in_ram']:.1f} | "
              f"{r['rerank_bytes_per_doc_on_disk']:.0f} | {r['recall_at_10']:.4f} | {r['single_query']['p50_ms']:.3f} | "
              f"{r['single_query']['p99_ms']:.3f} | {r['single_query_1_thread']['p50_ms']:.3f} | "
              f"{r['single_query_1_thread']['p99_ms']:.3f} | {r['batch64']['queries_per_s']:.1f} |")
    if payload.get("service"):
        print("\n| endpoint | clients | requests | failures | p50 ms | p99 ms | req/s | mean server batch |")
        print("|---|---|---|---|---|---|---|---|")
        for lv in payload["service"]["levels"]:
            print(f"| {lv['endpoint']} | {lv['clients']} | {lv['requests']} | {lv['failures']} | {lv.get('p50_ms', float('nan')):.2f} | "
                  f"{lv.get('p99_ms', float('nan')):.2f} | {lv['requests_per_s']:.1f} | {lv['mean_server_batch'] or 0:.2f} |")
    print(json.dumps(payload["targets"]["ivfpq_rerank"]["settings_meeting_all"]))


if __name__ == "__main__":
    main()
