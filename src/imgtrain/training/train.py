"""Train PyTorch Model: the training loop, readable top to bottom.

Set-up (check inputs, seed, build, maybe resume), then per epoch: train, validate, keep
the best weights, checkpoint, stop early. The run is built in a work directory beside the
output (``.imgtrain-resume-<name>``) and moved into place only when complete.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from imgtrain.data.cache import DecodedImageCache
from imgtrain.data.dataset import BadImagePolicy, ImageDataset, SeededSampler
from imgtrain.data.decode import ON_BAD_IMAGE
from imgtrain.data.transforms import AUGMENTATIONS, DEFAULT_AUGMENTATION, Normalize, build_augmentation
from imgtrain.device import resolve_device
from imgtrain.directories.atomic import (
    OWNER_FILE,
    PARTIAL_SUFFIX,
    atomic_file,
    check_not_an_input,
    check_output_writable,
    disown,
    make_owned_dir,
    owner_pid,
    publish,
    write_safetensors,
)
from imgtrain.directories.image_directory import IMAGE_LIST, SCHEMA_FILE, ImageDirectory
from imgtrain.directories.model_directory import (
    METRICS_FILE,
    SPEC_FILE,
    WEIGHTS_FILE,
    InputSpec,
    ModelSpec,
    library_versions,
    load_model_spec,
    write_model_directory,
)
from imgtrain.errors import (
    CheckpointExistsError,
    CheckpointMismatchError,
    ImgtrainError,
    InvalidDatasetError,
    InvalidParameterError,
    NotInRangeValueError,
    OutOfMemoryError,
    OutputNotWritableError,
    TrainingDivergedError,
    check_choice,
    check_range,
    option,
)
from imgtrain.models.registry import IMAGENET_MEAN, IMAGENET_STD, build_model, get_architecture
from imgtrain.models.trained import load_trained_model
from imgtrain.threads import Threads, parse_threads, worker_count
from imgtrain.training.checkpoint import (
    CHECKPOINT_FILE,
    checkpoint_epoch,
    file_digest,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from imgtrain.training.early_stopping import EarlyStopping
from imgtrain.training.image_size import auto_image_size
from imgtrain.training.precision import PRECISIONS, autocast, denormals_flushed, resolve_precision
from imgtrain.training.seeding import as_uint32, seed_everything

OPTIMIZERS = ("adamw", "sgd")
RESUME_PREFIX = ".imgtrain-resume-"
# Parameters that do not change the result: a run may resume with other values.
_FREE_PARAMETERS = ("num_workers", "device", "on_bad_image", "cache", "threads")


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
    precision: str = "auto"
    optimizer: str = "adamw"
    augmentation: str = DEFAULT_AUGMENTATION
    num_workers: int | None = None  # None: one per CPU core, at most 8
    threads: int | str | None = None  # torch's CPU threads: a count, "auto" or "adapt"; None: IMGTRAIN_THREADS or auto
    on_bad_image: str = "skip"
    cache: bool = True  # keep decoded images at training size in a memory-mapped file

    def check(self, training_size: int) -> None:
        check_range("epochs", self.epochs, low=1)
        check_range("batch_size", self.batch_size, low=2, high=training_size,
                    hint=f"pass a batch size from 2 (BatchNorm needs two images a batch) to {training_size}, "
                         "the number of training images")
        check_range("learning_rate", self.learning_rate, low=0, low_inclusive=False, high=math.inf,
                    high_inclusive=False)
        check_range("patience", self.patience, low=1)
        check_range("warmup_epochs", self.warmup_epochs, low=0)
        if self.image_size is not None:
            check_range("image_size", self.image_size, low=32, high=4096,
                        hint="pass an image size from 32 (DenseNet and ResNet shrink images 32-fold) to 4096")
        if self.num_workers is not None:
            check_range("num_workers", self.num_workers, low=0, high=64)
        self.threads = parse_threads(self.threads)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("augmentation", self.augmentation, AUGMENTATIONS)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("on_bad_image", self.on_bad_image, ON_BAD_IMAGE)


@dataclass
class EpochMetrics:
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
class TrainResult:
    output: Path
    best_epoch: int
    stopped_epoch: int
    best_validation_loss: float
    history: list[EpochMetrics] = field(default_factory=list)
    already_complete: bool = False


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resume_dir_for(output: Path) -> Path:
    output = Path(output).absolute()
    return output.parent / f"{RESUME_PREFIX}{output.name}"


def train_pytorch_model(
    untrained_model: Path | str,
    training_data: Path | str,
    validation_data: Path | str,
    output: Path | str,
    params: TrainingParameters | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    restart: bool = False,
    log: Callable[[str], None] = _stderr,
    progress: bool | None = None,
    **overrides,
) -> TrainResult:
    """Train a model directory on a labelled ImageDirectory; keep the best validation-loss epoch.

    Parameters come as a TrainingParameters or as keywords (``epochs=10``). An interrupted run
    leaves a checkpoint beside the output: ``resume`` continues it (with a larger ``epochs``, on
    to that many epochs) and ends with the same weights as an uninterrupted run; ``restart``
    discards it. Without either, a run that finds such a checkpoint stops and says so.
    """
    try:
        return _train(untrained_model, training_data, validation_data, Path(output), params, overwrite=overwrite,
                      resume=resume, restart=restart, log=log, progress=progress, **overrides)
    finally:
        disown(resume_dir_for(output))  # what stays there (a checkpoint) is free for the next run to resume


def _train(untrained_model, training_data, validation_data, output: Path, params: TrainingParameters | None, *,
           overwrite: bool, resume: bool, restart: bool, log: Callable[[str], None], progress: bool | None,
           **overrides) -> TrainResult:
    if resume and restart:
        raise InvalidParameterError(f"{option('resume', True)} and {option('restart', True)} exclude each other",
                                    "pass one of them")
    params = TrainingParameters(**{**(asdict(params) if params else {}), **overrides})
    check_not_an_input(output, {"untrained model": untrained_model, "training data": training_data,
                                "validation data": validation_data})
    base = load_model_spec(untrained_model)
    train_set = ImageDirectory.load(training_data)
    val_set = ImageDirectory.load(validation_data)
    train_labels = train_set.require_labels("training data")
    val_labels = _labels_in_order(val_set, train_set.categories)
    params.check(len(train_set))
    device = resolve_device(params.device)
    precision = resolve_precision(params.precision, device)
    run_parameters = {**{k: v for k, v in asdict(params).items() if k not in _FREE_PARAMETERS},
                      "precision": precision}
    resumable = {k: v for k, v in run_parameters.items() if k != "epochs"}  # the number of epochs may grow
    run_id = fingerprint({  # what a checkpoint must match to be resumed
        "parameters": resumable,
        "training data": file_digest(train_set.root / IMAGE_LIST, train_set.root / SCHEMA_FILE),
        "validation data": file_digest(val_set.root / IMAGE_LIST, val_set.root / SCHEMA_FILE),
        "untrained model": file_digest(Path(untrained_model) / SPEC_FILE),
    })
    work = resume_dir_for(output)
    if resume and _is_complete(output, run_id, params.epochs):
        return _result_of(output, already_complete=True)
    check_output_writable(output, overwrite=overwrite)
    _claim(work, output, resume=resume, restart=restart)
    if resume and _is_complete(work, run_id, params.epochs, waiting_for=output):  # killed before publishing
        _remove_leftovers(work)
        publish(work, output)
        log(f"{output} was complete in {work}: moved into place")
        return _result_of(output)
    _warn_about_shared_images(train_set, val_set, log)

    seed = as_uint32(params.random_seed)
    seed_everything(seed)
    categories = train_set.categories
    image_size = params.image_size or auto_image_size(train_set)
    model = _initial_model(base, untrained_model, len(categories)).to(device, memory_format=torch.channels_last)
    normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD).to(device)

    workers = worker_count(params.num_workers)
    checkpoint = work / CHECKPOINT_FILE
    if not (resume and checkpoint.is_file()):
        if resume:
            log(f"no checkpoint of {output} found: starting from scratch")
        shutil.rmtree(work, ignore_errors=True)  # nothing of value: what there was, restart discards
    make_owned_dir(work)

    drop_last = len(train_set) % params.batch_size == 1  # a batch of one breaks BatchNorm
    optimizer = _make_optimizer(model, base, params, device)
    steps_per_epoch = (len(train_set) // params.batch_size if drop_last
                       else math.ceil(len(train_set) / params.batch_size))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(params.warmup_epochs * steps_per_epoch, params.epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_fn = nn.CrossEntropyLoss()
    stopper = EarlyStopping(params.patience)
    history: list[EpochMetrics] = []
    epoch = 0
    if resume and checkpoint.is_file():
        state = load_checkpoint(checkpoint, run_id, model, optimizer, schedule, resumable)
        scaler.load_state_dict(state["scaler"])
        epoch, stopper = state["epoch"], EarlyStopping(**state["early_stopping"])
        history = [EpochMetrics(**m) for m in state["history"]]
        log(f"resuming {output} after epoch {epoch} from its checkpoint")
        _extend_schedule(schedule, optimizer, state["parameters"].get("epochs"), params.epochs, epoch, log)

    # The caches come after the checkpoint was accepted: a refused resume reserves no disk space.
    cache_names = {"training": train_set, "validation": val_set} if params.cache else {}
    _remove_caches(work, keep=[f"cache-{name}-{image_size}" for name in cache_names])
    caches = [DecodedImageCache.create_if_it_fits(work / f"cache-{name}-{image_size}", len(data), image_size, log)
              if name in cache_names else None for name, data in (("training", train_set), ("validation", val_set))]
    train_images = ImageDataset([train_set.path(i) for i in range(len(train_set))], train_labels, image_size,
                                augment=build_augmentation(image_size, params.augmentation), cache=caches[0])
    val_images = ImageDataset([val_set.path(i) for i in range(len(val_set))], val_labels, image_size,
                              cache=caches[1])
    train_sampler = SeededSampler(len(train_set), seed, shuffle=True)
    val_sampler = SeededSampler(len(val_set), 0, shuffle=False)

    loaders: dict[tuple[int, bool], DataLoader] = {}

    def loader(images: ImageDataset, sampler: SeededSampler) -> DataLoader:
        # Persistent workers decode; once the cache holds every image, reading it in this process
        # costs less, and on the CPU the worker processes would only take cores from training.
        inline = workers == 0 or (images.cache is not None and images.cache.complete() and device.type == "cpu")
        if inline:
            loaders.pop((id(images), False), None)  # ends that loader's worker processes
        if (id(images), inline) not in loaders:
            loaders[id(images), inline] = DataLoader(
                images, batch_size=params.batch_size, sampler=sampler, num_workers=0 if inline else workers,
                persistent_workers=not inline, pin_memory=device.type == "cuda",
                drop_last=drop_last and sampler is train_sampler)
        return loaders[id(images), inline]

    train_bad = BadImagePolicy(params.on_bad_image, train_images, log)
    val_bad = BadImagePolicy(params.on_bad_image, val_images, log)

    threads = Threads(params.threads, log)
    stepper = _Stepper(model, optimizer, scaler, schedule, loss_fn, normalize, device, precision,
                       params.learning_rate, threads)

    start = "fine-tuning ImageNet weights" if base.pretrained else "from scratch"
    if base.trained:
        start = f"from the trained model {untrained_model}"
    log(f"Training {base.architecture} ({start}) on {len(train_set):,} images in {len(categories):,} "
        f"categories, validating on {len(val_set):,}")
    log(f"device {device}, precision {precision}, image size {image_size}, batch size {params.batch_size}, "
        f"learning rate {params.learning_rate:g}, {params.optimizer}, augmentation {params.augmentation}, "
        f"up to {params.epochs} epochs, patience {params.patience}, {workers} data workers, "
        f"decoded-image cache {'on' if any(caches) else 'off'}, {threads.describe()}")

    try:
        with denormals_flushed(), threads:
            while epoch < params.epochs and not stopper.should_stop:
                epoch += 1
                started = time.perf_counter()
                lr = optimizer.param_groups[-1]["lr"]
                train_sampler.set_epoch(epoch)
                bar = tqdm(loader(train_images, train_sampler), desc=f"epoch {epoch}/{params.epochs}", leave=False,
                           unit="batch", disable=(not sys.stderr.isatty()) if progress is None else not progress)
                seen, loss_sum, wrong, waited = stepper.train_epoch(bar, train_bad, epoch)
                if seen == 0:
                    raise InvalidDatasetError(f"no training image of {training_data} could be decoded",
                                              "check the training data (see the warnings above)")
                train_seconds = time.perf_counter() - started
                val_loss, top1, top5 = evaluate_loss(model, loader(val_images, val_sampler), normalize, device, loss_fn,
                                                     precision, val_bad, threads)
                improved = stopper.update(epoch, val_loss)
                if improved:
                    _save_weights(model, work / WEIGHTS_FILE)
                history.append(EpochMetrics(epoch, lr, seen / train_seconds, loss_sum / max(seen, 1),
                                            wrong / max(seen, 1), val_loss, top1, top5, waited / train_seconds,
                                            time.perf_counter() - started))
                _write_metrics(work / METRICS_FILE, history)
                save_checkpoint(checkpoint, model, optimizer, schedule, {
                    "run_id": run_id, "parameters": run_parameters, "epoch": epoch, "early_stopping": asdict(stopper),
                    "history": [asdict(m) for m in history], "scaler": scaler.state_dict()})
                m = history[-1]
                log(f"epoch {epoch}/{params.epochs}  lr {lr:.2e}  train loss {m.train_loss:.4f} "
                    f"error {m.train_error:.2%}  {m.train_images_per_second:,.0f} img/s  "
                    f"val loss {val_loss:.4f} top-1 {top1:.2%}" + (f" top-5 {top5:.2%}" if top5 is not None else "")
                    + ("  *best*" if improved else ""))
            if stopper.should_stop and epoch < params.epochs:
                log(f"early stop: no lower validation loss for {params.patience} epochs")
    except torch.OutOfMemoryError:
        raise _out_of_memory(device, params, image_size) from None
    except RuntimeError as exc:
        if "can't allocate memory" in str(exc) or "out of memory" in str(exc):
            raise _out_of_memory(device, params, image_size) from None
        raise

    if stopper.best_epoch == 0:
        raise TrainingDivergedError("the validation loss was never a finite number",
                                    f"pass a lower {option('learning_rate')} than {params.learning_rate:g}")
    best = history[stopper.best_epoch - 1]
    spec = ModelSpec(
        architecture=base.architecture, pretrained=base.pretrained, options=base.options, trained=True,
        labels=list(categories), weights=WEIGHTS_FILE, versions=library_versions(),
        input=InputSpec(image_size=image_size, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
        training={**asdict(params), "image_size": image_size, "num_workers": workers, "device": str(device),
                  "precision": precision, "best_epoch": stopper.best_epoch, "stopped_epoch": epoch,
                  "best_validation_loss": stopper.best_loss,
                  "best_validation_top1_accuracy": best.validation_top1_accuracy,
                  "training_images": len(train_set), "validation_images": len(val_set), "run_id": run_id})
    for cache in caches:
        if cache is not None:
            cache.remove()
    write_model_directory(work, spec)  # the spec goes last: a work directory with one is complete
    _remove_leftovers(work)
    check_output_writable(output, overwrite=overwrite)
    publish(work, output)
    return TrainResult(output, stopper.best_epoch, epoch, stopper.best_loss, history)


@dataclass
class _Stepper:
    """One training epoch: forward, loss, backward and optimiser step for every batch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: torch.optim.lr_scheduler.LRScheduler
    loss_fn: nn.Module
    normalize: Normalize
    device: torch.device
    precision: str
    learning_rate: float
    threads: Threads

    def train_epoch(self, batches, bad_images: BadImagePolicy, epoch: int):
        """Return images seen, summed loss, wrong predictions, and seconds spent waiting for data."""
        self.model.train()
        seen, loss_sum, wrong, waited = 0, 0.0, 0, 0.0
        fetch_started = time.perf_counter()
        for step, batch in enumerate(batches, 1):
            waited += time.perf_counter() - fetch_started
            self.threads.step()
            x, y, _ = bad_images.filter(batch)
            if len(y) >= 2:  # a batch that bad images left with one image cannot train BatchNorm
                x, y = self.normalize(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)
                with autocast(self.precision, self.device):
                    logits = self.model(x)
                    loss = self.loss_fn(logits, y)
                batch_loss = loss.item()
                if not math.isfinite(batch_loss):
                    raise TrainingDivergedError(
                        f"the training loss became {batch_loss} in epoch {epoch}, batch {step}",
                        f"train again with a lower {option('learning_rate')} than {self.learning_rate:g}")
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)  # skips the step when fp16 gradients overflowed
                self.scaler.update()
                self.schedule.step()
                seen += len(y)
                loss_sum += batch_loss * len(y)
                wrong += int((logits.argmax(1) != y).sum())
                batches.set_postfix(loss=f"{loss_sum / seen:.4f}", refresh=False)
            fetch_started = time.perf_counter()
        return seen, loss_sum, wrong, waited


