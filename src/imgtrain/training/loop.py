"""The fit loop: train one epoch, evaluate, keep the best, checkpoint, stop early.

Everything around it (checking inputs, the work directory, resuming, publishing the model) is
train.py's. Every process of a distributed run runs this loop; what only rank 0 may do (write
files, log) goes through ``RunFiles`` and ``log``, which do nothing on the other ranks.

On a GPU the loop never waits for the device inside an epoch: the summed loss, the wrong answers
and a count of non-finite losses stay on the device, read every ``SYNC_EVERY`` steps (for the
progress bar and to stop a diverged run) and at the end of the epoch. On a CPU reading them costs
nothing, so it happens every step and a diverged run stops at the batch that diverged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from imgtrain.data.dataset import BadImagePolicy
from imgtrain.data.loading import Feeder
from imgtrain.data.transforms import Normalize
from imgtrain.distributed import ALONE, World
from imgtrain.errors import InvalidDatasetError, TrainingDivergedError, option
from imgtrain.precision import autocast
from imgtrain.threads import Threads
from imgtrain.training.averaging import WeightAverage
from imgtrain.training.early_stopping import EarlyStopping

SYNC_EVERY = 50  # GPU steps between reads of the running figures


@dataclass
class EpochMetrics:
    """One row of metrics.csv."""

    epoch: int
    learning_rate: float
    train_images_per_second: float
    train_loss: float
    train_error: float
    validation_loss: float
    validation_top1_accuracy: float
    validation_top5_accuracy: float | None  # None with 5 classes or fewer, where every label is in the top 5
    data_wait_fraction: float  # share of the training time spent waiting for images
    seconds: float


@dataclass
class TrainStats:
    """One epoch of training, over every process."""

    images: int
    loss: float
    error: float
    seconds: float
    data_wait_fraction: float


@dataclass
class Evaluation:
    """Validation figures over every image exactly once (all processes together)."""

    images: int
    loss: float
    top1: float
    top5: float | None


@dataclass
class Stepper:
    """What one optimisation step needs; ``model`` is what runs the forward pass (wrapped in
    DistributedDataParallel or compiled, maybe), ``network`` the plain module underneath."""

    model: nn.Module
    network: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: torch.optim.lr_scheduler.LRScheduler
    normalize: Normalize
    device: torch.device
    precision: str
    learning_rate: float
    threads: Threads
    world: World
    loss_fn: nn.Module = field(default_factory=nn.CrossEntropyLoss)  # class-weighted with --class-weights balanced
    validation_weights: torch.Tensor | None = None  # the class weights of the validation loss, if any
    average: WeightAverage | None = None  # with --ema: the weights evaluated and kept

    @property
    def evaluated(self) -> nn.Module:
        """The network evaluated after each epoch and saved when best: the weights' average, or the weights."""
        return self.average.network if self.average is not None else self.network


def train_one_epoch(s: Stepper, batches: Iterable, bad_images: BadImagePolicy, epoch: int,
                    show: Callable[[int, float], None] = lambda step, loss: None) -> TrainStats:
    """Forward, loss, backward and optimiser step for every batch of the epoch; ``show`` gets the step and
    the running loss whenever they are read."""
    s.model.train()
    sync_every = 1 if s.device.type == "cpu" else SYNC_EVERY
    loss_sum = torch.zeros((), dtype=torch.float64, device=s.device)
    wrong = torch.zeros((), dtype=torch.int64, device=s.device)
    nonfinite = torch.zeros((), dtype=torch.float32, device=s.device)  # the first loss that is not finite
    seen, waited = 0, 0.0
    started = fetch_started = time.perf_counter()
    step = 0
    for step, batch in enumerate(batches, 1):
        waited += time.perf_counter() - fetch_started
        s.threads.step()
        x, y, _ = bad_images.filter(batch)
        running = None  # BatchNorm's running statistics, to put back after a step that must not count
        if len(y) >= 2:
            x, y = s.normalize(x.to(s.device, non_blocking=True)), y.to(s.device, non_blocking=True)
            with autocast(s.precision, s.device):
                logits = s.model(x)
                loss = s.loss_fn(logits, y)
            seen += len(y)
            loss_sum += loss.detach().double() * len(y)
            wrong += (logits.detach().argmax(1) != y).sum()
            value = loss.detach().float()
            nonfinite = torch.where(torch.isfinite(nonfinite) & ~torch.isfinite(value), value, nonfinite)
        elif s.world.distributed:
            # Bad images left fewer than two in this process's batch. The others step anyway, and
            # DistributedDataParallel (and SyncBatchNorm) need every process in each step: take part
            # with the whole batch and a zero loss, and put BatchNorm's running statistics back.
            running = [b.clone() for b in s.network.buffers()]
            with autocast(s.precision, s.device):
                loss = s.model(s.normalize(batch[0].to(s.device, non_blocking=True))).sum() * 0.0
        else:
            fetch_started = time.perf_counter()
            continue  # alone, a process skips the step
        s.optimizer.zero_grad(set_to_none=True)
        s.scaler.scale(loss).backward()
        if running is not None:
            with torch.no_grad():
                for kept, buffer in zip(running, s.network.buffers(), strict=True):
                    buffer.copy_(kept)
        s.scaler.step(s.optimizer)  # skips the step when fp16 gradients overflowed
        s.scaler.update()
        s.schedule.step()
        if s.average is not None:
            s.average.update()
        if step % sync_every == 0:
            _check_finite(s, nonfinite, epoch, step)
            show(step, float(loss_sum) / max(seen, 1))
        fetch_started = time.perf_counter()
    _check_finite(s, nonfinite, epoch, step)
    seconds = time.perf_counter() - started
    images, loss_total, wrong_total, waited_total = s.world.sum(seen, loss_sum, wrong, waited, device=s.device)
    return TrainStats(int(images), loss_total / max(images, 1), wrong_total / max(images, 1), seconds,
                      waited_total / s.world.size / seconds if seconds else 0.0)


