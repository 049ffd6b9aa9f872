"""The DenseNet and ResNet modules, and image-model for any other torchvision classifier: each writes an
untrained model directory (a spec, no code).

Light: DenseNet and ResNet import neither torch nor torchvision unless pretrained weights must be
downloaded; image-model reads torchvision's registries.
"""

from __future__ import annotations

from imgtrain.directories.atomic import atomic_output_dir, check_output_writable
from imgtrain.directories.model_directory import ModelSpec, library_versions, write_model_directory
from imgtrain.errors import InvalidParameterError, option
from imgtrain.models.names import DENSENET_DEFAULT, RESNET_DEFAULT, check_model_name, model_names
from imgtrain.models.weights import ensure_pretrained_weights


def _make(family: str, output, model_name: str, pretrained: bool, options: dict, overwrite: bool) -> ModelSpec:
    if check_model_name(model_name) != family:
        raise InvalidParameterError(f"{model_name} is not a {family} model",
                                    f"choose one of {', '.join(model_names(family))}")
    return _write(output, model_name, pretrained, options, {}, overwrite)


def _write(output, model_name: str, pretrained: bool, options: dict, preprocessing: dict,
           overwrite: bool, url: str | None = None) -> ModelSpec:
    check_output_writable(output, overwrite=overwrite)
    if pretrained and model_name.startswith("timm/"):
        from imgtrain.models.timm_models import ensure_timm_weights

        ensure_timm_weights(model_name)  # fail now, not at training time
    elif pretrained:
        ensure_pretrained_weights(model_name, url)
    spec = ModelSpec(architecture=model_name, pretrained=pretrained, options=options,
                     versions=library_versions(), preprocessing=preprocessing)
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        write_model_directory(tmp, spec)
    return spec


def densenet(output, *, model_name: str = DENSENET_DEFAULT, pretrained: bool = True,
             memory_efficient: bool = False, overwrite: bool = False) -> ModelSpec:
    """Write an untrained DenseNet model directory; memory_efficient trades compute for memory."""
    return _make("densenet", output, model_name, pretrained, {"memory_efficient": memory_efficient}, overwrite)


def resnet(output, *, model_name: str = RESNET_DEFAULT, pretrained: bool = True,
           zero_init_residual: bool = False, overwrite: bool = False) -> ModelSpec:
    """Write an untrained ResNet model directory; zero_init_residual zeroes each block's last BN."""
    return _make("resnet", output, model_name, pretrained, {"zero_init_residual": zero_init_residual}, overwrite)


def image_model(output, *, model_name: str, pretrained: bool = True, overwrite: bool = False) -> ModelSpec:
    """Write an untrained model directory for any image classifier torchvision ships (`imgtrain list-models`):
    ConvNeXt, EfficientNet(V2), RegNet, MobileNet, ViT, Swin, ..., or timm's as ``timm/NAME`` (with the
    extra imgtrain[timm]). With ``pretrained``, its weights are fetched now, and the directory records how
    they expect their images (resize, crop, mean, std)."""
    from imgtrain.models.registry import get_architecture

    arch = get_architecture(model_name)  # an unknown name: InvalidParameterError naming the closest ones
    if pretrained and not arch.has_weights:
        raise InvalidParameterError(f"torchvision has no pretrained weights for {model_name}",
                                    f"pass {option('pretrained', False)}")
    # Inception V3's and GoogLeNet's ImageNet weights were trained on images scaled to [-1, 1]: their builders
    # turn ImageNet-normalised input into that when told so.
    options = {"transform_input": True} if pretrained and arch.family in ("inception", "googlenet") else {}
    return _write(output, model_name, pretrained, options, arch.preprocessing.to_dict() if pretrained else {},
                  overwrite, arch.weights.url if arch.weights is not None else None)