def _remove_caches(work: Path, keep: list[str] = ()) -> None:
    """Delete decoded-image cache files in ``work`` but those named in ``keep`` (file stems), such as
    the caches of an earlier attempt at another image size, or with --no-cache on resume."""
    for file in work.glob("cache-*"):
        if file.stem not in keep:
            file.unlink(missing_ok=True)


def _remove_leftovers(work: Path) -> None:
    """Before a finished work directory becomes the output: no checkpoint, cache or partial file."""
    (work / CHECKPOINT_FILE).unlink(missing_ok=True)
    _remove_caches(work)
    for partial in work.glob(f"*{PARTIAL_SUFFIX}"):
        partial.unlink()


def _is_complete(path: Path, run_id: dict, epochs: int, waiting_for: Path | None = None) -> bool:
    """Whether ``path`` holds this run, finished (the spec is written last): the output, or the work
    directory of one that was ``waiting_for`` being moved into place."""
    try:
        spec = load_model_spec(path, need_trained=True)
    except ImgtrainError:
        return False
    if spec.training.get("run_id") != run_id:
        return False
    done = spec.training.get("epochs")
    if done != epochs and waiting_for is not None:
        raise CheckpointMismatchError(
            f"a finished run of {done} epochs of {waiting_for} waits in {path} to be moved into place",
            f"pass {option('epochs', done)} with {option('resume', True)} to move it into place (then train it "
            f"further as a new run), or {option('restart', True)} to train {epochs} epochs anew")
    if done != epochs:
        raise CheckpointMismatchError(
            f"{path} is a finished run of {done} epochs, and its checkpoint is gone, so it cannot train on to {epochs}",
            f"train it further as a new run: pass it as {option('untrained_model')} with another {option('output')}")
    return True


