"""The architectures imgtrain builds: every image classifier torchvision ships, by name only.

The names, builders and ImageNet weights come from torchvision's own registries
(``torchvision.models.list_models``, ``get_model_builder``, ``get_model_weights``), so a torchvision
upgrade brings its new classifiers along. A model directory names an architecture; it is looked up
here and nowhere else, so opening a model directory never imports a module or runs code named in a
file.

What differs between the families is kept to the few facts torchvision's builders need told:

- the classifier head is the network's last Linear (SqueezeNet's: its last 1x1 convolution), found in
  the built network, and replaced by one with as many outputs as there are classes;
- Inception V3 and GoogLeNet: the auxiliary classifiers are loaded with the ImageNet weights and then
  dropped (imgtrain trains on the main output), and their pretrained weights expect ``transform_input``;
- ViT and MaxViT are built for one input size (``image_size`` / ``input_size``): see ``Architecture.sizes``.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models import WeightsEnum

from imgtrain.errors import (
    ImageSizeError,
    InvalidModelDirectoryError,
    InvalidParameterError,
    WeightsUnavailableError,
    option,
)
from imgtrain.models.names import FAMILIES
from imgtrain.models.weights import ensure_pretrained_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 4096  # training's own bounds (--image-size)

_AUXILIARY = ("inception", "googlenet")  # families with auxiliary classifiers and transform_input
_SIZE_ARGUMENT = {"vision_transformer": "image_size", "maxvit": "input_size"}  # built for one input size


@dataclass(frozen=True)
class Preprocessing:
    """How torchvision's ImageNet weights of an architecture expect their images (their eval transforms)."""

    resize_size: int
    crop_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        return {"resize_size": self.resize_size, "crop_size": self.crop_size, "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class Architecture:
    name: str
    family: str  # torchvision's module: resnet, densenet, efficientnet, vision_transformer, ...
    builder: Callable[..., nn.Module]
    weights: WeightsEnum | None  # torchvision's DEFAULT ImageNet weights, if it has any

    @property
    def has_weights(self) -> bool:
        return self.weights is not None

    @property
    def preprocessing(self) -> Preprocessing:
        """The weights' preprocessing; ImageNet's statistics at 224 px for an architecture without weights."""
        if self.weights is None:
            return Preprocessing(256, 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD)
        t = self.weights.transforms()
        return Preprocessing(int(t.resize_size[0]), int(t.crop_size[0]), t.interpolation.value,
                             tuple(float(x) for x in t.mean), tuple(float(x) for x in t.std))

    @property
    def min_size(self) -> int:
        """The smallest image the network takes (torchvision's weights record it), at least training's 32."""
        found = self.weights.meta.get("min_size", (1, 1))[0] if self.weights is not None else 1
        return max(MIN_IMAGE_SIZE, int(found))

    def sizes(self, pretrained: bool, trained_size: int | None = None) -> tuple[int, int, int]:
        """The image sizes the network takes: (smallest, step, largest); every step from the smallest.

        ViT cuts the image into patches and learns one position embedding per patch: from scratch any
        multiple of the patch size, with ImageNet weights the weights' size only, once trained its
        training size only. MaxViT's windows need multiples of 224. The rest take any size from the
        smallest their weights record.
        """
        if self.family == "vision_transformer":
            if trained_size is not None or pretrained:
                size = trained_size or self.min_size
                return size, 1, size
            patch = int(re.search(r"_(\d+)$", self.name).group(1))
            return math.ceil(MIN_IMAGE_SIZE / patch) * patch, patch, MAX_IMAGE_SIZE // patch * patch
        if self.family == "maxvit":
            return 224, 224, MAX_IMAGE_SIZE // 224 * 224
        return self.min_size, 1, MAX_IMAGE_SIZE

    def accepts(self, size: int, pretrained: bool, trained_size: int | None = None) -> bool:
        low, step, high = self.sizes(pretrained, trained_size)
        return low <= size <= high and (size - low) % step == 0

    def fit_size(self, size: int, pretrained: bool, trained_size: int | None = None) -> int:
        """The nearest size the network takes, not below ``size`` where possible."""
        low, step, high = self.sizes(pretrained, trained_size)
        return min(high, max(low, low + math.ceil((size - low) / step) * step))

    def describe_sizes(self, pretrained: bool, trained_size: int | None = None) -> str:
        low, step, high = self.sizes(pretrained, trained_size)
        if low == high:
            return f"{low} px only" + (" (its training size)" if trained_size else
                                       " with its ImageNet weights" if pretrained else "")
        if step > 1:
            return f"multiples of {step} from {low} to {high} px"
        return f"{low} to {high} px"

    def check_size(self, size: int, pretrained: bool, source: str, trained_size: int | None = None,
                   hint: Callable[[int], str] | None = None) -> None:
        """ImageSizeError, saying which sizes work, unless the network takes ``size`` px images; ``hint``: how
        to get a size that works (the one suggested), where --image-size does not decide it."""
        if not self.accepts(size, pretrained, trained_size):
            suggestion = self.fit_size(size, pretrained, trained_size)
            raise ImageSizeError(
                f"{self.name} cannot take {size} px images ({source}); it takes "
                f"{self.describe_sizes(pretrained, trained_size)}",
                hint(suggestion) if hint else
                f"pass {option('image_size', suggestion)}, or leave it out and imgtrain chooses one")


@dataclass(frozen=True)
class TimmArchitecture(Architecture):
    """A timm model (models/timm_models.py): sizes and preprocessing from its pretrained config."""

    @property
    def has_weights(self) -> bool:
        from imgtrain.models.timm_models import pretrained_config

        return bool(pretrained_config(self.name).get("hf_hub_id"))

    @property
    def preprocessing(self) -> Preprocessing:
        from imgtrain.models.timm_models import preprocessing

        p = preprocessing(self.name)
        return Preprocessing(p["resize_size"], p["crop_size"], p["interpolation"], tuple(p["mean"]), tuple(p["std"]))

    def sizes(self, pretrained: bool, trained_size: int | None = None) -> tuple[int, int, int]:
        from imgtrain.models.timm_models import fixed_size

        fixed = fixed_size(self.name)
        if fixed:  # built for one size: its config's (a trained one: that too, since it was built so)
            return fixed, 1, fixed
        return MIN_IMAGE_SIZE, 1, MAX_IMAGE_SIZE


@functools.cache
def architecture_names() -> tuple[str, ...]:
    """Every image classifier torchvision ships, in its order."""
    return tuple(tvm.list_models(module=tvm))


@functools.cache
def get_architecture(name: str) -> Architecture:
    if name.startswith("timm/"):
        from imgtrain.models.timm_models import build_timm, check_timm_name

        check_timm_name(name)
        return TimmArchitecture(name, "timm", build_timm, None)
    if name not in architecture_names():
        close = difflib.get_close_matches(name, architecture_names(), n=3)
        raise InvalidParameterError(
            f"unknown model name {name!r}" + (f" (did you mean {' or '.join(close)}?)" if close else ""),
            "`imgtrain list-models` lists every architecture imgtrain builds")
    weights = tvm.get_model_weights(name)
    return Architecture(name, tvm.get_model_builder(name).__module__.rsplit(".", 1)[-1],
                        tvm.get_model_builder(name), weights.DEFAULT if len(weights) else None)


def is_known(name: str) -> bool:
    """A name imgtrain builds (a timm name without timm installed: MissingDependencyError, saying how)."""
    if name.startswith("timm/"):
        from imgtrain.models.timm_models import check_timm_name

        try:
            check_timm_name(name)
        except InvalidParameterError:
            return False
        return True
    return name in FAMILIES or name in architecture_names()


def load_known_spec(root, *, need_trained: bool | None = None):
    """A model directory's spec (directories/ reads and checks its form) whose architecture imgtrain
    can build: InvalidModelDirectoryError naming the file otherwise (a timm name without timm:
    MissingDependencyError, saying how to install it)."""
    from imgtrain.directories.model_directory import HINT, SPEC_FILE, load_model_spec

    spec = load_model_spec(root, need_trained=need_trained)
    if not is_known(spec.architecture):
        raise InvalidModelDirectoryError(
            f"{root}/{SPEC_FILE}: unknown architecture {spec.architecture!r}; imgtrain builds the image classifiers "
            "torchvision ships (`imgtrain list-models` lists them)", HINT)
    return spec


def head_of(model: nn.Module) -> str:
    """The name of the classifier head: timm's ``get_classifier()``, else the network's last Linear, or last
    convolution (SqueezeNet)."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        for name, module in model.named_modules():
            if module is head and name:
                return name
    last = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            last = name
    if last is None:
        raise InvalidParameterError(f"{type(model).__name__} has no Linear or convolution to classify with",
                                    "choose another architecture (`imgtrain list-models`)")
    return last


@functools.cache
def head_name(name: str) -> str:
    """The head of architecture ``name``, from a network built on the meta device (no memory, no time)."""
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return head_of(_build(get_architecture(name), 1000, {}, None, pretrained=False))
        except NotImplementedError:  # a builder that computes on tensors (RegNet): built for real
            pass
    return head_of(_build(get_architecture(name), 1000, {}, None, pretrained=False))


def replace_head(model: nn.Module, num_classes: int) -> None:
    """Give ``model`` a new, freshly initialised head of ``num_classes`` outputs (timm's models: their own
    ``reset_classifier``)."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return
    path = head_of(model)
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size, stride=old.stride)
        nn.init.normal_(new.weight, mean=0.0, std=0.01)  # as torchvision's SqueezeNet starts its classifier
        nn.init.zeros_(new.bias)
    setattr(parent, attr, new.to(device=old.weight.device, dtype=old.weight.dtype))


