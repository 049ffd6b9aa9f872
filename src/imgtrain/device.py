"""Choosing the device the model runs on."""

from __future__ import annotations

import torch

from imgtrain.errors import InvalidParameterError, option

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not (name == "cuda" or name.startswith("cuda:")):
        raise InvalidParameterError(f"device {name!r} is not known", f"choose one of {', '.join(DEVICES)}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidParameterError(f"device {name} was asked for but no CUDA GPU is available",
                                    f"pass {option('device', 'cpu')} or {option('device', 'auto')}")
    try:
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"there are {torch.cuda.device_count()} GPUs")
    except RuntimeError as exc:
        raise InvalidParameterError(f"device {name!r} cannot be used ({exc})",
                                    f"pass {option('device')} auto, cpu, cuda or cuda:N with an existing N") from None
    return device
