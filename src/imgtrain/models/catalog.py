"""The table to choose a model from: every image classifier torchvision ships, read from its own registries.

Nothing here is kept by hand: the names come from ``torchvision.models.list_models`` and the figures
from each architecture's DEFAULT weights' metadata (parameters, GFLOPs at the default size, ImageNet
top-1, the weight file's size, the transforms' crop size), so a torchvision upgrade brings its new
models and figures along. Reading it builds no network and downloads nothing.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from imgtrain.errors import InvalidParameterError, check_choice
from imgtrain.models.names import FAMILIES

SORTS = ("name", "params", "gflops", "accuracy")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str  # torchvision's module: resnet, efficientnet, vision_transformer, ...
    params: int
    gflops: float  # at the default image size
    top1: float | None  # ImageNet-1K top-1 of the DEFAULT pretrained weights, %
    weights_mb: float | None
    image_size: int  # the DEFAULT weights' crop size
    pretrained: bool  # torchvision has ImageNet weights for it
    module: str  # the imgtrain command that builds it: densenet, resnet (the designer's), image-model


def catalog() -> list[ModelInfo]:
    """Every classification architecture torchvision ships, in torchvision's order."""
    import torchvision.models as tvm

    rows = []
    for name in tvm.list_models(module=tvm):
        weights = tvm.get_model_weights(name)
        default = weights.DEFAULT if len(weights) else None
        meta = default.meta if default is not None else {}
        crop = getattr(default.transforms(), "crop_size", [224]) if default is not None else [224]
        top1 = meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
        rows.append(ModelInfo(name, tvm.get_model_builder(name).__module__.rsplit(".", 1)[-1],
                              int(meta.get("num_params", 0)), float(meta.get("_ops", 0.0)), top1,
                              meta.get("_file_size"), int(crop[0]), default is not None,
                              FAMILIES.get(name, "image-model")))
    return rows


def timm_catalog() -> list[ModelInfo]:
    """timm's architectures (imgtrain[timm]), as ``timm/NAME``: timm records no parameter counts or accuracies
    without building them, so those columns are empty; the image size is its default weights'."""
    from imgtrain.models.timm_models import timm_module

    timm = timm_module()
    with_weights = {n.split(".")[0] for n in timm.list_models(pretrained=True)}
    rows = []
    for name in timm.list_models():
        cfg = timm.models.get_pretrained_cfg(name)
        size = int(cfg.input_size[-1]) if cfg is not None else 224
        rows.append(ModelInfo(f"timm/{name}", "timm", 0, 0.0, None, None, size, name in with_weights, "image-model"))
    return rows


def select(rows: list[ModelInfo], pattern: str | None = None, *, pretrained: bool = False,
           sort: str = "name") -> list[ModelInfo]:
    """The rows whose name matches ``pattern`` (a shell pattern such as ``'efficientnet*'``, or a part of
    the name), with pretrained weights if asked, sorted by name, or most parameters, GFLOPs or accuracy
    first."""
    check_choice("sort", sort, SORTS)
    if pattern:
        glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        rows = [r for r in rows if fnmatch.fnmatch(r.name.lower(), glob.lower())]
        if not rows:
            raise InvalidParameterError(f"no {'timm' if pattern.startswith('timm/') else 'torchvision'} classifier "
                                        f"matches {pattern!r}",
                                        "run `imgtrain list-models` for all of them")
    if pretrained:
        rows = [r for r in rows if r.pretrained]
    key = {"name": lambda r: r.name, "params": lambda r: -r.params, "gflops": lambda r: -r.gflops,
           "accuracy": lambda r: -(r.top1 or 0.0)}[sort]
    return sorted(rows, key=key)


def table(rows: list[ModelInfo]) -> str:
    """A plain-text table, one row per architecture."""
    header = ["name", "family", "params (M)", "GFLOPs", "ImageNet top-1", "weights (MB)", "image size", "imgtrain"]
    lines = [[r.name, r.family, f"{r.params / 1e6:.1f}" if r.params else "-", f"{r.gflops:.2f}" if r.gflops else "-",
              f"{r.top1:.1f}%" if r.top1 is not None else "-",
              f"{r.weights_mb:.0f}" if r.weights_mb is not None else "-", str(r.image_size),
              f"imgtrain {r.module}" if r.module else "-"] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    right = {2, 3, 4, 5, 6}

    def render(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                              strict=True))).rstrip()

    return "\n".join([render(header), render(["-" * w for w in widths]), *map(render, lines)])
