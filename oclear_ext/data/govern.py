"""Category-oriented data governance (OCLEAR): raw interaction logs -> clean classes -> a manifest.

Inputs (JSON Lines; image paths relative to the file's folder):
    logs:  {"query_image": "q/123.jpg", "doc_id": "sku-9", "count": 3, "query_category": "mugs"?}
           one line per (query image, clicked doc) with its click count; query_category is optional
           (e.g. from a category classifier run on the query image).
    docs:  {"doc_id": "sku-9", "image": "d/sku-9.jpg", "text": "red mug" | null, "category": "mugs"}

Rules, in this order (each one's removals are counted in the report):
    1. unknown docs:      log lines whose doc_id is not in the doc table are dropped.
    2. category noise:    pairs whose query_category disagrees with the doc's category are dropped.
    3. doc merging:       union-find over docs; two docs join when their images are near-duplicates
                          (64-bit difference hash within `dup_hamming` bits) or when they share at least
                          `min_shared_queries` distinct query images with Jaccard >= `min_query_jaccard`
                          (queries that clicked more than `max_docs_per_query` docs are too generic to count).
                          A class is one component; its label is its smallest doc id.
    4. query assignment:  each query image joins the class that has most of its clicks if that class holds
                          at least `dominance` of them (and the query has >= `min_query_clicks` clicks);
                          otherwise it is dropped as ambiguous.
    5. small classes:     classes with fewer than `min_class_size` rows (docs + queries) are dropped.
    6. huge classes:      classes are capped at `max_class_size` rows: docs first, then queries by clicks.
    7. long-tail weights: class c is drawn with probability proportional to n_c ** weight_power
                          (0.5 = square-root sampling; 1 = natural; 0 = class-balanced), so each row
                          gets weight n_c ** (weight_power - 1), rescaled to mean 1 over rows.
Outputs in out/: manifest.jsonl (with "weight"), classes.json (label -> doc ids), report.json, class_sizes.png.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Sequence

import numpy as np

from .manifest import ManifestItem, write_manifest


@dataclass
class GovernConfig:
    dup_hamming: int = 4            # max differing bits of the 64-bit dHash for near-duplicates; < 0 disables
    min_shared_queries: int = 2     # distinct queries two docs must share to merge; 0 disables co-click merging
    min_query_jaccard: float = 0.5  # |Q(a) & Q(b)| / |Q(a) | Q(b)| needed as well
    max_docs_per_query: int = 50    # queries clicking more docs than this do not vote for merges
    dominance: float = 0.6          # share of a query's clicks its class must hold
    min_query_clicks: int = 1
    min_class_size: int = 2
    max_class_size: int = 1000
    weight_power: float = 0.5
    check_category: bool = True

    def __post_init__(self) -> None:
        checks = [
            ("dominance", 0.0 < self.dominance <= 1.0, "in (0, 1]"),
            ("min_query_jaccard", 0.0 <= self.min_query_jaccard <= 1.0, "in [0, 1]"),
            ("dup_hamming", self.dup_hamming <= 32, "<= 32 (or < 0 to disable)"),
            ("min_class_size", self.min_class_size >= 1, ">= 1"),
            ("max_class_size", self.max_class_size >= self.min_class_size, f">= min_class_size ({self.min_class_size})"),
            ("max_docs_per_query", self.max_docs_per_query >= 2, ">= 2"),
            ("min_shared_queries", self.min_shared_queries >= 0, ">= 0"),
            ("min_query_clicks", self.min_query_clicks >= 1, ">= 1"),
            ("weight_power", 0.0 <= self.weight_power <= 1.0, "in [0, 1]"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"GovernConfig: {name} must be {expected}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Doc:
    doc_id: str
    image: str  # absolute path
    text: str | None
    category: str | None


@dataclass(frozen=True)
class Click:
    query_image: str  # absolute path; the query's identity
    doc_id: str
    count: int
    query_category: str | None = None


@dataclass
class GovernResult:
    items: list[ManifestItem]
    classes: dict[str, list[str]]                   # label -> member doc ids (after dropping and capping)
    report: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- reading inputs


def _read_jsonl(path: Path, required: dict[str, type], optional: dict[str, type], what: str) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no file at {path}")
    rows, errors = [], []
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                errors.append(f"  line {n}: invalid JSON ({e.msg})")
                continue
            if not isinstance(obj, dict):
                errors.append(f"  line {n}: expected a JSON object")
                continue
            bad = [k for k in required if k not in obj]
            bad += [k for k, t in {**required, **optional}.items() if obj.get(k) is not None and not isinstance(obj[k], t)]
            if bad:
                errors.append(f"  line {n}: missing or mistyped {sorted(set(bad))} (expected {dict((k, t.__name__) for k, t in {**required, **optional}.items())})")
                continue
            rows.append((n, obj))
    if errors:
        raise ValueError(f"{what} {path}: {len(errors)} bad line(s)\n" + "\n".join(errors[:50]))
    return rows


def read_docs(path: str | os.PathLike) -> list[Doc]:
    path = Path(path)
    root = path.resolve().parent
    docs, seen = [], set()
    for n, o in _read_jsonl(path, {"doc_id": str, "image": str}, {"text": str, "category": str}, "doc table"):
        if o["doc_id"] in seen:
            raise ValueError(f"doc table {path}: line {n}: duplicate doc_id {o['doc_id']!r}")
        seen.add(o["doc_id"])
        image = o["image"] if os.path.isabs(o["image"]) else str(root / o["image"])
        docs.append(Doc(o["doc_id"], image, o.get("text"), o.get("category")))
    return docs


def read_logs(path: str | os.PathLike) -> list[Click]:
    path = Path(path)
    root = path.resolve().parent
    clicks = []
    for n, o in _read_jsonl(path, {"query_image": str, "doc_id": str}, {"count": int, "query_category": str}, "logs"):
        count = o.get("count", 1)
        if count < 1:
            raise ValueError(f"logs {path}: line {n}: count must be >= 1, got {count}")
        q = o["query_image"] if os.path.isabs(o["query_image"]) else str(root / o["query_image"])
        clicks.append(Click(q, o["doc_id"], int(count), o.get("query_category")))
    return clicks


# ----------------------------------------------------------------------------- near-duplicate hashing


def dhash(path: str, bits: int = 8) -> int:
    """64-bit difference hash: sign of horizontal gradients of a 9x8 grayscale thumbnail (over white)."""
    from PIL import Image

    with Image.open(path) as im:
        rgba = im.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        g = np.asarray(flat.convert("L").resize((bits + 1, bits), Image.BILINEAR), dtype=np.int16)
    diff = (g[:, 1:] > g[:, :-1]).flatten()
    return int(sum(1 << i for i, b in enumerate(diff) if b))


def near_duplicate_pairs(hashes: Sequence[int], max_distance: int) -> list[tuple[int, int]]:
    """Pairs (i < j) with popcount(h_i ^ h_j) <= max_distance, without comparing all pairs.

    Pigeonhole: split the 64 bits into max_distance + 1 blocks; two hashes within max_distance bits
    agree exactly on at least one block, so only hashes that share a block value are compared.
    """
    blocks = max_distance + 1
    edges = [int(x) for x in np.linspace(0, 64, blocks + 1)]  # Python ints: numpy ones overflow on 64-bit shifts
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, h in enumerate(hashes):
        for b in range(blocks):
            lo, hi = edges[b], edges[b + 1]
            buckets[(b, (h >> lo) & ((1 << (hi - lo)) - 1))].append(i)
    pairs = set()
    for members in buckets.values():
        for i, j in combinations(members, 2):
            if bin(hashes[i] ^ hashes[j]).count("1") <= max_distance:
                pairs.add((i, j))
    return sorted(pairs)


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, i: int, j: int) -> bool:
        """Joins the sets of i and j; True when they were different sets."""
        ri, rj = self.find(i), self.find(j)
        if ri == rj:
            return False
        self.parent[max(ri, rj)] = min(ri, rj)
        return True


# ----------------------------------------------------------------------------- the rules


def build_classes(docs: Sequence[Doc], clicks: Sequence[Click], config: GovernConfig | None = None,
                  doc_hashes: Sequence[int] | None = None) -> GovernResult:
    """Applies rules 1-7 (module docstring) and returns manifest items, classes and a report.

    doc_hashes: precomputed 64-bit image hashes aligned with docs (default: dhash of each doc image
    when dup_hamming >= 0).
    """
    cfg = config or GovernConfig()
    report: dict = {"config": asdict(cfg), "removed": {}, "merges": {}}
    doc_index = {d.doc_id: i for i, d in enumerate(docs)}
    queries_before = {c.query_image for c in clicks}
    report["before"] = {"docs": len(docs), "query_images": len(queries_before), "pairs": len(clicks),
                        "clicks": sum(c.count for c in clicks)}

    def drop(rule: str, removed: list[Click]) -> None:
        report["removed"][rule] = {"pairs": len(removed), "clicks": sum(c.count for c in removed)}

    # 1. unknown docs
    known = [c for c in clicks if c.doc_id in doc_index]
    drop("unknown_doc", [c for c in clicks if c.doc_id not in doc_index])
    # 2. category noise
    if cfg.check_category:
        def agrees(c: Click) -> bool:
            cat = docs[doc_index[c.doc_id]].category
            return c.query_category is None or cat is None or c.query_category == cat
        kept = [c for c in known if agrees(c)]
        drop("category_mismatch", [c for c in known if not agrees(c)])
    else:
        kept = known
    # Aggregate repeated (query, doc) lines.
    pair_clicks: Counter = Counter()
    for c in kept:
        pair_clicks[(c.query_image, doc_index[c.doc_id])] += c.count

    # 3. doc merging
    uf = UnionFind(len(docs))
    dup_merges = 0
    if cfg.dup_hamming >= 0 and len(docs) > 1:
        hashes = list(doc_hashes) if doc_hashes is not None else [dhash(d.image) for d in docs]
        if len(hashes) != len(docs):
            raise ValueError(f"build_classes: doc_hashes has {len(hashes)} entries for {len(docs)} docs")
        for i, j in near_duplicate_pairs(hashes, cfg.dup_hamming):
            dup_merges += uf.union(i, j)
    docs_of_query: dict[str, set[int]] = defaultdict(set)
    for q, d in pair_clicks:
        docs_of_query[q].add(d)
    coclick_merges = 0
    if cfg.min_shared_queries > 0:
        queries_of_doc: Counter = Counter()
        shared: Counter = Counter()
        for q, ds in docs_of_query.items():
            if len(ds) > cfg.max_docs_per_query:
                continue
            for d in ds:
                queries_of_doc[d] += 1
            for a, b in combinations(sorted(ds), 2):
                shared[(a, b)] += 1
        for (a, b), s in sorted(shared.items()):
            union_size = queries_of_doc[a] + queries_of_doc[b] - s
            if s >= cfg.min_shared_queries and s / union_size >= cfg.min_query_jaccard:
                coclick_merges += uf.union(a, b)
    report["merges"] = {"near_duplicate": dup_merges, "co_click": coclick_merges}
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(len(docs)):
        members[uf.find(i)].append(i)
    label_of_root = {root: min(docs[i].doc_id for i in ms) for root, ms in members.items()}

    # 4. query assignment
    class_clicks: dict[str, Counter] = defaultdict(Counter)
    for (q, d), n in pair_clicks.items():
        class_clicks[q][label_of_root[uf.find(d)]] += n
    queries_of_class: dict[str, list[tuple[int, str]]] = defaultdict(list)
    ambiguous = low = 0
    for q, per_class in class_clicks.items():
        total = sum(per_class.values())
        label, top = min(per_class.items(), key=lambda kv: (-kv[1], kv[0]))
        if total < cfg.min_query_clicks:
            low += 1
        elif top / total < cfg.dominance:
            ambiguous += 1
        else:
            queries_of_class[label].append((top, q))
    report["removed"]["ambiguous_query"] = {"query_images": ambiguous}
    report["removed"]["few_clicks_query"] = {"query_images": low}

    # 5. small classes, 6. huge classes
    sizes_before = {}
    classes: dict[str, tuple[list[int], list[str]]] = {}
    small = small_rows = capped_rows = capped_classes = 0
    for root, ms in members.items():
        label = label_of_root[root]
        qs = [q for _, q in sorted(queries_of_class.get(label, []), key=lambda t: (-t[0], t[1]))]
        ds = sorted(ms, key=lambda i: docs[i].doc_id)
        size = len(ds) + len(qs)
        sizes_before[label] = size
        if size < cfg.min_class_size:
            small += 1
            small_rows += size
            continue
        if size > cfg.max_class_size:
            capped_classes += 1
            capped_rows += size - cfg.max_class_size
            ds = ds[: cfg.max_class_size]
            qs = qs[: cfg.max_class_size - len(ds)]
        classes[label] = (ds, qs)
    report["removed"]["small_class"] = {"classes": small, "rows": small_rows}
    report["removed"]["cap"] = {"classes": capped_classes, "rows": capped_rows}

    # 7. long-tail weights and rows
    sizes = {label: len(ds) + len(qs) for label, (ds, qs) in classes.items()}
    raw_weight = {label: float(n) ** (cfg.weight_power - 1.0) for label, n in sizes.items()}
    total_rows = sum(sizes.values())
    norm = total_rows / sum(raw_weight[l] * n for l, n in sizes.items()) if total_rows else 1.0
    items: list[ManifestItem] = []
    for label in sorted(classes):
        ds, qs = classes[label]
        cats = Counter(docs[i].category for i in ds if docs[i].category is not None)
        category = min(cats.items(), key=lambda kv: (-kv[1], kv[0]))[0] if cats else None
        w = raw_weight[label] * norm
        for i in ds:
            d = docs[i]
            items.append(ManifestItem(d.image, d.text, label, "doc", f"doc:{d.doc_id}", d.category, w))
        for q in qs:
            items.append(ManifestItem(q, None, label, "query", f"query:{q}", category, w))
    report["after"] = {"classes": len(classes), "docs": sum(len(ds) for ds, _ in classes.values()),
                       "query_images": sum(len(qs) for _, qs in classes.values()), "rows": len(items)}
    report["class_size"] = _size_summary(list(sizes.values()))
    report["class_size_before_filtering"] = _size_summary(list(sizes_before.values()))
    result = GovernResult(items, {l: [docs[i].doc_id for i in classes[l][0]] for l in sorted(classes)}, report)
    result.report["_sizes"] = {"before": sorted(sizes_before.values()), "after": sorted(sizes.values())}
    return result


def _size_summary(sizes: list[int]) -> dict:
    if not sizes:
        return {"count": 0}
    a = np.asarray(sizes)
    return {"count": int(a.size), "min": int(a.min()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "max": int(a.max()), "mean": float(a.mean())}


def plot_class_sizes(before: list[int], after: list[int], path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    top = max(before + after + [2])
    bins = np.unique(np.logspace(0, np.log10(top + 1), 30).astype(int))
    ax.hist(before, bins=bins, alpha=0.5, label=f"before the size rules ({len(before)} classes)")
    ax.hist(after, bins=bins, alpha=0.5, label=f"after min size and cap ({len(after)} classes)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("class size (rows: docs + query images)")
    ax.set_ylabel("classes")
    ax.set_title("class-size distribution")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def govern(logs: str | os.PathLike, docs: str | os.PathLike, out: str | os.PathLike,
           config: GovernConfig | None = None) -> GovernResult:
    """Reads logs + doc table, builds classes and writes manifest.jsonl, classes.json, report.json, class_sizes.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = build_classes(read_docs(docs), read_logs(logs), config)
    sizes = result.report.pop("_sizes")
    write_manifest(result.items, out / "manifest.jsonl")
    (out / "classes.json").write_text(json.dumps(result.classes, indent=1) + "\n")
    (out / "report.json").write_text(json.dumps(result.report, indent=2) + "\n")
    plot_class_sizes(sizes["before"], sizes["after"], out / "class_sizes.png")
    return result


