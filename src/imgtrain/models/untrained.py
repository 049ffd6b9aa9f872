"""The DenseNet and ResNet modules: each writes an untrained model directory (a spec, no code).

Light: neither torch nor torchvision is imported unless pretrained weights must be downloaded.
"""

from __future__ import annotations

from imgtrain.directories.atomic import atomic_output_dir, check_output_writable
from imgtrain.directories.model_directory import ModelSpec, library_versions, write_model_directory
from imgtrain.errors import InvalidParameterError
from imgtrain.models.names import DENSENET_DEFAULT, RESNET_DEFAULT, check_model_name, model_names
from imgtrain.models.weights import ensure_pretrained_weights


def _make(family: str, output, model_name: str, pretrained: bool, options: dict, overwrite: bool) -> ModelSpec:
    if check_model_name(model_name) != family:
        raise InvalidParameterError(f"{model_name} is not a {family} model",
                                    f"choose one of {', '.join(model_names(family))}")
    check_output_writable(output, overwrite=overwrite)
    if pretrained:
        ensure_pretrained_weights(model_name)  # fail now, not at training time
    spec = ModelSpec(architecture=model_name, pretrained=pretrained, options=options,
                     versions=library_versions())
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
