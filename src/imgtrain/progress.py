"""Progress bars: on a terminal only, never redrawn into a log or a pipe; off with --quiet."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm import tqdm


def bar(items: Iterable | None = None, *, what: str, total: int | None = None, unit: str = "image",
        show: bool | None = None) -> tqdm:
    """``items`` (or, without them, a bar to ``update`` by hand) with a bar of counts, rate and time left.
    ``show``: True or False, or None for 'when stderr is a terminal'. The bar goes when it is done."""
    hidden = (not sys.stderr.isatty()) if show is None else not show
    return tqdm(items, desc=what, total=total, unit=unit, leave=False, disable=hidden, dynamic_ncols=True)
