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

import functools
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
from imgtrain.errors import BadImageError, InvalidParameterError, check_choice, check_range, option
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
                picture = functional.pil_to_tensor(load_rgb(images.path(i)))
                try:
                    result = transform(picture)
                except ValueError as exc:  # torchvision's: an image smaller than a crop, say
                    raise BadImageError(
                        f"image {images.path(i)}: the transformation cannot take it, {picture.shape[-1]} x "
                        f"{picture.shape[-2]} px ({str(exc).rstrip('.')})",
                        "resize the images first (a Resize in the transformation), let RandomCrop pad them "
                        "(pad_if_needed), or remove the image") from None
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


@dataclass(frozen=True)
class TrainingTransformation:
    """A transformation as Train PyTorch Model runs it (``--transformation``) and the trained model keeps it.

    - ``fixed``: the operations before the first random one, run once per image; their result is what
      the decoded-image cache keeps.
    - ``random``: the rest, anew for every image and epoch (in place of ``--augmentation``), on the image
      as the fixed ones leave it, as Apply Image Transformation runs them; only their result is brought
      to ``image_size`` (squashed, where it has another shape): the size the network trains at.
    - ``inference``: every operation that is not random, wherever it stands: what the trained model
      records and scoring (and validation) applies, before squashing to ``image_size`` when the
      result is another shape.

    The sizes are read off the operations: a crop (CenterCrop, RandomCrop, RandomResizedCrop) or a
    Resize to a square makes a square of its size, Pad adds to it, the rest keep it. The training size
    is the square the operations make; where they make none, the one asked for, else the fixed
    operations' square or Resize, else ``fallback_size``.

    Where the fixed operations make squares, the cache keeps them (``cached_size``). Where they leave
    the shape to the picture (a Resize of the shorter side, a Pad, no operation at all) and random
    operations follow, the cache keeps each picture in that shape (``keeps_shape``), up to
    ``2 x cached_size x cached_size`` pixels (a larger one is decoded anew each time): a random crop
    must see the picture, not a square squashed from it. Where nothing random follows, it keeps the
    training image itself.
    """

    fixed: tuple[Operation, ...]
    random: tuple[Operation, ...]
    inference: tuple[Operation, ...]
    cached_size: int
    image_size: int
    keeps_shape: bool = False

    @classmethod
    def of(cls, operations: list[Operation], image_size: int | None, fallback_size: Callable[[], int],
           source: str = "the transformation") -> TrainingTransformation:
        """``image_size``: the one asked for (None: none); ``fallback_size``: the size to use where neither
        the operations nor the user decide (called only then)."""
        first_random = next((i for i, op in enumerate(operations) if is_random(op)), len(operations))
        fixed, random = tuple(operations[:first_random]), tuple(operations[first_random:])
        inference = tuple(op for op in operations if not is_random(op))
        decided = square_side(operations, None)
        if decided is not None and image_size is not None and decided != image_size:
            raise InvalidParameterError(
                f"{option('image_size')} {image_size} disagrees with {source}, whose operations make "
                f"{decided} x {decided} images", f"drop {option('image_size')}, or change the transformation's sizes")
        squares, resize = square_side(fixed, None), _last_resize(fixed)
        fallback = functools.cache(fallback_size)
        final = decided or image_size or squares or resize or fallback()
        keeps_shape = squares is None and bool(random)
        if keeps_shape:  # slots for pictures of the Resize's side, else of the size chosen from them or trained at
            cached = resize or max(final, fallback())
        else:  # the fixed operations' squares, or, where nothing random follows, the training image itself
            cached = squares or final
        return cls(fixed, random, inference, cached, final, keeps_shape)

    def preparation(self):
        """What a training image goes through once, before the cache: the fixed operations."""
        from imgtrain.data.transforms import Preparation

        return Preparation(self.cached_size, self.fixed, keep_shape=self.keeps_shape)

    def augmentation(self):
        """What a training image goes through anew every epoch: the random operations, then the training size."""
        from imgtrain.data.transforms import RandomOperations

        return RandomOperations(self.random, self.image_size) if self.random else None

    def size_hint(self, side: int) -> str | None:
        """How to make the operations leave ``side`` x ``side`` images, where they decide the training size
        (None where they do not: then --image-size decides it)."""
        operations = self.fixed + self.random
        now = square_side(operations, None)
        sizing = [i for i, op in enumerate(operations) if op.name in _INIT_FLAGS]
        if now is None or not sizing:
            return None
        last = sizing[-1]
        op, padding = operations[last], square_side(operations[last + 1:], 0) or 0  # what a Pad after it adds
        needed = side - padding
        made = (f"this one leaves {now} x {now}: its {op.name} makes {now - padding} x {now - padding}, its Pad "
                f"adds {padding}") if padding else f"this one's {op.name} makes {now} x {now}"
        change = f"make a transformation that leaves {side} x {side} images instead ({made})"
        if needed < 1:
            return change
        flags = {_INIT_FLAGS[op.name]: needed}
        resize = next((o for o in operations[:last] if o.name == "Resize"), None)
        if op.name in ("CenterCrop", "RandomCrop") and resize is not None and isinstance(_size(resize), int) \
                and _size(resize) < needed:
            flags["size"] = needed  # a crop larger than the resized picture would be padded with black (or refused)
        return (f"{change}: init-image-transformation with "
                f"{' and '.join(option(name, value) for name, value in flags.items())}, its other parameters as before")

    def describe(self) -> str:
        """'Resize, CenterCrop once (224 px, cached), RandomHorizontalFlip every epoch; scoring applies ...'."""
        def names(ops: tuple[Operation, ...]) -> str:
            return ", ".join(op.name for op in ops) or "nothing"

        cached = (f"each picture in the shape they leave, cached up to {2 * self.cached_size ** 2:,} pixels"
                  if self.keeps_shape else f"{self.cached_size} px, cached")
        return (f"{names(self.fixed)} once ({cached}), {names(self.random)} every epoch; "
                f"scoring applies {names(self.inference)}")


