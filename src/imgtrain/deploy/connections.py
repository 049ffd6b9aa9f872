"""The connections `imgtrain serve` holds: how many are open at once, and how long a request's headers may take.

uvicorn bounds neither. Its keep-alive timeout runs only between requests and stops at the next request's first
byte, so a connection that sends part of a request and then a header line now and then is never closed: 800
that sent a line every 2 s were all still open after 10 s, each a file descriptor (a process may open 1,024 by
default; past that accept() fails, and so does every file the server opens). Its ``limit_concurrency`` counts
connections, but is checked only once a request's headers are all there: it refuses no connection and closes
none, and while slow connections fill the count, it answers 503 to the clients that do send their requests.

Here uvicorn's own HTTP protocol (h11's, or httptools' where it is installed) is subclassed:

- A connection beyond --max-connections is answered 503 (Retry-After) and closed as it is accepted, before
  anything of it is read. First, though, the connection that has waited longest for a request's headers gives
  up its place, if it has waited over a second: a client whose headers come at once gets in, however many
  connections hold on to their places by sending theirs slowly (unless new ones come faster than the cap's
  count a second).
- A request's headers must all be there within --header-timeout-s of the connection's opening, or of the
  request's first byte on a connection kept alive (idle between requests, uvicorn's keep-alive timeout counts,
  5 s). Past it the connection is closed, with a 408 if part of a request came. A request's body is not timed
  here: once its headers are all there, it has --body-timeout-s.
- A request answered before its body was all there (413 by its Content-Length, 503 before reading it) is not
  kept alive: the rest of its body is read and dropped, for up to --body-timeout-s, and then the connection
  closes. Closed with bytes unread, a connection is reset, and a client still sending loses its answer.

The listen backlog is fitted to the open files the process may have (``fit_open_files``): asyncio accepts up to
that many connections in one go, before any is refused, so the server holds at most --max-connections, and for a
moment the backlog's count more, beside its own.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from imgtrain.errors import InvalidParameterError, option

BACKLOG = 2048  # uvicorn's: connections the kernel queues until they are accepted
_MIN_BACKLOG = 128
_RESERVED_FILES = 64  # the process's own descriptors: the listening socket, the event loop's, the standard streams
# (a served model holds 8), and what it opens as it goes
_EVICTABLE_AFTER_S = 1.0  # headers that take longer than this are not coming from a client in a hurry


@dataclass
class ConnectionLimits:
    """What a server's connections share: the limits, the connections open, and those waiting for headers."""

    max_connections: int
    header_timeout_s: float
    linger_s: float  # how long the rest of a body answered unread is read and dropped (--body-timeout-s)
    open: set = field(default_factory=set)
    waiting: dict = field(default_factory=dict)  # the connections waiting for a request's headers, longest first

    def make_room(self) -> bool:
        """Close the connection that has waited longest for its request's headers, if for over a second."""
        for oldest in self.waiting:
            waited = time.monotonic() - oldest.waiting_since
            if waited < _EVICTABLE_AFTER_S:
                return False
            oldest.expire(f"the request's headers were not all there after {waited:.1f} s, and the server needed "
                          "the connection for another: send them at once")
            return True
        return False


def guarded_protocol(limits: ConnectionLimits, base: type[asyncio.Protocol] | None = None) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (``base``; default, the one it would pick), held to ``limits``: for
    ``uvicorn.Config(http=...)``."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol as base
    return type(f"Guarded{base.__name__}", (_Guarded, base), {"limits": limits})


def fit_open_files(max_connections: int) -> int:
    """The listen backlog that keeps the server within the open files it may have, ``max_connections`` open:
    asyncio accepts as many connections at once as the backlog, each a descriptor, before any is refused.
    The soft limit is raised toward the hard one where more are needed, as Go's runtime does at start."""
    try:
        import resource
    except ImportError:  # not a Unix
        return BACKLOG
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _RESERVED_FILES + max_connections + BACKLOG
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return BACKLOG
    room = soft - _RESERVED_FILES - max_connections
    if room < _MIN_BACKLOG:
        raise InvalidParameterError(
            f"{option('max_connections', max_connections)} takes {max_connections + _RESERVED_FILES + _MIN_BACKLOG:,} "
            f"open files with the server's own, and this process may open {soft:,}",
            f"pass at most {option('max_connections', max(1, soft - _RESERVED_FILES - _MIN_BACKLOG))}, or raise "
            "the limit (ulimit -n)")
    return min(BACKLOG, room)


