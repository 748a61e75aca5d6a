"""Catalogue search API: load_model, CatalogIndex (flat / hnsw / ivfpq two-tier), persistence, add, model pairing."""

from __future__ import annotations

import contextlib
import json
import shutil

import numpy as np
import pytest
import torch
from search_fixtures import trained_run

from oclear_ext.search import CatalogIndex, CatalogIndexError, IndexParams, ModelIdentity, load_model
from oclear_ext.train.checkpoint import latest_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory.mktemp("search-run"))


def clustered(n: int, dim: int = 32, clusters: int = 20, noise: float = 0.35, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] / np.sqrt(dim) + rng.normal(scale=noise / np.sqrt(dim), size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(q: np.ndarray, d: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q @ d.T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(s, ids, 1)


def meta(n: int, start: int = 0) -> list[dict]:
    return [{"id": f"doc-{i}", "label": f"c{i % 7}", "text": f"item {i}", "image": None, "category": None}
            for i in range(start, start + n)]


# ---- load_model -------------------------------------------------------------------------------------------------
def test_load_model_round_trip_from_a_run_folder_and_a_checkpoint(run):
    run_dir, _ = run
    model = load_model(run_dir)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    state = torch.load(latest_checkpoint(run_dir) / "state.pt", weights_only=True)["model"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    images = torch.rand(4, 3, 16, 16)
    by_checkpoint = load_model(latest_checkpoint(run_dir))
    by_checkpoints_folder = load_model(run_dir / "checkpoints")
    with torch.no_grad():
        expected = model.embed_queries(images)
        assert torch.equal(by_checkpoint.embed_queries(images), expected)
        assert torch.equal(by_checkpoints_folder.embed_queries(images), expected)
        assert torch.equal(model.embed_docs(images, ["a red square", None, "blue", "x"]),
                           by_checkpoint.embed_docs(images, ["a red square", None, "blue", "x"]))
    identity = model.oclear_identity
    assert identity == by_checkpoint.oclear_identity
    assert identity.dim == 16 and identity.run_dir == str(run_dir.resolve())
    assert identity.checkpoint == str(latest_checkpoint(run_dir).resolve())


def test_a_checkpoint_copied_without_its_run_folder_loads_from_its_saved_config(run, tmp_path):
    run_dir, _ = run
    copy = tmp_path / "step"
    shutil.copytree(latest_checkpoint(run_dir), copy)
    alone = load_model(copy)
    assert alone.oclear_identity.run_dir is None
    assert alone.oclear_identity.weights_hash == load_model(run_dir).oclear_identity.weights_hash


def test_load_model_errors_name_the_problem(run, tmp_path):
    run_dir, _ = run
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        load_model(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_model(broken)
    config = json.loads((run_dir / "config.json").read_text())
    config["dim"] = 32
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not fit the model of its config"):
        load_model(broken)
    del config["dim"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lacks the model settings \['dim'\]"):
        load_model(broken)


class NotATensor:
    pass


def test_load_model_reads_weights_only_and_refuses_pickled_code(run, tmp_path):
    run_dir, _ = run
    evil = tmp_path / "evil"
    shutil.copytree(run_dir, evil)
    step = latest_checkpoint(evil)
    state = torch.load(step / "state.pt", weights_only=True)
    state["extra"] = NotATensor()  # unpickling it would run arbitrary code with weights_only=False
    torch.save(state, step / "state.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_model(evil)


# ---- CatalogIndex -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_flat_and_hnsw_find_the_exact_neighbours(kind):
    docs, queries = clustered(600), clustered(40, seed=1)
    index = CatalogIndex.build(docs, meta(len(docs)), kind=kind, params=IndexParams(ef_search=200))
    ids, scores = index.search(queries, 10)
    exact_ids, exact_scores = brute_force(queries, docs, 10)
    if kind == "flat":
        np.testing.assert_array_equal(ids, exact_ids)
    else:  # HNSW is approximate; at this size and ef_search it finds (almost) every neighbour
        found = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ids, exact_ids)])
        assert found >= 0.98
    np.testing.assert_allclose(scores[:, 0], exact_scores[:, 0], atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    assert index.results(ids[:1], scores[:1])[0][0]["id"] == f"doc-{ids[0, 0]}"


def test_two_tier_equals_exact_search_when_the_first_stage_fetches_everything():
    docs, queries = clustered(2000, dim=32), clustered(50, dim=32, seed=1)
    params = IndexParams(nlist=8, nprobe=8, pq_m=8, rerank_factor=200)  # k * 200 >= 2000 docs, every list visited
    with pytest.warns(UserWarning, match="PQ codebooks on 2000 docs"):
        index = CatalogIndex.build(docs, meta(len(docs)), kind="ivfpq", params=params)
    ids, scores = index.search(queries, 10)
    # Re-ranking is exact over the stored float16 vectors: the same as brute force over those vectors ...
    f16_ids, f16_scores = brute_force(queries, docs.astype(np.float16).astype(np.float32), 10)
    np.testing.assert_array_equal(ids, f16_ids)
    np.testing.assert_allclose(scores, f16_scores, rtol=0, atol=1e-5)
    # ... and within float16 rounding of the float32 flat index.
    flat_ids, flat_scores = CatalogIndex.build(docs, meta(len(docs))).search(queries, 10)
    np.testing.assert_allclose(scores, flat_scores, atol=2e-3)
    assert np.mean(ids == flat_ids) > 0.95


def test_two_tier_with_a_small_first_stage_reranks_to_good_recall():
    docs, queries = clustered(4000, dim=32), clustered(100, dim=32, seed=1)
    with pytest.warns(UserWarning, match="PQ codebooks on 4000 docs"):
        index = CatalogIndex.build(docs, meta(len(docs)), kind="ivfpq",
                                   params=IndexParams(nlist=16, nprobe=4, pq_m=8, rerank_factor=10, opq=True))
    ids, _ = index.search(queries, 10)
    exact_ids, _ = brute_force(queries, docs, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ids, exact_ids)])
    assert recall > 0.8
    narrow = index.search(queries, 10)
    index.set_search_params(rerank_factor=1)  # no over-fetch: recall can only drop
    recall_1 = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(index.search(queries, 10)[0], exact_ids)])
    assert recall_1 <= recall
    np.testing.assert_array_equal(narrow[0], ids)


