"""The model names of the DenseNet and ResNet modules (light: no torch import, for --help)."""

DENSENET_NAMES = ("densenet121", "densenet161", "densenet169", "densenet201")
RESNET_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2")
DENSENET_DEFAULT = "densenet201"
RESNET_DEFAULT = "resnext101_32x8d"
