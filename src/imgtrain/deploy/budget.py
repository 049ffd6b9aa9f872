"""Bytes that the server's requests may hold at once (their bodies, and their decoding), taken whole and in turn."""

from __future__ import annotations

import asyncio
from collections import deque
from contextlib import asynccontextmanager


class Budget:
    """``async with budget.hold(n)`` waits until ``n`` bytes are free and every request that came to wait
    before has had its own, then holds them until the block ends.

    First come, first served: a large request is not starved by small ones that keep fitting beside each
    other. One that waits holds nothing, so holders never wait on each other in a circle, and it waits in
    the event loop, not in one of the threads that decode."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0
        self._waiting: deque[tuple[int, asyncio.Future]] = deque()

    @asynccontextmanager
    async def hold(self, nbytes: int):
        if nbytes > self.limit:
            raise ValueError(f"{nbytes:,} bytes are more than the whole budget of {self.limit:,}")
        if self._waiting or self.held + nbytes > self.limit:
            turn = asyncio.get_running_loop().create_future()
            self._waiting.append((nbytes, turn))
            try:
                await turn
            except asyncio.CancelledError:
                if not turn.cancelled():  # its turn came as it was cancelled
                    self.held -= nbytes
                elif (nbytes, turn) in self._waiting:
                    self._waiting.remove((nbytes, turn))
                self._serve()
                raise
        else:
            self.held += nbytes
        try:
            yield
        finally:
            self.held -= nbytes
            self._serve()

    def _serve(self) -> None:
        """The waiting requests at the head of the line that now fit, in their order."""
        while self._waiting and self.held + self._waiting[0][0] <= self.limit:
            nbytes, turn = self._waiting.popleft()
            if not turn.cancelled():
                self.held += nbytes
                turn.set_result(None)
