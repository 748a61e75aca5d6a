"""`oclear-serve`: the catalogue search as an HTTP service (FastAPI + uvicorn) with a web page.

    GET  /                     a page: drop or pick a photo, see the top-k catalogue items
    GET  /healthz              {"status": "ok", "docs", "dim", "kind", "checkpoint", "batches", "queries"}
    POST /search?k=K           multipart field `image` (a photo) and optional `modifier` (a text that changes
                               it, for a model trained with composed queries) -> {"results": [{"id", "score",
                               "label", "text", "image", "category", "image_url"}, ...]} best first
    POST /search/embedding     JSON {"embedding": [D floats], "k": K} -> the same, without the model
    GET  /docs/{id}/image      a catalogue item's image file
Errors are JSON {"error": "..."} with a 4xx status (400 bad input, 404 unknown doc, 413 too large).

FastAPI for the request validation, multipart parsing and OpenAPI page (/api-docs) it brings; uvicorn
as the ASGI server. Requests never run the model on the event loop: uploads are decoded in the thread
pool, and concurrent queries are micro-batched onto one worker thread (oclear_ext.search.batching), so
16 clients cost one model call and one index search per batch, not 16 contending ones.
"""


import argparse
import concurrent.futures
import contextlib
import math
import mimetypes
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

import numpy as np
import torch
import torch.nn.functional as F

from ..cli_errors import run_cli
from .batching import MicroBatcher
from .catalog_index import CatalogIndex
from .embedding import ImageReadError, model_device, read_image
from .load_model import load_model

SERVE_HINT = "oclear-serve needs fastapi, uvicorn and python-multipart: pip install 'oclear_ext[serve]'"
PAGE = Path(__file__).with_name("page.html")


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _results(index: CatalogIndex, ids: np.ndarray, scores: np.ndarray) -> list[list[dict]]:
    rows = index.results(ids, scores)
    for row in rows:
        for doc in row:
            doc["image_url"] = f"/docs/{quote(doc['id'], safe='')}/image"
    return rows


class SearchService:
    """The model, the index and the two batchers; independent of the web framework (tested directly too)."""

    def __init__(self, index: CatalogIndex, model: Any, max_k: int = 100, max_upload_bytes: int = 10 << 20,
                 max_batch: int = 32, max_wait_s: float = 0.002) -> None:
        index.check_model(model)
        self.index, self.model = index, model
        self.max_k, self.max_upload_bytes = max_k, max_upload_bytes
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="oclear-search")
        self.images = MicroBatcher(self._search_images, self.executor, max_batch, max_wait_s)
        self.vectors = MicroBatcher(self._search_vectors, self.executor, max_batch, max_wait_s)

    @torch.no_grad()
    def _search_images(self, items: Sequence[tuple[torch.Tensor, int, str | None]]) -> list[list[dict]]:
        images = torch.stack([image for image, _, _ in items]).to(model_device(self.model))
        modifiers = [modifier for _, _, modifier in items]
        q = (self.model.embed_queries(images) if all(m is None for m in modifiers)
             else self.model.embed_queries(images, modifiers))
        return self._search(F.normalize(q.float(), dim=1).cpu().numpy(), [k for _, k, _ in items])

    def _search_vectors(self, items: Sequence[tuple[np.ndarray, int]]) -> list[list[dict]]:
        return self._search(np.stack([v for v, _ in items]), [k for _, k in items])

    def _search(self, q: np.ndarray, ks: list[int]) -> list[list[dict]]:
        ids, scores = self.index.search(q, max(ks))
        return [row[:k] for row, k in zip(_results(self.index, ids, scores), ks)]

    def parse_k(self, text: str | None) -> int:
        if text is None:
            return 10 if self.max_k >= 10 else self.max_k
        try:
            k = int(text)
        except ValueError:
            k = None
        if k is None or not 1 <= k <= self.max_k:
            raise BadRequest(400, f"k must be an integer in [1, {self.max_k}], got {text!r}")
        return k

    def parse_modifier(self, value: Any) -> str | None:
        """The optional `modifier` form field of a composed query, for a model trained with composed queries."""
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise BadRequest(400, "the `modifier` field must be a non-empty text")
        if getattr(self.model, "composer", None) is None:
            raise BadRequest(400, "this model was not trained with composed queries: it takes no `modifier`")
        return value

    def check_upload(self, data: bytes) -> None:
        if not data:
            raise BadRequest(400, "the uploaded image is empty")
        if len(data) > self.max_upload_bytes:
            raise BadRequest(413, f"the upload is {len(data)} bytes, over the limit of {self.max_upload_bytes}")

    def decode(self, data: bytes, filename: str | None) -> torch.Tensor:
        try:
            return read_image(data, self.model.image_size, name=repr(filename or "the upload"))
        except ImageReadError as err:
            raise BadRequest(400, f"not a readable image: {err}") from None

    def parse_embedding(self, body: Any) -> tuple[np.ndarray, int]:
        if not isinstance(body, dict) or "embedding" not in body:
            raise BadRequest(400, 'expected a JSON object {"embedding": [floats], "k": K}')
        vector = body["embedding"]
        if not isinstance(vector, list) or len(vector) != self.index.dim or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vector):
            got = f"{len(vector)} values" if isinstance(vector, list) else type(vector).__name__
            raise BadRequest(400, f"embedding must be a list of {self.index.dim} finite numbers, got {got}")
        k = self.parse_k(str(body["k"]) if "k" in body else None)
        return np.asarray(vector, dtype=np.float32), k

    def doc_image(self, doc_id: str) -> Path:
        try:
            doc = self.index.docs[self.index.position(doc_id)]
        except KeyError:
            raise BadRequest(404, f"no doc with id {doc_id!r} in the index") from None
        if not doc.get("image") or not Path(doc["image"]).is_file():
            raise BadRequest(404, f"the image file of doc {doc_id!r} is missing ({doc.get('image')})")
        return Path(doc["image"])

    def health(self) -> dict:
        return {"status": "ok", "docs": len(self.index), "dim": self.index.dim, "kind": self.index.kind,
                "checkpoint": self.index.model.checkpoint if self.index.model else None,
                "batches": self.images.batches + self.vectors.batches,
                "queries": self.images.items + self.vectors.items}


