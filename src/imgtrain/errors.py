"""The named errors of imgtrain, as the designer names them.

Every error carries a message (what is wrong, naming the file or parameter) and a hint
(how to fix it). The CLI prints them as one line: ``error: <Name>: <message>. <hint>``.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import re
from collections.abc import Iterator, Sequence

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # OSError numbers that mean "free space, then try again"

_ON_THE_COMMAND_LINE = contextvars.ContextVar("imgtrain_on_the_command_line", default=False)
_FLAG_NAMES = {"warmup_epochs": "warmup-steps"}  # the designer's name, where the CLI uses it
_NO_VALUE = object()


@contextlib.contextmanager
def speaking_command_line() -> Iterator[None]:
    """Inside this block (the CLI), messages name parameters as flags; elsewhere, as Python arguments."""
    token = _ON_THE_COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _ON_THE_COMMAND_LINE.reset(token)


def option(name: str, value: object = _NO_VALUE) -> str:
    """A parameter (with a value) as the user passes it: ``--batch-size 8`` or ``--no-pretrained`` on
    the command line, ``batch_size=8`` or ``pretrained=False`` in Python. None, on the command line, is
    the flag left out: ``no --image-size``."""
    if not _ON_THE_COMMAND_LINE.get():
        return name if value is _NO_VALUE else f"{name}={value!r}"
    flag = "--" + _FLAG_NAMES.get(name, name).replace("_", "-")
    if value is _NO_VALUE or value is True:
        return flag
    if value is None:
        return f"no {flag}"
    return "--no-" + flag[2:] if value is False else f"{flag} {value}"


def escaped(text: str) -> str:
    """``text`` with its control characters as their escapes (``\\n``, ``\\x1b``): a message that quotes a name
    from the user's files stays on its line and changes nothing of the terminal it is printed on."""
    return re.sub(r"[\x00-\x1f\x7f-\x9f]", lambda m: repr(m.group())[1:-1], text)


def one_line(exc: BaseException) -> str:
    """An error's text on one line, whatever it quotes (another library's message over several lines, a file
    name with a line break or a terminal's escape sequence in it): line breaks of every kind become spaces,
    other control characters their escapes."""
    return escaped(" ".join(part.strip() for part in str(exc).splitlines()))


def shown(name: str) -> str:
    """A name from the user's data (a label, a class) as a message shows it: escaped, the empty one as ''."""
    return escaped(name) if name else "''"


def some(names: Sequence[str], at_most: int = 10) -> str:
    """``cat, dog``, or the first few and how many more: ``a, b, ..., j and 28 more``; each name ``shown``."""
    listed = ", ".join(shown(name) for name in names[:at_most])
    return listed + (f" and {len(names) - at_most:,} more" if len(names) > at_most else "")


class ImgtrainError(Exception):
    """Base of every error imgtrain raises on purpose."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        text = self.message.rstrip(".")
        return f"{text}. {self.hint}" if self.hint else text


class InvalidModelDirectoryError(ImgtrainError):
    """The directory is not a model directory of the kind the module needs."""


class InvalidModelFileError(InvalidModelDirectoryError):
    """An exported model file (ONNX, OpenVINO) that cannot be read, or whose graph does not match its metadata."""


class InvalidDatasetError(ImgtrainError):
    """The data set is missing, empty, malformed, or does not match another one."""


class BadImageError(InvalidDatasetError):
    """An image file that cannot be decoded; the message names the file and the reason."""

    reason: str = "it cannot be decoded"


class NotLabeledDatasetError(ImgtrainError):
    """The module needs labelled images and the data set has none."""


class NotInRangeValueError(ImgtrainError):
    """A parameter is outside its allowed range."""

    def __init__(self, name: str, value: object, allowed: str, hint: str = "") -> None:
        super().__init__(
            f"parameter {option(name)} is {value!r}, allowed: {allowed}",
            hint or f"pass a value of {option(name)} in {allowed}",
        )
        self.name = name


class InvalidParameterError(ImgtrainError):
    """A parameter value is not one the module knows (a device, a model name, ...)."""


class ImageSizeError(ImgtrainError):
    """The architecture cannot take images of the size asked for (ViT, MaxViT, or below its smallest)."""


class WeightsUnavailableError(ImgtrainError):
    """Pretrained weights are neither cached nor downloadable."""


class OutputExistsError(ImgtrainError):
    """The output directory exists and would be replaced."""


class OutputNotWritableError(ImgtrainError):
    """The output cannot be written where it was asked for."""


class TrainingDivergedError(ImgtrainError):
    """The loss became NaN or infinite."""


class OutOfMemoryError(ImgtrainError):
    """The device ran out of memory."""


class CheckpointMismatchError(ImgtrainError):
    """A resume found a checkpoint made with other data or parameters."""


class CheckpointDamagedError(ImgtrainError):
    """A resume found a checkpoint that cannot be read."""


class CheckpointExistsError(ImgtrainError):
    """An interrupted run left a checkpoint, and the new run was asked neither to resume nor to restart."""


class DistributedRunError(ImgtrainError):
    """Another process of a distributed run stopped, or the processes could not reach each other."""


class InvalidTransformationDirectoryError(ImgtrainError):
    """The input is not a TransformationDirectory (the output of Init Image Transformation), or a damaged one."""


class InvalidPipelineError(ImgtrainError):
    """A pipeline file that cannot run: unknown components, ports or parameters, wrong types, dangling
    bindings, cycles."""


class ExportError(ImgtrainError):
    """The exporter cannot turn the model into the format asked for (an architecture or opset it refuses)."""


class AccuracyDropError(ExportError):
    """An int8 export loses more top-1 accuracy on the held-out images than --max-accuracy-drop allows."""


class EngineError(ImgtrainError):
    """An inference engine (ONNX Runtime, OpenVINO) asked for by name could not load the model."""


class MissingDependencyError(ImgtrainError):
    """An option needs an optional package (an extra, such as imgtrain[mlflow]) that is not installed."""


def check_choice(name: str, value: object, allowed: tuple) -> None:
    """Raise InvalidParameterError unless value is one of allowed."""
    if value not in allowed:
        raise InvalidParameterError(f"{option(name)} {value!r} is not known", f"choose one of {', '.join(allowed)}")


def check_range(
    name: str, value: float, *, low: float | None = None, high: float | None = None,
    low_inclusive: bool = True, high_inclusive: bool = True, hint: str = "",
) -> None:
    """Raise NotInRangeValueError unless value lies in the range (ends inclusive by default)."""
    if isinstance(value, float) and value != value:  # NaN compares false with everything
        raise NotInRangeValueError(name, value, "a number", hint)
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        lo = "(-inf" if low is None else ("[" if low_inclusive else "(") + _number(low)
        hi = "inf)" if high is None else _number(high) + ("]" if high_inclusive else ")")
        raise NotInRangeValueError(name, value, f"{lo}, {hi}", hint)


def _number(x: float) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:g}"
