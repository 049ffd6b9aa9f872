"""Dynamic batching: the images of concurrent requests go through the network together.

One thread owns the network. Requests queue their prepared images; the thread takes what is
queued, waits up to ``max_wait`` for more only while other requests are still being decoded (one
client alone never waits), runs the batch, and hands each request its rows. The work in hand is
bounded in images: a request reserves room for its images before they are decoded and frees it
once answered; past ``max_queue`` it is refused at once (the server answers 503) rather than left
to wait behind more work than it can hope to see done.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


class QueueFullError(Exception):
    """More images wait than the queue holds."""


@dataclass
class _Request:
    images: torch.Tensor  # uint8 N x 3 x S x S
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class Batcher:
    """Runs ``run`` (uint8 batch -> float32 probabilities) on batches of at most ``max_batch`` images."""

    def __init__(self, run: Callable[[torch.Tensor], np.ndarray], *, max_batch: int, max_wait_ms: float,
                 max_queue: int, setup: Callable[[], None] = lambda: None) -> None:
        """``setup`` runs first in the batching thread: torch's thread settings belong to the thread that
        computes (set from another thread, they left the network 1.5x slower here)."""
        self.run, self.max_batch, self.max_wait, self.max_queue = run, max_batch, max_wait_ms / 1000, max_queue
        self._setup = setup
        self._queue: deque[_Request] = deque()
        self.pending = 0  # images reserved: being decoded, queued or in the network
        self._coming = 0  # requests being decoded, which will queue soon
        self._changed = threading.Condition()
        self._stopping = False
        self.batches = 0  # batches run, and the images in them: for tests and logs
        self.images = 0
        self._thread = threading.Thread(target=self._work, name="imgtrain-batcher", daemon=True)
        self._thread.start()

    def coming(self, delta: int) -> None:
        """A request starts (+1) or stops (-1) decoding: while some do, a batch waits a little for them."""
        with self._changed:
            self._coming += delta
            self._changed.notify()

    def reserve(self, count: int) -> None:
        """Room for ``count`` images until ``release``; QueueFullError when they would not fit."""
        with self._changed:
            if self._stopping or self.pending + count > self.max_queue:
                raise QueueFullError
            self.pending += count

    def release(self, count: int) -> None:
        with self._changed:
            self.pending -= count

    async def __call__(self, images: torch.Tensor) -> np.ndarray:
        loop = asyncio.get_running_loop()
        request = _Request(images, loop.create_future(), loop)
        with self._changed:
            self._queue.append(request)
            self._changed.notify()
        return await request.future

    def stop(self) -> None:
        """Finish what is queued, then end the thread (new reservations are refused)."""
        with self._changed:
            self._stopping = True
            self._changed.notify()
        self._thread.join()

    def _take(self) -> list[_Request] | None:
        with self._changed:
            while not self._queue:
                if self._stopping:
                    return None
                self._changed.wait()
            taken = [self._queue.popleft()]
            count = len(taken[0].images)
            deadline = time.monotonic() + self.max_wait
            while count < self.max_batch:
                if self._queue:
                    if count + len(self._queue[0].images) > self.max_batch:
                        break
                    taken.append(self._queue.popleft())
                    count += len(taken[-1].images)
                    continue
                left = deadline - time.monotonic()
                if self._coming <= 0 or left <= 0 or self._stopping:
                    break
                self._changed.wait(left)
            return taken

    def _work(self) -> None:
        self._setup()
        while (taken := self._take()) is not None:
            try:
                probabilities = self.run(torch.cat([r.images for r in taken]))
            except BaseException as exc:  # every waiting request hears of it
                for r in taken:
                    r.loop.call_soon_threadsafe(_settle, r.future, None, exc)
                continue
            self.batches += 1
            self.images += len(probabilities)
            start = 0
            for r in taken:
                rows = probabilities[start:start + len(r.images)]
                start += len(r.images)
                r.loop.call_soon_threadsafe(_settle, r.future, rows, None)


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():  # the client went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