# The parameter of init_image_transformation that sets each sizing operation's size
_INIT_FLAGS = {"Resize": "size", "CenterCrop": "crop_size", "RandomCrop": "random_crop_size",
               "RandomResizedCrop": "random_size"}


def _size(op: Operation) -> tuple[int, int] | int | None:
    """An operation's size argument: (height, width), or one number (a Resize's shorter side, a crop's side)."""
    size = op.argument.get("size") if isinstance(op.argument, dict) else op.argument
    if isinstance(size, list):
        return (int(size[0]), int(size[0])) if len(size) == 1 else (int(size[0]), int(size[1]))
    return None if size is None else int(size)


def _padding(op: Operation, side: int) -> int | None:
    """A square of ``side`` after Pad: a side of 2p, or left + right (None where the padding makes it oblong)."""
    p = op.argument.get("padding", 0) if isinstance(op.argument, dict) else op.argument
    p = [p] if isinstance(p, (int, float)) else list(p)
    left, top, right, bottom = (p * 4)[:4] if len(p) == 1 else (p * 2)[:4] if len(p) == 2 else p[:4]
    return side + int(left) + int(right) if left + right == top + bottom else None


def square_side(operations: tuple[Operation, ...] | list[Operation], side: int | None) -> int | None:
    """The side of the square ``operations`` leave, given a square of ``side`` (None: a picture of any
    shape); None where the result's shape depends on the picture."""
    for op in operations:
        size = _size(op)
        if op.name in ("Resize", "CenterCrop", "RandomCrop", "RandomResizedCrop"):
            if isinstance(size, tuple):
                side = size[0] if size[0] == size[1] else None
            elif op.name != "Resize" or side is not None:  # a Resize of a square's side keeps it square
                side = size
        elif op.name == "Pad" and side is not None:
            side = _padding(op, side)
        elif op.name in ("RandomRotation", "RandomAffine") and isinstance(op.argument, dict) \
                and op.argument.get("expand"):
            side = None
    return side


def _last_resize(operations: tuple[Operation, ...]) -> int | None:
    sizes = [_size(op) for op in operations if op.name == "Resize"]
    return next((s if isinstance(s, int) else max(s) for s in reversed(sizes) if s is not None), None)
