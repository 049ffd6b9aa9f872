"""The baseline: Azure ML designer's Train PyTorch Model recipe as a plain PyTorch loop.

fp32; every image decoded with PIL every epoch in the main process (a DataLoader without workers);
resized to the training size, ToTensor, normalised with mean and std 0.5; SGD with momentum 0.9,
Nesterov and weight decay 1e-4; cross-entropy; batch size 16; validation after every epoch.
It reads the same ImageDirectories as imgtrain (images.lst and _schema.json) and imports nothing from it.

    python bench/baseline_train.py --training-data T --validation-data V --model resnet18 \
        --image-size 64 --epochs 2 --json result.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms


def read_image_directory(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """Paths, label indices and categories of an ImageDirectory."""
    schema = json.loads((root / "_schema.json").read_text(encoding="utf-8"))
    column = next(c for c in schema["columnAttributes"] if c.get("name") == "category")
    ordered = sorted(column["properties"]["categories"], key=lambda c: int(c["id"]))
    categories = [str(c["name"]) for c in ordered]
    index = {name: i for i, name in enumerate(categories)}
    paths, labels = [], []
    with open(root / "images.lst", encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                row = json.loads(line)
                paths.append(root / row["image_info"]["file_name"])
                labels.append(index[row["category"]])
    return paths, labels, categories


def designer_transform(image_size: int) -> transforms.Compose:
    return transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
        transforms.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    ])


class ImageListDataset(Dataset):
    def __init__(self, paths: list[Path], labels: list[int], transform) -> None:
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB")), self.labels[i]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--training-data", type=Path, required=True)
    parser.add_argument("--validation-data", type=Path, required=True)
    parser.add_argument("--model", default="resnet18", help="a torchvision model name")
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=0.001)
    parser.add_argument("--random-seed", type=int, default=1)
    parser.add_argument("--json", type=Path, required=True, help="where to write the per-epoch figures")
    args = parser.parse_args()

    torch.manual_seed(args.random_seed)
    train_paths, train_labels, categories = read_image_directory(args.training_data)
    val_paths, val_labels, _ = read_image_directory(args.validation_data)
    transform = designer_transform(args.image_size)
    # Drop a last batch of one image, which BatchNorm cannot train on (imgtrain does the same).
    train_loader = DataLoader(ImageListDataset(train_paths, train_labels, transform), batch_size=args.batch_size,
                              shuffle=True, num_workers=0, drop_last=len(train_paths) % args.batch_size == 1)
    val_loader = DataLoader(ImageListDataset(val_paths, val_labels, transform), batch_size=args.batch_size,
                            shuffle=False, num_workers=0)
    model = getattr(torchvision.models, args.model)(weights=None, num_classes=len(categories))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=0.9, nesterov=True,
                                weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    epochs = []
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        model.train()
        seen, loss_sum = 0, 0.0
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            seen += len(y)
            loss_sum += loss.item() * len(y)
        train_seconds = time.perf_counter() - started
        model.eval()
        correct, total = 0, 0
        with torch.no_grad():
            for x, y in val_loader:
                correct += int((model(x).argmax(1) == y).sum())
                total += len(y)
        epochs.append({"epoch": epoch, "train_images_per_second": seen / train_seconds,
                       "train_loss": loss_sum / seen, "validation_top1_accuracy": correct / total,
                       "seconds": time.perf_counter() - started})
        print(f"epoch {epoch}/{args.epochs}  train loss {loss_sum / seen:.4f}  {seen / train_seconds:,.1f} img/s  "
              f"val top-1 {correct / total:.2%}", flush=True)
    args.json.write_text(json.dumps({"epochs": epochs, "threads": torch.get_num_threads()}), encoding="utf-8")


if __name__ == "__main__":
    main()
