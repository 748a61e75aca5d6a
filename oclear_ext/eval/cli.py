"""`oclear-eval`: Recall@1/5/10 and mAP@10 of a manifest's queries against its docs.

Data: --manifest M (your own), or nothing: the built-in emoji evaluation protocol (held-out classes,
twitter images as queries, google image + text as documents; --builtin-split all for every class).
Embeddings: --query-emb Q --doc-emb D (.npy / .pt, rows in manifest order of the query rows and the doc
rows), a trained model: --checkpoint RUN_DIR (an oclear-train run folder, its latest checkpoint, or one
checkpoint folder), or an embedding function: --embedder pixels (baseline) | package.module:factory [--checkpoint P].
Writes OUT/metrics.json, OUT/per_query.jsonl, OUT/grid.png and prints the table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Sequence

from ..cli_errors import run_cli
from ..data.manifest import load_manifest
from .embedders import embed_manifest, load_embedder, load_embeddings
from .evaluate import evaluate, format_table
from .report import draw_grid, write_results
from .search import IndexOptions


def run_info() -> dict:
    """Versions and git revision, so a metrics file says what produced it."""
    import platform
    import subprocess

    import faiss
    import numpy
    import torch

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {"python": platform.python_version(), "torch": torch.__version__, "faiss": faiss.__version__,
            "numpy": numpy.__version__, "git_revision": rev, "machine": platform.machine()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oclear-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--manifest", help="manifest JSON Lines (default: the built-in emoji protocol)")
    data.add_argument("--builtin-split", default="heldout", choices=("heldout", "all"),
                      help="built-in emoji classes to evaluate on (default heldout)")
    data.add_argument("--query-role", default="query", choices=("query", "doc"),
                      help="rows used as queries; 'doc' = doc-to-doc retrieval, self-matches excluded")
    emb = p.add_argument_group("embeddings")
    emb.add_argument("--query-emb", help="precomputed query embeddings (.npy / .pt)")
    emb.add_argument("--doc-emb", help="precomputed doc embeddings (.npy / .pt)")
    emb.add_argument("--embedder", help="'pixels' or package.module:factory (default: the trained model of "
                                        "--checkpoint if one is given, else pixels)")
    emb.add_argument("--checkpoint", help="an oclear-train run folder (its latest checkpoint) or checkpoint folder: "
                                          "evaluates that model; with --embedder, passed to its factory as checkpoint=")
    emb.add_argument("--device", default="cpu", help="device of the trained model (default cpu)")
    emb.add_argument("--batch-size", type=int, default=256)
    idx = p.add_argument_group("index")
    idx.add_argument("--index", default="exact", choices=("exact", "ivf", "hnsw"))
    idx.add_argument("--nlist", type=int, default=None)
    idx.add_argument("--nprobe", type=int, default=16)
    idx.add_argument("--hnsw-m", type=int, default=32)
    idx.add_argument("--ef-search", type=int, default=128)
    p.add_argument("--category-level", action="store_true", help="also score with relevant = same category")
    p.add_argument("--grid-queries", type=int, default=8, help="queries shown in grid.png (0: no grid)")
    p.add_argument("--out", default="eval_out", help="output folder (default eval_out)")
    return p


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        if args.manifest:
            manifest_path = args.manifest
            data_name = args.manifest
        else:
            from ..data.emoji import builtin_manifest

            split = args.builtin_split
            manifest_path = builtin_manifest(Path(tmp) / "emoji", split=split)
            data_name = f"built-in emoji ({split} classes; twitter queries, google image + text docs)"
        manifest = load_manifest(manifest_path)
        queries = [manifest.items[i] for i in manifest.indices(args.query_role)]
        docs = [manifest.items[i] for i in manifest.indices("doc")]
        t0 = time.perf_counter()
        if args.query_emb or args.doc_emb:
            if not (args.query_emb and args.doc_emb):
                raise ValueError("give both --query-emb and --doc-emb")
            q, d = load_embeddings(args.query_emb), load_embeddings(args.doc_emb)
            if len(q) != len(queries) or len(d) != len(docs):
                raise ValueError(f"{len(q)} query / {len(d)} doc embeddings, but the manifest has "
                                 f"{len(queries)} {args.query_role} rows / {len(docs)} doc rows")
            source = f"embeddings {args.query_emb}, {args.doc_emb}"
        else:
            if args.embedder is None and args.checkpoint:
                from ..search.load_model import load_model

                fn = load_model(args.checkpoint, device=args.device)
                source = f"model {fn.oclear_identity.checkpoint}"
            else:
                spec = args.embedder or "pixels"
                fn = load_embedder(spec, args.checkpoint)
                source = f"embedder {spec}" + (f" ({args.checkpoint})" if args.checkpoint else "")
            q, d = embed_manifest(manifest, fn, batch_size=args.batch_size, query_role=args.query_role)
        t_embed = time.perf_counter() - t0
        keys = (None, None)
        if args.query_role == "doc":  # the same rows on both sides: a doc must not find itself
            keys = ([it.line for it in queries], [it.line for it in docs])
        options = IndexOptions(args.index, args.nlist, args.nprobe, args.hnsw_m, args.ef_search)
        cats = (None, None)
        if args.category_level:
            cats = ([it.category for it in queries], [it.category for it in docs])
        result = evaluate(q, d, [it.label for it in queries], [it.label for it in docs], *keys,
                          query_categories=cats[0], doc_categories=cats[1], options=options)
        ids = lambda items: [it.id if it.id is not None else f"line {it.line}" for it in items]
        extra = {"data": data_name, "embeddings": source, "queries": len(queries), "docs": len(docs),
                 "classes": len(set(manifest.labels())), "dim": int(q.shape[1]), "embed_seconds": round(t_embed, 3),
                 "run": run_info()}
        write_results(result, args.out, ids(queries), ids(docs), extra)
        if args.grid_queries > 0:
            captions = [f"+ {it.modifier}" if it.modifier else None for it in queries]
            draw_grid(result, [it.image for it in queries], [it.image for it in docs], Path(args.out) / "grid.png",
                      n_queries=args.grid_queries, query_captions=captions if any(captions) else None)
    print(f"{data_name}\n{source}: {len(queries)} queries, {len(docs)} docs, dim {q.shape[1]}, index {args.index}")
    print(format_table(result.metrics))
    if "recall_of_exact_top10" in result.metrics["index"]:
        print(f"{args.index} recall of the exact top-10: {result.metrics['index']['recall_of_exact_top10']:.4f}")
    print(f"wrote {args.out}/metrics.json, per_query.jsonl" + (", grid.png" if args.grid_queries > 0 else ""))
    return result.metrics


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(lambda a: run(build_parser().parse_args(a)), argv, "oclear-eval")


if __name__ == "__main__":
    main()
