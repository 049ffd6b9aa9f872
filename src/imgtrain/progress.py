"""Progress bars: on a terminal only, never redrawn into a log or a pipe; none at all with --quiet."""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterable, Iterator

from tqdm import tqdm

_QUIET = contextvars.ContextVar("imgtrain_quiet", default=False)


@contextlib.contextmanager
def quiet(on: bool = True) -> Iterator[None]:
    """Inside this block (the CLI with --quiet) no progress is shown, downloads included."""
    token = _QUIET.set(on)
    try:
        yield
    finally:
        _QUIET.reset(token)


def showing(show: bool | None = None) -> bool:
    """Whether to show progress: as asked, or (None) when stderr is a terminal and no one asked for quiet."""
    return (sys.stderr.isatty() and not _QUIET.get()) if show is None else show


def bar(items: Iterable | None = None, *, what: str, total: int | None = None, unit: str = "image",
        show: bool | None = None) -> tqdm:
    """``items`` (or, without them, a bar to ``update`` by hand) with a bar of counts, rate and time left.
    ``show``: True or False, or None for ``showing()``. The bar goes when it is done."""
    return tqdm(items, desc=what, total=total, unit=unit, leave=False, disable=not showing(show),
                dynamic_ncols=True)
