"""The architectures imgtrain builds: torchvision's DenseNets and ResNets, by name only.

A model directory names an architecture; it is looked up here and nowhere else, so opening
a model directory never imports a module or runs code named in a file.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models import WeightsEnum

from imgtrain.errors import WeightsUnavailableError, option
from imgtrain.models.names import FAMILIES, WEIGHTS_URLS, check_model_name
from imgtrain.models.weights import ensure_pretrained_weights


@dataclass(frozen=True)
class Architecture:
    name: str
    family: str  # the designer module that makes it: "densenet" or "resnet"
    builder: Callable[..., nn.Module]
    weights: WeightsEnum  # torchvision's ImageNet weights for fine-tuning
    head: str  # attribute holding the final Linear layer


ARCHITECTURES: dict[str, Architecture] = {}

for _builder, _weights in [
    (tvm.densenet121, tvm.DenseNet121_Weights.DEFAULT),
    (tvm.densenet161, tvm.DenseNet161_Weights.DEFAULT),
    (tvm.densenet169, tvm.DenseNet169_Weights.DEFAULT),
    (tvm.densenet201, tvm.DenseNet201_Weights.DEFAULT),
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
    _family = FAMILIES[_builder.__name__]
    ARCHITECTURES[_builder.__name__] = Architecture(_builder.__name__, _family, _builder, _weights,
                                                    "classifier" if _family == "densenet" else "fc")

# names.py keeps the names and weight files light to import; they must be torchvision's own.
assert list(ARCHITECTURES) == list(FAMILIES)
assert {n: a.weights.url for n, a in ARCHITECTURES.items()} == WEIGHTS_URLS, "models/names.py is out of date"


def get_architecture(name: str) -> Architecture:
    check_model_name(name)
    return ARCHITECTURES[name]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
                f"delete the file so that it is downloaded again, or pass {option('pretrained', False)}",
            ) from None
        old = getattr(model, arch.head)
        setattr(model, arch.head, nn.Linear(old.in_features, num_classes))
        return model
    return arch.builder(weights=None, num_classes=num_classes, **kwargs)
