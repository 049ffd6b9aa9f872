"""How the C library's malloc serves the large buffers torch allocates on the CPU.

glibc's malloc gives an allocation above its mmap threshold fresh pages from the kernel and hands
them back on free. The threshold starts at 128 KiB and rises, as large blocks are freed, to at
most 32 MiB. An inference pass frees each activation as soon as the next layer has read it, and
ResNet-18's first activations at batch size 16 and 224 px are 25-50 MiB: each pass then
faulted in and zeroed some 17,000 pages anew (67 MiB), and a batch took 94 ms where it takes 73
with the blocks reused. In `imgtrain serve` the state of the threshold depended on what the
process had allocated before, so the same server answered up to 1.8x fewer requests on some starts
than with the blocks reused (bench/README.md, "malloc").

``reuse_large_blocks()`` fixes the threshold at 256 MiB (blocks below it come from the heap and
are reused) and trims the heap only when more than 512 MiB lie free at its top: the process keeps
its largest batch's memory (a scoring run's peak rose by a tenth) and stops paying for it anew.
Scoring and serving on the CPU call it; training, whose steps allocate the same sizes every time,
gained nothing measurable from it and leaves malloc as it is. A setting of one's own wins: with
MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or GLIBC_TUNABLES in the environment, or another
allocator preloaded (jemalloc, tcmalloc, mimalloc), nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 256 * 2**20
TRIM_THRESHOLD = 512 * 2**20
_OLDER_GLIBC_MAX = 32 * 2**20  # the largest threshold older glibc versions accept on 64-bit systems

_OWN_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_done = False


def reuse_large_blocks() -> bool:
    """Set glibc's thresholds once for this process; whether they are (now or already) set."""
    global _done
    if _done:
        return True
    own_setting = any(name in os.environ for name in _OWN_SETTINGS)
    other_allocator = any(name in os.environ.get("LD_PRELOAD", "") for name in _OTHER_ALLOCATORS)
    if not sys.platform.startswith("linux") or own_setting or other_allocator:
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc: musl's mallopt does nothing
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) or mallopt(M_MMAP_THRESHOLD, _OLDER_GLIBC_MAX)):
        return False
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    _done = True
    return True


def give_back_free_memory() -> None:
    """Hand the free memory of every malloc arena back to the kernel (glibc's malloc_trim).

    Each thread allocates from an arena of its own, and with the thresholds above a large block freed
    there stays there: the server's decoding threads, one after another, would each keep the memory of
    the largest image they decoded, though the decodes never held it at once. The server calls this
    after a request whose decoding held much."""
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    trim(0)
