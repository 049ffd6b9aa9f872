"""The architectures imgtrain builds: torchvision's DenseNets and ResNets, by name only.

A model directory names an architecture; it is looked up here and nowhere else, so opening
a model directory never imports a module or runs code named in a file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models import WeightsEnum

from imgtrain.errors import InvalidParameterError, WeightsUnavailableError
from imgtrain.models.names import DENSENET_NAMES, RESNET_NAMES

OFFLINE_ENV = "IMGTRAIN_OFFLINE"  # set to 1 to never download pretrained weights


@dataclass(frozen=True)
class Architecture:
    name: str
    family: str  # the designer module that makes it: "densenet" or "resnet"
    builder: Callable[..., nn.Module]
    weights: WeightsEnum  # torchvision's ImageNet weights for fine-tuning
    head: str  # attribute holding the final Linear layer


ARCHITECTURES: dict[str, Architecture] = {}


def _register(family: str, head: str, builder: Callable[..., nn.Module], weights: WeightsEnum) -> None:
    ARCHITECTURES[builder.__name__] = Architecture(builder.__name__, family, builder, weights, head)


for _builder, _weights in [
    (tvm.densenet121, tvm.DenseNet121_Weights.DEFAULT),
    (tvm.densenet161, tvm.DenseNet161_Weights.DEFAULT),
    (tvm.densenet169, tvm.DenseNet169_Weights.DEFAULT),
    (tvm.densenet201, tvm.DenseNet201_Weights.DEFAULT),
]:
    _register("densenet", "classifier", _builder, _weights)
for _builder, _weights in [
    (tvm.resnet18, tvm.ResNet18_Weights.DEFAULT),
    (tvm.resnet34, tvm.ResNet34_Weights.DEFAULT),
    (tvm.resnet50, tvm.ResNet50_Weights.DEFAULT),
    (tvm.resnet101, tvm.ResNet101_Weights.DEFAULT),
    (tvm.resnet152, tvm.ResNet152_Weights.DEFAULT),
    (tvm.resnext50_32x4d, tvm.ResNeXt50_32X4D_Weights.DEFAULT),
    (tvm.resnext101_32x8d, tvm.ResNeXt101_32X8D_Weights.DEFAULT),
    (tvm.wide_resnet50_2, tvm.Wide_ResNet50_2_Weights.DEFAULT),
    (tvm.wide_resnet101_2, tvm.Wide_ResNet101_2_Weights.DEFAULT),
]:
    _register("resnet", "fc", _builder, _weights)


assert tuple(n for n in ARCHITECTURES if ARCHITECTURES[n].family == "densenet") == DENSENET_NAMES
assert tuple(n for n in ARCHITECTURES if ARCHITECTURES[n].family == "resnet") == RESNET_NAMES


def model_names(family: str | None = None) -> list[str]:
    return [a.name for a in ARCHITECTURES.values() if family in (None, a.family)]


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise InvalidParameterError(
            f"unknown model name {name!r}", f"choose one of {', '.join(model_names())}"
        ) from None


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def weights_cache_path(name: str) -> Path:
    """Where torchvision keeps (and looks for) the pretrained weights of ``name``."""
    url = get_architecture(name).weights.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def ensure_pretrained_weights(name: str) -> Path:
    """Make sure the ImageNet weights of ``name`` are in torchvision's cache; download if allowed."""
    arch = get_architecture(name)
    path = weights_cache_path(name)
    if path.is_file():
        return path
    hint = (f"download {arch.weights.url} and place it at {path}, "
            "or pass --no-pretrained to train from scratch")
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise WeightsUnavailableError(
            f"pretrained weights for {name} are not cached and {OFFLINE_ENV} forbids downloading", hint)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        prefix = Path(arch.weights.url).stem.rsplit("-", 1)[-1]  # torchvision names files <name>-<sha256 prefix>
        torch.hub.download_url_to_file(arch.weights.url, str(path), hash_prefix=prefix, progress=True)
    except Exception as exc:  # any network or file failure: the hint says what to do
        raise WeightsUnavailableError(
            f"pretrained weights for {name} could not be downloaded ({type(exc).__name__}: {exc})", hint
        ) from None
    return path


_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _new_densenet_keys(state: dict) -> dict:
    """torchvision's DenseNet files use old key names ('norm.1.weight' for 'norm1.weight')."""
    renamed = {}
    for key, value in state.items():
        match = _OLD_DENSENET_KEY.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed


def build_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    memory_efficient: bool = False,
    zero_init_residual: bool = False,
) -> nn.Module:
    """Build ``name`` with a classifier head of ``num_classes`` outputs.

    Pretrained: torchvision's ImageNet network with its 1000-way classifier *replaced* by a
    new one (the designer stacked a second Linear on top of it instead).
    """
    arch = get_architecture(name)
    kwargs = {"memory_efficient": memory_efficient} if arch.family == "densenet" else {
        "zero_init_residual": zero_init_residual}
    if pretrained:
        path = ensure_pretrained_weights(name)
        model = arch.builder(weights=None, **kwargs)
        try:
            # weights_only: tensors are read, no pickled code is ever run (the file may have been placed by hand).
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(_new_densenet_keys(state) if arch.family == "densenet" else state)
        except Exception as exc:  # a damaged, hostile or wrong file
            raise WeightsUnavailableError(
                f"the cached weights {path} cannot be loaded ({type(exc).__name__})",
                "delete the file so that it is downloaded again, or pass --no-pretrained",
            ) from None
        old = getattr(model, arch.head)
        setattr(model, arch.head, nn.Linear(old.in_features, num_classes))
        return model
    return arch.builder(weights=None, num_classes=num_classes, **kwargs)