def _claim(work: Path, output: Path, *, resume: bool, restart: bool) -> None:
    """Take the work directory for this run, unless another live process trains in it. An interrupted
    run's checkpoint (or its finished, unpublished model) is never thrown away unasked: without
    resume or restart, stop and say what is there."""
    owner = owner_pid(work)
    if owner is not None and owner != os.getpid():
        raise OutputNotWritableError(
            f"another imgtrain process (pid {owner}) is training into {output} now (its work is in {work})",
            f"wait for it to finish or stop it; if no such process runs, delete {work / OWNER_FILE}")
    if resume or restart or not work.exists():
        make_owned_dir(work)
        return
    size = sum(f.stat().st_size for f in work.iterdir() if f.is_file())
    where = f"in {work} ({size / 1e6:,.0f} MB)"
    if (work / SPEC_FILE).exists():
        raise CheckpointExistsError(f"a finished run of {output} was not moved into place: it waits {where}",
                                    f"pass {option('resume', True)} to move it into place, or "
                                    f"{option('restart', True)} to discard it and train again")
    if (work / CHECKPOINT_FILE).exists():
        done = checkpoint_epoch(work / CHECKPOINT_FILE)
        after = f" after epoch {done}" if done else ""
        raise CheckpointExistsError(f"an interrupted run of {output} left a checkpoint{after} {where}",
                                    f"pass {option('resume', True)} to continue it, or {option('restart', True)} "
                                    "to discard it and start again")
    make_owned_dir(work)  # what was there is worth nothing: the run starts afresh in it


