"""The TransformationDirectory: Init Image Transformation's output, in the designer's format.

Layout (the designer's, so each tool reads the other's)::

    _meta.yaml          type: TransformationDirectory, extension: {}, transform_type: Image
    _transforms.json    an ordered list of [name, argument] pairs: [["Resize", 256], ["CenterCrop", 224],
                        ["RandomHorizontalFlip", {}]]; the argument is a number, or {} for the defaults,
                        or an object of the operation's keyword arguments

Reading one checks every pair against the operations imgtrain knows: a name is never looked up in
a library by its text, and an argument of the wrong kind is a named error. Building the operations
is data/transformation.py's work; this module needs no torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from imgtrain.directories.files import read_text
from imgtrain.errors import InvalidTransformationDirectoryError

META_FILE = "_meta.yaml"
TRANSFORMS_FILE = "_transforms.json"
KIND = "TransformationDirectory"
HINT = "make one with `imgtrain init-image-transformation`"

# name -> (what its number argument is, the keyword arguments an object may hold); None: takes no number
OPERATIONS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "Resize": ("size", ("size", "antialias")),
    "CenterCrop": ("size", ("size",)),
    "Pad": ("padding", ("padding", "fill", "padding_mode")),
    "ColorJitter": (None, ("brightness", "contrast", "saturation", "hue")),
    "Grayscale": (None, ("num_output_channels",)),
    "RandomResizedCrop": ("size", ("size", "scale", "ratio", "antialias")),
    "RandomCrop": ("size", ("size", "padding", "pad_if_needed", "fill", "padding_mode")),
    "RandomHorizontalFlip": (None, ("p",)),
    "RandomVerticalFlip": (None, ("p",)),
    "RandomRotation": ("degrees", ("degrees", "expand", "fill")),
    "RandomAffine": ("degrees", ("degrees", "translate", "scale", "shear", "fill")),
    "RandomGrayscale": (None, ("p",)),
    "RandomPerspective": (None, ("distortion_scale", "p", "fill")),
    "RandomErasing": (None, ("p", "scale", "ratio", "value")),
}


@dataclass(frozen=True)
class Operation:
    name: str
    argument: float | int | dict  # as in the file: a number, or keyword arguments ({} for the defaults)

    @property
    def random(self) -> bool:
        """Drawn anew each time (the designer drops these in inference mode, by their name)."""
        return self.name.startswith("Random")

    def to_json(self) -> list:
        return [self.name, self.argument]


def load_transformation(root: Path | str) -> list[Operation]:
    """The operations of a TransformationDirectory, checked; InvalidTransformationDirectoryError otherwise."""
    root = Path(root)
    if not (root / META_FILE).is_file():
        what = "does not exist" if not root.exists() else f"has no {META_FILE}"
        raise InvalidTransformationDirectoryError(f"{root} {what}: it is not a TransformationDirectory", HINT)
    try:
        meta = yaml.safe_load(read_text(root / META_FILE))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise InvalidTransformationDirectoryError(f"{root / META_FILE} cannot be read ({exc})", HINT) from None
    kind = meta.get("type") if isinstance(meta, dict) else None
    if kind != KIND:
        raise InvalidTransformationDirectoryError(f"{root} is not a TransformationDirectory (its type is {kind!r})",
                                                  HINT)
    try:
        pairs = json.loads(read_text(root / TRANSFORMS_FILE))
    except (OSError, ValueError) as exc:
        raise InvalidTransformationDirectoryError(f"{root / TRANSFORMS_FILE} cannot be read ({exc})", HINT) from None
    return parse_operations(pairs, str(root / TRANSFORMS_FILE))


def parse_operations(pairs: object, where: str) -> list[Operation]:
    """``[[name, argument], ...]`` as operations, each checked; InvalidTransformationDirectoryError naming ``where``."""
    if not isinstance(pairs, list):
        raise InvalidTransformationDirectoryError(f"{where} is not a list of [name, argument]", HINT)
    return [_operation(pair, f"{where}, operation {n}") for n, pair in enumerate(pairs, 1)]


def _operation(pair: object, where: str) -> Operation:
    if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
        raise InvalidTransformationDirectoryError(f"{where} is {pair!r}, not a [name, argument] pair", HINT)
    name, argument = pair
    if name not in OPERATIONS:
        raise InvalidTransformationDirectoryError(
            f"{where}: {name!r} is not an image operation imgtrain knows", f"known: {', '.join(OPERATIONS)}")
    number, keywords = OPERATIONS[name]
    if isinstance(argument, dict):
        unknown = sorted(set(argument) - set(keywords))
        if unknown:
            raise InvalidTransformationDirectoryError(
                f"{where}: {name} takes no {', '.join(map(repr, unknown))}", f"{name} takes {', '.join(keywords)}")
        if not all(_plain(v) for v in argument.values()):
            raise InvalidTransformationDirectoryError(f"{where}: {name}'s arguments must be numbers or lists of them",
                                                      HINT)
    elif number is None or isinstance(argument, bool) or not isinstance(argument, (int, float)) \
            or not math.isfinite(argument) or argument < 0:
        expected = f"a number >= 0 ({number}) or an object" if number else "an object ({} for its defaults)"
        raise InvalidTransformationDirectoryError(f"{where}: {name}'s argument is {argument!r}, not {expected}", HINT)
    return Operation(name, argument)


def _plain(value: object) -> bool:
    """A value an operation's keyword may take: a number, a short text, true/false, null, or a few numbers."""
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, str):
        return len(value) <= 20
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    return isinstance(value, list) and len(value) <= 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)


def write_transformation(root: Path, operations: list[Operation]) -> None:
    """Write the two files of a TransformationDirectory into ``root`` (a folder made for it)."""
    meta = {"type": KIND, "extension": {}, "transform_type": "Image"}
    (root / META_FILE).write_text(yaml.safe_dump(meta, sort_keys=False), encoding="utf-8")
    (root / TRANSFORMS_FILE).write_text(json.dumps([op.to_json() for op in operations]), encoding="utf-8")
