"""oclear-serve: every endpoint, every bad upload, concurrent requests, and the micro-batcher."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from search_fixtures import built_index, trained_run

from oclear_ext.search import CatalogIndex, load_model
from oclear_ext.search.batching import MicroBatcher
from oclear_ext.search.server import SearchService, create_app, load_service


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("search-service")
    run_dir, manifest = trained_run(folder)
    index_dir = built_index(run_dir, manifest, folder / "index")
    service = load_service(str(index_dir), max_k=20, max_upload_bytes=64 << 10, max_wait_s=0.005)
    with TestClient(create_app(service)) as client:
        yield client, service, manifest


def png(path: Path) -> bytes:
    return path.read_bytes()


def upload(client, data: bytes, k: str | None = "3", name: str = "photo.png"):
    url = "/search" + (f"?k={k}" if k is not None else "")
    return client.post(url, files={"image": (name, data, "image/png")})


def test_health_page_and_search(served):
    client, service, manifest = served
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["docs"] == 8 and health["dim"] == 16 and health["kind"] == "flat"
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text and "/search?k=" in page.text
    answer = upload(client, png(manifest.parent / "img" / "red-1.png")).json()["results"]
    assert len(answer) == 3
    assert [r["score"] for r in answer] == sorted((r["score"] for r in answer), reverse=True)
    assert {"id", "score", "label", "text", "image", "category", "image_url"} <= set(answer[0])
    # the same as the Python API on the same photo
    ids, scores = service.index.search_images(service.model, [str(manifest.parent / "img" / "red-1.png")], 3)
    assert [r["id"] for r in answer] == [service.index.docs[i]["id"] for i in ids[0]]
    np.testing.assert_allclose([r["score"] for r in answer], scores[0], rtol=1e-5)
    assert len(upload(client, png(manifest.parent / "img" / "red-1.png"), k=None).json()["results"]) == 8  # default 10, 8 docs


def test_doc_images_are_served(served):
    client, service, _ = served
    doc = service.index.docs[0]
    reply = client.get(f"/docs/{doc['id']}/image")
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"
    assert reply.content == Path(doc["image"]).read_bytes()
    missing = client.get("/docs/no-such-doc/image")
    assert missing.status_code == 404 and missing.json() == {"error": "no doc with id 'no-such-doc' in the index"}


def test_a_doc_id_with_slashes_round_trips_through_image_url(tmp_path):
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "a.png")
    index = CatalogIndex.build(np.eye(2, 4, dtype=np.float32), [{"id": "1F600/google", "image": str(tmp_path / "a.png")},
                                                               {"id": "b", "image": str(tmp_path / "gone.png")}])
    service = SearchService(index, _StubModel())
    with TestClient(create_app(service)) as client:
        results = client.post("/search/embedding", json={"embedding": [1, 0, 0, 0], "k": 2}).json()["results"]
        assert results[0]["image_url"] == "/docs/1F600%2Fgoogle/image"
        assert client.get(results[0]["image_url"]).content == (tmp_path / "a.png").read_bytes()
        gone = client.get(results[1]["image_url"])
        assert gone.status_code == 404 and "the image file of doc 'b' is missing" in gone.json()["error"]


class _StubModel:
    image_size = 4


@pytest.mark.parametrize("case, status, message", [
    ("not an image", 400, "not a readable image: cannot decode image 'photo.png': not a recognised image format"),
    ("empty", 400, "the uploaded image is empty"),
    ("too large", 413, "over the limit of 65536"),
    ("truncated", 400, "not a readable image"),
    ("k zero", 400, "k must be an integer in [1, 20], got '0'"),
    ("k too big", 400, "k must be an integer in [1, 20], got '21'"),
    ("k not a number", 400, "k must be an integer in [1, 20], got 'ten'"),
    ("no image field", 400, "the upload has no `image` file field"),
    ("not multipart", 400, "expected a multipart/form-data upload"),
])
def test_bad_uploads_get_a_json_error_and_the_service_keeps_serving(served, case, status, message):
    client, _, manifest = served
    good = png(manifest.parent / "img" / "blue-1.png")
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(noisy, "PNG")
    reply = {
        "not an image": lambda: upload(client, b"just some text"),
        "empty": lambda: upload(client, b""),
        "too large": lambda: upload(client, noisy.getvalue()),
        "truncated": lambda: upload(client, good[: len(good) // 2]),
        "k zero": lambda: upload(client, good, k="0"),
        "k too big": lambda: upload(client, good, k="21"),
        "k not a number": lambda: upload(client, good, k="ten"),
        "no image field": lambda: client.post("/search?k=3", files={"photo": ("p.png", good, "image/png")}),
        "not multipart": lambda: client.post("/search?k=3", content=good, headers={"content-type": "image/png"}),
    }[case]()
    assert reply.status_code == status
    assert message in reply.json()["error"]
    assert client.get("/healthz").status_code == 200
    assert upload(client, good).status_code == 200


@pytest.mark.parametrize("body, message", [
    ({"embedding": [0.1] * 5}, "embedding must be a list of 16 finite numbers, got 5 values"),
    ('{"embedding": [NaN' + ', 0.0' * 15 + ']}', "16 finite numbers"),  # Python's JSON reads NaN
    ({"embedding": "x" * 16}, "got str"),
    ({"vector": [0.0] * 16}, 'expected a JSON object {"embedding"'),
    ({"embedding": [0.0] * 16, "k": 0}, "k must be an integer in [1, 20]"),
])
def test_bad_embedding_requests_get_a_json_error(served, body, message):
    client, _, _ = served
    reply = (client.post("/search/embedding", content=body, headers={"content-type": "application/json"})
             if isinstance(body, str) else client.post("/search/embedding", json=body))
    assert reply.status_code == 400 and message in reply.json()["error"]


def test_embedding_search_equals_the_index(served):
    client, service, _ = served
    q = np.random.default_rng(1).normal(size=16).astype(np.float32)
    q /= np.linalg.norm(q)
    ids, scores = service.index.search(q[None], 4)
    results = client.post("/search/embedding", json={"embedding": q.tolist(), "k": 4}).json()["results"]
    assert [r["id"] for r in results] == [service.index.docs[i]["id"] for i in ids[0]]
    assert client.post("/search/embedding", content=b"{", headers={"content-type": "application/json"}).json() == \
        {"error": "the request body is not valid JSON"}


def test_sixteen_concurrent_clients_all_get_their_own_answer(served):
    client, service, manifest = served
    photos = sorted((manifest.parent / "img").glob("*-[123].png"))
    expected = {p.name: [r["id"] for r in upload(client, png(p), k="5").json()["results"]] for p in photos}
    before = service.images.items
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda p: (p.name, upload(client, png(p), k="5")), photos * 4))
    assert all(r.status_code == 200 for _, r in replies)
    for name, reply in replies:
        assert [r["id"] for r in reply.json()["results"]] == expected[name]
    assert service.images.items - before == len(replies)


def test_the_micro_batcher_groups_waiting_requests_and_keeps_their_order():
    calls = []

    def fn(items):
        calls.append(list(items))
        return [item * 10 for item in items]

    async def scenario():
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(fn, pool, max_batch=4, max_wait_s=10.0)  # full batches go at once
            batcher.start()
            results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
            await batcher.stop()
            return results

    # Fewer than max_batch left (items 8, 9) wait out max_wait_s, so the last batch is short but complete.
    async def with_timeout():
        return await asyncio.wait_for(scenario(), timeout=30)

    assert asyncio.run(with_timeout()) == [i * 10 for i in range(10)]
    assert [len(c) for c in calls] == [4, 4, 2] and sum(calls, []) == list(range(10))


def test_a_failing_batch_fails_each_of_its_requests_and_the_next_one_runs():
    def fn(items):
        if any(item < 0 for item in items):
            raise ValueError("negative item")
        return items

    async def scenario():
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(fn, pool, max_batch=2, max_wait_s=5.0)
            batcher.start()
            failed = await asyncio.gather(batcher.submit(-1), batcher.submit(2), return_exceptions=True)
            ok = await asyncio.gather(batcher.submit(3), batcher.submit(4))
            await batcher.stop()
            return failed, ok

    failed, ok = asyncio.run(scenario())
    assert all(isinstance(f, ValueError) and "negative item" in str(f) for f in failed)
    assert ok == [3, 4]


def test_serve_refuses_bad_settings_and_a_foreign_model(served, tmp_path, capsys):
    from cli_helpers import assert_cli_error

    from oclear_ext.search.server import main

    _, service, _ = served
    index_dir = tmp_path / "idx"
    service.index.save(index_dir)
    assert_cli_error(capsys, main, ["--index", str(index_dir), "--max-k", "0"], "oclear-serve", "--max-k must be >= 1")
    assert_cli_error(capsys, main, ["--index", str(tmp_path / "none")], "oclear-serve", "no catalogue index at")
    other, _ = trained_run(tmp_path / "other", steps=2)
    with pytest.raises(ValueError, match="its weights differ"):
        SearchService(service.index, load_model(other))
