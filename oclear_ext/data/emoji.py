"""Built-in retrieval data: the same emoji drawn by three vendors (image-to-multi-modal with domain shift).

Class = one emoji (1,911 in 99 subcategories, from emoji-datasource 16.0.0). Query = one vendor's
image; document = another vendor's image plus the emoji's name and keywords. Vendors: google (Noto,
Apache-2.0), twitter (Twemoji, CC-BY-4.0), openmoji (CC-BY-SA-4.0, rasterised from SVG). Apple and
Facebook images are not freely licensed and are never used.

Two forms:
- the compact copy shipped in the package (oclear_ext/data/emoji_builtin/): all emoji, three vendors,
  32 px, one RGBA PNG atlas per vendor plus emoji.jsonl (metadata and the fixed split). Load it with
  `load_builtin()` (arrays) or turn it into an ordinary manifest folder with `builtin_manifest(dir)`.
  Next to it, the composed-query data (oclear_ext.data.composed): 1,555 skin-tone variants (google and
  twitter), the reference + modifier -> target pairs and their split.
- the full set at 64 px (or any size) as a manifest folder, built from the npm packages:
      python -m oclear_ext.data.emoji build --out DIR [--size 64] [--packages DIR]
  (`compact --out DIR` rebuilds the shipped copy.) Needs npm and, for openmoji, cairosvg.

Split: classes are split 70/30 into train / held-out per subcategory (stratified), from a fixed seed;
the result is stored in emoji.jsonl and `emoji_split` recomputes it. Evaluation protocol
(`builtin_manifest(split="heldout")`): held-out classes only, twitter images as queries, google image +
text as documents.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .manifest import write_manifest

VENDORS = ("google", "twitter", "openmoji")
NPM_PACKAGES = {
    "meta": "emoji-datasource@16.0.0",
    "google": "emoji-datasource-google@16.0.0",
    "twitter": "emoji-datasource-twitter@16.0.0",
    "openmoji": "openmoji@17.0.0",
}
SPLIT_SEED = 0
HELDOUT_FRACTION = 0.3
BUILTIN_SIZE = 32
ATLAS_COLUMNS = 48
BUILTIN_PACKAGE = "oclear_ext.data"
BUILTIN_FOLDER = "emoji_builtin"

LICENSES = {
    "google": ("Apache-2.0", "Noto Emoji, Copyright Google Inc.", "https://github.com/googlefonts/noto-emoji/blob/main/LICENSE"),
    "twitter": ("CC-BY-4.0", "Twemoji, Copyright Twitter, Inc and other contributors", "https://creativecommons.org/licenses/by/4.0/"),
    "openmoji": ("CC-BY-SA-4.0", "OpenMoji, the open-source emoji and icon project (openmoji.org)", "https://creativecommons.org/licenses/by-sa/4.0/"),
    "meta": ("MIT", "emoji-datasource, Copyright (c) 2013 Cal Henderson", "https://github.com/iamcal/emoji-data/blob/master/LICENSE"),
}


@dataclass(frozen=True)
class EmojiRecord:
    """One emoji class. `unified` (e.g. "1F600") is the class label; `text` is the document text."""

    unified: str
    name: str
    short_names: tuple[str, ...]
    category: str
    subcategory: str
    sort_order: int
    image: str  # file name inside emoji-datasource-<vendor>/img/<vendor>/64/

    @property
    def text(self) -> str:
        keywords = ", ".join(s.replace("_", " ").replace("-", " ") for s in self.short_names)
        return f"{self.name.lower()}; keywords: {keywords}"


def emoji_split(records: Sequence[EmojiRecord], seed: int = SPLIT_SEED, fraction: float = HELDOUT_FRACTION) -> dict[str, str]:
    """unified -> "train" | "heldout": per subcategory, round(fraction * n) classes held out.

    Deterministic: each subcategory is shuffled by its own string-seeded random.Random (string seeds
    hash with SHA-512, stable across Python versions and runs), from the records sorted by code.
    """
    by_sub: dict[str, list[str]] = {}
    for r in records:
        by_sub.setdefault(r.subcategory, []).append(r.unified)
    split = {}
    for sub in sorted(by_sub):
        codes = sorted(by_sub[sub])
        random.Random(f"oclear-emoji-split:{seed}:{sub}").shuffle(codes)
        n_held = int(fraction * len(codes) + 0.5)
        for i, code in enumerate(codes):
            split[code] = "heldout" if i < n_held else "train"
    return split


# ----------------------------------------------------------------------------- building from npm


def fetch_packages(workdir: str | Path) -> dict[str, Path]:
    """`npm pack` the four source packages into workdir and extract them; returns vendor -> package root."""
    workdir = Path(workdir)
    roots = {}
    for key, spec in NPM_PACKAGES.items():
        dest = workdir / key
        if not (dest / "package" / "package.json").is_file():
            dest.mkdir(parents=True, exist_ok=True)
            try:
                out = subprocess.run(["npm", "pack", spec, "--pack-destination", str(dest)], check=True,
                                     capture_output=True, text=True)
            except FileNotFoundError:
                raise RuntimeError("emoji build: npm is not on PATH (it fetches the emoji packages)") from None
            except subprocess.CalledProcessError as e:
                raise RuntimeError(f"emoji build: `npm pack {spec}` failed:\n{e.stderr}") from None
            tgz = dest / out.stdout.strip().splitlines()[-1]
            with tarfile.open(tgz) as tar:
                tar.extractall(dest, filter="data")
            tgz.unlink()
        roots[key] = dest / "package"
    return roots


def read_records(meta_root: str | Path) -> list[EmojiRecord]:
    """The emoji table of emoji-datasource (base emoji, no skin-tone variants), in Unicode sort order."""
    table = json.loads((Path(meta_root) / "emoji.json").read_text(encoding="utf-8"))
    records = [
        EmojiRecord(e["unified"], e["name"] or e["short_name"], tuple(e["short_names"]), e["category"],
                    e["subcategory"], int(e["sort_order"]), e["image"])
        for e in table
    ]
    return sorted(records, key=lambda r: r.sort_order)


def render(vendor: str, root: Path, record: EmojiRecord, size: int):
    """The vendor's drawing of one emoji as a size x size RGBA PIL image."""
    from PIL import Image

    if vendor in ("google", "twitter"):
        im = Image.open(root / "img" / vendor / "64" / record.image).convert("RGBA")
    elif vendor == "openmoji":
        import cairosvg  # only the builder needs it

        svg_dir = root / "color" / "svg"
        candidates = [record.unified, record.unified.replace("-FE0F", "")]
        svg = next((svg_dir / f"{c}.svg" for c in candidates if (svg_dir / f"{c}.svg").is_file()), None)
        if svg is None:
            raise FileNotFoundError(f"emoji build: openmoji has no SVG for {record.unified} ({record.name})")
        # Rasterise at 4x and downsample: cairo's own antialiasing of thin outlines is coarser.
        png = cairosvg.svg2png(url=str(svg), output_width=4 * size, output_height=4 * size)
        im = Image.open(io.BytesIO(png)).convert("RGBA")
    else:
        raise ValueError(f"emoji render: vendor must be one of {VENDORS}, got {vendor!r}")
    if im.size != (size, size):
        im = im.resize((size, size), Image.LANCZOS)  # Pillow resizes RGBA premultiplied: no dark fringes
    return im


