"""oclear-eval: embeddings in, embedding functions plugged in, the built-in emoji baseline, output files."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from cli_helpers import assert_cli_error

from oclear_ext.data import load_manifest
from oclear_ext.eval import EmbeddingFunction, PixelEmbedding, embed_manifest, load_embedder
from oclear_ext.eval.cli import main

N_CLASSES = 12


@pytest.fixture
def manifest(tmp_path):
    """12 classes, one query and one doc each, with solid-colour images."""
    rows = []
    for c in range(N_CLASSES):
        for role in ("query", "doc"):
            Image.new("RGB", (8, 8), (20 * c, 255 - 20 * c, 100)).save(tmp_path / f"{role}{c}.png")
            rows.append({"image": f"{role}{c}.png", "text": f"class {c}" if role == "doc" else None,
                         "label": f"c{c}", "role": role, "id": f"{role}-{c}", "category": "even" if c % 2 == 0 else "odd"})
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def one_hot(index, n=N_CLASSES):
    x = np.zeros((len(index), n), np.float32)
    x[np.arange(len(index)), index] = 1
    return x


def test_embeddings_in_from_npy_and_pt(manifest, tmp_path, capsys):
    docs = one_hot(np.arange(N_CLASSES))
    np.save(tmp_path / "d.npy", docs)
    # Queries 0-5 point at their own class, queries 6-11 at the next class: R@1 = 0.5 by construction.
    target = np.array([c if c < 6 else (c + 1) % N_CLASSES for c in range(N_CLASSES)])
    q = one_hot(target) + 0.5 * one_hot(np.arange(N_CLASSES))  # own class second for queries 6-11
    torch.save(torch.from_numpy(q), tmp_path / "q.pt")
    out = tmp_path / "out"
    main(["--manifest", str(manifest), "--query-emb", str(tmp_path / "q.pt"), "--doc-emb", str(tmp_path / "d.npy"),
          "--out", str(out), "--category-level", "--grid-queries", "4"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["instance"]["R@1"] == pytest.approx(0.5)
    assert metrics["instance"]["R@5"] == pytest.approx(1.0)
    assert metrics["instance"]["mAP@10"] == pytest.approx((6 * 1.0 + 6 * 0.5) / 12)
    # Category level: queries 6-11 land on the next class, whose parity differs, then their own.
    assert metrics["category"]["R@1"] == pytest.approx(0.5)
    rows = [json.loads(l) for l in (out / "per_query.jsonl").read_text().splitlines()]
    assert rows[7]["query"] == "query-7" and rows[7]["top"][0]["doc"] == "doc-8" and rows[7]["first_relevant_rank"] == 2
    assert Image.open(out / "grid.png").size[1] > 4 * 64
    printed = capsys.readouterr().out
    assert "R@1" in printed and "mAP@10" in printed and "0.5000" in printed


def test_embedding_count_must_match_the_manifest(manifest, tmp_path, capsys):
    np.save(tmp_path / "q.npy", one_hot(np.arange(5)))
    np.save(tmp_path / "d.npy", one_hot(np.arange(N_CLASSES)))
    common = ["--manifest", str(manifest), "--out", str(tmp_path / "o")]
    assert_cli_error(capsys, main, [*common, "--query-emb", str(tmp_path / "q.npy"), "--doc-emb", str(tmp_path / "d.npy")],
                     "oclear-eval", "5 query / 12 doc embeddings, but the manifest has 12 query rows")
    assert_cli_error(capsys, main, [*common, "--query-emb", str(tmp_path / "q.npy")], "oclear-eval",
                     "give both --query-emb and --doc-emb")


PLUGIN = '''
import torch

class ColourEmbedder:
    """A model stand-in: mean colour times a weight loaded from the checkpoint."""
    image_size = 8

    def __init__(self, weight):
        self.weight = weight

    def embed_queries(self, images):
        return images.mean(dim=(2, 3)) @ self.weight

    def embed_docs(self, images, texts):
        assert all(isinstance(t, str) for t in texts)
        return images.mean(dim=(2, 3)) @ self.weight


def load(checkpoint=None):
    return ColourEmbedder(torch.load(checkpoint) if checkpoint else torch.eye(3))
'''


def test_an_embedder_factory_plugs_in_with_a_checkpoint(manifest, tmp_path, monkeypatch):
    (tmp_path / "my_model.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save(torch.eye(3) * 2, tmp_path / "ckpt.pt")
    fn = load_embedder("my_model:load", checkpoint=str(tmp_path / "ckpt.pt"))
    assert isinstance(fn, EmbeddingFunction)
    q, d = embed_manifest(load_manifest(manifest), fn, batch_size=5)
    assert q.shape == (N_CLASSES, 3) and d.shape == (N_CLASSES, 3)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(q, d, atol=1e-6)  # same colours on both sides
    main(["--manifest", str(manifest), "--embedder", "my_model:load", "--checkpoint", str(tmp_path / "ckpt.pt"),
          "--out", str(tmp_path / "out"), "--grid-queries", "0"])
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["instance"]["R@1"] == 1.0


def test_embedder_spec_errors():
    with pytest.raises(ValueError, match="expected 'pixels' or 'package.module:factory'"):
        load_embedder("nonsense")
    with pytest.raises(TypeError, match="lacks image_size / embed_queries / embed_docs"):
        load_embedder("builtins:object")


def test_doc_to_doc_retrieval_never_returns_the_query_itself(manifest, tmp_path, capsys):
    # Two identical-looking docs per class: each must find its twin, never itself (which scores the same).
    rows = []
    for c in range(6):
        Image.new("RGB", (8, 8), (40 * c, 255 - 40 * c, 30)).save(tmp_path / f"twin{c}.png")
        rows += [{"image": f"twin{c}.png", "text": "t", "label": f"c{c}", "role": "doc", "id": f"c{c}-{k}"} for k in "ab"]
    path = tmp_path / "twins.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    main(["--manifest", str(path), "--query-role", "doc", "--out", str(tmp_path / "o"), "--grid-queries", "2"])
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["instance"]["R@1"] == 1.0 and metrics["instance"]["mAP@10"] == 1.0
    for line in (tmp_path / "o" / "per_query.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["query"] not in [t["doc"] for t in row["top"]]
        assert row["top"][0]["doc"] != row["query"] and row["top"][0]["label"] == row["label"]
        assert row["n_relevant"] == 1
    # One doc per class: with the self-match excluded nothing is relevant, and evaluation says so
    # instead of scoring self-matches as hits.
    assert_cli_error(capsys, main, ["--manifest", str(manifest), "--query-role", "doc", "--out", str(tmp_path / "o2"),
                                    "--grid-queries", "0"], "oclear-eval", "no query has a relevant doc")


def test_builtin_emoji_baseline_runs_and_beats_chance(tmp_path, capsys):
    out = tmp_path / "out"
    main(["--out", str(out), "--category-level"])
    m = json.loads((out / "metrics.json").read_text())
    inst = m["instance"]
    assert m["queries"] == m["docs"] == inst["queries"] == 579 and m["classes"] == 579
    assert inst["R@1"] <= inst["R@5"] <= inst["R@10"] <= 1.0
    assert inst["R@1"] > 20 / 579  # pixels carry real signal: 20x chance
    assert m["category"]["R@1"] >= inst["R@1"]  # same emoji implies same subcategory
    assert len((out / "per_query.jsonl").read_text().splitlines()) == 579
    assert "instance" in capsys.readouterr().out


def test_pixel_embedding_is_centred_and_normalised():
    fn = PixelEmbedding(grid=4, image_size=8)
    e = fn.embed_queries(torch.rand(3, 3, 8, 8))
    assert e.shape == (3, 48)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(e.mean(dim=1), torch.zeros(3), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="need 1 <= grid <= image_size"):
        PixelEmbedding(grid=16, image_size=8)
