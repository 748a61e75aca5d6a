"""Composed-query emoji data: pairs from the codes, a group-disjoint split, the shipped copy and its manifests."""

import collections

import pytest

from oclear_ext.data import load_manifest
from oclear_ext.data.composed import (SPLITS, ToneVariant, composed_manifest, composed_split,
                                      derive_pairs, load_composed, read_pairs)
from oclear_ext.data.emoji import builtin_dir
from oclear_ext.train.data import BUILTIN_EMOJI_COMPOSED, resolve_manifest


@pytest.fixture(scope="module")
def data():
    return load_composed()


def test_pairs_follow_the_code_structure():
    sub = {"1F3C3": "person-activity", "1F3C3-200D-2640-FE0F": "person-activity",
           "1F3C3-200D-2642-FE0F": "person-activity", "1F3C3-200D-27A1-FE0F": "person-activity",
           "1F9D1-200D-1F4BB": "person-role", "1F469-200D-1F4BB": "person-role",
           "1F9D1": "person", "1F9D1-200D-1F9B1": "person",
           "1F468-200D-1F469-200D-1F466": "family", "1F469-200D-1F469-200D-1F466": "family",
           "1F6B6-200D-2640-FE0F": "person-activity"}  # its person form (1F6B6) is missing: no pair
    variants = [ToneVariant("1F3C3-1F3FE", "1F3C3", "1F3FE", "x.png")]
    sub["1F3C3-1F3FE"] = "person-activity"
    pairs = {(p.reference, p.modifier, p.target) for p in derive_pairs(sub, variants)}
    assert pairs == {
        ("1F3C3", "medium-dark skin tone", "1F3C3-1F3FE"),
        ("1F3C3", "woman", "1F3C3-200D-2640-FE0F"), ("1F3C3", "man", "1F3C3-200D-2642-FE0F"),
        ("1F3C3-200D-2642-FE0F", "woman", "1F3C3-200D-2640-FE0F"),  # gender swap
        ("1F3C3-200D-2640-FE0F", "man", "1F3C3-200D-2642-FE0F"),
        ("1F3C3", "facing right", "1F3C3-200D-27A1-FE0F"),
        ("1F9D1-200D-1F4BB", "woman", "1F469-200D-1F4BB"),  # profession: the lead changes
        ("1F9D1", "curly hair", "1F9D1-200D-1F9B1"),
    }  # families are never paired


def test_split_keeps_groups_whole_and_is_reproducible(data):
    assert composed_split(data.pairs) == data.split  # what the builder stored is what the seed gives
    for p in data.pairs:
        assert data.split[p.reference] == data.split[p.target]
    by_split = collections.Counter(data.split[p.target] for p in data.pairs)
    assert set(by_split) == set(SPLITS)
    assert 0.28 <= by_split["heldout"] / len(data.pairs) <= 0.36 and 0.08 <= by_split["val"] / len(data.pairs) <= 0.15
    pairs, split = read_pairs(builtin_dir() / "composed.jsonl")
    assert pairs == data.pairs and split == data.split


def test_shipped_copy_has_every_kind_of_modifier_and_its_images(data):
    modifiers = collections.Counter(p.modifier for p in data.pairs)
    for m in ("light skin tone", "medium-dark skin tone", "woman", "man", "facing right", "curly hair"):
        assert modifiers[m] > 0, m
    assert len(data.pairs) > 3000
    for vendor in ("google", "twitter"):
        for code in data.records:
            assert data.images[vendor][code].shape == (32, 32, 4)
    thumbs = next(p for p in data.pairs if p.modifier == "dark skin tone" and p.reference == "1F44D")
    assert data.records[thumbs.target].name.lower() == "thumbs up sign: dark skin tone"
    assert (data.images["google"]["1F44D"] != data.images["google"][thumbs.target]).any()


@pytest.mark.parametrize("split", ["heldout", "val"])
def test_evaluation_splits_hold_only_composed_queries_of_unseen_classes(tmp_path, data, split):
    train = load_manifest(composed_manifest(tmp_path / "train", "train"))
    held = load_manifest(composed_manifest(tmp_path / split, split), check_images="header")
    queries = [held.items[i] for i in held.indices("query")]
    assert queries and all(q.modifier for q in queries)
    assert set(q.label for q in queries) <= set(held.labels("doc"))
    # No held-out class (reference or target) is trained on: neither as a label nor as a query image.
    trained = set(train.labels())
    held_classes = set(held.labels()) | {q.id.split("/")[0] for q in queries}
    assert not trained & held_classes
    assert len(queries) == len(data.split_pairs(split))


def test_training_split_has_plain_and_composed_queries_and_docs(tmp_path, data):
    train = load_manifest(composed_manifest(tmp_path / "train", "train"))
    kinds = collections.Counter((it.role, it.modifier is not None) for it in train.items)
    n = len(data.classes("train"))
    assert kinds == {("query", False): n, ("doc", False): n, ("query", True): len(data.split_pairs("train"))}
    doc = next(it for it in train.items if it.role == "doc" and "skin tone" in (it.text or ""))
    assert doc.text.split(";")[0].endswith("skin tone")


def test_builtin_spec_resolves_each_split_and_refuses_unknown_ones(tmp_path):
    held = resolve_manifest(BUILTIN_EMOJI_COMPOSED, "heldout", tmp_path)
    val = resolve_manifest(BUILTIN_EMOJI_COMPOSED + ":val", "heldout", tmp_path)
    assert held.parent.name == "emoji-composed-heldout" and val.parent.name == "emoji-composed-val"
    with pytest.raises(ValueError, match="split must be one of"):
        resolve_manifest(BUILTIN_EMOJI_COMPOSED + ":test", "train", tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        composed_manifest(tmp_path / "x", "all")