def test_k_beyond_the_catalogue_pads_with_minus_one():
    index = CatalogIndex.build(clustered(5), meta(5))
    ids, scores = index.search(clustered(2, seed=3), 8)
    assert ids.shape == (2, 8) and (ids[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()
    assert sorted(ids[0, :5]) == [0, 1, 2, 3, 4]
    assert [len(r) for r in index.results(ids, scores)] == [5, 5]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_save_load_and_add_give_the_same_results(kind, tmp_path):
    docs, more, queries = clustered(3000), clustered(500, seed=2), clustered(30, seed=1)
    params = IndexParams(nlist=16, nprobe=16, pq_m=8)
    with pytest.warns(UserWarning, match="PQ codebooks") if kind == "ivfpq" else contextlib.nullcontext():
        index = CatalogIndex.build(docs, meta(len(docs)), kind=kind, params=params)
    before = index.search(queries, 10)
    index.save(tmp_path / "idx")
    loaded = CatalogIndex.load(tmp_path / "idx")
    assert (loaded.kind, len(loaded), loaded.dim, loaded.docs) == (kind, 3000, 32, index.docs)
    if kind == "ivfpq":
        assert isinstance(loaded.vectors, np.memmap)  # the re-rank vectors stay on disk
        assert loaded.params.nlist == 16 and loaded.memory_bytes()["rerank_bytes_per_doc"] == 64
    for a, b in zip(before, loaded.search(queries, 10)):
        np.testing.assert_array_equal(a, b)
    # add to the loaded index, save, load: the same as adding to the built one
    index.add(more, meta(len(more), start=3000))
    loaded.add(more, meta(len(more), start=3000))
    loaded.save(tmp_path / "idx")
    reloaded = CatalogIndex.load(tmp_path / "idx")
    assert len(reloaded) == 3500 and reloaded.docs[-1]["id"] == "doc-3499" and reloaded.position("doc-3499") == 3499
    if kind == "hnsw":  # faiss inserts into the graph from several threads: the two graphs differ slightly
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(index.search(queries, 10)[0],
                                                                      reloaded.search(queries, 10)[0])])
        assert overlap >= 0.95
    else:
        for a, b in zip(index.search(queries, 10), reloaded.search(queries, 10)):
            np.testing.assert_array_equal(a, b)
    if kind == "flat":  # adding equals building over everything
        whole = CatalogIndex.build(np.concatenate([docs, more]), meta(3500))
        np.testing.assert_array_equal(whole.search(queries, 10)[0], reloaded.search(queries, 10)[0])


def test_a_folder_whose_save_was_interrupted_is_refused(tmp_path):
    index = CatalogIndex.build(clustered(50), meta(50))
    index.save(tmp_path / "idx")
    with pytest.raises(CatalogIndexError, match="no catalogue index at"):
        CatalogIndex.load(tmp_path / "elsewhere")
    docs = tmp_path / "idx" / "docs.jsonl"
    docs.write_text(docs.read_text()[:-200])
    with pytest.raises(CatalogIndexError, match="docs.jsonl is .* bytes, index.json records .* interrupted save"):
        CatalogIndex.load(tmp_path / "idx")
    (tmp_path / "idx" / "index.json").write_text("{")
    with pytest.raises(CatalogIndexError, match="index.json is not valid JSON"):
        CatalogIndex.load(tmp_path / "idx")
    assert not list((tmp_path / "idx").glob("*.tmp"))


