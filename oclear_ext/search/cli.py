"""`oclear-index` (a run folder + a catalogue manifest -> an index folder) and `oclear-search` (photos -> JSON)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from ..cli_errors import run_cli
from .catalog_index import INDEX_KINDS, CatalogIndex, IndexParams
from .embedding import doc_metadata, embed_catalog_docs, read_image
from .load_model import load_model

BUILTIN_CATALOGUE = "builtin:emoji"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_search_params(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nprobe", type=_positive_int, help="ivfpq: inverted lists visited per query (default 32)")
    p.add_argument("--ef-search", type=_positive_int, help="hnsw: search candidate list (default 128)")
    p.add_argument("--rerank-factor", type=_positive_int, help="ivfpq: candidates re-ranked = k x this (default 10)")


def _search_params(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in ("nprobe", "ef_search", "rerank_factor") if getattr(args, name)}


def index_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="oclear-index",
        description="Embeds a catalogue manifest's doc rows (image + text, with the fusion) with a trained model "
                    "and writes a searchable index folder.")
    p.add_argument("--checkpoint", required=True, help="oclear-train run folder (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--manifest", required=True,
                   help=f"catalogue manifest (its doc rows are indexed), or {BUILTIN_CATALOGUE}: every built-in emoji "
                        "(google image + name), written as files under OUT/catalogue")
    p.add_argument("--out", required=True, help="index folder to write")
    p.add_argument("--kind", default="flat", choices=INDEX_KINDS, help="flat (exact), hnsw, or ivfpq (two-tier; default flat)")
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
    p.add_argument("--hnsw-m", type=_positive_int, default=32)
    p.add_argument("--ef-construction", type=_positive_int, default=80)
    p.add_argument("--nlist", type=_positive_int, help="ivfpq: inverted lists (default ~4 sqrt(docs))")
    p.add_argument("--pq-m", type=_positive_int, help="ivfpq: PQ bytes per doc at 8 bits (default dim / 8)")
    p.add_argument("--pq-bits", type=_positive_int, default=8)
    p.add_argument("--opq", action="store_true", help="ivfpq: learn an OPQ rotation before PQ")
    _add_search_params(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def index_main(argv: Sequence[str] | None = None) -> dict:
    from ..data.manifest import load_manifest

    args = index_parser().parse_args(argv)
    out = Path(args.out)
    model = load_model(args.checkpoint, device=args.device)
    if args.manifest == BUILTIN_CATALOGUE:
        from ..data.emoji import builtin_manifest

        manifest_path = builtin_manifest(out / "catalogue", split="all", query_vendors=("twitter",), doc_vendor="google")
    else:
        manifest_path = args.manifest
    manifest = load_manifest(manifest_path)
    t0 = time.perf_counter()
    embeddings, items = embed_catalog_docs(manifest, model, args.batch_size, args.num_workers, progress=not args.no_progress)
    t_embed = time.perf_counter() - t0
    params = IndexParams(hnsw_m=args.hnsw_m, ef_construction=args.ef_construction, nlist=args.nlist, pq_m=args.pq_m,
                         pq_bits=args.pq_bits, opq=args.opq, **_search_params(args))
    t0 = time.perf_counter()
    index = CatalogIndex.build(embeddings, doc_metadata(items), kind=args.kind, params=params, model=model)
    t_build = time.perf_counter() - t0
    index.save(out)
    memory = index.memory_bytes()
    summary = {"index": str(out), "kind": args.kind, "docs": len(index), "dim": index.dim,
               "embed_seconds": round(t_embed, 3), "build_seconds": round(t_build, 3), **memory,
               "checkpoint": model.oclear_identity.checkpoint}
    per_doc = f"{memory['index_bytes_per_doc']:.0f} B/doc in memory"
    if "rerank_bytes_per_doc" in memory:
        per_doc += f" + {memory['rerank_bytes_per_doc']:.0f} B/doc float16 re-rank vectors on disk"
    print(f"indexed {len(index)} docs (dim {index.dim}, {args.kind}): {per_doc}; "
          f"embedding {t_embed:.1f} s, index build {t_build:.1f} s -> {out}")
    return summary


def search_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="oclear-search",
        description="Searches an index folder with query photos: one JSON line per image on stdout, "
                    '{"query": PATH, "results": [{"id", "score", "label", "text", "image", "category"}, ...]}, best first.')
    p.add_argument("--index", required=True, help="index folder written by oclear-index")
    p.add_argument("--checkpoint", help="run folder or checkpoint (default: the one the index was built with)")
    p.add_argument("--k", type=_positive_int, default=10, help="results per query (default 10)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--modifier", help='text that modifies every query image ("in red"): composed queries, for a '
                                      "model trained with composed_queries")
    _add_search_params(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="query image files")
    return p


def search_main(argv: Sequence[str] | None = None) -> list[dict]:
    args = search_parser().parse_args(argv)
    index = CatalogIndex.load(args.index)
    if args.checkpoint is None:
        if index.model is None:
            raise ValueError(f"the index {args.index} records no model; pass --checkpoint")
        if not Path(index.model.checkpoint).exists():
            raise FileNotFoundError(f"the index's checkpoint {index.model.checkpoint} no longer exists; pass --checkpoint")
    model = load_model(args.checkpoint or index.model.checkpoint, device=args.device)
    index.check_model(model)
    if _search_params(args):
        index.set_search_params(**_search_params(args))
    images, problems = [], []
    for path in args.images:  # every unreadable image is named at once, before any search
        try:
            images.append(read_image(path, model.image_size))
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("; ".join(problems))
    import torch

    modifiers = None if args.modifier is None else [args.modifier] * len(images)
    ids, scores = index.search_images(model, torch.stack(images), args.k, batch_size=args.batch_size,
                                      modifiers=modifiers)
    lines = [{"query": path, "results": results} for path, results in zip(args.images, index.results(ids, scores))]
    for line in lines:
        sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
    return lines


def main_index(argv: Sequence[str] | None = None) -> None:
    run_cli(index_main, argv, "oclear-index")


def main_search(argv: Sequence[str] | None = None) -> None:
    run_cli(search_main, argv, "oclear-search")