OPTION_HELP = {
    "dup_hamming": "max differing bits of the 64-bit image dHash for near-duplicate docs (-1: off)",
    "min_shared_queries": "distinct query images two docs must share to merge (0: no co-click merging)",
    "min_query_jaccard": "and the Jaccard of their query sets must reach this",
    "max_docs_per_query": "queries that clicked more docs than this do not vote for merges",
    "dominance": "share of a query's clicks its class must hold, else the query is dropped",
    "min_query_clicks": "queries with fewer clicks in all are dropped",
    "min_class_size": "classes with fewer rows (docs + queries) are dropped",
    "max_class_size": "classes are capped at this many rows (docs first, then most-clicked queries)",
    "weight_power": "class c is sampled with probability proportional to n_c ** power (0.5: square root)",
    "check_category": "keep pairs whose query category disagrees with the doc's",
}


def main(argv: Sequence[str] | None = None) -> None:
    from ..cli_errors import run_cli

    run_cli(_main, argv, "oclear-govern")


def _main(argv: Sequence[str] | None) -> None:
    parser = argparse.ArgumentParser(
        prog="oclear-govern", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Turn interaction logs into clean classes and a manifest.", epilog=__doc__)
    parser.add_argument("--logs", required=True, help="JSON Lines: query_image, doc_id, count, query_category?")
    parser.add_argument("--docs", required=True, help="JSON Lines: doc_id, image, text, category")
    parser.add_argument("--out", required=True, help="output folder")
    defaults = GovernConfig()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false", help=OPTION_HELP[name])
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"{OPTION_HELP[name]} (default {value})")
    args = vars(parser.parse_args(argv))
    logs, docs, out = args.pop("logs"), args.pop("docs"), args.pop("out")
    result = govern(logs, docs, out, GovernConfig(**args))
    r = result.report
    print(f"before: {r['before']}")
    for rule, removed in r["removed"].items():
        print(f"  {rule:>18}: removed {removed}")
    print(f"  merges: {r['merges']}")
    print(f"after: {r['after']}")
    print(f"wrote {out}/manifest.jsonl, classes.json, report.json, class_sizes.png")


if __name__ == "__main__":
    main()
