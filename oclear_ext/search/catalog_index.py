"""CatalogIndex: a searchable catalogue of doc embeddings with their metadata, saved as one folder.

Kinds (faiss, inner product on L2-normalised embeddings, i.e. cosine):
    flat    IndexFlatIP: exact, 4 D bytes per doc in memory.
    hnsw    IndexHNSWFlat: a graph over the full vectors (4 D + ~8 M bytes per doc), sub-linear search.
    ivfpq   two-tier: an IVF + PQ first stage (optionally behind an OPQ rotation) keeps pq_m bytes per doc
            in memory and over-fetches k * rerank_factor candidates; the candidates are re-scored exactly
            against the docs' float16 vectors, which stay on disk after `load` (memory-mapped: only the
            pages of candidates are read), and the best k are returned.

Folder layout (`save`):
    index.faiss        the faiss index
    vectors.f16.npy    (ivfpq only) the (N, D) float16 re-rank vectors
    docs.jsonl         one line per doc, in faiss id order: {"id", "label", "text", "image", "category"}
    index.json         kind, parameters, dimension, count, the model it was built with, file sizes
Each file is written to a temporary name and renamed into place, index.json last; `load` checks the
sizes index.json records, so a folder whose save was interrupted is refused with a message, not read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .model_identity import ModelIdentity, check_same_model, model_identity

INDEX_KINDS = ("flat", "hnsw", "ivfpq")
FORMAT_VERSION = 1
DOC_FIELDS = ("id", "label", "text", "image", "category")
FILES = {"index": "index.faiss", "vectors": "vectors.f16.npy", "docs": "docs.jsonl", "meta": "index.json"}
# faiss k-means wants >= 39 training points per centroid; below that its centroids are poorly placed.
MIN_POINTS_PER_CENTROID = 39


class CatalogIndexError(ValueError):
    """A catalogue index that cannot be built, loaded or searched as asked; the message says why."""


@dataclass(frozen=True)
class IndexParams:
    """Parameters of each kind; None = chosen from the catalogue size at build time (recorded in index.json).

    hnsw:  hnsw_m links per node, ef_construction (build quality), ef_search (search candidate list).
    ivfpq: nlist inverted lists (default ~4 sqrt(N), a power of two, >= 39 docs per list), nprobe lists
           visited per query, pq_m sub-quantisers of pq_bits bits (pq_m * pq_bits / 8 bytes per doc;
           pq_m must divide the dimension), opq (a learned rotation before PQ), rerank_factor (first
           stage fetches k * rerank_factor candidates), train_size (docs sampled to train; default all
           up to 256 per list).
    """

    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    nlist: int | None = None
    nprobe: int = 32
    pq_m: int | None = None
    pq_bits: int = 8
    opq: bool = False
    rerank_factor: int = 10
    train_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hnsw_m", "ef_construction", "ef_search", "nprobe", "pq_bits", "rerank_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CatalogIndexError(f"CatalogIndex: {name} must be a positive integer, got {value!r}")
        for name in ("nlist", "pq_m", "train_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise CatalogIndexError(f"CatalogIndex: {name} must be a positive integer or None, got {value!r}")
        if self.pq_bits > 16:
            raise CatalogIndexError(f"CatalogIndex: pq_bits must be in [1, 16], got {self.pq_bits}")

    def resolved(self, n: int, dim: int) -> "IndexParams":
        """The ivfpq defaults filled in for n docs of dimension dim, each checked against what faiss needs."""
        nlist = self.nlist
        if nlist is None:
            nlist = 1 << max(0, int(round(math.log2(max(1.0, 4 * math.sqrt(n))))))
            while nlist > 1 and n < MIN_POINTS_PER_CENTROID * nlist:
                nlist //= 2
        pq_m = self.pq_m
        if pq_m is None:  # 1 byte per 8 dimensions at 8 bits: 32 bytes for D = 256
            pq_m = next(m for m in range(max(1, dim // 8), 0, -1) if dim % m == 0)
        if dim % pq_m:
            raise CatalogIndexError(f"CatalogIndex: pq_m = {pq_m} must divide the dimension {dim}")
        need = max(MIN_POINTS_PER_CENTROID * nlist, 1 << self.pq_bits)
        if n < need:
            raise CatalogIndexError(f"CatalogIndex: ivfpq with nlist = {nlist} and pq_bits = {self.pq_bits} needs at least "
                              f"{need} docs to train, got {n}; use kind='flat' or 'hnsw' for a catalogue this small, "
                              f"or lower nlist / pq_bits")
        train_size = self.train_size or min(n, 256 * nlist)
        if train_size < need:
            raise CatalogIndexError(f"CatalogIndex: train_size = {train_size} is below the {need} docs ivfpq needs to train")
        return dataclasses.replace(self, nlist=nlist, pq_m=pq_m, train_size=min(train_size, n))


def _as_matrix(x: Any, name: str, dim: int | None = None) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().float().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise CatalogIndexError(f"CatalogIndex: {name} must be 2-D (N, D), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise CatalogIndexError(f"CatalogIndex: {name} have dimension {x.shape[1]}, the index has dimension {dim}")
    if not np.isfinite(x).all():
        raise CatalogIndexError(f"CatalogIndex: {name} contain NaN or inf")
    return x


def _doc_rows(metadata: Sequence[Any], n: int) -> list[dict]:
    """docs.jsonl rows from dicts or ManifestItems; `id` defaults to the doc's position."""
    if len(metadata) != n:
        raise CatalogIndexError(f"CatalogIndex: {len(metadata)} metadata rows for {n} embeddings")
    rows = []
    for i, m in enumerate(metadata):
        m = dataclasses.asdict(m) if dataclasses.is_dataclass(m) else dict(m)
        unknown = set(m) - set(DOC_FIELDS) - {"role", "weight", "line"}
        if unknown:
            raise CatalogIndexError(f"CatalogIndex: metadata row {i} has unknown keys {sorted(unknown)}; expected {DOC_FIELDS}")
        row = {key: m.get(key) for key in DOC_FIELDS}
        row["id"] = str(row["id"]) if row["id"] is not None else None
        rows.append(row)
    return rows


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class CatalogIndex:
    """Doc embeddings (N, D) searchable by inner product, with one metadata row per doc (`docs`).

    Search results are doc numbers: row i of `docs` is faiss id i (in build and `add` order).
    """

    def __init__(self, kind: str, params: IndexParams, faiss_index, vectors: np.ndarray | None, docs: list[dict],
                 model: ModelIdentity | None) -> None:
        self.kind, self.params, self.faiss_index = kind, params, faiss_index
        self.vectors = vectors  # ivfpq: (N, D) float16 re-rank vectors (memory-mapped after load)
        self.docs = docs
        self.model = model
        self._positions = {row["id"]: i for i, row in enumerate(docs) if row["id"] is not None}

    # ---- building -------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, doc_embeddings: Any, metadata: Sequence[Any], kind: str = "flat", params: IndexParams | None = None,
              model: Any = None) -> "CatalogIndex":
        """Indexes doc_embeddings (N, D) float (L2-normalised: the search ranks by inner product).

        metadata: N dicts or ManifestItems with id (unique; default the doc's position), label, text, image,
        category. model: the model that embedded the docs (from `load_model`) or its ModelIdentity; recorded
        so that searching with another model is refused.
        """
        import faiss

        if kind not in INDEX_KINDS:
            raise CatalogIndexError(f"CatalogIndex: kind must be one of {INDEX_KINDS}, got {kind!r}")
        x = _as_matrix(doc_embeddings, "doc embeddings")
        if len(x) == 0:
            raise CatalogIndexError("CatalogIndex: no doc embeddings to index")
        rows = _doc_rows(metadata, len(x))
        for i, row in enumerate(rows):
            if row["id"] is None:
                row["id"] = str(i)
        params = params or IndexParams()
        dim = x.shape[1]
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = params.ef_construction
        else:
            params = params.resolved(len(x), dim)
            index = cls._new_ivfpq(dim, params)
            sample = np.random.default_rng(params.seed).choice(len(x), params.train_size, replace=False)
            index.train(x[np.sort(sample)])
        identity = model if isinstance(model, ModelIdentity) or model is None else model_identity(model)
        out = cls(kind, params, index, np.empty((0, dim), np.float16) if kind == "ivfpq" else None, [], identity)
        out._configure_search()
        out.add(x, rows)
        return out

    @staticmethod
    def _new_ivfpq(dim: int, params: IndexParams):
        import faiss

        factory = (f"OPQ{params.pq_m}," if params.opq else "") + f"IVF{params.nlist},PQ{params.pq_m}x{params.pq_bits}"
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        # The factory turns on polysemous training (a reordering of PQ codes for Hamming filtering, which
        # this search does not use); it dominates training time (~50 s at 2k docs on 2 cores vs < 1 s).
        ivf.do_polysemous_training = False
        if params.train_size < MIN_POINTS_PER_CENTROID * (1 << params.pq_bits):
            # faiss would print its k-means advice once per sub-quantiser; say it once instead
            warnings.warn(f"CatalogIndex: training {1 << params.pq_bits}-centroid PQ codebooks on {params.train_size} docs "
                          f"(faiss advises >= {MIN_POINTS_PER_CENTROID << params.pq_bits}); the first stage will be coarse, "
                          "so keep rerank_factor high or use kind='flat' at this size", stacklevel=3)
            ivf.pq.cp.min_points_per_centroid = 1
            if params.opq:  # the rotation trains a PQ of its own; give it the same setting
                opq = faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0))
                opq_pq = faiss.ProductQuantizer(dim, params.pq_m, params.pq_bits)
                opq_pq.cp.min_points_per_centroid = 1
                opq.pq = opq_pq
                index.referenced_objects = [opq_pq]  # faiss's idiom: keeps the Python owner alive with the index
        # ParameterSpace reaches the IVF stage inside an OPQ pre-transform too
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", min(params.nprobe, params.nlist))
        return index

    def _configure_search(self) -> None:
        import faiss

        if self.kind == "hnsw":
            self.faiss_index.hnsw.efSearch = self.params.ef_search
        elif self.kind == "ivfpq":
            faiss.ParameterSpace().set_index_parameter(self.faiss_index, "nprobe", min(self.params.nprobe, self.params.nlist))

    def add(self, doc_embeddings: Any, metadata: Sequence[Any]) -> None:
        """Appends docs without rebuilding (ivfpq keeps its trained quantisers). Ids must be new."""
        x = _as_matrix(doc_embeddings, "doc embeddings", self.dim if self.docs else None)
        rows = _doc_rows(metadata, len(x))
        start = len(self.docs)
        for i, row in enumerate(rows):
            if row["id"] is None:
                row["id"] = str(start + i)
        seen = set(self._positions)
        dup = []
        for row in rows:
            if row["id"] in seen:
                dup.append(row["id"])
            seen.add(row["id"])
        if dup:
            raise CatalogIndexError(f"CatalogIndex: {len(dup)} doc id(s) already in the index or repeated, e.g. {dup[:3]}")
        self.faiss_index.add(x)
        if self.kind == "ivfpq":
            # an appended memmap is read into memory here; `save` writes it back to disk
            self.vectors = np.concatenate([np.asarray(self.vectors), x.astype(np.float16)])
        for i, row in enumerate(rows):
            self._positions[row["id"]] = start + i
        self.docs.extend(rows)

    # ---- searching ------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.faiss_index.d)

    def __len__(self) -> int:
        return len(self.docs)

    def position(self, doc_id: str) -> int:
        """The doc number of a catalogue id (KeyError if absent)."""
        return self._positions[doc_id]

    def search(self, query_embeddings: Any, k: int, rerank_batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Top-k docs of each query: (ids (Nq, k) int64 doc numbers, -1 where fewer than k docs exist;
        scores (Nq, k) float32 inner products, -inf there), best first."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise CatalogIndexError(f"CatalogIndex.search: k must be a positive integer, got {k!r}")
        q = _as_matrix(query_embeddings, "query embeddings", self.dim)
        kk = min(k, len(self))
        if self.kind != "ivfpq":
            scores, ids = self.faiss_index.search(q, kk)
        else:
            ids, scores = self._search_two_tier(q, kk, rerank_batch)
        if kk < k:
            ids = np.pad(ids, ((0, 0), (0, k - kk)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, k - kk)), constant_values=-np.inf)
        return ids.astype(np.int64), scores.astype(np.float32)

    def _search_two_tier(self, q: np.ndarray, k: int, rerank_batch: int) -> tuple[np.ndarray, np.ndarray]:
        fetch = min(len(self), k * self.params.rerank_factor)
        _, candidates = self.faiss_index.search(q, fetch)
        ids = np.empty((len(q), k), np.int64)
        scores = np.empty((len(q), k), np.float32)
        for start in range(0, len(q), rerank_batch):
            cand = candidates[start:start + rerank_batch]
            valid = cand >= 0
            # Sorting the rows to fetch makes the memory-mapped reads sequential within each batch.
            flat = np.maximum(cand, 0).ravel()
            order = np.argsort(flat, kind="stable")
            vecs = np.empty((flat.size, self.dim), np.float32)
            vecs[order] = self.vectors[flat[order]]
            exact = np.einsum("qcd,qd->qc", vecs.reshape(*cand.shape, self.dim), q[start:start + len(cand)])
            exact = np.where(valid, exact, -np.inf).astype(np.float32)
            # best first; equal scores by doc number, so the order does not depend on the first stage's
            top = np.lexsort((np.where(valid, cand, np.iinfo(np.int64).max), -exact), axis=1)[:, :k]
            ids[start:start + len(cand)] = np.where(np.take_along_axis(valid, top, 1), np.take_along_axis(cand, top, 1), -1)
            scores[start:start + len(cand)] = np.take_along_axis(exact, top, 1)
        return ids, scores

    def results(self, ids: np.ndarray, scores: np.ndarray) -> list[list[dict]]:
        """The docs.jsonl rows of search results with their scores: one list per query, best first."""
        return [[{**self.docs[i], "score": float(s)} for i, s in zip(row_ids, row_scores) if i >= 0]
                for row_ids, row_scores in zip(ids, scores)]

    def search_images(self, model: Any, images: Any, k: int, batch_size: int = 64,
                      modifiers: Sequence[str | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Embeds query images with model.embed_queries and searches: images are paths, PIL images, or a
        (B, 3, H, W) float tensor in [0, 1] at the model's image_size; modifiers (optional, one text or None
        per image) make composed queries. Refuses a model other than the index's (when both are known)."""
        from .embedding import embed_query_images

        self.check_model(model)
        return self.search(embed_query_images(model, images, batch_size, modifiers), k)

    def check_model(self, model: Any) -> None:
        """Raises if `model` is known to differ from the model the index was built with."""
        check_same_model(self.model, model_identity(model), "the index")

    def memory_bytes(self) -> dict:
        """Bytes per doc: the faiss index in memory, and (ivfpq) the float16 re-rank vectors kept on disk."""
        import faiss

        n = max(1, len(self))
        index_bytes = faiss.serialize_index(self.faiss_index).nbytes
        out = {"index_bytes_per_doc": index_bytes / n}
        if self.vectors is not None:
            out["rerank_bytes_per_doc"] = self.vectors.nbytes / n
        return out

    # ---- persistence ----------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Writes the index folder (see the module docstring); safe to call on an existing index folder."""
        import faiss

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / FILES["index"], lambda p: faiss.write_index(self.faiss_index, str(p)))
        sizes = {FILES["index"]: (folder / FILES["index"]).stat().st_size}
        if self.vectors is not None:
            def write_vectors(p: Path) -> None:
                with open(p, "wb") as f:
                    np.save(f, np.asarray(self.vectors, dtype=np.float16))
            _atomic_write(folder / FILES["vectors"], write_vectors)
            sizes[FILES["vectors"]] = (folder / FILES["vectors"]).stat().st_size
        else:
            (folder / FILES["vectors"]).unlink(missing_ok=True)
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in self.docs)
        _atomic_write(folder / FILES["docs"], lambda p: p.write_text(text, encoding="utf-8"))
        sizes[FILES["docs"]] = (folder / FILES["docs"]).stat().st_size
        meta = {"format": FORMAT_VERSION, "kind": self.kind, "params": dataclasses.asdict(self.params),
                "dim": self.dim, "count": len(self), "model": self.model.to_json() if self.model else None,
                "files": sizes, "faiss": faiss.__version__, "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _atomic_write(folder / FILES["meta"], lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, model: Any = None, mmap: bool = True) -> "CatalogIndex":
        """Reads an index folder and checks it is complete; with `model`, also that it is the index's model.

        mmap: keep the ivfpq re-rank vectors on disk (memory-mapped) instead of reading them into memory.
        """
        import faiss

        folder = Path(folder)
        meta_path = folder / FILES["meta"]
        if not meta_path.is_file():
            raise CatalogIndexError(f"no catalogue index at {folder} (no {FILES['meta']}; build one with oclear-index)")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise CatalogIndexError(f"index {folder}: {FILES['meta']} is not valid JSON ({err})") from None
        if meta.get("format") != FORMAT_VERSION or meta.get("kind") not in INDEX_KINDS:
            raise CatalogIndexError(f"index {folder}: unsupported format {meta.get('format')!r} / kind {meta.get('kind')!r}")
        for name, size in meta["files"].items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != size:
                found = path.stat().st_size if path.is_file() else "missing"
                raise CatalogIndexError(f"index {folder}: {name} is {found} bytes, index.json records {size} "
                                  "(an interrupted save or a changed file); rebuild the index")
        index = faiss.read_index(str(folder / FILES["index"]))
        docs = [json.loads(line) for line in (folder / FILES["docs"]).read_text(encoding="utf-8").splitlines() if line]
        vectors = None
        if meta["kind"] == "ivfpq":
            vectors = np.load(folder / FILES["vectors"], mmap_mode="r" if mmap else None)
        counts = {"faiss index": index.ntotal, "docs.jsonl": len(docs)}
        if vectors is not None:
            counts["vectors"] = len(vectors)
        for what, count in counts.items():
            if count != meta["count"]:
                raise CatalogIndexError(f"index {folder}: the {what} holds {count} docs, index.json records {meta['count']}")
        if index.d != meta["dim"] or (vectors is not None and vectors.shape[1] != meta["dim"]):
            raise CatalogIndexError(f"index {folder}: dimension {index.d} in the faiss index, {meta['dim']} in index.json")
        identity = ModelIdentity.from_json(meta["model"]) if meta.get("model") else None
        out = cls(meta["kind"], IndexParams(**meta["params"]), index, vectors, docs, identity)
        out._configure_search()
        if model is not None:
            out.check_model(model)
        return out

    def set_search_params(self, **changes) -> None:
        """Changes how this index searches: nprobe, ef_search, rerank_factor (build parameters stay)."""
        allowed = {"nprobe", "ef_search", "rerank_factor"}
        if set(changes) - allowed:
            raise CatalogIndexError(f"CatalogIndex: only {sorted(allowed)} can change after build, got {sorted(changes)}")
        self.params = dataclasses.replace(self.params, **changes)
        self._configure_search()
