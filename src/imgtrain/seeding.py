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

    Data order and augmentation are seeded per epoch and per image by the sampler.
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