def create_app(service: SearchService):
    """The FastAPI application serving `service`."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.concurrency import run_in_threadpool
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
        from starlette.datastructures import UploadFile
        from starlette.exceptions import HTTPException
    except ImportError as err:
        raise ImportError(SERVE_HINT) from err

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.images.start()
        service.vectors.start()
        yield
        await service.images.stop()
        await service.vectors.stop()

    app = FastAPI(title="oclear_ext catalogue search", lifespan=lifespan, docs_url="/api-docs", redoc_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(BadRequest)
    async def bad_request(_, exc: BadRequest):
        return error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, exc: RequestValidationError):
        return error(400, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/healthz")
    async def healthz():
        return service.health()

    @app.post("/search")
    async def search(request: Request):
        k = service.parse_k(request.query_params.get("k"))
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > service.max_upload_bytes + (64 << 10):  # + multipart framing
            raise BadRequest(413, f"the upload is {length} bytes, over the limit of {service.max_upload_bytes}")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise BadRequest(400, "expected a multipart/form-data upload with an `image` file field")
        async with request.form(max_files=1, max_fields=4) as form:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise BadRequest(400, "the upload has no `image` file field")
            data = await upload.read(service.max_upload_bytes + 1)
            name = upload.filename
            modifier = service.parse_modifier(form.get("modifier"))
        service.check_upload(data)
        image = await run_in_threadpool(service.decode, data, name)
        return {"results": await service.images.submit((image, k, modifier))}

    @app.post("/search/embedding")
    async def search_embedding(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise BadRequest(400, "the request body is not valid JSON") from None
        vector, k = service.parse_embedding(body)
        return {"results": await service.vectors.submit((vector, k))}

    @app.get("/docs/{doc_id:path}/image")
    async def doc_image(doc_id: str):
        path = service.doc_image(doc_id)
        return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")

    return app


def load_service(index_dir: str, checkpoint: str | None = None, device: str = "cpu", **options) -> SearchService:
    """The index folder and its model (the index's own checkpoint unless another is given)."""
    index = CatalogIndex.load(index_dir)
    if checkpoint is None:
        if index.model is None:
            raise ValueError(f"the index {index_dir} records no model; pass --checkpoint")
        checkpoint = index.model.checkpoint
    return SearchService(index, load_model(checkpoint, device=device), **options)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oclear-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--index", required=True, help="index folder written by oclear-index")
    p.add_argument("--checkpoint", help="run folder or checkpoint (default: the one the index was built with)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-k", type=int, default=100, help="largest k a request may ask (default 100)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload (default 10 MB)")
    p.add_argument("--max-batch", type=int, default=32, help="queries embedded together at most (default 32)")
    p.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="how long a query waits for others to batch with (default 2 ms)")
    p.add_argument("--log-level", default="info")
    return p


def serve_main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    for name in ("max_k", "max_batch", "port"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_upload_mb <= 0 or args.max_wait_ms < 0:
        raise ValueError("--max-upload-mb must be > 0 and --max-wait-ms >= 0")
    try:
        import uvicorn
    except ImportError as err:
        raise ImportError(SERVE_HINT) from err
    service = load_service(args.index, args.checkpoint, args.device, max_k=args.max_k,
                           max_upload_bytes=int(args.max_upload_mb * (1 << 20)), max_batch=args.max_batch,
                           max_wait_s=args.max_wait_ms / 1000)
    print(f"oclear-serve: {len(service.index)} docs ({service.index.kind}) on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level=args.log_level)


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(serve_main, argv, "oclear-serve")