def load_weights(network: nn.Module, state: dict, *, strict: bool = True):
    """``network.load_state_dict`` for a plain dict of tensors, as safetensors gives: such a file keeps no
    module versions, which some modules read (MNASNet refuses to load without), so the network's own
    are used: imgtrain saved the weights from a network of the same build."""
    ordered = OrderedDict(state)
    ordered._metadata = getattr(network.state_dict(), "_metadata", None)
    return network.load_state_dict(ordered, strict=strict)


def _build(arch: Architecture, num_classes: int, options: dict, image_size: int | None, *,
           pretrained: bool) -> nn.Module:
    kwargs = dict(options)
    if arch.family in _AUXILIARY:
        # the auxiliary classifiers exist only to load the ImageNet weights; init_weights said once (no warning)
        kwargs.update(aux_logits=pretrained, init_weights=not pretrained)
    if arch.family in _SIZE_ARGUMENT:
        size = image_size or arch.sizes(pretrained)[0]
        kwargs[_SIZE_ARGUMENT[arch.family]] = size if arch.family == "vision_transformer" else (size, size)
    return arch.builder(weights=None, num_classes=num_classes, **kwargs)


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
    image_size: int | None = None,
    **options,
) -> nn.Module:
    """Build ``name`` with a classifier head of ``num_classes`` outputs.

    Pretrained: torchvision's ImageNet network with its 1000-way classifier *replaced* by a
    new one (the designer stacked a second Linear on top of it instead). ``image_size`` matters
    only to the architectures built for one input size (ViT, MaxViT). ``options`` are the
    builder's own: memory_efficient (DenseNet), zero_init_residual (ResNet), transform_input
    (Inception V3, GoogLeNet).
    """
    arch = get_architecture(name)
    if isinstance(arch, TimmArchitecture):
        return arch.builder(name, num_classes, pretrained=pretrained, image_size=image_size)
    if not pretrained:
        return _build(arch, num_classes, options, image_size, pretrained=False)
    if arch.weights is None:
        raise WeightsUnavailableError(f"torchvision has no pretrained weights for {name}",
                                      f"pass {option('pretrained', False)}")
    path = ensure_pretrained_weights(name, arch.weights.url)
    model = _build(arch, len(arch.weights.meta["categories"]), options, image_size, pretrained=True)
    try:
        # weights_only: tensors are read, no pickled code is ever run (the file may have been placed by hand).
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(_new_densenet_keys(state) if arch.family == "densenet" else state)
    except Exception as exc:  # a damaged, hostile or wrong file
        raise WeightsUnavailableError(
            f"the cached weights {path} cannot be loaded ({type(exc).__name__})",
            f"delete the file so that it is downloaded again, or pass {option('pretrained', False)}",
        ) from None
    if arch.family in _AUXILIARY:  # trained on the main output only: the auxiliary classifiers go
        model.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, aux):
                setattr(model, aux, None)
    replace_head(model, num_classes)
    return model
