"""ManifestDataset: shapes, dtypes, transparency, roles, contiguous labels, deterministic augmentation."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from oclear_ext.data import ClassIndex, load_manifest
from oclear_ext.data.dataset import ManifestDataset, collate, decode_image, random_flip_and_shift


@pytest.fixture
def manifest(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        arr = rng.integers(0, 256, size=(10 + i, 12, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "text": f"item {i}" if i % 2 else None, "label": f"c{i // 2}",
                     "role": "doc" if i % 2 else "query"})
    rows[2]["modifier"] = "in green"  # a composed query
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_items_have_the_documented_shapes_and_types(manifest):
    ds = ManifestDataset(manifest, image_size=(8, 16))
    assert len(ds) == 6
    item = ds[1]
    assert item["image"].shape == (3, 8, 16) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["text"] == "item 1" and ds[0]["text"] is None
    assert item["label"].dtype == torch.int64 and item["label"].item() == 0
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    batch = collate([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 8, 16)
    assert batch["text"] == [None, "item 1", None, "item 3"]
    assert batch["label"].tolist() == [0, 0, 1, 1] and batch["index"].tolist() == [0, 1, 2, 3]
    assert batch["modifier"] == [None, None, "in green", None]


def test_no_resize_keeps_the_file_pixels(manifest, tmp_path):
    ds = ManifestDataset(manifest, image_size=None)
    expected = np.asarray(Image.open(tmp_path / "3.png"), dtype=np.float32) / 255
    torch.testing.assert_close(ds[3]["image"], torch.from_numpy(expected).permute(2, 0, 1))


def test_roles_filter_keeps_manifest_positions(manifest):
    docs = ManifestDataset(manifest, image_size=8, roles=("doc",))
    assert len(docs) == 3 and [docs[i]["index"] for i in range(3)] == [1, 3, 5]
    assert all(docs[i]["role"] == "doc" for i in range(3))


def test_transparent_pixels_are_composited_over_the_background(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:2, :, :] = (255, 0, 0, 255)  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    img = decode_image(str(tmp_path / "t.png"), None, background=(0, 0, 255))
    assert img[:, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert img[:, 3, 0].tolist() == [0.0, 0.0, 1.0]


def test_loading_twice_gives_identical_tensors(manifest):
    a, b = ManifestDataset(manifest, image_size=8), ManifestDataset(manifest, image_size=8)
    for i in range(len(a)):
        assert torch.equal(a[i]["image"], b[i]["image"])


def test_augmentation_is_deterministic_per_seed_epoch_and_index(manifest):
    aug = random_flip_and_shift(2)
    a = ManifestDataset(manifest, image_size=8, augment=aug, seed=1)
    b = ManifestDataset(manifest, image_size=8, augment=aug, seed=1)
    # Order of access (which worker, which batch) must not matter.
    first = [a[i]["image"] for i in range(6)]
    assert all(torch.equal(first[i], b[i]["image"]) for i in reversed(range(6)))
    a.set_epoch(1)
    changed = [not torch.equal(first[i], a[i]["image"]) for i in range(6)]
    assert any(changed)  # a new epoch draws new augmentations
    c = ManifestDataset(manifest, image_size=8, augment=aug, seed=2)
    assert any(not torch.equal(first[i], c[i]["image"]) for i in range(6))


def test_a_given_class_index_is_used_and_checked(manifest, tmp_path):
    idx = ClassIndex(["c2", "c1", "c0", "extra"])
    ds = ManifestDataset(manifest, image_size=8, class_index=idx)
    assert ds.labels.tolist() == [2, 2, 1, 1, 0, 0]
    with pytest.raises(ValueError, match=r"label\(s\) not in the given class_index"):
        ManifestDataset(manifest, image_size=8, class_index=ClassIndex(["c0"]))


def test_bad_arguments_raise_clear_errors(manifest):
    with pytest.raises(ValueError, match="roles must be among"):
        ManifestDataset(manifest, roles=("queries",))
    with pytest.raises(ValueError, match="image_size must be positive"):
        ManifestDataset(manifest, image_size=0)
    only_queries = load_manifest(manifest)
    only_queries.items = [it for it in only_queries.items if it.role == "query"]
    with pytest.raises(ValueError, match=r"no items with roles \['doc'\]"):
        ManifestDataset(only_queries, roles=("doc",))


def test_dataloader_with_workers_matches_direct_access(manifest):
    ds = ManifestDataset(manifest, image_size=8, augment=random_flip_and_shift(1))
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate)
    batches = list(loader)
    direct = torch.stack([ds[i]["image"] for i in range(len(ds))])
    assert torch.equal(torch.cat([b["image"] for b in batches]), direct)