def _extend_schedule(schedule, optimizer, old_epochs: int | None, epochs: int, done: int, log) -> None:
    """Resuming with another number of epochs: the epochs left follow the schedule of a run of that many
    epochs from where the checkpoint stands (the epochs done keep the schedule they had)."""
    if old_epochs is None or old_epochs == epochs:
        return
    if epochs < done:
        raise NotInRangeValueError("epochs", epochs, f"[{done}, inf)",
                                   f"the checkpoint has trained {done} epochs already: pass at least {done}, "
                                   f"or {option('restart', True)}")
    for group, base, factor in zip(optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas, strict=True):
        group["lr"] = base * factor(schedule.last_epoch)
    log(f"training on to {epochs} epochs instead of {old_epochs}: the epochs left follow the learning-rate "
        f"schedule of a {epochs}-epoch run (so the weights differ from those of a fresh {epochs}-epoch run)")


def _result_of(output: Path, *, already_complete: bool = False) -> TrainResult:
    spec = load_model_spec(output, need_trained=True)
    with open(output / METRICS_FILE, newline="", encoding="utf-8") as f:
        history = [EpochMetrics(**{k: (int(v) if k == "epoch" else float(v) if v != "" else None)
                                   for k, v in row.items()}) for row in csv.DictReader(f)]
    t = spec.training
    return TrainResult(output, t["best_epoch"], t["stopped_epoch"], t["best_validation_loss"], history,
                       already_complete=already_complete)


