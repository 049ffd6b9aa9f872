"""timm's image classifiers, as ``timm/NAME`` (the optional extra ``imgtrain[timm]``).

timm builds the network from its own registry (a name is looked up there, never imported); its
pretrained weights are the ``model.safetensors`` of its Hugging Face Hub repository, fetched once
into the Hub's cache (``$HF_HOME/hub``, by default ``~/.cache/huggingface/hub``) and loaded from that
file, so nothing is unpickled; the classifier head is then replaced with timm's own
``reset_classifier``. Offline (``IMGTRAIN_OFFLINE=1``, or no network), the error says which folder to
copy from a machine that has the weights, or to pass ``--no-pretrained``.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from imgtrain.errors import InvalidParameterError, MissingDependencyError, WeightsUnavailableError, option
from imgtrain.models.weights import OFFLINE_ENV

PREFIX = "timm/"
WEIGHTS_FILE = "model.safetensors"


def timm_module():
    """timm, or MissingDependencyError saying how to install it."""
    try:
        import timm
    except ImportError:
        raise MissingDependencyError("timm's models (timm/NAME) need timm, which is not installed",
                                     "install it with `pip install 'imgtrain[timm]'`") from None
    return timm


def check_timm_name(name: str) -> str:
    """The timm model name of ``timm/NAME`` (a tag such as ``.in1k`` allowed), if timm knows it."""
    timm = timm_module()
    bare = name[len(PREFIX):]
    if not timm.is_model(bare):
        import difflib

        close = difflib.get_close_matches(bare.split(".")[0], timm.list_models(), n=3)
        raise InvalidParameterError(
            f"unknown model name {name!r}" + (f" (did you mean {' or '.join(PREFIX + c for c in close)}?)"
                                              if close else ""),
            "`imgtrain list-models 'timm/*'` lists timm's models")
    return bare


def pretrained_config(name: str) -> dict:
    """timm's pretrained config of ``timm/NAME`` (its default tag unless the name has one): {} if none."""
    cfg = timm_module().models.get_pretrained_cfg(check_timm_name(name))
    return cfg.to_dict() if cfg is not None else {}


def preprocessing(name: str) -> dict:
    """How the weights want their images, in the terms torchvision's weights use."""
    cfg = pretrained_config(name)
    crop = int(cfg.get("input_size", (3, 224, 224))[-1])
    return {"resize_size": int(round(crop / float(cfg.get("crop_pct") or 1.0))), "crop_size": crop,
            "interpolation": str(cfg.get("interpolation", "bilinear")),
            "mean": [float(x) for x in cfg.get("mean", (0.485, 0.456, 0.406))],
            "std": [float(x) for x in cfg.get("std", (0.229, 0.224, 0.225))]}


def fixed_size(name: str) -> int | None:
    """The one input size of a network built for it (timm's ``fixed_input_size``: ViTs and the like)."""
    cfg = pretrained_config(name)
    return int(cfg.get("input_size", (3, 224, 224))[-1]) if cfg.get("fixed_input_size") else None


def _hub_cache() -> Path:
    """The Hugging Face Hub's cache, read from the environment now (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expanduser(home)) / "hub"


def ensure_timm_weights(name: str) -> Path:
    """The local ``model.safetensors`` of ``timm/NAME``'s pretrained weights, downloaded once if allowed."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    repo = pretrained_config(name).get("hf_hub_id")
    if not repo:
        raise WeightsUnavailableError(f"timm has no pretrained weights for {name} on the Hugging Face Hub",
                                      f"pass {option('pretrained', False)}")
    cache = _hub_cache()
    found = try_to_load_from_cache(repo, WEIGHTS_FILE, cache_dir=cache)
    if isinstance(found, str):
        return Path(found)
    folder = cache / f"models--{repo.replace('/', '--')}"
    hint = (f"copy {folder} from a machine that has run `imgtrain image-model --model-name {name}`, or pass "
            f"{option('pretrained', False)} to train from scratch")
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise WeightsUnavailableError(
            f"pretrained weights for {name} are not cached and {OFFLINE_ENV} forbids downloading", hint)
    unreachable = _unreachable_hub()
    if unreachable:  # the Hub's client would retry for half a minute, a line each time
        raise WeightsUnavailableError(f"pretrained weights for {name} are not cached and the Hugging Face Hub cannot "
                                      f"be reached ({unreachable})", hint)
    try:
        return Path(hf_hub_download(repo, WEIGHTS_FILE, cache_dir=cache))
    except Exception as exc:  # no network, no such file, a refused download: the hint says what to do
        raise WeightsUnavailableError(
            f"pretrained weights for {name} could not be downloaded from the Hugging Face Hub "
            f"({type(exc).__name__})", hint) from None


def _unreachable_hub(timeout: float = 5.0) -> str | None:
    """Why the Hub's host cannot be reached (a name that does not resolve, a refused or silent connection), or
    None when it can, or when a proxy stands between (only a request through it can tell)."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError as exc:
        return f"{url.hostname}: {exc.strerror or exc}"
    return None


def build_timm(name: str, num_classes: int, *, pretrained: bool, image_size: int | None) -> nn.Module:
    timm = timm_module()
    bare = check_timm_name(name)
    size = {"img_size": image_size} if image_size and fixed_size(name) else {}
    if not pretrained:
        return timm.create_model(bare, pretrained=False, num_classes=num_classes, **size)
    path = ensure_timm_weights(name)
    try:  # the file alone: timm reads safetensors with safetensors, and asks the network for nothing
        model = timm.create_model(bare, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **size)
    except Exception as exc:  # a damaged or wrong file
        raise WeightsUnavailableError(
            f"the cached weights {path} cannot be loaded ({type(exc).__name__})",
            f"delete the file so that it is downloaded again, or pass {option('pretrained', False)}") from None
    model.reset_classifier(num_classes)
    return model


def list_timm(pretrained: bool) -> list[str]:
    """timm's architectures (without weight tags), as ``timm/NAME``."""
    return [PREFIX + n for n in timm_module().list_models(pretrained=pretrained)
            if "." not in n] if not pretrained else sorted(
        {PREFIX + n.split(".")[0] for n in timm_module().list_models(pretrained=True)})
