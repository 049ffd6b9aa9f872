"""Dynamic batching: the images of concurrent requests go through the network together.

One thread owns the network, and it alone runs torch: it loads the model, then runs every batch;
the threads that decode requests use Pillow and numpy only. The reason is libgomp, the OpenMP
under torch's CPU kernels: it keeps a team of worker threads for every thread that computes in
parallel, and once the threads of all teams outnumber the cores it cuts the spin of a waiting
thread to 100 turns, so that each parallel region (some 60 in a ResNet-18 image) puts the
workers to sleep and wakes them again. Measured on 2 cores: a network loaded in the main
thread and run in another took 1.4x longer an image at batch size 1; a small operation, 5x.

Requests queue their decoded images, a request of more than ``max_batch`` images in parts of at
most that many; the thread takes what is queued, waits up to ``max_wait`` for more only while
other requests are still being decoded (one client alone never waits), runs the batch, and hands
each part its rows, which its request puts back in order: no batch holds more than ``max_batch``.
The work in hand is bounded in images: a request reserves room for its images before they are
decoded and frees it once answered; past ``max_queue`` it is refused at once (the server answers
503) rather than left to wait behind more work than it can hope to see done.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


class QueueFullError(Exception):
    """More images wait than the queue holds."""


@dataclass
class _Request:
    images: list  # decoded images, as the network's ``run`` takes them
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class Batcher:
    """Runs batches of at most ``max_batch`` images through the network, in a thread of its own."""

    def __init__(self, start: Callable[[], Callable[[list], np.ndarray]], *, max_batch: int,
                 max_wait_ms: float, max_queue: int) -> None:
        """``start`` runs first, in the batching thread, and returns ``run``: a batch's images (a list) ->
        float32 probabilities, a row each. Returns once ``start`` has; what it raised is raised here."""
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000, max_queue
        self._start = start
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._queue: deque[_Request] = deque()
        self.pending = 0  # images reserved: being decoded, queued or in the network
        self._coming = 0  # requests being decoded, which will queue soon
        self._changed = threading.Condition()
        self._stopping = False
        self.batches = 0  # batches run, and the images in them: for tests and logs
        self.images = 0
        self._thread = threading.Thread(target=self._work, name="imgtrain-batcher", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._failure is not None:
            raise self._failure

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

    async def __call__(self, images: list) -> np.ndarray:
        """The images' probabilities, a row each in their order: run in batches of at most ``max_batch``."""
        loop = asyncio.get_running_loop()
        parts = [_Request(images[at:at + self.max_batch], loop.create_future(), loop)
                 for at in range(0, len(images), self.max_batch)]
        with self._changed:
            self._queue.extend(parts)
            self._changed.notify()
        answers = await asyncio.gather(*(part.future for part in parts), return_exceptions=True)
        for answer in answers:  # every part's outcome retrieved, the first failure raised
            if isinstance(answer, BaseException):
                raise answer
        return np.concatenate(answers)

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
        try:
            run = self._start()
        except BaseException as exc:  # raised in the thread that made the batcher
            self._failure = exc
            return
        finally:
            self._started.set()
        while (taken := self._take()) is not None:
            try:
                probabilities = run([image for r in taken for image in r.images])
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
