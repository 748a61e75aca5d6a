"""Manifest format: validation reports every bad line by number; class ids are contiguous and saved."""

import json

import pytest
from PIL import Image

from oclear_ext.data import ClassIndex, ManifestError, ManifestItem, load_manifest, write_manifest


def _png(path, color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)
    return path


def _write(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


@pytest.fixture
def folder(tmp_path):
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png", (0, 255, 0))
    return tmp_path


def test_valid_manifest_resolves_paths_and_maps_labels(folder):
    m = _write(folder / "m.jsonl", [
        {"image": "img/a.png", "text": None, "label": "z", "role": "query", "id": "q1", "category": "red"},
        "",  # blank lines are allowed
        {"image": "img/b.png", "text": "green thing", "label": "a", "role": "doc", "weight": 2.5},
        {"image": str(folder / "img" / "a.png"), "text": "red", "label": 7, "role": "doc"},
    ])
    man = load_manifest(m)
    assert [it.line for it in man.items] == [1, 3, 4]
    assert man.items[0].image == str(folder / "img" / "a.png")
    assert man.items[2].label == "7"  # integer labels become their decimal string
    assert man.items[1].weight == 2.5 and man.items[0].weight == 1.0
    assert man.class_index.labels == ["7", "a", "z"]  # sorted: reproducible contiguous ids
    assert [man.class_index.id(l) for l in ("7", "a", "z")] == [0, 1, 2]
    assert man.indices("query") == [0] and man.indices("doc") == [1, 2]


@pytest.mark.parametrize("line, message", [
    ("{not json", r"line 2: invalid JSON"),
    ('["a", "list"]', r"line 2: expected a JSON object, got list"),
    ({"image": "img/a.png", "text": None, "role": "doc"}, r"line 2: missing key\(s\) \['label'\]"),
    ({"image": "img/a.png", "text": None, "label": "x", "role": "doc", "lable": 1}, r"line 2: unknown key\(s\) \['lable'\]"),
    ({"image": "img/missing.png", "text": None, "label": "x", "role": "doc"}, r"line 2: image file not found: 'img/missing.png'"),
    ({"image": "", "text": None, "label": "x", "role": "doc"}, r"line 2: 'image' must be a non-empty path string"),
    ({"image": "img/a.png", "text": 3, "label": "x", "role": "doc"}, r"line 2: 'text' must be a string or null, got int"),
    ({"image": "img/a.png", "text": None, "label": "  ", "role": "doc"}, r"line 2: empty label"),
    ({"image": "img/a.png", "text": None, "label": [1], "role": "doc"}, r"line 2: 'label' must be a string \(or integer\) class id, got list"),
    ({"image": "img/a.png", "text": None, "label": "x", "role": "document"}, r"line 2: unknown role 'document'"),
    ({"image": "img/a.png", "text": None, "label": "x", "role": "doc", "category": 5}, r"line 2: 'category' must be a string, got int"),
    ({"image": "img/a.png", "text": None, "label": "x", "role": "doc", "weight": 0}, r"line 2: 'weight' must be a finite number > 0"),
    ({"image": "img/a.png", "text": None, "label": "x", "role": "doc", "id": "same"}, r"line 2: duplicate id 'same' \(first on line 1\)"),
    ({"image": "img/a.png", "text": None, "label": "x", "role": "query", "modifier": " "}, r"line 2: 'modifier' must be a non-empty string or null"),
    ({"image": "img/a.png", "text": None, "label": "x", "role": "query", "modifier": 3}, r"line 2: 'modifier' must be a non-empty string or null, got 3"),
    ({"image": "img/a.png", "text": "t", "label": "x", "role": "doc", "modifier": "red"}, r"line 2: 'modifier' is only allowed on queries"),
])
def test_each_error_type_is_reported_with_its_line_number(folder, line, message):
    good = {"image": "img/a.png", "text": None, "label": "x", "role": "query", "id": "same"}
    m = _write(folder / "m.jsonl", [good, line])
    with pytest.raises(ManifestError, match=message) as info:
        load_manifest(m)
    assert [n for n, _ in info.value.errors] == [2] * len(info.value.errors)


def test_all_bad_lines_are_reported_at_once(folder):
    good = {"image": "img/a.png", "text": None, "label": "x", "role": "doc"}
    m = _write(folder / "m.jsonl", [good, {**good, "role": "nope"}, good, {**good, "label": ""}, {**good, "image": "gone.png"}])
    with pytest.raises(ManifestError, match=r"3 bad line\(s\)") as info:
        load_manifest(m)
    assert [n for n, _ in info.value.errors] == [2, 4, 5]


def test_one_line_with_several_problems_lists_them_all(folder):
    m = _write(folder / "m.jsonl", [{"image": "nope.png", "text": None, "label": "", "role": "x"}])
    with pytest.raises(ManifestError) as info:
        load_manifest(m)
    text = "\n".join(msg for _, msg in info.value.errors)
    assert "image file not found" in text and "empty label" in text and "unknown role" in text


def test_empty_manifest_and_missing_file(folder):
    with pytest.raises(ManifestError, match="the manifest has no items"):
        load_manifest(_write(folder / "empty.jsonl", [""]))
    with pytest.raises(FileNotFoundError, match="no manifest file"):
        load_manifest(folder / "absent.jsonl")
    with pytest.raises(ValueError, match="check_images must be"):
        load_manifest(folder / "empty.jsonl", check_images="yes")


def test_header_check_catches_a_file_that_is_not_an_image(folder):
    (folder / "img" / "fake.png").write_text("not an image")
    m = _write(folder / "m.jsonl", [{"image": "img/fake.png", "text": None, "label": "x", "role": "doc"}])
    assert len(load_manifest(m)) == 1  # exists: fine by default
    with pytest.raises(ManifestError, match="line 1: image file is not a readable image"):
        load_manifest(m, check_images="header")
    assert len(load_manifest(folder / "m.jsonl", check_images="none")) == 1


def test_write_then_load_round_trip_with_relative_paths(folder):
    items = [ManifestItem(str(folder / "img" / "a.png"), "red", "c1", "doc", "d1", "cat", 0.5),
             ManifestItem(str(folder / "img" / "b.png"), None, "c1", "query")]
    path = write_manifest(items, folder / "sub" / "m.jsonl")
    first = json.loads(path.read_text().splitlines()[0])
    assert first["image"] == "../img/a.png" and first["weight"] == 0.5
    back = load_manifest(path)
    assert [(it.image, it.text, it.label, it.role, it.id, it.category, it.weight) for it in back.items] == \
           [(it.image, it.text, it.label, it.role, it.id, it.category, it.weight) for it in items]


def test_class_index_save_load_and_errors(tmp_path):
    idx = ClassIndex.from_labels(["b", "a", "b", "c"])
    assert idx.labels == ["a", "b", "c"] and len(idx) == 3
    idx.save(tmp_path / "classes.json")
    assert ClassIndex.load(tmp_path / "classes.json").labels == idx.labels
    with pytest.raises(KeyError, match="label 'zz' is not one of the 3 known classes"):
        idx.id("zz")
    with pytest.raises(ValueError, match="labels must be unique"):
        ClassIndex(["a", "a"])
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="is not a class index"):
        ClassIndex.load(tmp_path / "bad.json")


def test_composed_query_modifier_is_optional_and_round_trips(folder):
    m = _write(folder / "m.jsonl", [
        {"image": "img/a.png", "text": None, "label": "mug-red", "role": "query", "modifier": "in red"},
        {"image": "img/a.png", "text": None, "label": "mug", "role": "query", "modifier": None},
        {"image": "img/b.png", "text": "red mug", "label": "mug-red", "role": "doc"},
    ])
    man = load_manifest(m)
    assert [it.modifier for it in man.items] == ["in red", None, None]
    rows = [it.to_json(folder) for it in man.items]
    assert rows[0]["modifier"] == "in red" and "modifier" not in rows[1] and "modifier" not in rows[2]
    again = load_manifest(write_manifest(man.items, folder / "again.jsonl"))
    assert [it.modifier for it in again.items] == ["in red", None, None]
