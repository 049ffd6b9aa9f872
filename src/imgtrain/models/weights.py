"""Pretrained ImageNet weights: found in torch's cache, or downloaded once into it (hash-checked).

Light to import: torch is imported only to download. Offline (``IMGTRAIN_OFFLINE=1``, or no
network), the error names the URL and the path to place the file at by hand.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from imgtrain.errors import WeightsUnavailableError, option
from imgtrain.models.names import WEIGHTS_URLS
from imgtrain.progress import showing

OFFLINE_ENV = "IMGTRAIN_OFFLINE"  # set to 1 to never download pretrained weights


def torch_hub_dir() -> Path:
    """torch.hub.get_dir(), without importing torch unless it is already imported (where
    torch.hub.set_dir may have moved it): $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub."""
    if "torch" in sys.modules:
        import torch.hub

        return Path(torch.hub.get_dir())
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return Path(os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch")))) / "hub"


def weights_url(name: str) -> str:
    """The URL of torchvision's DEFAULT ImageNet weights of ``name`` (the designer's modules' names are
    known without importing torchvision)."""
    if name in WEIGHTS_URLS:
        return WEIGHTS_URLS[name]
    from imgtrain.models.registry import get_architecture

    weights = get_architecture(name).weights
    if weights is None:
        raise WeightsUnavailableError(f"torchvision has no pretrained weights for {name}",
                                      f"pass {option('pretrained', False)} to train it from scratch")
    return weights.url


def weights_cache_path(name: str) -> Path:
    """Where torchvision keeps (and looks for) the pretrained weights of ``name``."""
    return torch_hub_dir() / "checkpoints" / os.path.basename(weights_url(name))


def ensure_pretrained_weights(name: str) -> Path:
    """Make sure the ImageNet weights of ``name`` are in torch's cache; download them if allowed."""
    path = weights_cache_path(name)
    if path.is_file():
        return path
    url = weights_url(name)
    hint = f"download {url} and place it at {path}, or pass {option('pretrained', False)} to train from scratch"
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise WeightsUnavailableError(
            f"pretrained weights for {name} are not cached and {OFFLINE_ENV} forbids downloading", hint)
    try:
        import torch.hub

        path.parent.mkdir(parents=True, exist_ok=True)
        prefix = Path(url).stem.rsplit("-", 1)[-1]  # torchvision names files <name>-<sha256 prefix>
        torch.hub.download_url_to_file(url, str(path), hash_prefix=prefix, progress=showing())
    except Exception as exc:  # any network or file failure: the hint says what to do
        raise WeightsUnavailableError(
            f"pretrained weights for {name} could not be downloaded ({type(exc).__name__}: {exc})", hint
        ) from None
    return path
