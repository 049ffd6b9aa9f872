"""Bytes that the server's requests may hold at once (their bodies, and their decoding), taken whole and in turn."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from contextlib import asynccontextmanager


class BudgetFullError(Exception):
    """A request's bytes did not get their turn within its patience."""


class Budget:
    """``async with budget.hold(n)`` waits until ``n`` bytes are free and every request that came to wait
    before has had its own, then holds them until the block ends.

    First come, first served: a large request is not starved by small ones that keep fitting beside each
    other. One that waits holds nothing, so holders never wait on each other in a circle, and it waits in
    the event loop, not in one of the threads that decode. ``drained(peak)`` is called when the last holder
    lets go and no one waits, with the most the budget held at once since it last drained."""

    def __init__(self, limit: int, drained: Callable[[int], None] | None = None) -> None:
        self.limit, self.held, self.peak = limit, 0, 0
        self._drained = drained
        self._waiting: deque[tuple[int, asyncio.Future]] = deque()

    @asynccontextmanager
    async def hold(self, nbytes: int, patience: float | None = None):
        """Hold ``nbytes``; with ``patience`` (seconds), raise BudgetFullError if their turn has not come by then
        (0: unless they fit now, before anyone who waits)."""
        if nbytes > self.limit:
            raise ValueError(f"{nbytes:,} bytes are more than the whole budget of {self.limit:,}")
        if self._waiting or self.held + nbytes > self.limit:
            if patience is not None and patience <= 0:
                raise BudgetFullError
            turn = asyncio.get_running_loop().create_future()
            self._waiting.append((nbytes, turn))
            try:
                async with asyncio.timeout(patience):
                    await turn
            except (asyncio.CancelledError, TimeoutError) as exc:
                if turn.done() and not turn.cancelled():  # its turn came as it gave up
                    self._release(nbytes)
                elif (nbytes, turn) in self._waiting:
                    self._waiting.remove((nbytes, turn))
                    self._serve()
                if isinstance(exc, TimeoutError):
                    raise BudgetFullError from None
                raise
        else:
            self._take(nbytes)
        try:
            yield
        finally:
            self._release(nbytes)

    def _take(self, nbytes: int) -> None:
        self.held += nbytes
        self.peak = max(self.peak, self.held)

    def _release(self, nbytes: int) -> None:
        self.held -= nbytes
        self._serve()
        if not self.held and not self._waiting and self.peak:
            peak, self.peak = self.peak, 0
            if self._drained is not None:
                self._drained(peak)

    def _serve(self) -> None:
        """The waiting requests at the head of the line that now fit, in their order."""
        while self._waiting and self.held + self._waiting[0][0] <= self.limit:
            nbytes, turn = self._waiting.popleft()
            if not turn.cancelled():
                self._take(nbytes)
                turn.set_result(None)
