"""A peer of the `tta` section: fastai's way to train an image classifier, from scratch.

Run by bench/tta_peers.py with the pinned fastai folder first on PYTHONPATH. What a fastai user writes:

    dls = ImageDataLoaders.from_folder(ROOT, train="train", valid="val", item_tfms=Resize(SIZE), bs=16)
    learn = vision_learner(dls, resnet18, pretrained=False, metrics=accuracy)
    learn.fit_one_cycle(5, 1e-3)

``fit_one_cycle``, not ``fine_tune`` (which is for pretrained weights). fastai's own defaults otherwise: its
Adam (decoupled weight decay 0.01), one-cycle schedule, cross-entropy, no batch augmentation (``aug_transforms``
is opt-in), ``vision_learner``'s head (concatenated average and max pooling, two linear layers with batch norm
and dropout) on torchvision's ResNet-18 body, DataLoader workers ``defaults.cpus``. Its one CPU speed option:
``to_channelslast(use_amp=False)`` (``--channels-last``); fastai's mixed precision (``MixedPrecision``, also
bf16) is CUDA-only (``autocast('cuda')``), so training is fp32. One line is printed after each epoch's
validation, for the benchmark to stamp: ``fastai epoch N/E val top-1 X%``; fastai's ``CSVLogger`` writes the
same history to ``--csv``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="ROOT with train/<class>/* and val/<class>/*")
    parser.add_argument("--size", type=int, required=True, help="image size, px")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="fit_one_cycle's lr_max (fastai's default: 1e-3)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--csv", type=Path, required=True, help="fastai's CSVLogger file")
    args = parser.parse_args(argv)

    from fastai.vision.all import (
        Callback,
        CSVLogger,
        ImageDataLoaders,
        Recorder,
        Resize,
        accuracy,
        resnet18,
        set_seed,
        vision_learner,
    )

    class EpochLine(Callback):
        """Prints each epoch's validation top-1 once the Recorder has it."""

        order = Recorder.order + 1

        def after_epoch(self) -> None:
            names = self.recorder.metric_names[1:-1]  # epoch and time are not in the values
            top1 = 100 * float(self.recorder.values[-1][names.index("accuracy")])
            print(f"fastai epoch {self.epoch + 1}/{self.n_epoch} val top-1 {top1:.4f}%", flush=True)

    set_seed(args.seed, reproducible=True)
    dls = ImageDataLoaders.from_folder(args.data, train="train", valid="val", item_tfms=Resize(args.size),
                                       bs=args.batch, seed=args.seed)
    learn = vision_learner(dls, resnet18, pretrained=False, metrics=accuracy,
                           cbs=[CSVLogger(fname=args.csv), EpochLine()])
    if args.channels_last:
        learn.to_channelslast(use_amp=False)
    with learn.no_bar():
        learn.fit_one_cycle(args.epochs, args.lr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
