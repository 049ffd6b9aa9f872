"""Listening on an address, for `imgtrain serve` and `imgtrain ui`, without importing torch (the page's URL is
printed before anything heavy loads)."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from imgtrain.errors import InvalidParameterError, option


def check_address(host: str, port: int) -> None:
    """A named error now, before the model loads, where the address cannot be listened on (in use, unknown)."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as exc:
        raise InvalidParameterError(f"cannot listen on {host}:{port} ({exc.strerror or exc})",
                                    f"pick another {option('port')}, or stop what listens there") from None


@contextmanager
def stop_signals_end_quietly():
    """uvicorn stops gracefully on SIGTERM and SIGINT, then raises the signal again for whatever handled it
    before: here, a handler that lets serve() return, so that a stop is a clean exit (0), not a kill."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda number, frame: None) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
