"""The weights of a model the designer's Train PyTorch Model trained, in an imgtrain network.

The designer saves a torch zip of its wrapper's state dict: the torchvision network's tensors under
``model.``, and, when it started from ImageNet weights, a second Linear stacked on the 1000-way
classifier (``out_linear_model``). The file is read with torch's weights-only loader, which rebuilds
tensors and nothing else: no pickled code runs. The two stacked Linear layers, with nothing between
them, are one Linear: they are folded into the head of a plain torchvision network, which then
computes exactly what the designer's did and trains, scores and saves as any imgtrain model.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from imgtrain.directories.files import check_regular
from imgtrain.directories.model_directory import HINT, ModelSpec
from imgtrain.errors import InvalidModelDirectoryError
from imgtrain.models.registry import head_name

PREFIX = "model."
STACKED = "out_linear_model."


def designer_state(path: Path, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The weights of the designer's trained network as a state dict of imgtrain's (its head folded into one
    Linear), for the network ``build_model`` makes from ``spec``."""
    try:
        check_regular(path)
        with warnings.catch_warnings():  # torch's note on a pickle protocol it did not write: the refusal says it
            warnings.simplefilter("ignore", UserWarning)
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, a damaged one, or one that holds more than tensors
        raise InvalidModelDirectoryError(
            f"cannot read the designer's weights {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
            "imgtrain reads them with torch's weights-only loader; a file that needs more is refused") from None
    if not isinstance(saved, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in saved.items()):
        raise InvalidModelDirectoryError(f"{path} is not a state dict of tensors", HINT)
    state = {k[len(PREFIX):]: v for k, v in saved.items() if k.startswith(PREFIX)}
    stacked = {k[len(STACKED):]: v for k, v in saved.items() if k.startswith(STACKED)}
    unknown = sorted(set(saved) - {PREFIX + k for k in state} - {STACKED + k for k in stacked})
    if unknown:
        raise InvalidModelDirectoryError(f"{path} holds tensors no designer model has: {', '.join(unknown[:3])}", HINT)
    head = head_name(spec.architecture)
    if stacked:
        try:
            first_w, first_b = state.pop(f"{head}.weight"), state.pop(f"{head}.bias")
            second_w, second_b = stacked["weight"], stacked["bias"]
            state[f"{head}.weight"] = second_w.double() @ first_w.double()
            state[f"{head}.bias"] = second_w.double() @ first_b.double() + second_b.double()
        except (KeyError, RuntimeError) as exc:
            raise InvalidModelDirectoryError(f"{path}: the stacked classifier does not fit ({exc})", HINT) from None
        state = {k: v.float() if v.dtype == torch.float64 else v for k, v in state.items()}
    return state
