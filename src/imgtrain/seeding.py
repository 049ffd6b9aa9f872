"""Determinism: the same seed on the same machine gives bit-identical weights.

Light to import (split uses ``as_uint32``, so it sits beside device.py, not in training/):
torch is imported when seeding.
"""

from __future__ import annotations

import os
import random


def as_uint32(seed: int) -> int:
    """Any integer as a seed (the designer takes any int); numpy's generators take 32 bits."""
    return seed % 2**32


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every GPU), and ask for deterministic kernels.

    Every process of a run seeds alike here, so that every one builds the same network; each then draws
    what its forward passes need (dropout, stochastic depth) from its own stream (``seed_rank``). Data order
    and augmentation are seeded per epoch and per image by the sampler.
    """
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(as_uint32(seed))
    torch.manual_seed(seed)  # also seeds every CUDA device
    # cuBLAS needs this set before its first use to be deterministic.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
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