def _response(status: str, message: str, *headers: str) -> bytes:
    """A whole HTTP answer, written before the connection closes: the request was never handed to the app."""
    body = json.dumps({"error": message}).encode()
    head = [f"HTTP/1.1 {status}", "content-type: application/json", f"content-length: {len(body)}", *headers,
            "connection: close"]
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


class _Guarded:
    """Mixed into uvicorn's HTTP protocol class, whose ``cycle`` (the request being answered, None before the
    first) changes when a request's headers are all there, in h11's protocol as in httptools'."""

    limits: ConnectionLimits
    refused = lingering = False
    waiting_since = 0.0
    _timer: asyncio.TimerHandle | None = None
    _partial = False  # part of the request awaited has come
    _upgraded = False

    def connection_made(self, transport) -> None:
        limits = self.limits
        if len(limits.open) >= limits.max_connections and not limits.make_room():
            self.refused = True
            transport.write(_response("503 Service Unavailable",
                                      f"the server holds as many connections as it takes ({limits.max_connections}, "
                                      "its --max-connections): retry in a second", "retry-after: 1"))
            transport.close()
            return
        limits.open.add(self)
        self.raw = transport
        super().connection_made(_Transport(transport, self))
        self._wait()

    def data_received(self, data: bytes) -> None:
        if self.refused or self.lingering:
            return  # the rest of a body answered unread, dropped
        if self._timer is None and self._between_requests():
            self._wait()  # a request's first bytes on a connection kept alive
        self._partial = self._partial or self._timer is not None
        super().data_received(data)
        if self._timer is not None and not self._between_requests():
            self._stop_waiting()  # its headers are all there: the app has the request

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.linger()  # not kept alive while the body it did not read is still coming

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return
        self._stop_waiting()
        self.limits.open.discard(self)
        super().connection_lost(exc)

    def shutdown(self) -> None:  # the server stops: a body nobody will answer is not waited for
        if self.lingering:
            self.raw.abort()
        else:
            super().shutdown()

    def handle_websocket_upgrade(self, *args) -> None:  # the connection passes to another protocol
        self._stop_waiting()
        self.limits.open.discard(self)
        self._upgraded = True
        super().handle_websocket_upgrade(*args)

    def linger(self) -> bool:
        """Where the request was answered before its body was all there (413 by its Content-Length, 503 before
        reading it), close the connection only once the client has sent the rest (read and dropped) or within
        --body-timeout-s: a socket closed with bytes unread is reset, and a client still sending would lose its
        answer. Whether it lingers (uvicorn's own close then waits for it)."""
        cycle = self.cycle
        if self.lingering or self._upgraded or self.raw.is_closing() or cycle is None or not cycle.more_body:
            return self.lingering
        self.lingering = True
        self._stop_waiting()
        if self.raw.can_write_eof():  # the answer, then the end of what the server sends
            self.raw.write_eof()
        self.raw.resume_reading()
        self._timer = self.loop.call_later(self.limits.linger_s, self.raw.abort)
        return True

    def expire(self, message: str) -> None:
        """Close the connection, with a 408 if part of a request came (nothing came: nothing to answer)."""
        self._stop_waiting()
        self.limits.open.discard(self)  # its place is free now: closing it takes a turn of the event loop
        if not self.raw.is_closing():
            if self._partial:
                self.raw.write(_response("408 Request Timeout", message))
            self.raw.close()

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _wait(self) -> None:
        self.waiting_since, self._partial = time.monotonic(), False
        self.limits.waiting[self] = None
        timeout = self.limits.header_timeout_s
        self._timer = self.loop.call_later(timeout, self.expire, (
            f"the request's headers were not all there within {timeout:g} s: send them at once (the server's "
            "--header-timeout-s)"))

    def _stop_waiting(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.limits.waiting.pop(self, None)


class _Transport:
    """The connection's transport as uvicorn's protocol sees it: its close lingers while a body is still coming."""

    def __init__(self, transport: asyncio.Transport, protocol: _Guarded) -> None:
        self._transport, self._protocol = transport, protocol

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def close(self) -> None:
        if not self._protocol.linger():
            self._transport.close()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()
