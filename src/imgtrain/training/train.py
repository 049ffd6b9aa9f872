"""Train PyTorch Model: the training loop, readable top to bottom.

Set-up (check inputs, seed, build), then per epoch: train, validate, keep the best weights,
stop early. Outputs are built in a temporary directory and moved into place at the end.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from imgtrain.data.dataset import ImageDataset, raise_for_bad_images
from imgtrain.data.transforms import AUGMENTATIONS, DEFAULT_AUGMENTATION, Normalize, build_transform
from imgtrain.device import resolve_device
from imgtrain.directories.atomic import atomic_output_dir, check_output_writable
from imgtrain.directories.image_directory import ImageDirectory
from imgtrain.directories.model_directory import (
    METRICS_FILE,
    WEIGHTS_FILE,
    InputSpec,
    ModelSpec,
    library_versions,
    load_model_spec,
    load_trained_model,
    write_model_directory,
)
from imgtrain.errors import InvalidDatasetError, InvalidParameterError, check_range
from imgtrain.models.registry import IMAGENET_MEAN, IMAGENET_STD, build_model, get_architecture
from imgtrain.training.early_stopping import EarlyStopping
from imgtrain.training.image_size import auto_image_size
from imgtrain.training.seeding import seed_everything, seed_worker

OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TrainingParameters:
    """Train PyTorch Model's parameters; the first five are the designer's, with its defaults."""

    epochs: int = 5
    batch_size: int = 16
    learning_rate: float = 0.001
    random_seed: int = 1
    patience: int = 3
    warmup_epochs: int = 0
    image_size: int | None = None  # None: chosen from the training images
    device: str = "auto"
    optimizer: str = "adamw"
    augmentation: str = DEFAULT_AUGMENTATION
    num_workers: int | None = None  # None: one per CPU core, at most 8

    def check(self, training_size: int) -> None:
        check_range("epochs", self.epochs, low=1)
        check_range("batch_size", self.batch_size, low=1, high=training_size,
                    hint=f"pass a batch size of at most {training_size}, the number of training images")
        check_range("learning_rate", self.learning_rate, low=0, low_inclusive=False, high=10)
        check_range("patience", self.patience, low=1)
        check_range("warmup_epochs", self.warmup_epochs, low=0)
        if self.image_size is not None:
            check_range("image_size", self.image_size, low=8, high=4096)
        if self.num_workers is not None:
            check_range("num_workers", self.num_workers, low=0, high=64)
        for name, value, allowed in [("optimizer", self.optimizer, OPTIMIZERS),
                                     ("augmentation", self.augmentation, AUGMENTATIONS)]:
            if value not in allowed:
                raise InvalidParameterError(f"{name} {value!r} is not known", f"choose one of {', '.join(allowed)}")


@dataclass
class EpochMetrics:
    epoch: int
    learning_rate: float
    train_images_per_second: float
    train_loss: float
    train_error: float
    validation_loss: float
    validation_top1_accuracy: float
    validation_top5_accuracy: float
    seconds: float


@dataclass
class TrainResult:
    output: Path
    best_epoch: int
    stopped_epoch: int
    best_validation_loss: float
    history: list[EpochMetrics] = field(default_factory=list)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train_pytorch_model(
    untrained_model: Path | str,
    training_data: Path | str,
    validation_data: Path | str,
    output: Path | str,
    params: TrainingParameters | None = None,
    *,
    overwrite: bool = False,
    log: Callable[[str], None] = _stderr,
    progress: bool | None = None,
    **overrides,
) -> TrainResult:
    """Train a model directory on a labelled ImageDirectory; keep the best validation-loss epoch.

    Parameters may come as a TrainingParameters or as keywords (``epochs=10``).
    """
    params = TrainingParameters(**{**(asdict(params) if params else {}), **overrides})
    base = load_model_spec(untrained_model)
    train_set = ImageDirectory.load(training_data)
    val_set = ImageDirectory.load(validation_data)
    train_labels = train_set.require_labels("training data")
    val_labels = _labels_in_order(val_set, train_set.categories)
    params.check(len(train_set))
    output = Path(output)
    check_output_writable(output, overwrite=overwrite)

    generator = seed_everything(params.random_seed)
    device = resolve_device(params.device)
    categories = train_set.categories
    image_size = params.image_size or auto_image_size([train_set.path(i) for i in range(len(train_set))])
    model = _initial_model(base, untrained_model, len(categories)).to(device)
    spec = ModelSpec(architecture=base.architecture, pretrained=base.pretrained, options=base.options,
                     trained=True, labels=list(categories), weights=WEIGHTS_FILE,
                     input=InputSpec(image_size=image_size, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)))
    normalize = Normalize(spec.input.mean, spec.input.std).to(device)

    workers = params.num_workers if params.num_workers is not None else min(8, os.cpu_count() or 1)
    loader_args = dict(batch_size=params.batch_size, num_workers=workers, worker_init_fn=seed_worker,
                       pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    train_loader = DataLoader(
        ImageDataset([train_set.path(i) for i in range(len(train_set))], train_labels,
                     build_transform(image_size, augmentation=params.augmentation), image_size),
        shuffle=True, generator=generator, drop_last=len(train_set) % params.batch_size == 1, **loader_args)
    val_dataset = ImageDataset([val_set.path(i) for i in range(len(val_set))], val_labels,
                               build_transform(image_size), image_size)
    val_loader = DataLoader(val_dataset, shuffle=False, **loader_args)

    optimizer = _make_optimizer(model, base, params)
    steps_per_epoch = len(train_loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(params.warmup_epochs * steps_per_epoch, params.epochs * steps_per_epoch))
    loss_fn = nn.CrossEntropyLoss()
    stopper = EarlyStopping(params.patience)
    history: list[EpochMetrics] = []

    start = "fine-tuning ImageNet weights" if base.pretrained else "from scratch"
    if base.trained:
        start = f"from the trained model {untrained_model}"
    log(f"Training {base.architecture} ({start}) on {len(train_set):,} images in {len(categories):,} "
        f"categories, validating on {len(val_set):,}")
    log(f"device {device}, precision fp32, image size {image_size}, batch size {params.batch_size}, "
        f"learning rate {params.learning_rate:g}, {params.optimizer}, augmentation {params.augmentation}, "
        f"up to {params.epochs} epochs, patience {params.patience}, {workers} data workers")

    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        for epoch in range(1, params.epochs + 1):
            started = time.perf_counter()
            lr = optimizer.param_groups[-1]["lr"]
            bar = tqdm(train_loader, desc=f"epoch {epoch}/{params.epochs}", leave=False, unit="batch",
                       disable=(not sys.stderr.isatty()) if progress is None else not progress)
            model.train()
            seen, loss_sum, wrong = 0, 0.0, 0
            for x, y, index, ok in bar:
                raise_for_bad_images(ok, index, train_loader.dataset)
                x, y = normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
                logits = model(x)
                loss = loss_fn(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                seen += len(y)
                loss_sum += loss.item() * len(y)
                wrong += int((logits.argmax(1) != y).sum())
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", refresh=False)
            train_seconds = time.perf_counter() - started
            val_loss, top1, top5 = evaluate_loss(model, val_loader, normalize, device, loss_fn)
            improved = stopper.update(epoch, val_loss)
            if improved:
                _save_weights(model, tmp / WEIGHTS_FILE)
            metrics = EpochMetrics(epoch, lr, seen / train_seconds, loss_sum / seen, wrong / seen,
                                   val_loss, top1, top5, time.perf_counter() - started)
            history.append(metrics)
            _write_metrics(tmp / METRICS_FILE, history)
            log(f"epoch {epoch}/{params.epochs}  lr {lr:.2e}  train loss {metrics.train_loss:.4f} "
                f"error {metrics.train_error:.2%}  {metrics.train_images_per_second:,.0f} img/s  "
                f"val loss {val_loss:.4f} top-1 {top1:.2%} top-5 {top5:.2%}" + ("  *best*" if improved else ""))
            if not math.isfinite(metrics.train_loss):
                raise InvalidParameterError(f"the training loss became {metrics.train_loss} in epoch {epoch}",
                                            "pass a lower --learning-rate")
            if stopper.should_stop:
                log(f"early stop: no lower validation loss for {params.patience} epochs")
                break
        spec.training = {
            **asdict(params), "image_size": image_size, "num_workers": workers, "device": str(device),
            "precision": "fp32", "best_epoch": stopper.best_epoch, "stopped_epoch": epoch,
            "best_validation_loss": stopper.best_loss,
            "best_validation_top1_accuracy": history[stopper.best_epoch - 1].validation_top1_accuracy,
            "training_images": len(train_set), "validation_images": len(val_set),
        }
        spec.versions = library_versions()
        write_model_directory(tmp, spec)
    return TrainResult(output, stopper.best_epoch, epoch, stopper.best_loss, history)


def _labels_in_order(val_set: ImageDirectory, categories: list[str]) -> np.ndarray:
    """Validation labels renumbered to the training categories, which must be the same set."""
    labels = val_set.require_labels("validation data")
    missing = sorted(set(categories) - set(val_set.categories))
    extra = sorted(set(val_set.categories) - set(categories))
    if missing or extra:
        raise InvalidDatasetError(
            f"validation data {val_set.root} has other categories than the training data "
            f"(missing: {missing or 'none'}; extra: {extra or 'none'})",
            "split both sets from one ImageDirectory with `imgtrain split-image-directory`")
    to_train = np.array([categories.index(c) for c in val_set.categories], dtype=np.int64)
    return to_train[labels]


def _initial_model(base: ModelSpec, path, num_classes: int) -> nn.Module:
    """The network to start from: a fresh (or ImageNet) one, or the weights of a trained model."""
    if not base.trained:
        return build_model(base.architecture, num_classes, pretrained=base.pretrained, **base.options)
    model, _ = load_trained_model(path)
    head = get_architecture(base.architecture).head
    if base.num_classes != num_classes:
        setattr(model, head, nn.Linear(getattr(model, head).in_features, num_classes))
    return model


def _make_optimizer(model: nn.Module, base: ModelSpec, params: TrainingParameters) -> torch.optim.Optimizer:
    """AdamW by default; pretrained backbones learn at a tenth of the head's rate.

    Biases and normalisation weights get no weight decay.
    """
    head = get_architecture(base.architecture).head
    backbone_lr = params.learning_rate * (0.1 if base.pretrained or base.trained else 1.0)
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        in_head = name.startswith(head + ".")
        groups.setdefault((in_head, p.ndim <= 1), []).append(p)
    decay = 0.05 if params.optimizer == "adamw" else 1e-4
    param_groups = [
        {"params": ps, "lr": params.learning_rate if in_head else backbone_lr,
         "weight_decay": 0.0 if no_decay else decay}
        for (in_head, no_decay), ps in sorted(groups.items())
    ]  # sorted: the head's groups come last, so param_groups[-1] carries the head's rate
    if params.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=params.learning_rate, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(param_groups, lr=params.learning_rate)


def _warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to zero at the last step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


@torch.no_grad()
def evaluate_loss(model: nn.Module, loader: DataLoader, normalize: Normalize, device: torch.device,
                  loss_fn: nn.Module) -> tuple[float, float, float]:
    """Mean loss, top-1 and top-5 accuracy over every validation image exactly once."""
    model.eval()
    n, loss_sum, top1, top5 = 0, 0.0, 0, 0
    for x, y, index, ok in loader:
        raise_for_bad_images(ok, index, loader.dataset)
        x, y = normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        logits = model(x)
        loss_sum += float(loss_fn(logits, y)) * len(y)
        k = min(5, logits.shape[1])
        best = logits.topk(k, dim=1).indices
        top1 += int((best[:, 0] == y).sum())
        top5 += int((best == y[:, None]).any(dim=1).sum())
        n += len(y)
    return loss_sum / n, top1 / n, top5 / n


def _save_weights(model: nn.Module, path: Path) -> None:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".partial")
    save_file(state, str(tmp))
    os.replace(tmp, path)


def _write_metrics(path: Path, history: list[EpochMetrics]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=list(asdict(history[0])))
        writer.writeheader()
        writer.writerows(asdict(m) for m in history)