def test_bad_inputs_are_refused_with_what_was_wrong():
    docs = clustered(100)
    with pytest.raises(CatalogIndexError, match="kind must be one of"):
        CatalogIndex.build(docs, meta(100), kind="lsh")
    with pytest.raises(CatalogIndexError, match="99 metadata rows for 100 embeddings"):
        CatalogIndex.build(docs, meta(99))
    with pytest.raises(CatalogIndexError, match="must be 2-D"):
        CatalogIndex.build(docs[0], meta(1))
    bad = docs.copy()
    bad[3, 3] = np.nan
    with pytest.raises(CatalogIndexError, match="NaN or inf"):
        CatalogIndex.build(bad, meta(100))
    with pytest.raises(CatalogIndexError, match="unknown keys \\['title'\\]"):
        CatalogIndex.build(docs[:1], [{"id": "a", "title": "x"}])
    with pytest.raises(CatalogIndexError, match="needs at least 9984 docs to train, got 100"):
        CatalogIndex.build(docs, meta(100), kind="ivfpq", params=IndexParams(nlist=256))
    with pytest.raises(CatalogIndexError, match="pq_m = 5 must divide the dimension 32"):
        CatalogIndex.build(docs, meta(100), kind="ivfpq", params=IndexParams(pq_m=5))
    with pytest.raises(CatalogIndexError, match="nprobe must be a positive integer"):
        IndexParams(nprobe=0)
    index = CatalogIndex.build(docs, meta(100))
    with pytest.raises(CatalogIndexError, match="query embeddings have dimension 8, the index has dimension 32"):
        index.search(np.zeros((1, 8), np.float32), 3)
    with pytest.raises(CatalogIndexError, match="k must be a positive integer"):
        index.search(docs[:1], 0)
    with pytest.raises(CatalogIndexError, match="doc embeddings have dimension 16"):
        index.add(np.zeros((1, 16), np.float32), meta(1, start=100))
    with pytest.raises(CatalogIndexError, match="already in the index or repeated, e.g. \\['doc-5'\\]"):
        index.add(docs[:1], meta(1, start=5))
    with pytest.raises(CatalogIndexError, match="only \\['ef_search', 'nprobe', 'rerank_factor'\\] can change"):
        index.set_search_params(nlist=4)


def test_an_index_refuses_a_model_other_than_its_own(run, tmp_path):
    run_dir, manifest = run
    model = load_model(run_dir)
    index = CatalogIndex.build(clustered(20, dim=16), meta(20), model=model)
    index.save(tmp_path / "idx")
    assert CatalogIndex.load(tmp_path / "idx", model=model).model == model.oclear_identity
    own = model.oclear_identity
    other_weights = ModelIdentity(own.run_dir, "/elsewhere/step-00000009", own.config_hash, "0" * 16, 16)
    with pytest.raises(ValueError, match="its weights differ"):
        CatalogIndex.load(tmp_path / "idx", model=other_weights)
    with pytest.raises(ValueError, match="its model configuration differs"):
        index.check_model(ModelIdentity(None, "/x", "1" * 16, own.weights_hash, 16))
    with pytest.raises(ValueError, match="its embedding dimension is 8, not 16"):
        index.check_model(ModelIdentity(None, "/x", own.config_hash, own.weights_hash, 8))
    images = [str(manifest.parent / "img" / "red-1.png"), str(manifest.parent / "img" / "blue-2.png")]
    with pytest.raises(ValueError, match="its weights differ"):
        index.search_images(_with_identity(load_model(run_dir), other_weights), images, 3)


def _with_identity(model, identity):
    model.oclear_identity = identity
    return model


def test_search_images_takes_paths_pil_images_bytes_or_a_tensor(run):
    from PIL import Image

    from oclear_ext.data.dataset import decode_image
    from oclear_ext.search import ImageReadError, embed_query_images

    run_dir, manifest = run
    model = load_model(run_dir)
    paths = [str(manifest.parent / "img" / f"{c}-1.png") for c in ("red", "green", "blue")]
    index = CatalogIndex.build(clustered(30, dim=16), meta(30), model=model)
    expected = index.search_images(model, paths, 5)
    tensor = torch.stack([decode_image(p, 16) for p in paths])
    pil = [Image.open(p) for p in paths]
    raw = [open(p, "rb").read() for p in paths]
    for images in (tensor, pil, raw):
        for a, b in zip(expected, index.search_images(model, images, 5)):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(embed_query_images(model, paths), axis=1), 1, rtol=1e-5)
    with pytest.raises(ImageReadError, match="cannot decode image .*not a recognised image format"):
        embed_query_images(model, [b"plain text"])
    with pytest.raises(ImageReadError, match="cannot read image /no/such.png"):
        embed_query_images(model, ["/no/such.png"])
    with pytest.raises(ValueError, match="a sequence"):
        embed_query_images(model, paths[0])
