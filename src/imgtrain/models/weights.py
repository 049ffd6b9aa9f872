"""Pretrained ImageNet weights: found in torch's cache, or downloaded once into it (hash-checked).

Light to import: torch is imported only to download. Offline (``IMGTRAIN_OFFLINE=1``, or no
network), the error names the URL and the path to place the file at by hand.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from imgtrain.errors import WeightsUnavailableError, option
from imgtrain.models.names import WEIGHTS_URLS, check_model_name
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


def weights_cache_path(name: str, url: str | None = None) -> Path:
    """Where torchvision keeps (and looks for) the pretrained weights of ``name``: the file of ``url``, torchvision's
    DEFAULT weights (models/registry.py knows them; the designer's modules' names are known here, without
    importing torchvision)."""
    if url is None:
        check_model_name(name)
        url = WEIGHTS_URLS[name]
    return torch_hub_dir() / "checkpoints" / os.path.basename(url)


def ensure_pretrained_weights(name: str, url: str | None = None) -> Path:
    """Make sure the ImageNet weights of ``name`` (the file of ``url``) are in torch's cache; download them if
    allowed."""
    path = weights_cache_path(name, url)
    if path.is_file():
        return path
    url = url or WEIGHTS_URLS[name]
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
