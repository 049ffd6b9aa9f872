"""The DenseNet and ResNet modules' model names and the files of their ImageNet weights.

Every other torchvision classifier is known to models/registry.py, from torchvision's own registries.

Light: no torch import, so that `--help`, `imgtrain resnet` and `imgtrain densenet` start at
once. The registry checks, on import, that these are the URLs of torchvision's own weights.
"""

DENSENET_NAMES = ("densenet121", "densenet161", "densenet169", "densenet201")
RESNET_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2")
DENSENET_DEFAULT = "densenet201"
RESNET_DEFAULT = "resnext101_32x8d"
FAMILIES = {**dict.fromkeys(DENSENET_NAMES, "densenet"), **dict.fromkeys(RESNET_NAMES, "resnet")}

_DOWNLOADS = "https://download.pytorch.org/models/"
# torchvision's DEFAULT ImageNet weights of each architecture; files are named <name>-<sha256 prefix>.pth
WEIGHTS_URLS = {name: _DOWNLOADS + file for name, file in {
    "densenet121": "densenet121-a639ec97.pth",
    "densenet161": "densenet161-8d451a50.pth",
    "densenet169": "densenet169-b2777c0a.pth",
    "densenet201": "densenet201-c1103571.pth",
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-11ad3fa6.pth",
    "resnet101": "resnet101-cd907fc2.pth",
    "resnet152": "resnet152-f82ba261.pth",
    "resnext50_32x4d": "resnext50_32x4d-1a0047aa.pth",
    "resnext101_32x8d": "resnext101_32x8d-110c445d.pth",
    "wide_resnet50_2": "wide_resnet50_2-9ba9bcbe.pth",
    "wide_resnet101_2": "wide_resnet101_2-d733dc28.pth",
}.items()}


def model_names(family: str | None = None) -> list[str]:
    return [name for name, f in FAMILIES.items() if family in (None, f)]


def check_model_name(name: str) -> str:
    """The family of a known model name; InvalidParameterError naming the choices otherwise."""
    from imgtrain.errors import InvalidParameterError

    if name not in FAMILIES:
        raise InvalidParameterError(f"unknown model name {name!r}", f"choose one of {', '.join(model_names())}")
    return FAMILIES[name]