def _warn_about_shared_images(train_set: ImageDirectory, val_set: ImageDirectory, log) -> None:
    """The same image in both sets inflates validation accuracy: say which files."""
    if train_set.digests is None or val_set.digests is None:
        return
    seen = {d: i for i, d in enumerate(train_set.digests)}
    shared = [(train_set.path(seen[d]), val_set.path(j)) for j, d in enumerate(val_set.digests) if d in seen]
    if shared:
        log(f"warning: {len(shared)} validation image(s) are also in the training data (same bytes), "
            f"e.g. {shared[0][1]} = {shared[0][0]}")


def _out_of_memory(device: torch.device, params: TrainingParameters, image_size: int) -> OutOfMemoryError:
    return OutOfMemoryError(
        f"the {device.type} ran out of memory at batch size {params.batch_size} and image size {image_size}",
        f"pass a smaller {option('batch_size')} (or {option('image_size')})")


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
    model = load_trained_model(path).network
    head = get_architecture(base.architecture).head
    if base.num_classes != num_classes:
        setattr(model, head, nn.Linear(getattr(model, head).in_features, num_classes))
    return model


def _make_optimizer(model: nn.Module, base: ModelSpec, params: TrainingParameters,
                    device: torch.device) -> torch.optim.Optimizer:
    """AdamW by default; pretrained backbones learn at a tenth of the head's rate.

    Biases and normalisation weights get no weight decay. The fused implementations update
    all parameters in one kernel: on a CPU, 3x faster than the per-tensor loop.
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
    fused = device.type in ("cpu", "cuda")
    if params.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=params.learning_rate, momentum=0.9, nesterov=True, fused=fused)
    return torch.optim.AdamW(param_groups, lr=params.learning_rate, fused=fused)


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
                  loss_fn: nn.Module, precision: str = "fp32",
                  bad_images: BadImagePolicy | None = None,
                  threads: Threads | None = None) -> tuple[float, float, float | None]:
    """Mean loss, top-1 and top-5 accuracy over every validation image exactly once (top-5 only with more
    than 5 classes: with fewer it is 100% and says nothing)."""
    model.eval()
    bad_images = bad_images or BadImagePolicy("fail", loader.dataset, _stderr)
    n, loss_sum, top1, top5 = 0, 0.0, 0, 0
    for batch in loader:
        if threads is not None:
            threads.step()
        x, y, _ = bad_images.filter(batch)
        if len(y) == 0:
            continue
        x, y = normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        with autocast(precision, device):
            logits = model(x).float()
        loss_sum += float(loss_fn(logits, y)) * len(y)
        k = min(5, logits.shape[1])
        best = logits.topk(k, dim=1).indices
        top1 += int((best[:, 0] == y).sum())
        top5 += int((best == y[:, None]).any(dim=1).sum())
        n += len(y)
    if n == 0:
        raise InvalidDatasetError("no validation image could be decoded", "check the validation data")
    return loss_sum / n, top1 / n, (top5 / n if logits.shape[1] > 5 else None)


def _save_weights(model: nn.Module, path: Path) -> None:
    write_safetensors({k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}, path)


def _write_metrics(path: Path, history: list[EpochMetrics]) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=list(asdict(history[0])))
        writer.writeheader()
        writer.writerows(asdict(m) for m in history)
