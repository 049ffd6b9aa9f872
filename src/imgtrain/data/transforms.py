"""Image preparation: resize once, augment per epoch, normalise on the device.

``prepare`` turns a decoded picture into a uint8 tensor at training size (what the
decoded-image cache stores); augmentation then runs on that tensor, anew every epoch;
normalisation happens on the batch, on the training device (4x less data between
processes than float32).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from imgtrain.data.picture import squashed

AUGMENTATIONS = ("shift", "shift-flip", "none")
DEFAULT_AUGMENTATION = "shift"


def prepare(image: Image.Image, image_size: int) -> torch.Tensor:
    """RGB picture -> uint8 3 x size x size: the whole image, squashed to a square (no crop)."""
    return v2.functional.pil_to_tensor(squashed(image, image_size))


def three_channels(x: torch.Tensor) -> torch.Tensor:
    """A uint8 CHW tensor with one channel (a transformation's ["Grayscale", {"num_output_channels": 1}]) as the
    three the networks take, each that grey, as Grayscale with 3 makes them; others as they are."""
    return x.expand(3, *x.shape[1:]).contiguous() if x.shape[0] == 1 else x


def squash(x: torch.Tensor, size: int) -> torch.Tensor:
    """A uint8 CHW tensor resized to size x size, unless it is already."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return v2.functional.resize(x, [size, size], antialias=True)


class Preparation:
    """What happens to a decoded picture once (its result is what the decoded-image cache keeps):
    by default the whole picture squashed to size x size; with a transformation's fixed operations
    (Resize, CenterCrop, Pad, Grayscale), those, then squashed to size x size when they leave
    another shape, unless ``keep_shape`` (random operations follow, and must see the picture as the
    fixed ones leave it)."""

    def __init__(self, size: int, operations: Sequence | None = None, *, keep_shape: bool = False) -> None:
        from imgtrain.data.transformation import compose

        self.size, self.keep_shape = size, keep_shape
        self.steps = compose(list(operations)) if operations else None
        first = operations[0] if operations else None
        # JPEGs decode at a reduced scale only where the picture is resized first anyway: a crop
        # of the full picture must see its full resolution.
        if first is None:
            self.draft_size = None if keep_shape else size
        elif first.name == "Resize" and isinstance(first.argument, (int, float)):
            self.draft_size = int(first.argument)
        else:
            self.draft_size = None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.plain:
            return prepare(image, self.size)
        x = v2.functional.pil_to_tensor(image)
        if self.steps is not None:
            x = three_channels(self.steps(x))
        return x if self.keep_shape else squash(x, self.size)

    def load(self, path) -> torch.Tensor:
        """An image file decoded (BadImageError naming it) and prepared: every path that reads files does this."""
        from imgtrain.data.decode import load_rgb

        return self(load_rgb(path, draft_size=self.draft_size))

    @property
    def plain(self) -> bool:
        """No transformation's operations: Pillow alone prepares the picture (see ``pixels``)."""
        return self.steps is None and not self.keep_shape

    def pixels(self, image: Image.Image) -> np.ndarray:
        """The plain preparation as a size x size x 3 uint8 array (channels last), made by Pillow and numpy
        without torch: for threads that must not start torch's parallel work (deploy/batching.py)."""
        if not self.plain:
            raise ValueError("a transformation's operations run in torch: call the preparation itself")
        return np.asarray(squashed(image, self.size))


class RandomOperations:
    """A transformation's random operations (torchvision's), drawn anew for each image and epoch from
    the generator passed in, then squashed to size x size when they leave another shape. ValueError
    for an image they cannot take (smaller than a RandomCrop)."""

    def __init__(self, operations: Sequence, size: int) -> None:
        from imgtrain.data.transformation import compose

        self.steps, self.size = compose(list(operations)), size

    def __call__(self, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
        # torchvision draws from torch's CPU generator: seeded for this image, then given back as it was
        # (directly: torch.manual_seed and fork_rng take 50x longer, as they visit every device).
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(rng.getrandbits(63))
        try:
            return squash(three_channels(self.steps(x)), self.size)
        finally:
            generator.set_state(state)


class Augmentation:
    """``shift`` moves the image by up to 1/16 of its side (reflect-padded, then cropped):
    label-preserving for photos, digits and text alike. ``shift-flip`` adds horizontal flips,
    right for photos, wrong for digits and text.

    Randomness comes from the generator passed in (seeded per image and epoch), never from
    global state; numpy on a uint8 tensor takes ~25 us an image, 6x less than torchvision's.
    """

    def __init__(self, image_size: int, kind: str) -> None:
        self.pad = max(1, image_size // 16)
        self.flip = kind == "shift-flip"

    def __call__(self, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
        p = self.pad
        padded = np.pad(x.numpy(), ((0, 0), (p, p), (p, p)), mode="reflect")
        dy, dx = rng.randrange(2 * p + 1), rng.randrange(2 * p + 1)
        out = padded[:, dy:dy + x.shape[1], dx:dx + x.shape[2]]
        if self.flip and rng.random() < 0.5:
            out = out[:, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(out))


def build_augmentation(image_size: int, augmentation: str = "none") -> Augmentation | None:
    return None if augmentation == "none" else Augmentation(image_size, augmentation)


CHANNELS_LAST_FROM = 128  # px: on a CPU, smaller images compute faster in the plain layout


def memory_format(device: torch.device, image_size: int) -> torch.memory_format:
    """The layout a network and its batches compute in: channels-last on a GPU (tensor cores) and on a CPU from
    CHANNELS_LAST_FROM px; the plain (NCHW) layout for smaller images on a CPU. Measured on 2 cores with AVX-512
    BF16 (ResNet-18, batch 16, a training step, bf16, the layouts taking turns): channels-last 1.15x faster at
    224 px, even at 128, 10% slower at 64 and 21% slower at 32 (52.3 against 43.2 ms), where oneDNN's reorders
    around small convolutions cost more than the layout saves (bench/README.md, "Time to accuracy")."""
    if device.type == "cpu" and image_size < CHANNELS_LAST_FROM:
        return torch.contiguous_format
    return torch.channels_last


class Normalize(torch.nn.Module):
    """uint8 NCHW batch -> float, scaled to [0, 1] then standardised with the model's statistics,
    in the layout the network computes in (``memory_format``)."""

    def __init__(self, mean, std, layout: torch.memory_format = torch.channels_last) -> None:
        super().__init__()
        self.layout = layout
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) / self.std).contiguous(memory_format=self.layout)