def _check_finite(s: Stepper, nonfinite: torch.Tensor, epoch: int, step: int) -> None:
    value = float(nonfinite)
    if not math.isfinite(value):
        where = f"batch {step}" if s.device.type == "cpu" else f"one of the batches up to {step}"
        raise TrainingDivergedError(
            f"the training loss became {value} in epoch {epoch}, {where}",
            f"train again with a lower {option('learning_rate')} than {s.learning_rate:g}")


def precise_images(share: int) -> int:
    """Training images whose BatchNorm statistics replace the running ones before an evaluation, in each process:
    a tenth of its share of an epoch, at least PRECISE_MIN (all of a small share) and at most PRECISE_MAX."""
    return min(share, max(PRECISE_MIN, min(PRECISE_MAX, share // 10)))


PRECISE_MIN, PRECISE_MAX = 512, 2048
PRECISE_ENOUGH = 32  # fewer images than this (over all processes) keep the running statistics: see below


@torch.no_grad()
def recompute_batchnorm(s: Stepper, network: nn.Module, batches: Iterable, images: int,
                        bad_images: BadImagePolicy) -> None:
    """Precise BatchNorm (as pycls and Detectron2 do it): BatchNorm's running mean and variance computed again,
    of ``network`` (the trained one or the weights' average) as plain averages over the first ``images`` training
    images of the epoch, with its weights as they are now.

    The running statistics follow the weights with momentum 0.1: an average over the last ten or so steps,
    taken while the weights moved, and still holding their starting values after a few dozen steps. With few
    steps (a small set, a larger batch, several processes), they lag the weights so far that evaluation sees
    a different network: measured on 216 training images, 3 epochs, the training error went to 10% while
    validation stayed at chance. Recomputed, evaluation and the saved model use the statistics of the weights
    they have. Only BatchNorm layers run in training mode (dropout and stochastic depth stay off, as in
    evaluation); over processes, the statistics are averaged. From fewer than PRECISE_ENOUGH images (a set of
    3 images at a batch of 2 gave one batch of 2, variances near zero and a validation loss of 3,000), the running
    statistics are kept as training left them."""
    norms = [m for m in network.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or images <= 0:
        return
    network.eval()
    momenta = [m.momentum for m in norms]
    kept = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches, each weighing the same
        m.train()
    # SyncBatchNorm gathers over the processes in every forward pass: each process then runs every batch, whole (a
    # bad image is zeros, and counts). Plain BatchNorm leaves bad images out, and batches too small for it.
    synced = any(isinstance(m, nn.SyncBatchNorm) for m in norms)
    taken, used = 0, 0
    try:
        for batch in batches:
            taken += len(batch[1])  # the same in every process: they stop after the same batch
            x = batch[0] if synced else bad_images.filter(batch)[0]
            if len(x) >= 2:
                with autocast(s.precision, s.device):
                    network(s.normalize(x.to(s.device, non_blocking=True)))
                used += len(x)
            if taken >= images:
                break
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
    if s.world.sum(used)[0] < PRECISE_ENOUGH:
        for m, (mean, var, count) in zip(norms, kept, strict=True):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
        return
    s.world.average([b for m in norms for b in (m.running_mean, m.running_var)])


@torch.no_grad()
def evaluate(network: nn.Module, batches: Iterable, normalize: Normalize, device: torch.device,
             precision: str = "fp32", bad_images: BadImagePolicy | None = None, world: World = ALONE,
             threads: Threads | None = None, class_weights: torch.Tensor | None = None) -> Evaluation:
    """Mean loss, top-1 and top-5 accuracy over every validation image exactly once: each process
    sums over its share, then the sums are added up over processes (top-5 only with more than 5
    classes: with fewer it is 100% and says nothing). With ``class_weights`` the loss is their
    weighted mean, as torch's weighted cross-entropy takes it: every class counts by its weight."""
    network.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # images, loss, top-1, top-5, weights
    classes = 0
    for batch in batches:
        if threads is not None:
            threads.step()
        x, y, _ = bad_images.filter(batch) if bad_images is not None else batch[:3]
        if len(y) == 0:
            continue
        x, y = normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        with autocast(precision, device):
            logits = network(x).float()
        classes = logits.shape[1]
        best = logits.topk(min(5, classes), dim=1).indices
        n = torch.tensor(len(y), dtype=torch.float64, device=device)
        sums += torch.stack([n, nn.functional.cross_entropy(logits, y, weight=class_weights, reduction="sum").double(),
                             (best[:, 0] == y).sum().double(), (best == y[:, None]).any(dim=1).sum().double(),
                             class_weights[y].sum().double() if class_weights is not None else n])
    n, loss_sum, top1, top5, weights, wide = world.sum(*sums, float(classes > 5), device=device)
    if n == 0:
        raise InvalidDatasetError("no validation image could be decoded", "check the validation data")
    return Evaluation(int(n), loss_sum / weights if weights else math.inf, top1 / n, top5 / n if wide else None)


class Watcher(Protocol):
    """Something that follows the run's figures as they come (rank 0 only): TensorBoard, MLflow."""

    def step(self, step: int, loss: float, learning_rate: float) -> None:
        """The running training loss of the epoch so far, on the global step."""

    def epoch(self, metrics: EpochMetrics) -> None: ...


class RunFiles(Protocol):
    """What the loop writes, on rank 0 only (the methods do nothing on the other ranks)."""

    def save_best(self, network: nn.Module) -> None: ...

    def save_checkpoint(self, epoch: int, stopper: EarlyStopping, history: list[EpochMetrics]) -> None: ...


@dataclass
class Fit:
    """The loop's state: resumed from a checkpoint, or fresh."""

    epochs: int
    stopper: EarlyStopping
    history: list[EpochMetrics] = field(default_factory=list)
    epoch: int = 0  # the last epoch done


def fit(s: Stepper, state: Fit, train: Feeder, validation: Feeder, bad: dict[str, BadImagePolicy],
        files: RunFiles, log: Callable[[str], None], progress: Callable[[Iterable, int], Iterable],
        watchers: Sequence[Watcher] = ()) -> Fit:
    """Train epoch after epoch until ``state.epochs`` or early stopping; return the final state."""
    while state.epoch < state.epochs and not state.stopper.should_stop:
        state.epoch += 1
        epoch, started = state.epoch, time.perf_counter()
        lr = s.optimizer.param_groups[-1]["lr"]
        batches = train.epoch(epoch)
        bar = progress(batches, epoch)
        before = (epoch - 1) * len(batches)  # steps of the epochs before

        def show(step: int, loss: float, bar=bar, before=before) -> None:
            if hasattr(bar, "show"):
                bar.show(loss)
            for watcher in watchers:
                watcher.step(before + step, loss, s.optimizer.param_groups[-1]["lr"])

        trained = train_one_epoch(s, bar, bad["training"], epoch, show=show)
        if trained.images == 0:
            raise InvalidDatasetError(f"no training image of {train.source} could be decoded",
                                      "check the training data (see the warnings above)")
        evaluated = s.evaluated
        if s.average is not None:
            s.average.flush()
            s.average.take_buffers(s.network)
        recompute_batchnorm(s, evaluated, train.epoch(epoch), precise_images(len(train.sampler)), bad["training"])
        s.world.share_buffers(evaluated)
        val = evaluate(evaluated, validation.epoch(epoch), s.normalize, s.device, s.precision, bad["validation"],
                       s.world, s.threads, s.validation_weights)
        improved = state.stopper.update(epoch, val.loss)
        if improved:
            files.save_best(evaluated)
        state.history.append(EpochMetrics(epoch, lr, trained.images / trained.seconds, trained.loss, trained.error,
                                          val.loss, val.top1, val.top5, trained.data_wait_fraction,
                                          time.perf_counter() - started))
        files.save_checkpoint(epoch, state.stopper, state.history)
        for watcher in watchers:
            watcher.epoch(state.history[-1])
        log(f"epoch {epoch}/{state.epochs}  lr {lr:.2e}  train loss {trained.loss:.4f} "
            f"error {trained.error:.2%}  {trained.images / trained.seconds:,.0f} img/s  "
            f"val loss {val.loss:.4f} top-1 {val.top1:.2%}" + (f" top-5 {val.top5:.2%}" if val.top5 is not None else "")
            + ("  *best*" if improved else ""))
    if state.stopper.should_stop and state.epoch < state.epochs:
        log(f"early stop: no lower validation loss for {state.stopper.patience} epochs")
    return state

