"""How an imgtrain process ends: on SIGTERM as on Ctrl-C, and with its launcher under torchrun.

Light to import: the command line sets both up before torch is loaded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

LAUNCHER_PID = "IMGTRAIN_LAUNCHER_PID"  # set by `--nproc-per-node` for the processes torchrun starts


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler, a container that stops), raised where the process is, so that it
    unwinds as from Ctrl-C: temporary outputs removed, trackers told, one line said."""

    signal_number = signal.SIGTERM


def _raise_terminated(number: int, frame) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Inside this block, SIGTERM raises Terminated, unless someone else handles SIGTERM already (or this is
    not the main thread, where Python runs signal handlers)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def launched_by_torchrun() -> bool:
    """Whether torchrun (or a launcher like it) started this process as a rank of a run: RANK alone, left in the
    environment by something else, is no world."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def rank() -> int:
    """This process's rank under torchrun (0 alone), read from the environment, without torch."""
    return int(os.environ.get("RANK", "0") or 0) if launched_by_torchrun() else 0


def die_with_launcher() -> bool:
    """Under torchrun, end this process with SIGKILL when its launcher ends, however it ends; return whether the
    launcher is imgtrain's own (``--nproc-per-node``), which says how the run ended.

    torchrun starts each worker in a session of its own and ends them when it is stopped, but a
    launcher killed with SIGKILL (the OOM killer, a scheduler that gives up) passes nothing on: the
    workers would train on, and publish, by themselves. Linux's parent-death signal (prctl) ends them
    with it; a launcher that died before the signal was asked for (its pid, from --nproc-per-node,
    is no longer the parent's) ends this process at once. Elsewhere, nothing.
    """
    launcher = os.environ.pop(LAUNCHER_PID, None)  # this process's launcher, not that of any it starts
    if not sys.platform.startswith("linux"):
        return launcher is not None
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) == 0 and launcher is not None \
            and launcher.isdigit() and os.getppid() != int(launcher):
        os.kill(os.getpid(), signal.SIGKILL)
    return launcher is not None
