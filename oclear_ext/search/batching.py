"""Micro-batching for the search service: concurrent requests share one model call and one index search."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, Callable, Sequence


class MicroBatcher:
    """Collects submitted items for up to max_wait_s (or until max_batch are waiting), then runs
    fn(items) -> results (one per item) on the worker thread, off the event loop.

    One worker thread: the model and the faiss index run one batch at a time (each uses every core
    itself; two batches at once would only fight over them), while the event loop keeps accepting,
    decoding and answering requests. A failing batch fails each of its requests with the exception.
    """

    def __init__(self, fn: Callable[[Sequence[Any]], Sequence[Any]], executor: concurrent.futures.Executor,
                 max_batch: int = 32, max_wait_s: float = 0.002) -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"MicroBatcher: need max_batch >= 1 and max_wait_s >= 0, got {max_batch}, {max_wait_s}")
        self.fn, self.executor = fn, executor
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self.batches = 0   # counters, for the service's /healthz
        self.items = 0

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def submit(self, item: Any) -> Any:
        if self._queue is None:
            raise RuntimeError("MicroBatcher: submit before start")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0 and self._queue.empty():
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), max(timeout, 0)))
                except asyncio.TimeoutError:
                    break
            live = [(item, fut) for item, fut in batch if not fut.cancelled()]  # a client that went away
            if not live:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [item for item, _ in live])
            except Exception as err:  # noqa: BLE001 - handed to every waiting request
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            self.batches += 1
            self.items += len(live)
            for (_, fut), result in zip(live, results):
                if not fut.done():
                    fut.set_result(result)
