"""Determinism: the same seed on the same machine gives bit-identical weights.

Light to import (split uses ``as_uint32``, so it sits beside device.py, not in training/):
torch is imported when seeding.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from collections.abc import Callable, Iterator

CUBLAS_WORKSPACE_CONFIG = "CUBLAS_WORKSPACE_CONFIG"
DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")  # the two settings with which cuBLAS computes deterministically
_UNSEEN = object()


def _cuda_in_use() -> bool:
    """Whether CUDA has been used in this process (without importing torch: where it is not, it has not)."""
    cuda = getattr(sys.modules.get("torch"), "cuda", None)
    return cuda is not None and cuda.is_initialized()


# The CUBLAS_WORKSPACE_CONFIG that cuBLAS reads when it first runs in this process, as cublas_setting tells
# it (_UNSEEN: CUDA was in use before imgtrain was imported), and the value imgtrain set, if it did.
_cublas_reads: str | None | object = _UNSEEN if _cuda_in_use() else os.environ.get(CUBLAS_WORKSPACE_CONFIG)
_set_here: str | None = None


def as_uint32(seed: int) -> int:
    """Any integer as a seed (the designer takes any int); numpy's generators take 32 bits."""
    return seed % 2**32


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every GPU), and ask for deterministic kernels.

    Every process of a run seeds alike here, so that every one builds the same network; each then draws
    what its forward passes need (dropout, stochastic depth) from its own stream (``seed_rank``). Data order
    and augmentation are seeded per epoch and per image by the sampler. What this changes for the rest of
    the process, ``torch_settings_restored`` puts back.
    """
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(as_uint32(seed))
    torch.manual_seed(seed)  # also seeds every CUDA device (cuBLAS's setting: torch_settings_restored)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of the torch generators of process ``rank``: streams that numpy's SeedSequence makes
    independent of each other for every (seed, rank)."""
    import numpy as np

    return int(np.random.SeedSequence([as_uint32(seed), rank]).generate_state(1, np.uint64)[0])


def seed_rank(seed: int, rank: int) -> None:
    """Seed this process's torch generators (the CPU's and every GPU's) for its forward passes: under
    torchrun every process then draws its own dropout masks, as one process drawing for the whole batch
    would, instead of all drawing the same ones. Checkpoints keep every process's generators."""
    import torch

    torch.manual_seed(rank_seed(seed, rank))


def cublas_setting(device_type: str, cuda_in_use: bool) -> str | None:
    """The CUBLAS_WORKSPACE_CONFIG cuBLAS computes with in this process, as far as can be told, for a run on
    ``device_type`` that starts now; a GPU run sets it where unset, and it stays set.

    cuBLAS reads it once, when it first runs. Where CUDA is not in use yet, that is what is set now. Where it
    was in use before, what was set the last time imgtrain saw it not in use counts (it is not what imgtrain
    set since: too late), unless someone else has set it since; where imgtrain came after CUDA, what is set
    as the first run finds it (set from the start, or not at all)."""
    global _cublas_reads, _set_here
    now = os.environ.get(CUBLAS_WORKSPACE_CONFIG)
    if device_type == "cuda" and now is None:  # in time where CUDA is not in use yet
        os.environ[CUBLAS_WORKSPACE_CONFIG] = _set_here = DETERMINISTIC_CUBLAS[0]
    if not cuda_in_use:
        _cublas_reads = os.environ.get(CUBLAS_WORKSPACE_CONFIG)
    elif _cublas_reads is _UNSEEN or (now is not None and now != _set_here):
        _cublas_reads = now
    return _cublas_reads


def cublas_nondeterminism(device_type: str, setting: str | None, cuda_in_use: bool) -> str | None:
    """Why cuBLAS may not compute deterministically in a run on ``device_type``, or None; ``setting``: the
    CUBLAS_WORKSPACE_CONFIG it computes with (``cublas_setting``)."""
    if device_type != "cuda" or setting in DETERMINISTIC_CUBLAS:
        return None
    if setting is not None:
        return (f"{CUBLAS_WORKSPACE_CONFIG} is {setting!r}, with which cuBLAS does not compute deterministically: "
                f"the same seed may give other weights; set it to {DETERMINISTIC_CUBLAS[0]} (or unset it)")
    if cuda_in_use:
        return (f"CUDA was in use in this process before the run, without {CUBLAS_WORKSPACE_CONFIG}: cuBLAS may "
                "have chosen its workspace already, and the same seed may then give other weights; set "
                f"{CUBLAS_WORKSPACE_CONFIG}={DETERMINISTIC_CUBLAS[0]} in the environment before Python starts (the "
                "imgtrain command needs nothing), or train before anything else uses the GPU")
    return None


@contextlib.contextmanager
def torch_settings_restored(device_type: str, log: Callable[[str], None]) -> Iterator[None]:
    """Training changes torch's settings for the whole process (deterministic algorithms, cuDNN's
    autotuner and determinism) and seeds its random generators: put back as they were when the run ends,
    however it ends, since the Python API and pipelines run many things in one process. The random states
    of python, numpy and torch's CPU come back, and the GPUs' where the process had used CUDA before.

    Before the run uses a GPU, CUBLAS_WORKSPACE_CONFIG is set (when unset) for cuBLAS to compute
    deterministically; it stays set, since cuBLAS reads it once (a CPU run leaves it alone). Where
    determinism cannot hold (CUDA used in this process before with it unset, or set to another value),
    ``log`` says so in a warning, in every run of the process it holds for (``cublas_setting``)."""
    import numpy as np
    import torch

    cuda_in_use = torch.cuda.is_initialized()
    problem = cublas_nondeterminism(device_type, cublas_setting(device_type, cuda_in_use), cuda_in_use)
    if problem:
        log(f"warning: {problem}")
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if cuda_in_use else None)
    try:
        yield
    finally:
        deterministic, warn_only, benchmark, cudnn_deterministic = flags
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, cudnn_deterministic
        python, numpy, cpu, gpus = states
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if gpus is not None:
            torch.cuda.set_rng_state_all(gpus)
