"""Data governance: each rule on synthetic logs with planted duplicates, planted noise and known skew."""

import json
import random

import numpy as np
import pytest
from PIL import Image

from oclear_ext.data import load_manifest
from oclear_ext.data.govern import (Click, Doc, GovernConfig, build_classes, dhash, main,
                                    near_duplicate_pairs, read_logs)

NO_MERGE = dict(dup_hamming=-1, min_shared_queries=0)


def docs_(n, category="cat"):
    return [Doc(f"d{i}", f"/nowhere/d{i}.png", f"doc {i}", category) for i in range(n)]


def far_hashes(n, seed=0):
    """n 64-bit hashes pairwise more than 16 bits apart (no accidental near-duplicates)."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        h = rng.getrandbits(64)
        if all(bin(h ^ o).count("1") > 16 for o in out):
            out.append(h)
    return out


def by_label(result):
    rows = {}
    for it in result.items:
        rows.setdefault(it.label, []).append(it)
    return rows


def test_near_duplicate_pairs_equal_brute_force():
    rng = random.Random(1)
    hashes = [rng.getrandbits(64) for _ in range(300)]
    for i in range(0, 60, 3):  # plant close copies: flip 0..4 bits
        flipped = hashes[i]
        for b in rng.sample(range(64), i % 5):
            flipped ^= 1 << b
        hashes.append(flipped)
    for t in (0, 2, 4):
        brute = sorted((i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
                       if bin(hashes[i] ^ hashes[j]).count("1") <= t)
        assert near_duplicate_pairs(hashes, t) == brute
        assert len(brute) > 0


def test_planted_near_duplicate_images_are_merged(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        arr = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(arr).save(paths[-1])
    # d4 is d0 re-encoded slightly brighter and resized: a near-duplicate catalogue photo.
    base = np.asarray(Image.open(paths[0])).astype(int)
    Image.fromarray(np.clip(base + 6, 0, 255).astype(np.uint8)).resize((40, 40)).save(tmp_path / "4.png")
    paths.append(tmp_path / "4.png")
    docs = [Doc(f"d{i}", str(p), None, "c") for i, p in enumerate(paths)]
    clicks = [Click(f"/q/{i}.png", f"d{i}", 1) for i in range(5)]
    hashes = [dhash(str(p)) for p in paths]
    assert bin(hashes[0] ^ hashes[4]).count("1") <= 4
    cfg = dict(min_shared_queries=0, min_class_size=1)
    result = build_classes(docs, clicks, GovernConfig(dup_hamming=4, **cfg))
    assert result.classes == {"d0": ["d0", "d4"], "d1": ["d1"], "d2": ["d2"], "d3": ["d3"]}
    assert result.report["merges"]["near_duplicate"] == 1
    off = build_classes(docs, clicks, GovernConfig(dup_hamming=-1, **cfg))
    assert len(off.classes) == 5 and off.report["merges"]["near_duplicate"] == 0


def test_docs_sharing_enough_distinct_queries_are_merged():
    docs = docs_(5)
    clicks = []
    for q in range(3):  # d0 and d1 share three distinct queries
        clicks += [Click(f"q{q}", "d0", 1), Click(f"q{q}", "d1", 1)]
    clicks += [Click("q9", "d1", 1), Click("q9", "d2", 1)]  # d1 and d2 share only one
    # One generic query clicks every doc: too generic to vote (max_docs_per_query = 4).
    clicks += [Click("generic", f"d{i}", 1) for i in range(5)] * 1
    cfg = GovernConfig(dup_hamming=-1, min_shared_queries=2, min_query_jaccard=0.5, max_docs_per_query=4,
                       min_class_size=1, dominance=0.1)
    result = build_classes(docs, clicks, cfg)
    assert result.classes["d0"] == ["d0", "d1"]
    assert {"d2", "d3", "d4"} <= set(result.classes)
    assert result.report["merges"]["co_click"] == 1
    # With the generic query allowed to vote, d3 and d4 still share only it: no merge.
    loose = build_classes(docs, clicks, GovernConfig(**{**cfg.__dict__, "max_docs_per_query": 10}))
    assert "d3" in loose.classes and "d4" in loose.classes
    # Jaccard: d1 has 5 queries (q0-2, q9, generic) vs d0's 4, sharing 4 -> 0.8; at 0.9 they stay apart.
    strict = build_classes(docs, clicks, GovernConfig(**{**cfg.__dict__, "max_docs_per_query": 10, "min_query_jaccard": 0.9}))
    assert "d1" in strict.classes


def test_category_mismatched_pairs_are_dropped_as_noise():
    docs = docs_(2, category="shoes")
    clean = [Click(f"q{i}", "d0", 2, "shoes") for i in range(6)] + [Click("qx", "d1", 1)]  # no category: kept
    noise = [Click(f"n{i}", "d1", 3, "lamps") for i in range(4)]  # planted noise
    result = build_classes(docs, clean + noise, GovernConfig(**NO_MERGE, min_class_size=1))
    assert result.report["removed"]["category_mismatch"] == {"pairs": 4, "clicks": 12}
    queries = {it.image for it in result.items if it.role == "query"}
    assert queries == {f"q{i}" for i in range(6)} | {"qx"}
    kept = build_classes(docs, clean + noise, GovernConfig(**NO_MERGE, min_class_size=1, check_category=False))
    assert {f"n{i}" for i in range(4)} <= {it.image for it in kept.items if it.role == "query"}


def test_unknown_docs_are_dropped_and_counted():
    result = build_classes(docs_(1), [Click("q", "d0", 1), Click("q", "ghost", 5)], GovernConfig(**NO_MERGE, min_class_size=1))
    assert result.report["removed"]["unknown_doc"] == {"pairs": 1, "clicks": 5}


def test_queries_join_the_dominant_class_or_are_dropped():
    docs = docs_(2)
    clicks = [Click("dominant", "d0", 8), Click("dominant", "d1", 2),
              Click("split", "d0", 5), Click("split", "d1", 5),
              Click("repeat", "d1", 2), Click("repeat", "d1", 2), Click("repeat", "d0", 3)]  # 4 vs 3: 0.57
    result = build_classes(docs, clicks, GovernConfig(**NO_MERGE, dominance=0.6, min_class_size=1))
    rows = by_label(result)
    assert [it.image for it in rows["d0"] if it.role == "query"] == ["dominant"]
    assert [it.image for it in rows["d1"] if it.role == "query"] == []
    assert result.report["removed"]["ambiguous_query"] == {"query_images": 2}
    lower = build_classes(docs, clicks, GovernConfig(**NO_MERGE, dominance=0.55, min_class_size=1))
    assert [it.image for it in by_label(lower)["d1"] if it.role == "query"] == ["repeat"]  # repeated lines add up
    few = build_classes(docs, clicks, GovernConfig(**NO_MERGE, min_query_clicks=8, dominance=0.5, min_class_size=1))
    assert few.report["removed"]["few_clicks_query"] == {"query_images": 1}  # "repeat" has 7 clicks in all
    assert "repeat" not in {it.image for it in few.items}


def test_small_classes_dropped_and_huge_classes_capped_with_known_skew():
    docs = docs_(4)
    clicks = [Click(f"big{i:03d}", "d0", 1 + i) for i in range(50)]       # d0: 1 doc + 50 queries
    clicks += [Click(f"mid{i}", "d1", 1) for i in range(4)]               # d1: 1 + 4
    clicks += [Click("one", "d2", 1)]                                      # d2: 1 + 1
    # d3: no queries -> size 1
    result = build_classes(docs, clicks, GovernConfig(**NO_MERGE, min_class_size=2, max_class_size=10))
    rows = by_label(result)
    assert set(rows) == {"d0", "d1", "d2"}
    assert result.report["removed"]["small_class"] == {"classes": 1, "rows": 1}
    assert len(rows["d0"]) == 10 and rows["d0"][0].role == "doc"
    kept = [it.image for it in rows["d0"] if it.role == "query"]
    assert kept == [f"big{i:03d}" for i in range(49, 40, -1)]  # the 9 most-clicked queries
    assert result.report["removed"]["cap"] == {"classes": 1, "rows": 41}
    assert result.report["after"] == {"classes": 3, "docs": 3, "query_images": 14, "rows": 17}


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_long_tail_weights_follow_the_power_law(power):
    docs = docs_(3)
    sizes = {"d0": 64, "d1": 16, "d2": 4}
    clicks = [Click(f"{d}-{i}", d, 1) for d, n in sizes.items() for i in range(n - 1)]
    result = build_classes(docs, clicks, GovernConfig(**NO_MERGE, weight_power=power, min_class_size=1))
    rows = by_label(result)
    assert {l: len(r) for l, r in rows.items()} == sizes
    weights = np.array([it.weight for it in result.items])
    assert weights.mean() == pytest.approx(1.0)
    mass = {l: sum(it.weight for it in r) for l, r in rows.items()}
    # Class sampling mass is proportional to n_c ** power: 64 vs 4 gives 16 ** power.
    assert mass["d0"] / mass["d2"] == pytest.approx(16.0 ** power)
    assert mass["d1"] / mass["d2"] == pytest.approx(4.0 ** power)


def test_govern_writes_a_valid_manifest_report_and_plot(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "img").mkdir()
    doc_rows, log_rows = [], []
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "img" / f"d{i}.png")
        doc_rows.append({"doc_id": f"d{i}", "image": f"img/d{i}.png", "text": f"product {i}", "category": "a" if i < 3 else "b"})
        for j in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "img" / f"q{i}{j}.png")
            log_rows.append({"query_image": f"img/q{i}{j}.png", "doc_id": f"d{i}", "count": 2 + j,
                             "query_category": "a" if i < 3 else "b"})
    log_rows.append({"query_image": "img/q00.png", "doc_id": "d5", "count": 1, "query_category": "a"})  # noise
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in doc_rows))
    (tmp_path / "logs.jsonl").write_text("\n".join(json.dumps(r) for r in log_rows))
    main(["--logs", str(tmp_path / "logs.jsonl"), "--docs", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "out"),
          "--min-class-size", "2"])
    out = tmp_path / "out"
    man = load_manifest(out / "manifest.jsonl", check_images="header")
    assert len(man.class_index) == 6 and len(man.indices("doc")) == 6 and len(man.indices("query")) == 18
    report = json.loads((out / "report.json").read_text())
    assert report["before"] == {"docs": 6, "query_images": 18, "pairs": 19, "clicks": 6 * 9 + 1}
    assert report["removed"]["category_mismatch"] == {"pairs": 1, "clicks": 1}
    assert report["after"]["rows"] == 24 and report["class_size"]["max"] == 4
    assert json.loads((out / "classes.json").read_text())["d2"] == ["d2"]
    assert Image.open(out / "class_sizes.png").size[0] > 100


def test_bad_inputs_raise_clear_errors(tmp_path):
    (tmp_path / "logs.jsonl").write_text('{"query_image": "q.png", "doc_id": "d"}\n{"doc_id": 3}\n{"query_image": "q", "doc_id": "d", "count": 0}\n')
    with pytest.raises(ValueError, match=r"line 2: missing or mistyped \['doc_id', 'query_image'\]"):
        read_logs(tmp_path / "logs.jsonl")
    (tmp_path / "logs.jsonl").write_text('{"query_image": "q", "doc_id": "d", "count": 0}\n')
    with pytest.raises(ValueError, match="line 1: count must be >= 1"):
        read_logs(tmp_path / "logs.jsonl")
    with pytest.raises(FileNotFoundError, match="logs: no file at"):
        read_logs(tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match=r"dominance must be in \(0, 1\], got 1.5"):
        GovernConfig(dominance=1.5)
    with pytest.raises(ValueError, match="max_class_size must be >= min_class_size"):
        GovernConfig(min_class_size=5, max_class_size=4)
    with pytest.raises(ValueError, match="doc_hashes has 1 entries for 2 docs"):
        build_classes(docs_(2), [], GovernConfig(), doc_hashes=[0])


def test_every_rule_is_deterministic():
    docs = docs_(12)
    rng = random.Random(5)
    clicks = [Click(f"q{rng.randrange(40)}", f"d{rng.randrange(12)}", rng.randrange(1, 5)) for _ in range(200)]
    cfg = GovernConfig(dup_hamming=2, min_class_size=1)
    a = build_classes(docs, clicks, cfg, doc_hashes=far_hashes(12))
    b = build_classes(docs, list(reversed(clicks)), cfg, doc_hashes=far_hashes(12))
    assert a.classes == b.classes and a.items == b.items
