"""The manifest format (docs/design.md#data) and its validating loader.

A manifest is a JSON Lines file, one item per line:

    {"image": "imgs/a.png", "text": "red mug" | null, "label": "<class id>", "role": "query" | "doc",
     "id": "optional unique id", "category": "optional category", "weight": optional positive sampling weight,
     "modifier": "optional text on a query: what to change" | null}

A query with a modifier is a composed query (reference image + modifier text -> the target class, `label`):
"+ medium-dark skin tone", "the woman's version". Documents carry no modifier. Manifests without the key
are unchanged.

Image paths are relative to the manifest's folder (absolute paths are kept). Blank lines are allowed.
The loader checks every line and raises one ManifestError that lists every bad line with its line
number, so a 10^6-line catalogue is fixed in one pass instead of failing on line 7 and then line 9.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

ROLES = ("query", "doc")
REQUIRED_KEYS = ("image", "text", "label", "role")
OPTIONAL_KEYS = ("id", "category", "weight", "modifier")
MAX_LISTED_ERRORS = 50

ImageCheck = Literal["exists", "header", "none"]


class ManifestError(ValueError):
    """Raised with every bad line of a manifest; `.errors` holds (line_number, message) pairs."""

    def __init__(self, path: str | os.PathLike, errors: list[tuple[int, str]]):
        self.path = str(path)
        self.errors = errors
        shown = "\n".join(f"  line {n}: {msg}" for n, msg in errors[:MAX_LISTED_ERRORS])
        more = f"\n  ... and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
        super().__init__(f"manifest {self.path}: {len(errors)} bad line(s)\n{shown}{more}")


@dataclass(frozen=True)
class ManifestItem:
    """One validated manifest line. `image` is an absolute path; `line` is the 1-based line number."""

    image: str
    text: str | None
    label: str
    role: str
    id: str | None = None
    category: str | None = None
    weight: float = 1.0
    modifier: str | None = None
    line: int = 0

    def to_json(self, root: str | os.PathLike | None = None) -> dict:
        """The manifest line for this item; with `root`, the image path is written relative to it."""
        image = os.path.relpath(self.image, root) if root is not None else self.image
        row: dict = {"image": Path(image).as_posix(), "text": self.text, "label": self.label, "role": self.role}
        if self.id is not None:
            row["id"] = self.id
        if self.category is not None:
            row["category"] = self.category
        if self.weight != 1.0:
            row["weight"] = self.weight
        if self.modifier is not None:
            row["modifier"] = self.modifier
        return row


@dataclass
class ClassIndex:
    """Class labels (strings) <-> contiguous ids 0..C-1, in sorted label order so that it is reproducible."""

    labels: list[str]
    _ids: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._ids = {label: i for i, label in enumerate(self.labels)}
        if len(self._ids) != len(self.labels):
            raise ValueError("ClassIndex: labels must be unique")

    @classmethod
    def from_labels(cls, labels: Iterable[str]) -> "ClassIndex":
        return cls(sorted(set(labels)))

    def __len__(self) -> int:
        return len(self.labels)

    def id(self, label: str) -> int:
        try:
            return self._ids[label]
        except KeyError:
            raise KeyError(f"ClassIndex: label {label!r} is not one of the {len(self.labels)} known classes") from None

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps({"num_classes": len(self.labels), "labels": self.labels}, indent=0) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ClassIndex":
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or not isinstance(data.get("labels"), list):
            raise ValueError(f"ClassIndex.load: {path} is not a class index (expected {{'labels': [...]}})")
        return cls([str(x) for x in data["labels"]])


@dataclass
class Manifest:
    """Validated items of one manifest file, with the folder its relative paths resolve against."""

    path: str
    items: list[ManifestItem]
    class_index: ClassIndex

    def __len__(self) -> int:
        return len(self.items)

    def indices(self, role: str) -> list[int]:
        """Positions of the items with this role, in file order."""
        if role not in ROLES:
            raise ValueError(f"Manifest.indices: role must be one of {ROLES}, got {role!r}")
        return [i for i, item in enumerate(self.items) if item.role == role]

    def labels(self, role: str | None = None) -> list[str]:
        return [it.label for it in self.items if role is None or it.role == role]


def _check_line(obj: object, root: Path, check_images: ImageCheck) -> tuple[ManifestItem | None, list[str]]:
    if not isinstance(obj, dict):
        return None, [f"expected a JSON object, got {type(obj).__name__}"]
    errors = []
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        errors.append(f"missing key(s) {missing} (required: {list(REQUIRED_KEYS)})")
    unknown = sorted(set(obj) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        errors.append(f"unknown key(s) {unknown} (allowed: {list(REQUIRED_KEYS + OPTIONAL_KEYS)})")

    image = obj.get("image")
    image_path = None
    if "image" in obj:
        if not isinstance(image, str) or not image:
            errors.append(f"'image' must be a non-empty path string, got {image!r}")
        else:
            image_path = os.path.normpath(image if os.path.isabs(image) else str(root / image))
            if check_images != "none" and not os.path.isfile(image_path):
                errors.append(f"image file not found: {image!r} (resolved to {image_path})")
            elif check_images == "header":
                errors.extend(_check_image_header(image_path))
    text = obj.get("text")
    if "text" in obj and text is not None and not isinstance(text, str):
        errors.append(f"'text' must be a string or null, got {type(text).__name__}")
    label = obj.get("label")
    if "label" in obj:
        # Integer labels are accepted and kept as their decimal string: class ids are names, not indices.
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            errors.append(f"'label' must be a string (or integer) class id, got {type(label).__name__}")
        elif str(label).strip() == "":
            errors.append("empty label")
    role = obj.get("role")
    if "role" in obj and role not in ROLES:
        errors.append(f"unknown role {role!r} (expected one of {list(ROLES)})")
    for key in ("id", "category"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            errors.append(f"'{key}' must be a string, got {type(obj[key]).__name__}")
    weight = obj.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        errors.append(f"'weight' must be a finite number > 0, got {weight!r}")
    modifier = obj.get("modifier")
    if modifier is not None:
        if not isinstance(modifier, str) or not modifier.strip():
            errors.append(f"'modifier' must be a non-empty string or null, got {modifier!r}")
        elif role == "doc":
            errors.append("'modifier' is only allowed on queries (role 'query'), this line is a doc")
    if errors:
        return None, errors
    item = ManifestItem(
        image=image_path, text=text, label=str(label), role=role, id=obj.get("id"),
        category=obj.get("category"), weight=float(weight), modifier=modifier,
    )
    return item, []


def _check_image_header(path: str) -> list[str]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:  # reads the header only; decoding happens in the Dataset
            im.size
    except (UnidentifiedImageError, OSError) as e:
        return [f"image file is not a readable image: {path} ({e.__class__.__name__})"]
    return []


def load_manifest(path: str | os.PathLike, check_images: ImageCheck = "exists") -> Manifest:
    """Reads and validates a manifest; raises ManifestError listing every bad line.

    check_images: "exists" (default) checks that each image file exists; "header" also opens it with
    Pillow (slower: one file open per line); "none" skips file checks (for manifests built elsewhere).
    Besides per-line errors it reports duplicate ids and a manifest without any item.
    """
    if check_images not in ("exists", "header", "none"):
        raise ValueError(f"load_manifest: check_images must be 'exists', 'header' or 'none', got {check_images!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_manifest: no manifest file at {path}")
    root = path.resolve().parent
    items: list[ManifestItem] = []
    errors: list[tuple[int, str]] = []
    first_line_of_id: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                errors.append((n, f"invalid JSON ({e.msg} at column {e.colno})"))
                continue
            item, line_errors = _check_line(obj, root, check_images)
            errors.extend((n, msg) for msg in line_errors)
            if item is None:
                continue
            if item.id is not None:
                if item.id in first_line_of_id:
                    errors.append((n, f"duplicate id {item.id!r} (first on line {first_line_of_id[item.id]})"))
                    continue
                first_line_of_id[item.id] = n
            items.append(ManifestItem(**{**item.__dict__, "line": n}))
    if errors:
        raise ManifestError(path, errors)
    if not items:
        raise ManifestError(path, [(0, "the manifest has no items")])
    return Manifest(str(path), items, ClassIndex.from_labels(it.label for it in items))


def write_manifest(items: Iterable[ManifestItem | dict], path: str | os.PathLike) -> Path:
    """Writes items as JSON Lines; ManifestItem image paths are made relative to the manifest's folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = path.resolve().parent
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            row = item.to_json(root) if isinstance(item, ManifestItem) else item
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
