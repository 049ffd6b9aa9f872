"""Init Image Transformation and Apply Image Transformation, as the designer has them.

Init writes the chosen operations as a TransformationDirectory (directories/transformation_directory.py);
Apply runs them over an ImageDirectory and writes a new one, every image re-encoded as PNG with
the same ids and categories. ``inference`` mode drops the random operations.

Beyond the designer: the random operations are seeded (``random_seed`` and the image's id decide
each image's draw, so a re-run gives the same files), Grayscale really converts, and Color jitter
really jitters (the designer writes ``["ColorJitter", {}]``, torchvision's do-nothing defaults, and
keeps it at inference; imgtrain reads ``{}`` as brightness, contrast and saturation 0.4, the
ImageNet recipe's, and drops it at inference with the other random operations).
"""

from __future__ import annotations

import hashlib
import io
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from imgtrain.data.decode import load_rgb
from imgtrain.directories.atomic import atomic_output_dir, check_not_an_input
from imgtrain.directories.image_directory import ImageDirectory, write_image_directory_files
from imgtrain.directories.transformation_directory import Operation, load_transformation, write_transformation
from imgtrain.errors import check_choice, check_range
from imgtrain.progress import bar

MODES = ("training", "inference")
DESIGNER_MODES = {"For training": "training", "For inference": "inference"}  # the designer's names
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4}  # what ["ColorJitter", {}] means here


@dataclass
class ImageTransformation:
    """Init Image Transformation's parameters, with the designer's defaults."""

    resize: bool = True
    size: int = 256
    center_crop: bool = True
    crop_size: int = 224
    pad: bool = False
    padding: int = 0
    color_jitter: bool = False
    grayscale: bool = False
    random_resized_crop: bool = False
    random_size: int = 256
    random_crop: bool = False
    random_crop_size: int = 224
    random_horizontal_flip: bool = True
    random_vertical_flip: bool = False
    random_rotation: bool = False
    random_rotation_degrees: float = 0
    random_affine: bool = False
    random_affine_degrees: float = 0
    random_grayscale: bool = False
    random_perspective: bool = False
    random_erasing: bool = False

    def check(self) -> None:
        for name in ("size", "crop_size", "random_size", "random_crop_size"):
            check_range(name, getattr(self, name), low=1)
        check_range("padding", self.padding, low=0)
        for name in ("random_rotation_degrees", "random_affine_degrees"):
            check_range(name, getattr(self, name), low=0, high=180)

    def operations(self) -> list[Operation]:
        """The operations that are on, in the designer's order and with its arguments."""
        chosen = [
            (self.resize, "Resize", self.size), (self.center_crop, "CenterCrop", self.crop_size),
            (self.pad, "Pad", self.padding), (self.color_jitter, "ColorJitter", {}),
            (self.grayscale, "Grayscale", {"num_output_channels": 3}),
            (self.random_resized_crop, "RandomResizedCrop", self.random_size),
            (self.random_crop, "RandomCrop", self.random_crop_size),
            (self.random_horizontal_flip, "RandomHorizontalFlip", {}),
            (self.random_vertical_flip, "RandomVerticalFlip", {}),
            (self.random_rotation, "RandomRotation", _number(self.random_rotation_degrees)),
            (self.random_affine, "RandomAffine", _number(self.random_affine_degrees)),
            (self.random_grayscale, "RandomGrayscale", {}), (self.random_perspective, "RandomPerspective", {}),
            (self.random_erasing, "RandomErasing", {}),
        ]
        return [Operation(name, argument) for on, name, argument in chosen if on]


def _number(x: float) -> int | float:
    """10, not 10.0, as the designer writes whole degrees."""
    return int(x) if float(x).is_integer() else float(x)


def init_image_transformation(output: Path | str, params: ImageTransformation | None = None, *,
                              overwrite: bool = False, **overrides) -> list[Operation]:
    """Write a TransformationDirectory; parameters as an ImageTransformation or as keywords (``size=128``)."""
    params = ImageTransformation(**{**(asdict(params) if params else {}), **overrides})
    params.check()
    operations = params.operations()
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        write_transformation(tmp, operations)
    return operations


def is_random(op: Operation) -> bool:
    """Dropped at inference: the designer's Random* operations, and Color jitter (random here, see above)."""
    return op.random or op.name == "ColorJitter"


def compose(operations: list[Operation], mode: str = "training") -> Callable:
    """The operations of ``mode`` as one callable on uint8 CHW tensors (torchvision's v2 transforms)."""
    from torchvision.transforms import v2

    kinds = {"Resize": v2.Resize, "CenterCrop": v2.CenterCrop, "Pad": v2.Pad, "ColorJitter": v2.ColorJitter,
             "Grayscale": v2.Grayscale, "RandomResizedCrop": v2.RandomResizedCrop, "RandomCrop": v2.RandomCrop,
             "RandomHorizontalFlip": v2.RandomHorizontalFlip, "RandomVerticalFlip": v2.RandomVerticalFlip,
             "RandomRotation": v2.RandomRotation, "RandomAffine": v2.RandomAffine,
             "RandomGrayscale": v2.RandomGrayscale, "RandomPerspective": v2.RandomPerspective,
             "RandomErasing": v2.RandomErasing}
    defaults = {"ColorJitter": JITTER, "Grayscale": {"num_output_channels": 3}}
    steps = []
    for op in operations:
        if mode == "inference" and is_random(op):
            continue
        if isinstance(op.argument, dict):
            steps.append(kinds[op.name](**{**defaults.get(op.name, {}), **op.argument}))
        else:
            whole = op.name not in ("RandomRotation", "RandomAffine")  # sizes and paddings are pixels
            steps.append(kinds[op.name](int(op.argument) if whole else float(op.argument)))
    return v2.Compose(steps)


def apply_image_transformation(
    transformation: Path | str,
    dataset: Path | str,
    output: Path | str,
    *,
    mode: str = "training",
    random_seed: int = 1,
    overwrite: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> ImageDirectory:
    """Apply a TransformationDirectory to every image of an ImageDirectory; write the result as a new one."""
    import torch
    from torchvision.transforms.v2 import functional

    mode = DESIGNER_MODES.get(mode, mode)
    check_choice("mode", mode, MODES)
    check_not_an_input(output, {"transformation": transformation, "dataset": dataset})
    operations = load_transformation(transformation)
    images = ImageDirectory.load(dataset)
    transform = compose(operations, mode)
    kept = [op.name for op in operations if mode == "training" or not is_random(op)]
    log(f"Applying {', '.join(kept) or 'no operation'} ({mode}) to {len(images):,} images")
    with atomic_output_dir(output, overwrite=overwrite, inputs={"transformation": transformation,
                                                                "dataset": dataset}) as tmp:
        files, infos = [], []
        for i in bar(range(len(images)), what="transforming", total=len(images), show=progress):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(random_seed % 2**32 * 1_000_003 + int(images.ids[i]))
                result = transform(functional.pil_to_tensor(load_rgb(images.path(i))))
            encoded = io.BytesIO()
            functional.to_pil_image(result).save(encoded, format="PNG")
            name = str(PurePosixPath(images.files[i]).with_suffix(".png"))
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(encoded.getvalue())
            files.append(name)
            infos.append({**images.info(i), "width": int(result.shape[-1]), "height": int(result.shape[-2]),
                          "sha256": hashlib.sha256(encoded.getvalue()).hexdigest()})
        write_image_directory_files(tmp, files, images.categories or None, images.labels, ids=images.ids,
                                    infos=infos)
    return ImageDirectory.load(output)
