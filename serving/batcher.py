"""Dynamic batching of already-validated image rows, in the manner of Triton's dynamic batcher.

MLServer's own adaptive batcher (``mlserver.batching``) merges whole requests at the
protocol level: it concatenates their Python lists, takes dtype and row shape from the
first request (a ``[1, 64, 3, 64]`` request batched with ``[1, 3, 64, 64]`` ones is
silently reinterpreted), fails every request in a batch when one is bad, counts requests
rather than rows, and cuts batches on a timer whether or not the engine is free. This one
sees only rows that passed validation, counts rows, and forms the next batch the moment
the engine is free from whatever has queued meanwhile (waiting up to ``max_delay_s`` for
more only when the queue is short), so a bad request can never touch its neighbours.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


@dataclass
class _Pending:
    rows: np.ndarray
    future: asyncio.Future


class DynamicBatcher:
    """``await submit(rows)`` -> that request's output rows; one engine call at a time."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch: int,
                 max_delay_s: float, on_batch: Callable[[int, float], None] | None = None) -> None:
        self._run = run
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Pending] | None = None
        self._carry: _Pending | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lvvit-engine")

    async def submit(self, rows: np.ndarray) -> np.ndarray:
        if not 1 <= len(rows) <= self.max_batch:
            raise ValueError(f"{len(rows)} rows; a request holds 1..{self.max_batch}")
        loop = asyncio.get_running_loop()
        if self._queue is None:  # created here so it belongs to the serving loop
            self._queue = asyncio.Queue()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._serve())
        pending = _Pending(rows, loop.create_future())
        self._queue.put_nowait(pending)
        return await pending.future

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=True)

    async def _next_batch(self) -> list[_Pending]:
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, size = [first], len(first.rows)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_delay_s
        while size < self.max_batch:
            if self._queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                item = self._queue.get_nowait()
            if size + len(item.rows) > self.max_batch:
                self._carry = item  # starts the next batch; never split across two
                break
            batch.append(item)
            size += len(item.rows)
        return batch

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [p for p in await self._next_batch() if not p.future.done()]
            if not batch:
                continue
            rows = np.concatenate([p.rows for p in batch]) if len(batch) > 1 else batch[0].rows
            start = loop.time()
            try:
                out = await loop.run_in_executor(self._executor, self._run, rows)
            except Exception as err:  # an engine failure: every request in this batch gets it
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(err)
                continue
            if self._on_batch is not None:
                self._on_batch(len(rows), loop.time() - start)
            offset = 0
            for p in batch:
                n = len(p.rows)
                if not p.future.done():  # a client may have gone away meanwhile
                    p.future.set_result(out[offset:offset + n])
                offset += n
