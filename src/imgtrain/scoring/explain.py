"""Where a model looked: a saliency map for each image, drawn over it (Captum, the extra imgtrain[explain]).

- Convolutional networks: Grad-CAM (Captum's ``LayerGradCam``) on the deepest feature map that still has
  at least 7 x 7 cells (the last stage's at 224 px; an earlier one for small images, where the last is 1 x 1
  or 2 x 2), for the predicted class, upsampled to the image.
- Transformers (ViT, Swin, MaxViT: any network with attention), whose last feature maps are tokens rather
  than a grid: integrated gradients (Captum's ``IntegratedGradients``, 16 steps from a black image), the
  absolute attribution summed over colour channels and smoothed over 1/16 of the image.

Maps are scaled to a maximum of 1. The image is the one the model saw: decoded and prepared (resized to
its size, or its transformation's fixed operations) as scoring does.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgtrain.errors import InvalidParameterError, MissingDependencyError

PAGE = "index.html"
LISTING = "explanations.json"  # each PNG's image, true and predicted label, probability and method
MIN_CELLS = 7  # Grad-CAM's map: the deepest one with at least this many cells a side (ResNet's last at 224 px)


@dataclass
class Explanation:
    image: str  # as the user named it
    truth: str | None
    predicted: str
    probability: float  # of the predicted label
    picture: np.ndarray  # H x W x 3 uint8, as the model saw it
    saliency: np.ndarray  # H x W float, maximum 1
    method: str


def captum_module():
    try:
        import captum.attr
    except ImportError:
        raise MissingDependencyError("explanations need Captum, which is not installed",
                                     "install it with `pip install 'imgtrain[explain]'`") from None
    return captum.attr


def method_for(network: nn.Module) -> str:
    attention = any(isinstance(m, nn.MultiheadAttention) or "attention" in type(m).__name__.lower()
                    for m in network.modules())
    return "integrated gradients" if attention else "Grad-CAM"


def _grad_cam_layer(network: nn.Module, x: torch.Tensor) -> nn.Module:
    """The module whose output is the deepest N x C x H x W map with H, W >= 7 (else the deepest one > 1)."""
    seen: list[tuple[nn.Module, int]] = []

    def hook(module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[1] > 3 \
                and not getattr(module, "inplace", False):
            seen.append((module, min(output.shape[-2:])))

    handles = [m.register_forward_hook(hook) for m in network.modules() if m is not network]
    try:
        with torch.no_grad():
            network(x[:1])
    finally:
        for h in handles:
            h.remove()
    fine = [m for m, side in seen if side >= MIN_CELLS] or [m for m, side in seen if side > 1]
    if not fine:
        raise InvalidParameterError(f"{type(network).__name__} has no feature map to explain with Grad-CAM",
                                    "explain a model trained at a larger --image-size")
    return fine[-1]


def saliency(network: nn.Module, x: torch.Tensor, targets: list[int], method: str) -> np.ndarray:
    """N x H x W maps for normalised images ``x`` (N x 3 x H x W) and their target classes."""
    attr = captum_module()
    network.eval()
    target = torch.tensor(targets, device=x.device)
    if method == "Grad-CAM":
        cam = attr.LayerGradCam(network, _grad_cam_layer(network, x))
        maps = cam.attribute(x, target=target, relu_attributions=True)
        maps = attr.LayerAttribution.interpolate(maps, tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0]
    else:
        ig = attr.IntegratedGradients(network)
        maps = ig.attribute(x, baselines=torch.zeros_like(x), target=target, n_steps=16,
                            internal_batch_size=16).abs().sum(dim=1, keepdim=True)
        side = max(1, x.shape[-1] // 16)
        maps = nn.functional.avg_pool2d(maps, 2 * side + 1, stride=1, padding=side, count_include_pad=False)[:, 0]
    maps = maps.detach().float().clamp(min=0)
    peak = maps.flatten(1).amax(dim=1).clamp(min=1e-12)
    return (maps / peak[:, None, None]).cpu().numpy()


def explain_images(model, paths: list[Path], names: list[str], truths: list[str | None] | None = None,
                   batch_size: int = 8, device: str = "auto") -> list[Explanation]:
    """An Explanation for each image file, for the class the model predicts, computed on ``device`` (auto:
    the GPU where there is one), in fp32."""
    from imgtrain.data.transforms import Normalize
    from imgtrain.device import resolve_device

    where = resolve_device(device)
    network = model.network.to(where).float().eval()
    method = method_for(network)
    normalize = Normalize(model.spec.input.mean, model.spec.input.std).to(where)
    preparation = model.preparation
    out = []
    for start in range(0, len(paths), batch_size):
        chunk = range(start, min(start + batch_size, len(paths)))
        pictures = torch.stack([preparation.load(paths[i]) for i in chunk])
        x = normalize(pictures.to(where))
        with torch.no_grad():
            probabilities = network(x).float().softmax(dim=1).cpu()
        predicted = probabilities.argmax(dim=1).tolist()
        maps = saliency(network, x.requires_grad_(method != "Grad-CAM"), predicted, method)
        for k, i in enumerate(chunk):
            out.append(Explanation(names[i], truths[i] if truths else None, model.labels[predicted[k]],
                                   float(probabilities[k, predicted[k]]), pictures[k].permute(1, 2, 0).numpy(),
                                   maps[k], method))
    return out


def overlay_png(e: Explanation, size: int = 224) -> bytes:
    """The image beside the same image under its saliency map (jet, half transparent), captioned."""
    from matplotlib.figure import Figure

    from imgtrain.reports.page import figure_png

    figure = Figure(figsize=(2 * size / 100, size / 100 + 0.45))
    for k, title in enumerate(("image", e.method)):
        ax = figure.add_axes((k / 2 + 0.01, 0.02, 0.48, 0.98 * size / (size + 45)))
        ax.imshow(e.picture, interpolation="nearest")
        if k:
            ax.imshow(e.saliency, cmap="jet", alpha=0.5, vmin=0, vmax=1, interpolation="bilinear")
        ax.set_axis_off()
        ax.set_title(title, fontsize=8)
    truth = f"true: {e.truth}  ·  " if e.truth is not None else ""
    figure.suptitle(f"{truth}predicted: {e.predicted} ({e.probability:.1%})", fontsize=9, y=0.995)
    return figure_png(figure)


def mistake_overlays(trained_model, mistakes, shown: int = 8) -> list[tuple[object, bytes]]:
    """Overlays for the first ``shown`` mistakes whose image is found, for the evaluation report: [] when
    Captum is not installed or the model cannot be loaded (the report is written without them)."""
    try:
        captum_module()
        from imgtrain.models.trained import TrainedModel, load_trained_model

        model = trained_model if isinstance(trained_model, TrainedModel) else load_trained_model(trained_model)
        found = [m for m in mistakes if m.path is not None][:shown]
        explained = explain_images(model, [m.path for m in found], [m.image for m in found],
                                   [m.truth for m in found])
        return [(m, overlay_png(e)) for m, e in zip(found, explained, strict=True)]
    except Exception:  # an explanation is a bonus: a model that is gone or an image that changed loses it only
        return []


def explain(trained_model, dataset, output, *, images: int = 16, device: str = "auto", overwrite: bool = False,
            log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> list[Explanation]:
    """Write, for up to ``images`` images of ``dataset`` (an ImageDirectory, folder, files or patterns), an
    overlay of where the model looked, as PNG files and one HTML page (``output/index.html``). With labels,
    the mistakes come first, most confident first; then the rest in order. ``device``: auto (the GPU where
    there is one), cpu, cuda or cuda:N."""
    from imgtrain.device import resolve_device
    from imgtrain.directories.atomic import atomic_output_dir, check_output_writable
    from imgtrain.errors import check_range
    from imgtrain.models.trained import TrainedModel, load_trained_model
    from imgtrain.reports.page import Page
    from imgtrain.scoring.score import _rows, predict

    check_range("images", images, low=1)
    resolve_device(device)  # cuda without a GPU: named before any work
    captum_module()  # missing: say so before any work
    rows = _rows(dataset)
    given = trained_model.path if isinstance(trained_model, TrainedModel) else trained_model
    check_output_writable(output, overwrite=overwrite, inputs={"trained model": given, "dataset": rows.given})
    model = trained_model if isinstance(trained_model, TrainedModel) else load_trained_model(trained_model)
    order = list(range(len(rows.paths)))
    if rows.categories is not None:
        found = predict(model, rows.paths, device=device)
        wrong = [i for i in order if found[i].label != rows.categories[i]]
        wrong.sort(key=lambda i: -found[i].probability)
        order = wrong + [i for i in order if i not in set(wrong)]
    chosen = order[:images]
    explanations = explain_images(model, [rows.paths[i] for i in chosen], [rows.names[i] for i in chosen],
                                  [rows.categories[i] for i in chosen] if rows.categories is not None else None,
                                  device=device)
    page = Page(f"Where {Path(model.path).name} looked")
    page.paragraph(f"{len(explanations)} images; {explanations[0].method} for the predicted class "
                   "(red: what raised its score most)." if explanations else "No images.", css="lead")
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        listed = []
        for n, e in enumerate(explanations):
            png = overlay_png(e)
            (tmp / f"{n:03d}.png").write_bytes(png)
            page.figure(png, e.image, e.image)
            listed.append({"file": f"{n:03d}.png", "image": e.image, "truth": e.truth, "predicted": e.predicted,
                           "probability": float(e.probability), "method": e.method})
        page.write(tmp / PAGE)
        (tmp / LISTING).write_text(json.dumps(listed, indent=1), encoding="utf-8")
    log(f"Explanations of {len(explanations)} images written to {output} (open {Path(output) / PAGE})")
    return explanations
