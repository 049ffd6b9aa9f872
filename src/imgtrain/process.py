"""How an imgtrain process ends: with its launcher under torchrun.

Light to import: the command line sets it up before torch is loaded.
"""

from __future__ import annotations

import os
import signal
import sys

LAUNCHER_PID = "IMGTRAIN_LAUNCHER_PID"  # set by `--nproc-per-node` for the processes torchrun starts


def die_with_launcher() -> None:
    """Under torchrun, end this process with SIGKILL when its launcher ends, however it ends.

    torchrun starts each worker in a session of its own and ends them when it is stopped, but a
    launcher killed with SIGKILL (the OOM killer, a scheduler that gives up) passes nothing on: the
    workers would train on, and publish, by themselves. Linux's parent-death signal (prctl) ends them
    with it; a launcher that died before the signal was asked for (its pid, from --nproc-per-node,
    is no longer the parent's) ends this process at once. Elsewhere, nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
        return
    launcher = os.environ.pop(LAUNCHER_PID, None)  # this process's launcher, not that of any it starts
    if launcher is not None and launcher.isdigit() and os.getppid() != int(launcher):
        os.kill(os.getpid(), signal.SIGKILL)
