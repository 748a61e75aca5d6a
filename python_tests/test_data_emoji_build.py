"""The emoji builder on a miniature copy of the npm packages (no network): layout, manifests, split, licences."""

import json

import pytest
from PIL import Image

from oclear_ext.data import load_manifest
from oclear_ext.data.emoji import build, build_compact, emoji_split, read_records

try:
    import cairosvg  # noqa: F401
except (ImportError, OSError) as e:  # OSError: cairosvg installed but the system cairo library is missing
    # Not a skip: the builder is part of the package, and requirements-test.txt installs cairosvg.
    raise RuntimeError(f"the emoji builder rasterises OpenMoji SVGs with cairosvg, which is not usable here ({e}): "
                       "pip install -r requirements-test.txt, and the system cairo library (apt-get install libcairo2)") from e

EMOJI = [  # unified, name, short names, subcategory
    ("1F600", "GRINNING FACE", ["grinning"], "face-smiling"),
    ("1F603", "SMILING FACE WITH OPEN MOUTH", ["smiley"], "face-smiling"),
    ("1F604", "SMILING FACE WITH OPEN MOUTH AND SMILING EYES", ["smile"], "face-smiling"),
    ("2764-FE0F", "HEAVY BLACK HEART", ["heart"], "heart"),
    ("1F3C3", "RUNNER", ["runner"], "person-activity"),  # with a tone variant (composed-query data)
    ("1F3C3-200D-2640-FE0F", "WOMAN RUNNING", ["woman-running"], "person-activity"),
]
TONE_VARIANT = {"1F3FD": {"unified": "1F3C3-1F3FD", "image": "1f3c3-1f3fd.png", "has_img_google": True,
                          "has_img_twitter": True}}
SVG = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72"><circle cx="36" cy="36" r="30" fill="#{}"/></svg>'


@pytest.fixture
def packages(tmp_path):
    """The files the builder reads, laid out as `npm pack` + extract leaves them."""
    root = tmp_path / "pk"
    table = [{"unified": u, "name": n, "short_name": s[0], "short_names": s, "category": "Smileys & Emotion",
              "subcategory": sub, "sort_order": i, "image": f"{u.lower()}.png"} for i, (u, n, s, sub) in enumerate(EMOJI)]
    table[4]["skin_variations"] = TONE_VARIANT
    meta = root / "meta" / "package"
    meta.mkdir(parents=True)
    (meta / "package.json").write_text("{}")
    (meta / "emoji.json").write_text(json.dumps(table))
    (meta / "LICENSE").write_text("The MIT License (MIT)")
    for vendor, colour in (("google", (200, 0, 0)), ("twitter", (0, 0, 200))):
        pkg = root / vendor / "package"
        (pkg / "img" / vendor / "64").mkdir(parents=True)
        (pkg / "package.json").write_text("{}")
        for name in [e["image"] for e in table] + [TONE_VARIANT["1F3FD"]["image"]]:
            Image.new("RGBA", (64, 64), colour + (255,)).save(pkg / "img" / vendor / "64" / name)
    om = root / "openmoji" / "package"
    (om / "color" / "svg").mkdir(parents=True)
    (om / "package.json").write_text("{}")
    (om / "LICENSE.txt").write_text("Attribution-ShareAlike 4.0 International")
    for u, *_ in EMOJI:
        (om / "color" / "svg" / f"{u.replace('-FE0F', '')}.svg").write_text(SVG.format("00aa00"))  # openmoji drops FE0F
    return root


def test_build_writes_images_manifests_and_attribution(packages, tmp_path):
    out = tmp_path / "out"
    build(out, size=16, packages=packages)
    for vendor in ("google", "twitter", "openmoji"):
        for u, *_ in EMOJI:
            im = Image.open(out / "images" / vendor / f"{u}.png")
            assert im.size == (16, 16) and im.mode == "RGBA"
    assert Image.open(out / "images" / "openmoji" / "1F600.png").getpixel((8, 8))[:3] == (0, 170, 0)
    full = load_manifest(out / "manifest.jsonl", check_images="header")
    assert len(full.indices("query")) == 2 * len(EMOJI) and len(full.indices("doc")) == len(EMOJI)
    split = emoji_split(read_records(packages / "meta" / "package"))
    held = load_manifest(out / "heldout.jsonl")
    train = load_manifest(out / "train.jsonl")
    assert set(held.labels()) == {u for u, s in split.items() if s == "heldout"}
    assert not set(held.labels()) & set(train.labels())
    assert all(it.id.endswith("/twitter") for it in held.items if it.role == "query")
    assert "CC-BY-SA-4.0" in (out / "ATTRIBUTION.md").read_text()


def test_build_compact_atlas_round_trips(packages, tmp_path):
    out = build_compact(tmp_path / "compact", packages=packages, size=8)
    meta = json.loads((out / "atlas.json").read_text())
    assert meta["count"] == len(EMOJI) and meta["tile"] == 8
    atlas = Image.open(out / "twitter.png")
    assert atlas.size == (meta["columns"] * 8, 8)
    assert atlas.getpixel((8 * 3 + 4, 4)) == (0, 0, 200, 255)  # fourth tile
    assert atlas.getpixel((8 * len(EMOJI) + 4, 4))[3] == 0  # past the last tile: transparent
    rows = [json.loads(l) for l in (out / "emoji.jsonl").read_text().splitlines()]
    assert [r["unified"] for r in rows] == [u for u, *_ in EMOJI]


def test_build_compact_writes_the_composed_query_data(packages, tmp_path):
    out = build_compact(tmp_path / "compact", packages=packages, size=8)
    variants = [json.loads(l) for l in (out / "variants.jsonl").read_text().splitlines()]
    assert [(v["unified"], v["name"]) for v in variants] == [("1F3C3-1F3FD", "RUNNER: medium skin tone")]
    assert json.loads((out / "variants.json").read_text())["count"] == 1
    assert Image.open(out / "variants-google.png").getpixel((4, 4)) == (200, 0, 0, 255)
    pairs = [json.loads(l) for l in (out / "composed.jsonl").read_text().splitlines()]
    assert {(p["reference"], p["modifier"], p["target"]) for p in pairs} == {
        ("1F3C3", "medium skin tone", "1F3C3-1F3FD"), ("1F3C3", "woman", "1F3C3-200D-2640-FE0F")}
    assert len({p["split"] for p in pairs}) == 1  # one group: a base and its variants share a split
    assert "tone variants" in (out / "ATTRIBUTION.md").read_text()
    again = build_compact(tmp_path / "again", packages=packages, size=8)
    for name in ("variants-google.png", "variants-twitter.png", "variants.jsonl", "composed.jsonl"):
        assert (out / name).read_bytes() == (again / name).read_bytes()  # byte-identical rebuilds
