"""Outputs appear complete or not at all.

A module writes into a temporary directory beside its target and renames it into place
only when everything is written: a failed or interrupted run never leaves a half-written
output, and never replaces an existing one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from imgtrain.errors import OutputExistsError

TMP_PREFIX = ".imgtrain-tmp-"


def check_output_writable(target: Path, *, overwrite: bool = False) -> None:
    """Fail before any work when the output exists or its parent cannot be written."""
    target = Path(target)
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise OutputExistsError(
            f"output {target} already exists",
            "choose another output path, or pass --overwrite to replace it",
        )
    parent = target.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputExistsError(
            f"cannot write into {parent}", "choose an output path in a writable directory"
        )


@contextlib.contextmanager
def atomic_output_dir(target: Path | str, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``target`` when the block succeeds."""
    target = Path(target)
    check_output_writable(target, overwrite=overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-", dir=target.absolute().parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        # Move the old output aside first, so that there is no moment with neither.
        old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-old-", dir=tmp.parent))
        os.rename(target, old / "x")
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