def write_metadata(records: Sequence[EmojiRecord], split: dict[str, str], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(records):
            f.write(json.dumps({
                "index": i, "unified": r.unified, "name": r.name, "short_names": list(r.short_names),
                "category": r.category, "subcategory": r.subcategory, "text": r.text, "split": split[r.unified],
            }, ensure_ascii=False) + "\n")


def read_metadata(path: Path) -> tuple[list[EmojiRecord], dict[str, str]]:
    """What write_metadata wrote: (records in file order, unified -> split)."""
    records, split = [], {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        e = json.loads(line)
        records.append(EmojiRecord(e["unified"], e["name"], tuple(e["short_names"]), e["category"], e["subcategory"],
                                   e["index"], ""))
        split[e["unified"]] = e["split"]
    return records, split


def _write_attribution(out: Path, roots: dict[str, Path], size: int, n: int, n_sub: int) -> None:
    lines = [
        "# Emoji data: sources, licences, attribution",
        "",
        f"{n} emoji in {n_sub} subcategories, {size} px, drawn by three vendors, rebuilt by",
        "`python -m oclear_ext.data.emoji` from these npm packages (images resized; openmoji rasterised from SVG):",
        "",
        "| part | npm package | licence | attribution |",
        "|---|---|---|---|",
    ]
    for key in ("meta", *VENDORS):
        lic, who, url = LICENSES[key]
        part = "names, categories, keywords" if key == "meta" else f"{key} images"
        lines.append(f"| {part} | `{NPM_PACKAGES[key]}` | {lic} | {who}; licence: {url} |")
    lines += [
        "",
        "The openmoji images are adapted (rasterised, resized) from OpenMoji and are shared under CC-BY-SA-4.0.",
        "Apple and Facebook images are not included (not freely licensed).",
        "Licence texts: LICENSE-emoji-datasource.txt (MIT), LICENSE-openmoji.txt (CC-BY-SA-4.0),",
        "LICENSE-Apache-2.0.txt (google images); CC-BY-4.0 (twitter images): https://creativecommons.org/licenses/by/4.0/legalcode",
        "",
    ]
    (out / "ATTRIBUTION.md").write_text("\n".join(lines), encoding="utf-8")
    shutil.copyfile(roots["meta"] / "LICENSE", out / "LICENSE-emoji-datasource.txt")
    shutil.copyfile(roots["openmoji"] / "LICENSE.txt", out / "LICENSE-openmoji.txt")
    apache = Path("/usr/share/common-licenses/Apache-2.0")
    if apache.is_file():
        shutil.copyfile(apache, out / "LICENSE-Apache-2.0.txt")


def build(out: str | Path, size: int = 64, packages: str | Path | None = None) -> Path:
    """Builds the full emoji set as a manifest folder; returns the path of manifest.jsonl.

    out/images/<vendor>/<unified>.png, out/emoji.jsonl (metadata + split), and three manifests:
    manifest.jsonl (every class; twitter and openmoji as queries, google + text as documents),
    train.jsonl (the same for training classes) and heldout.jsonl (the evaluation protocol: held-out
    classes, twitter queries, google + text documents).
    """
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        roots = fetch_packages(packages or tmp)
        records = read_records(roots["meta"])
        split = emoji_split(records)
        for vendor in VENDORS:
            (out / "images" / vendor).mkdir(parents=True, exist_ok=True)
            for r in records:
                render(vendor, roots[vendor], r, size).save(out / "images" / vendor / f"{r.unified}.png", optimize=True)
        write_metadata(records, split, out / "emoji.jsonl")
        _write_attribution(out, roots, size, len(records), len({r.subcategory for r in records}))
    rows = lambda subset, query_vendors: _manifest_rows(records, subset, query_vendors, "google",
                                                        lambda v, r: f"images/{v}/{r.unified}.png")
    write_manifest(rows(None, ("twitter", "openmoji")), out / "manifest.jsonl")
    write_manifest(rows({c for c, s in split.items() if s == "train"}, ("twitter", "openmoji")), out / "train.jsonl")
    write_manifest(rows({c for c, s in split.items() if s == "heldout"}, ("twitter",)), out / "heldout.jsonl")
    return out / "manifest.jsonl"


def build_compact(out: str | Path, packages: str | Path | None = None, size: int = BUILTIN_SIZE) -> Path:
    """Builds the compact copy that ships in the package: <vendor>.png atlases + emoji.jsonl + licences,
    and the composed-query data (oclear_ext.data.composed: tone-variant atlases, variants.jsonl, composed.jsonl)."""
    from .composed import build_compact_variants

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        roots = fetch_packages(packages or tmp)
        records = read_records(roots["meta"])
        for vendor in VENDORS:
            save_atlas([render(vendor, roots[vendor], r, size) for r in records], size, out / f"{vendor}.png")
        write_metadata(records, emoji_split(records), out / "emoji.jsonl")
        _write_attribution(out, roots, size, len(records), len({r.subcategory for r in records}))
        build_compact_variants(out, roots, records, size)
    (out / "atlas.json").write_text(json.dumps({"tile": size, "columns": ATLAS_COLUMNS, "count": len(records),
                                                "vendors": list(VENDORS)}) + "\n")
    return out


def save_atlas(tiles: Sequence, size: int, path: Path) -> None:
    """size x size RGBA PIL images -> one PNG, ATLAS_COLUMNS tiles per row, in order."""
    from PIL import Image

    if not tiles:
        raise ValueError(f"emoji build: no images for the atlas {path.name}")
    rows = (len(tiles) + ATLAS_COLUMNS - 1) // ATLAS_COLUMNS
    atlas = Image.new("RGBA", (ATLAS_COLUMNS * size, rows * size), (0, 0, 0, 0))
    for i, tile in enumerate(tiles):
        atlas.paste(tile, ((i % ATLAS_COLUMNS) * size, (i // ATLAS_COLUMNS) * size))
    atlas.save(path, optimize=True)


def read_atlas(path: Path, tile: int, columns: int, count: int) -> np.ndarray:
    """An atlas PNG -> (count, tile, tile, 4) uint8 RGBA, in save_atlas's order."""
    from PIL import Image

    with Image.open(path) as im:
        atlas = np.asarray(im.convert("RGBA"))
    rows = atlas.shape[0] // tile
    tiles = atlas.reshape(rows, tile, columns, tile, 4).transpose(0, 2, 1, 3, 4).reshape(rows * columns, tile, tile, 4)
    return np.ascontiguousarray(tiles[:count])


# ----------------------------------------------------------------------------- the shipped copy


@dataclass
class BuiltinEmoji:
    """The shipped emoji data in memory: records in atlas order, their split, and vendor -> (N, S, S, 4) uint8 RGBA."""

    records: list[EmojiRecord]
    split: dict[str, str]
    images: dict[str, np.ndarray]

    def indices(self, split: str = "all") -> list[int]:
        if split not in ("all", "train", "heldout"):
            raise ValueError(f"BuiltinEmoji: split must be 'all', 'train' or 'heldout', got {split!r}")
        return [i for i, r in enumerate(self.records) if split == "all" or self.split[r.unified] == split]


def builtin_dir() -> Path:
    """Folder of the shipped compact copy (atlases, emoji.jsonl, ATTRIBUTION.md, licences)."""
    return Path(str(resources.files(BUILTIN_PACKAGE) / BUILTIN_FOLDER))


def load_builtin(vendors: Iterable[str] = VENDORS) -> BuiltinEmoji:
    """Loads the shipped 32 px emoji (about 0.1 s): no network, nothing but the installed package."""
    folder = builtin_dir()
    meta = json.loads((folder / "atlas.json").read_text())
    records, split = read_metadata(folder / "emoji.jsonl")
    images = {}
    for vendor in vendors:
        if vendor not in VENDORS:
            raise ValueError(f"load_builtin: vendor must be one of {VENDORS}, got {vendor!r}")
        images[vendor] = read_atlas(folder / f"{vendor}.png", meta["tile"], meta["columns"], meta["count"])
    return BuiltinEmoji(records, split, images)


def _manifest_rows(records, subset, query_vendors, doc_vendor, image_path):
    rows = []
    for r in records:
        if subset is not None and r.unified not in subset:
            continue
        for v in query_vendors:
            rows.append({"image": image_path(v, r), "text": None, "label": r.unified, "role": "query",
                         "id": f"{r.unified}/{v}", "category": r.subcategory})
        rows.append({"image": image_path(doc_vendor, r), "text": r.text, "label": r.unified, "role": "doc",
                     "id": f"{r.unified}/{doc_vendor}", "category": r.subcategory})
    return rows


def builtin_manifest(out: str | Path, split: str = "heldout", query_vendors: Sequence[str] = ("twitter",),
                     doc_vendor: str = "google") -> Path:
    """Materialises the shipped emoji as an ordinary manifest folder (PNG files + manifest.jsonl).

    Defaults give the evaluation protocol: held-out classes, twitter queries, google image + text docs.
    For training, e.g. split="train", query_vendors=("twitter", "openmoji"). The `category` field is the
    emoji's subcategory (99 of them), for category-level metrics. Returns the manifest path.
    """
    from PIL import Image

    for v in (*query_vendors, doc_vendor):
        if v not in VENDORS:
            raise ValueError(f"builtin_manifest: vendor must be one of {VENDORS}, got {v!r}")
    if doc_vendor in query_vendors:
        raise ValueError(f"builtin_manifest: doc_vendor {doc_vendor!r} is also a query vendor (queries would find themselves)")
    data = load_builtin(sorted({*query_vendors, doc_vendor}))
    out = Path(out)
    keep = set(data.indices(split))
    records = [r for i, r in enumerate(data.records) if i in keep]
    for v in (*query_vendors, doc_vendor):
        (out / "images" / v).mkdir(parents=True, exist_ok=True)
        for i in sorted(keep):
            path = out / "images" / v / f"{data.records[i].unified}.png"
            if not path.is_file():
                Image.fromarray(data.images[v][i]).save(path)
    rows = _manifest_rows(records, None, query_vendors, doc_vendor, lambda v, r: f"images/{v}/{r.unified}.png")
    return write_manifest(rows, out / "manifest.jsonl")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m oclear_ext.data.emoji", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the full emoji set as a manifest folder (needs npm and cairosvg)")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--size", type=int, default=64, help="image size in pixels (default 64)")
    b.add_argument("--packages", help="folder to keep the npm packages in (default: a temporary folder)")
    c = sub.add_parser("compact", help="rebuild the compact 32 px copy that ships in the package")
    c.add_argument("--out", required=True)
    c.add_argument("--packages")
    m = sub.add_parser("manifest", help="write the shipped copy as a manifest folder (no network)")
    m.add_argument("--out", required=True)
    m.add_argument("--split", default="heldout", choices=("all", "train", "heldout"))
    m.add_argument("--query-vendors", default="twitter", help="comma-separated, default twitter")
    m.add_argument("--doc-vendor", default="google")
    args = parser.parse_args(argv)
    if args.command == "build":
        print(build(args.out, size=args.size, packages=args.packages))
    elif args.command == "compact":
        print(build_compact(args.out, packages=args.packages))
    else:
        print(builtin_manifest(args.out, args.split, tuple(args.query_vendors.split(",")), args.doc_vendor))


if __name__ == "__main__":
    main()
