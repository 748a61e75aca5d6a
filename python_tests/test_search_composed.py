"""Composed queries through search: the Python API, oclear-search --modifier, oclear-serve's `modifier` field,
oclear-eval on a manifest with modifiers; models without a composer refuse a modifier with a clear error."""

from __future__ import annotations

import json

import pytest
from cli_helpers import assert_cli_error
from fastapi.testclient import TestClient
from search_fixtures import built_index, trained_run
from train_data import planted_composed_manifest, tiny_config

from oclear_ext.data import load_manifest
from oclear_ext.eval import embed_manifest
from oclear_ext.eval.embedders import PixelEmbedding
from oclear_ext.eval.cli import main as eval_main
from oclear_ext.search import CatalogIndex, load_model
from oclear_ext.search.cli import main_search
from oclear_ext.search.server import create_app, load_service
from oclear_ext.train import train


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    """(run folder, planted composed manifest, its index): an adaptive composed model, 80 steps."""
    folder = tmp_path_factory.mktemp("search-composed")
    manifest = planted_composed_manifest(folder / "data")
    config = tiny_config(manifest, folder / "run", batch_size=12, log_every=10, max_steps=80, composed_queries=True)
    train(config)
    return folder / "run", manifest, built_index(folder / "run", manifest, folder / "index")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A run trained without composed queries and its index (the search tests' planted colours)."""
    folder = tmp_path_factory.mktemp("search-plain")
    run_dir, manifest = trained_run(folder)
    return run_dir, manifest, built_index(run_dir, manifest, folder / "index")


def light(manifest, colour: str = "red") -> str:
    return str(manifest.parent / "img" / f"{colour}-1.png")


def test_a_modifier_turns_the_query_towards_its_target(composed):
    run_dir, manifest, index_dir = composed
    index, model = CatalogIndex.load(index_dir), load_model(run_dir)
    images = [light(manifest, c) for c in ("red", "green", "blue")]
    ids, _ = index.search_images(model, images, 1, modifiers=["dark"] * 3)
    assert [index.docs[i]["label"] for i in ids[:, 0]] == ["dark red", "dark green", "dark blue"]
    plain_ids, _ = index.search_images(model, images, 1)
    assert [index.docs[i]["label"] for i in plain_ids[:, 0]] == ["red", "green", "blue"]
    mixed, _ = index.search_images(model, images, 1, modifiers=["dark", None, "dark"])
    assert [index.docs[i]["label"] for i in mixed[:, 0]] == ["dark red", "green", "dark blue"]
    with pytest.raises(ValueError, match="3 images but 2 modifiers"):
        index.search_images(model, images, 1, modifiers=["dark", "dark"])


def test_oclear_search_modifier(composed, plain, capsys):
    run_dir, manifest, index_dir = composed
    capsys.readouterr()
    main_search(["--index", str(index_dir), "--k", "1", "--modifier", "dark", light(manifest, "cyan")])
    line = json.loads(capsys.readouterr().out)
    assert line["results"][0]["label"] == "dark cyan"
    _, plain_manifest, plain_index = plain
    assert_cli_error(capsys, main_search, ["--index", str(plain_index), "--modifier", "dark",
                                           str(plain_manifest.parent / "img" / "red-1.png")], "oclear-search",
                     "built without composed_queries")


def test_oclear_serve_modifier_field(composed, plain):
    run_dir, manifest, index_dir = composed
    photo = open(light(manifest, "yellow"), "rb").read()
    with TestClient(create_app(load_service(str(index_dir), max_wait_s=0.0))) as client:
        reply = client.post("/search?k=1", files={"image": ("p.png", photo, "image/png")}, data={"modifier": "dark"})
        assert reply.status_code == 200 and reply.json()["results"][0]["label"] == "dark yellow"
        reply = client.post("/search?k=1", files={"image": ("p.png", photo, "image/png")})
        assert reply.json()["results"][0]["label"] == "yellow"
        reply = client.post("/search?k=1", files={"image": ("p.png", photo, "image/png")}, data={"modifier": "  "})
        assert reply.status_code == 400 and "non-empty text" in reply.json()["error"]
    with TestClient(create_app(load_service(str(plain[2]), max_wait_s=0.0))) as client:
        reply = client.post("/search?k=1", files={"image": ("p.png", photo, "image/png")}, data={"modifier": "dark"})
        assert reply.status_code == 400 and "not trained with composed queries" in reply.json()["error"]


def test_oclear_eval_reads_modifier_queries(composed, plain, tmp_path, capsys):
    run_dir, manifest, _ = composed
    eval_main(["--manifest", str(manifest), "--checkpoint", str(run_dir), "--out", str(tmp_path / "eval")])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["instance"]["queries"] == 36 and metrics["instance"]["R@1"] >= 0.9
    assert (tmp_path / "eval" / "grid.png").is_file()
    # An image-only embedder cannot answer composed queries: refused before embedding anything.
    with pytest.raises(ValueError, match="queries with a modifier text, but PixelEmbedding.embed_queries takes no"):
        embed_manifest(load_manifest(manifest), PixelEmbedding())
    assert_cli_error(capsys, eval_main, ["--manifest", str(manifest), "--out", str(tmp_path / "eval-pixels")],
                     "oclear-eval", "takes no modifiers")
    assert_cli_error(capsys, eval_main, ["--manifest", str(manifest), "--checkpoint", str(plain[0]), "--out",
                                         str(tmp_path / "eval-plain")], "oclear-eval", "built without composed_queries")
