"""The built-in emoji data: complete, class-disjoint fixed split, usable through an ordinary manifest."""

import json
from collections import Counter, defaultdict

import numpy as np
import pytest

from oclear_ext.data import load_manifest
from oclear_ext.data.dataset import ManifestDataset
from oclear_ext.data.emoji import VENDORS, builtin_dir, builtin_manifest, emoji_split, load_builtin


@pytest.fixture(scope="module")
def data():
    return load_builtin()


def test_builtin_holds_every_emoji_for_three_vendors(data):
    n = len(data.records)
    assert n == 1911 and len({r.unified for r in data.records}) == n
    assert len({r.subcategory for r in data.records}) == 99
    for vendor in VENDORS:
        imgs = data.images[vendor]
        assert imgs.shape == (n, 32, 32, 4) and imgs.dtype == np.uint8
        # Every tile is drawn: no empty (fully transparent) slot in any atlas.
        assert (imgs[..., 3].reshape(n, -1).max(axis=1) > 0).all()
    # The vendors draw differently (domain shift) but the same emoji: not byte-identical copies.
    assert not np.array_equal(data.images["google"], data.images["twitter"])


def test_split_is_class_disjoint_stratified_and_about_70_30(data):
    splits = Counter(data.split.values())
    assert set(splits) == {"train", "heldout"}
    train, held = set(data.indices("train")), set(data.indices("heldout"))
    assert not (train & held) and len(train | held) == len(data.records)
    assert 0.28 <= splits["heldout"] / len(data.records) <= 0.32
    per_sub = defaultdict(Counter)
    for r in data.records:
        per_sub[r.subcategory][data.split[r.unified]] += 1
    for sub, c in per_sub.items():
        n = c["train"] + c["heldout"]
        assert c["heldout"] == int(0.3 * n + 0.5), sub  # stratified: each subcategory split 70/30


def test_stored_split_is_what_the_seed_reproduces(data):
    assert emoji_split(data.records) == data.split
    assert emoji_split(list(reversed(data.records))) == data.split  # independent of record order
    assert emoji_split(data.records, seed=1) != data.split


def test_licences_and_attribution_ship_next_to_the_data():
    folder = builtin_dir()
    text = (folder / "ATTRIBUTION.md").read_text()
    for needle in ("Apache-2.0", "CC-BY-4.0", "CC-BY-SA-4.0", "MIT", "emoji-datasource@16.0.0", "openmoji@17.0.0"):
        assert needle in text
    assert "Attribution-ShareAlike 4.0" in (folder / "LICENSE-openmoji.txt").read_text()
    assert "MIT" in (folder / "LICENSE-emoji-datasource.txt").read_text()
    assert "Apache License" in (folder / "LICENSE-Apache-2.0.txt").read_text()
    # Budget: the package's built-in data stays under 16 MiB (base emoji about 8 MiB, composed-query data 5.3).
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 16 * 2**20


def test_builtin_manifest_is_the_evaluation_protocol(tmp_path, data):
    path = builtin_manifest(tmp_path)
    man = load_manifest(path, check_images="header")
    held = {data.records[i].unified for i in data.indices("heldout")}
    queries = [man.items[i] for i in man.indices("query")]
    docs = [man.items[i] for i in man.indices("doc")]
    assert {q.label for q in queries} == held == {d.label for d in docs}
    assert all(q.id.endswith("/twitter") and q.text is None for q in queries)
    assert all(d.id.endswith("/google") and d.text and "keywords:" in d.text for d in docs)
    ds = ManifestDataset(man, image_size=32, roles=("query",))
    first = ds[0]["image"]
    i = next(j for j, r in enumerate(data.records) if r.unified == queries[0].label)
    rgba = data.images["twitter"][i].astype(np.float32) / 255
    expected = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])  # over white
    np.testing.assert_allclose(first.permute(1, 2, 0).numpy(), expected, atol=1 / 255 + 1e-6)


def test_builtin_manifest_for_training_and_bad_vendors(tmp_path, data):
    path = builtin_manifest(tmp_path, split="train", query_vendors=("twitter", "openmoji"))
    man = load_manifest(path)
    train = {data.records[i].unified for i in data.indices("train")}
    assert set(man.labels()) == train
    assert len(man.indices("query")) == 2 * len(train) and len(man.indices("doc")) == len(train)
    with pytest.raises(ValueError, match="vendor must be one of"):
        builtin_manifest(tmp_path, query_vendors=("apple",))
    with pytest.raises(ValueError, match="also a query vendor"):
        builtin_manifest(tmp_path, query_vendors=("google",))
    with pytest.raises(ValueError, match="split must be"):
        data.indices("test")


def test_metadata_rows_carry_names_keywords_and_subcategories():
    rows = [json.loads(l) for l in (builtin_dir() / "emoji.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(rows)))
    grinning = next(r for r in rows if r["unified"] == "1F600")
    assert grinning["subcategory"] == "face-smiling" and "grinning" in grinning["text"]
