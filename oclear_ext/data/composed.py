"""Composed-query data from the emoji sources: reference emoji + modifier text -> target emoji (another class).

The metadata of emoji-datasource says systematically how emoji relate, and each relation is a modifier a
shopper could type next to a photo:
- skin tone: every emoji with `skin_variations` has five single-tone variants (new classes here; the base
  set has none), "thumbs up" + "medium-dark skin tone" -> "thumbs up: medium-dark skin tone";
- gender: a ZWJ sequence with the female / male sign ("person running" + "woman" -> "woman running"), a
  profession led by woman / man instead of person ("technologist" + "man" -> "man technologist"), and the
  swap between them ("man running" + "woman" -> "woman running");
- hair style ("person" + "curly hair" -> "person: curly hair") and direction ("person walking" + "facing
  right" -> "person walking facing right"), both ZWJ components.
Pairs are derived from the codes alone (`derive_pairs`), so what the metadata does not state is never
guessed. Families, couples and kisses are left out: swapping one person of a family is not "the woman's
version".

Split (fixed, from a seed): the classes linked by pairs form groups (a base with all its variants); whole
groups go to train / val / heldout, so no held-out reference or target class is ever trained on, and val
(for choosing settings) comes from the training side. Held-out and val manifests hold only composed
queries; training also has every class's plain image query.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:
    import numpy as np

    from .emoji import EmojiRecord

SKIN_TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}
# ZWJ components that add one attribute to the sequence they join (Unicode's emoji ZWJ sequences).
ZWJ_MODIFIERS = {
    "2640-FE0F": "woman",  # female sign
    "2642-FE0F": "man",  # male sign
    "27A1-FE0F": "facing right",  # rightwards arrow
    "1F9B0": "red hair",
    "1F9B1": "curly hair",
    "1F9B2": "bald",
    "1F9B3": "white hair",
}
GENDER_SWAP = {"2640-FE0F": "2642-FE0F", "2642-FE0F": "2640-FE0F"}
PERSON, LEAD_GENDER = "1F9D1", {"1F469": "woman", "1F468": "man"}
EXCLUDED_SUBCATEGORIES = ("family",)  # couples, kisses, families
ZWJ = "-200D-"
SPLITS = ("train", "val", "heldout")
SPLIT_SEED = 0
SPLIT_FRACTIONS = {"heldout": 0.3, "val": 0.1}  # of the pairs; the rest is train


@dataclass(frozen=True)
class ComposedPair:
    """reference (class code) + modifier (text) -> target (class code)."""

    reference: str
    modifier: str
    target: str


@dataclass(frozen=True)
class ToneVariant:
    """A single-skin-tone variant of a base emoji: a class of its own."""

    unified: str
    base: str
    tone: str  # the modifier code, a key of SKIN_TONES
    image: str  # file name inside emoji-datasource-<vendor>/img/<vendor>/64/

    @property
    def tone_name(self) -> str:
        return SKIN_TONES[self.tone]


def tone_variants(table: Iterable[dict], vendors: Sequence[str] = ("google", "twitter")) -> list[ToneVariant]:
    """The single-tone variants in emoji-datasource's table (two-tone couples are left out), in table order.

    Only variants every vendor in `vendors` draws are kept (`has_img_<vendor>`).
    """
    out = []
    for e in sorted(table, key=lambda e: int(e["sort_order"])):
        if e["subcategory"] in EXCLUDED_SUBCATEGORIES:
            continue
        for tone, v in sorted((e.get("skin_variations") or {}).items()):
            if tone in SKIN_TONES and all(v.get(f"has_img_{vendor}", False) for vendor in vendors):
                out.append(ToneVariant(v["unified"], e["unified"], tone, v["image"]))
    return out


def derive_pairs(subcategory: dict[str, str], variants: Sequence[ToneVariant]) -> list[ComposedPair]:
    """Every (reference, modifier, target) the codes imply, sorted; `subcategory` maps base codes to theirs.

    Tone: base -> each of its variants. ZWJ: a target whose sequence is a reference's with one component of
    ZWJ_MODIFIERS added; the gender sign swapped; a woman / man lead where the reference has the person
    lead (or the other gender's).
    """
    codes = set(subcategory)
    pairs = {ComposedPair(v.base, v.tone_name, v.unified) for v in variants}
    for target in codes:
        if subcategory[target] in EXCLUDED_SUBCATEGORIES:
            continue
        parts = target.split(ZWJ)
        candidates = []
        for i, part in enumerate(parts):
            if i > 0 and part in ZWJ_MODIFIERS:
                candidates.append((ZWJ.join(parts[:i] + parts[i + 1:]), ZWJ_MODIFIERS[part]))
            if i > 0 and part in GENDER_SWAP:
                candidates.append((ZWJ.join(parts[:i] + [GENDER_SWAP[part]] + parts[i + 1:]), ZWJ_MODIFIERS[part]))
        lead, *tone = parts[0].split("-")  # a tone variant keeps its tone after the lead
        if lead in LEAD_GENDER:
            for other in (PERSON, *(g for g in LEAD_GENDER if g != lead)):
                candidates.append((ZWJ.join(["-".join([other, *tone])] + parts[1:]), LEAD_GENDER[lead]))
        for reference, modifier in candidates:
            if reference in codes and subcategory[reference] not in EXCLUDED_SUBCATEGORIES:
                pairs.add(ComposedPair(reference, modifier, target))
    return sorted(pairs, key=lambda p: (p.reference, p.modifier, p.target))


def composed_split(pairs: Sequence[ComposedPair], seed: int = SPLIT_SEED) -> dict[str, str]:
    """class code -> "train" | "val" | "heldout", whole groups at a time (classes connected by pairs).

    Groups are shuffled by a string-seeded random.Random (stable across Python versions) from their sorted
    order; held-out, then val, take groups until they hold their fraction of the pairs.
    """
    parent: dict[str, str] = {}

    def root(c: str) -> str:
        parent.setdefault(c, c)
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    for p in pairs:
        a, b = root(p.reference), root(p.target)
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[str, list[str]] = {}
    for c in sorted(parent):
        groups.setdefault(root(c), []).append(c)
    pair_count = {g: 0 for g in groups}
    for p in pairs:
        pair_count[root(p.target)] += 1
    order = sorted(groups)
    random.Random(f"oclear-emoji-composed-split:{seed}").shuffle(order)
    split, taken = {}, {s: 0 for s in SPLITS}
    for g in order:
        name = next((s for s in ("heldout", "val") if taken[s] < SPLIT_FRACTIONS[s] * len(pairs)), "train")
        taken[name] += pair_count[g]
        for c in groups[g]:
            split[c] = name
    return split


def write_pairs(pairs: Sequence[ComposedPair], split: dict[str, str], path: Path) -> None:
    """composed.jsonl: one pair per line with its split (the split of both its classes)."""
    with open(path, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps({"reference": p.reference, "modifier": p.modifier, "target": p.target,
                                "split": split[p.target]}) + "\n")


def read_pairs(path: Path) -> tuple[list[ComposedPair], dict[str, str]]:
    """composed.jsonl -> (pairs, class code -> split)."""
    pairs, split = [], {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        e = json.loads(line)
        pairs.append(ComposedPair(e["reference"], e["modifier"], e["target"]))
        split[e["reference"]] = split[e["target"]] = e["split"]
    return pairs, split


# ----------------------------------------------------------------------------- building and the shipped copy

VARIANT_VENDORS = ("google", "twitter")  # queries twitter, docs google; openmoji draws no tone variants here


def variant_records(variants: Sequence[ToneVariant], base: dict[str, "EmojiRecord"]) -> list["EmojiRecord"]:
    """Each tone variant as an emoji class: its base's name with the tone ("thumbs up sign: dark skin tone")."""
    from .emoji import EmojiRecord

    return [EmojiRecord(v.unified, f"{base[v.base].name}: {v.tone_name}", base[v.base].short_names,
                        base[v.base].category, base[v.base].subcategory, base[v.base].sort_order, v.image)
            for v in variants]


def build_compact_variants(out: Path, roots: dict[str, Path], records: Sequence["EmojiRecord"], size: int) -> None:
    """Writes the composed-query part of the shipped copy next to the base atlases (emoji.build_compact).

    variants-<vendor>.png (tone-variant atlases), variants.json (atlas layout), variants.jsonl (the variant
    classes, in atlas order, with their composed split), composed.jsonl (the pairs), an ATTRIBUTION.md note.
    """
    from .emoji import ATLAS_COLUMNS, render, save_atlas, write_metadata

    table = json.loads((Path(roots["meta"]) / "emoji.json").read_text(encoding="utf-8"))
    base = {r.unified: r for r in records}
    variants = tone_variants(table, VARIANT_VENDORS)
    vrecords = variant_records(variants, base)
    pairs = derive_pairs({**{r.unified: r.subcategory for r in records},
                          **{r.unified: r.subcategory for r in vrecords}}, variants)
    split = composed_split(pairs)
    for vendor in VARIANT_VENDORS:
        save_atlas([render(vendor, roots[vendor], r, size) for r in vrecords], size, out / f"variants-{vendor}.png")
    write_metadata(vrecords, split, out / "variants.jsonl")
    write_pairs(pairs, split, out / "composed.jsonl")
    (out / "variants.json").write_text(json.dumps({"tile": size, "columns": ATLAS_COLUMNS, "count": len(vrecords),
                                                   "vendors": list(VARIANT_VENDORS)}) + "\n")
    with open(out / "ATTRIBUTION.md", "a", encoding="utf-8") as f:
        f.write(f"Composed-query data: {len(vrecords)} single-skin-tone variants (google and twitter images, same "
                f"packages and licences) and {len(pairs)} pairs derived from the emoji-datasource metadata.\n")


@dataclass
class ComposedEmoji:
    """The shipped composed-query data: classes (base and variants) by code, pairs, split, 32 px images."""

    records: dict[str, "EmojiRecord"]
    pairs: list[ComposedPair]
    split: dict[str, str]
    images: dict[str, dict[str, "np.ndarray"]]  # vendor -> code -> (S, S, 4) uint8 RGBA

    def classes(self, split: str) -> list[str]:
        """The class codes of one split, in the data's order."""
        if split not in SPLITS:
            raise ValueError(f"ComposedEmoji: split must be one of {SPLITS}, got {split!r}")
        return [c for c in self.records if self.split.get(c) == split]

    def split_pairs(self, split: str) -> list[ComposedPair]:
        if split not in SPLITS:
            raise ValueError(f"ComposedEmoji: split must be one of {SPLITS}, got {split!r}")
        return [p for p in self.pairs if self.split[p.target] == split]


def load_composed() -> ComposedEmoji:
    """Loads the shipped composed-query data (no network)."""
    from .emoji import builtin_dir, load_builtin, read_atlas, read_metadata

    folder = builtin_dir()
    data = load_builtin(VARIANT_VENDORS)
    meta = json.loads((folder / "variants.json").read_text())
    vrecords, _ = read_metadata(folder / "variants.jsonl")
    pairs, split = read_pairs(folder / "composed.jsonl")
    records = {r.unified: r for r in (*data.records, *vrecords) if r.unified in split}
    images = {}
    for vendor in VARIANT_VENDORS:
        tiles = read_atlas(folder / f"variants-{vendor}.png", meta["tile"], meta["columns"], meta["count"])
        images[vendor] = {**{r.unified: data.images[vendor][i] for i, r in enumerate(data.records)},
                          **{r.unified: tiles[i] for i, r in enumerate(vrecords)}}
    return ComposedEmoji(records, pairs, split, images)


def composed_manifest(out: str | Path, split: str = "heldout") -> Path:
    """Materialises one split of the composed-query data as a manifest folder; returns the manifest path.

    Every split: google image + text documents of its classes, and the composed queries (twitter image of
    the reference, the modifier, label = the target). "train" also has each class's plain twitter query
    (no modifier), so the image path learns every class it is asked to compose towards.
    """
    from PIL import Image

    from .manifest import write_manifest

    if split not in SPLITS:
        raise ValueError(f"composed_manifest: split must be one of {SPLITS}, got {split!r}")
    data = load_composed()
    out = Path(out)
    classes = data.classes(split)
    image = lambda vendor, code: f"images/{vendor}/{code}.png"
    rows = []
    for code in classes:
        r = data.records[code]
        if split == "train":
            rows.append({"image": image("twitter", code), "text": None, "label": code, "role": "query",
                         "id": f"{code}/twitter", "category": r.subcategory})
        rows.append({"image": image("google", code), "text": r.text, "label": code, "role": "doc",
                     "id": f"{code}/google", "category": r.subcategory})
    for p in data.split_pairs(split):
        rows.append({"image": image("twitter", p.reference), "text": None, "label": p.target, "role": "query",
                     "id": f"{p.reference}/twitter+{p.modifier}", "category": data.records[p.target].subcategory,
                     "modifier": p.modifier})
    for vendor in VARIANT_VENDORS:
        (out / "images" / vendor).mkdir(parents=True, exist_ok=True)
        for code in classes:
            path = out / image(vendor, code)
            if not path.is_file():
                Image.fromarray(data.images[vendor][code]).save(path)
    return write_manifest(rows, out / "manifest.jsonl")
