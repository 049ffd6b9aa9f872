"""Train PyTorch Model: the run around the fit loop.

Check the inputs, claim the work directory beside the output (``.imgtrain-resume-<name>``),
build the model and the data feeders, maybe resume, then hand over to ``loop.fit`` (train,
validate, keep the best, checkpoint, stop early) and, when it is done, move the work directory
into place. Under torchrun every process runs this; only rank 0 touches files.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgtrain.data.dataset import BadImagePolicy, ImageDataset, SeededSampler
from imgtrain.data.decode import ON_BAD_IMAGE
from imgtrain.data.loading import Feeder, fill_cache, open_caches, remove_caches
from imgtrain.data.transformation import TrainingTransformation
from imgtrain.data.transforms import (
    AUGMENTATIONS,
    DEFAULT_AUGMENTATION,
    Normalize,
    Preparation,
    build_augmentation,
    memory_format,
)
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
    METRICS_JSONL,
    SPEC_FILE,
    WEIGHTS_FILE,
    InputSpec,
    ModelSpec,
    library_versions,
    load_model_spec,
    write_model_directory,
)
from imgtrain.directories.transformation_directory import load_transformation
from imgtrain.distributed import (
    ALONE,
    World,
    ddp,
    join_world,
    leave_world,
    rank_device,
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
    some,
)
from imgtrain.models.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_model,
    get_architecture,
    head_of,
    load_known_spec,
    replace_head,
)
from imgtrain.models.trained import load_trained_model
from imgtrain.precision import PRECISIONS, denormals_flushed, resolve_precision
from imgtrain.progress import bar
from imgtrain.reports import plots
from imgtrain.reports.page import REPORT_FILE
from imgtrain.reports.training import TRAINING_IMAGES, read_history, training_page
from imgtrain.seeding import as_uint32, seed_everything, seed_rank, torch_settings_restored
from imgtrain.threads import ADAPT, OtherLoad, Threads, parse_threads, worker_count
from imgtrain.training import balance
from imgtrain.training.averaging import WeightAverage
from imgtrain.training.checkpoint import (
    CHECKPOINT_FILE,
    BackgroundWriter,
    checkpoint_contents,
    checkpoint_epoch,
    checkpoint_state,
    file_digest,
    fingerprint,
    load_checkpoint,
    rng_state,
)
from imgtrain.training.early_stopping import EarlyStopping
from imgtrain.training.image_size import auto_image_size
from imgtrain.training.loop import EpochMetrics, Fit, Stepper, fit
from imgtrain.training.tracking import DEFAULT_EVERY, MLFLOW_RUN_FILE, Trackers, Tracking

OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("linear", "cosine")  # the decay after the warm-up, to zero at the last step
LR_SCALINGS = ("auto", "none", "sqrt", "linear")
# A checkpoint of up to this many bytes is copied and written beside the next epoch's steps (ResNet-50's, with
# the weights' average and AdamW's moments, is 410 MB); a larger one is written while training waits.
BACKGROUND_LIMIT = 1 << 30
CLASS_WEIGHTS = ("none", "balanced")
SAMPLERS = ("uniform", "balanced")
RESUME_PREFIX = ".imgtrain-resume-"
# Parameters that do not change the result: a run may resume with other values.
_FREE_PARAMETERS = ("num_workers", "device", "on_bad_image", "cache", "threads")
# Parameters added after runs were first fingerprinted: at these defaults they are left out of the
# fingerprint, so that a checkpoint or a finished output of an older version still matches.
_LATER_DEFAULTS = {"class_weights": "none", "sampler": "uniform", "transformation": None, "ema": False,
                   "lr_schedule": "cosine"}
_CHOICES = {"lr_schedule": LR_SCHEDULES, "class_weights": CLASS_WEIGHTS, "sampler": SAMPLERS}
BAD_IMAGES_KEPT = 100  # bad images named in the spec (and the report) per data set; the rest are counted

__all__ = ["EpochMetrics", "TrainResult", "TrainingParameters", "train_pytorch_model"]


@dataclass
class TrainingParameters:
    """Train PyTorch Model's parameters; the first five are the designer's, with its defaults."""

    epochs: int = 5
    batch_size: int = 16  # per process: a run of N processes steps on N x batch_size images
    learning_rate: float = 0.001
    random_seed: int = 1
    patience: int = 3
    warmup_epochs: int = 0
    lr_schedule: str = "linear"  # after the warm-up, the learning rate falls to zero at the last step: linear or cosine
    image_size: int | None = None  # None: chosen from the training images
    device: str = "auto"
    precision: str = "auto"
    optimizer: str = "adamw"
    augmentation: str = DEFAULT_AUGMENTATION
    ema: bool = True  # evaluate and keep an exponential moving average of the weights (training/averaging.py)
    num_workers: int | None = None  # None: one per CPU core, at most 8
    threads: int | str | None = None  # torch's CPU threads: a count, "auto" or "adapt"; None: IMGTRAIN_THREADS or auto
    on_bad_image: str = "skip"
    cache: bool = True  # keep decoded images at training size in a memory-mapped file
    lr_scaling: str = "auto"  # with N processes: the learning rate times 1, sqrt(N) or N; auto: sqrt (adamw), N (sgd)
    sync_batchnorm: bool = False  # BatchNorm statistics over every process's batch (CUDA)
    compile: bool = False  # torch.compile the model: slower start, faster steps on long GPU runs
    class_weights: str = "none"  # balanced: each class's loss weighted by (images / classes) / its images
    sampler: str = "uniform"  # balanced: every class drawn equally often in each epoch (with replacement)
    transformation: str | None = None  # a TransformationDirectory: its random operations replace the augmentation

    def check(self, training_size: int, world: World = ALONE) -> None:
        check_range("epochs", self.epochs, low=1)
        share = training_size // world.size
        check_range("batch_size", self.batch_size, low=2, high=share,
                    hint=f"pass a batch size from 2 (BatchNorm needs two images a batch) to {share}, "
                         + ("the number of training images" if world.size == 1 else
                            f"each of the {world.size} processes' share of the {training_size} training images"))
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
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("augmentation", self.augmentation, AUGMENTATIONS)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("on_bad_image", self.on_bad_image, ON_BAD_IMAGE)
        check_choice("lr_scaling", self.lr_scaling, LR_SCALINGS)
        check_choice("class_weights", self.class_weights, CLASS_WEIGHTS)
        check_choice("sampler", self.sampler, SAMPLERS)
        if self.transformation is not None:
            self.transformation = str(self.transformation)  # a path, as the spec and the trackers record it
        if self.transformation is not None and self.augmentation != DEFAULT_AUGMENTATION:
            raise InvalidParameterError(
                f"{option('augmentation', self.augmentation)} and {option('transformation')} both augment",
                f"drop {option('augmentation')}: with a transformation, its random operations are the augmentation")

    @property
    def balanced(self) -> bool:
        """Whether the classes are balanced somehow: then the validation loss that picks the best epoch is too."""
        return self.class_weights == "balanced" or self.sampler == "balanced"

    def learning_rate_factor(self, processes: int) -> float:
        """How much the learning rate grows with the number of processes (the batch grows N-fold)."""
        scaling = self.lr_scaling
        if scaling == "auto":  # Malladi et al. 2022 (Adam: square root); Goyal et al. 2017 (SGD: linear)
            scaling = "sqrt" if self.optimizer == "adamw" else "linear"
        return {"none": 1.0, "sqrt": math.sqrt(processes), "linear": float(processes)}[scaling]


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
    tensorboard: Path | str | None = None,
    mlflow: bool | str = False,
    log_every: int = DEFAULT_EVERY,
    **overrides,
) -> TrainResult:
    """Train a model directory on a labelled ImageDirectory; keep the best validation-loss epoch.

    Parameters come as a TrainingParameters or as keywords (``epochs=10``). An interrupted run
    leaves a checkpoint beside the output: ``resume`` continues it (with a larger ``epochs``, on
    to that many epochs) and ends with the same weights as an uninterrupted run; ``restart``
    discards it. Without either, a run that finds such a checkpoint stops and says so.

    Started by torchrun, every process calls this with the same arguments: each trains on its
    share of the images (``batch_size`` is per process), and rank 0 alone writes.

    ``tensorboard``: a folder to write TensorBoard event files into; ``mlflow``: True (MLflow's own
    settings, else ./mlruns) or a tracking URI. Both get the figures of every epoch and, every
    ``log_every`` steps, the running training loss.
    """
    load = OtherLoad()  # what other processes use while the run is set up: --threads auto's count comes from it
    params = TrainingParameters(**{**(asdict(params) if params else {}), **overrides})
    check_range("log_every", log_every, low=1)
    tracking = Tracking(tensorboard, mlflow, log_every)
    tracking.check()
    device = resolve_device(params.device)
    with torch_settings_restored(device.type, log):  # what the run changes of torch's settings, put back
        world = join_world(device)
        try:
            with world.speaking_for_the_others():
                return _train(untrained_model, training_data, validation_data, Path(output), params,
                              rank_device(device, world), world, overwrite=overwrite, resume=resume, restart=restart,
                              log=log if world.is_main else lambda message: None, progress=progress,
                              tracking=tracking if world.is_main else Tracking(),
                              load=None if world.distributed else load)
        finally:
            if world.is_main:
                disown(resume_dir_for(output))  # what stays there (a checkpoint) is free for the next run to resume
            leave_world(world)


def _train(untrained_model, training_data, validation_data, output: Path, params: TrainingParameters,
           device: torch.device, world: World, *, overwrite: bool, resume: bool, restart: bool,
           log: Callable[[str], None], progress: bool | None, tracking: Tracking,
           load: OtherLoad | None) -> TrainResult:
    if resume and restart:
        raise InvalidParameterError(f"{option('resume', True)} and {option('restart', True)} exclude each other",
                                    "pass one of them")
    check_not_an_input(output, {"untrained model": untrained_model, "training data": training_data,
                                "validation data": validation_data})
    run = _Run.of(Path(untrained_model), Path(training_data), Path(validation_data), output, params, device, world)
    outcome = world.on_main(lambda: _take_work_directory(run, overwrite=overwrite, resume=resume, restart=restart,
                                                         log=log))
    if outcome != "train":
        return _result_of(output, already_complete=outcome == "complete")
    if world.is_main:
        _warn_about_shared_images(run.train_set, run.val_set, log)

    seed_everything(run.seed)
    stepper, state, files = _model_and_state(run, resume=resume, log=log, load=load)
    # The caches come after the checkpoint was accepted: a refused resume reserves no disk space.
    caches = open_caches(run.work, {"training": (len(run.train_set), run.cached_size, run.cached_shapes),
                                    "validation": (len(run.val_set), run.image_size, False)} if params.cache else {},
                         make=world.is_main,
                         shared=world.local_size == world.size, barrier=world.barrier, log=log)
    train_feed, val_feed, bad = _feeders(run, caches, log)
    _describe(run, stepper, caches, log)
    # With --on-bad-image fail, the first bad image stops the run as soon as a batch holds it, not after every image
    if run.device.type == "cpu" and world.size == 1 and params.on_bad_image != "fail":
        for feed, what in ((train_feed, "training images"), (val_feed, "validation images")):
            fill_cache(feed.images, run.workers, log, what)
    trackers = Trackers(tracking.open(output.name, _tracked_parameters(run), run.work, state.history), log)
    try:
        result = _fit_and_publish(run, stepper, state, train_feed, val_feed, bad, files, caches, log, progress,
                                  trackers, overwrite=overwrite)
    except BaseException as exc:
        trackers.finish(None, interrupted=isinstance(exc, KeyboardInterrupt))  # Ctrl-C, SIGTERM: --resume goes on
        raise
    trackers.finish(output)
    return result


def _fit_and_publish(run: _Run, stepper: Stepper, state: Fit, train_feed: Feeder, val_feed: Feeder, bad: dict,
                     files: _RunFiles, caches: dict, log, progress: bool | None, trackers: Trackers, *,
                     overwrite: bool) -> TrainResult:
    """The fit loop, then the trained model directory with its report, moved into place (by rank 0)."""
    params, world, output = run.params, run.world, run.output
    def epoch_bar(batches: Iterable, epoch: int) -> Iterable:
        return _Progress(batches, f"epoch {epoch}/{params.epochs}", show=progress if world.is_main else False)

    try:
        with stepper.threads, denormals_flushed():
            try:
                state = fit(stepper, state, train_feed, val_feed, bad, files, log, epoch_bar, [trackers])
            except BaseException:
                with contextlib.suppress(Exception):  # what stopped the run is the error, not a checkpoint's
                    files.wait()  # the last epoch's checkpoint written: a run stopped now resumes after it
                raise
            files.wait()
    except torch.OutOfMemoryError:
        raise _out_of_memory(run.device, params, run.image_size) from None
    except RuntimeError as exc:
        if "can't allocate memory" in str(exc) or "out of memory" in str(exc):
            raise _out_of_memory(run.device, params, run.image_size) from None
        raise

    if state.stopper.best_epoch == 0:
        raise TrainingDivergedError("the validation loss was never a finite number",
                                    f"pass a lower {option('learning_rate')} than {params.learning_rate:g}")
    spec = _trained_spec(run, state, {name: world.union(policy.skipped) for name, policy in bad.items()},
                         files.threads or ADAPT)

    def publish_model() -> None:
        _write_report(run, spec, state, train_feed, log)
        for cache in caches.values():
            if cache is not None:
                cache.remove()
        write_model_directory(run.work, spec)  # the spec goes last: a work directory with one is complete
        _remove_leftovers(run.work)
        check_output_writable(output, overwrite=overwrite)
        publish(run.work, output)

    world.on_main(publish_model)
    return TrainResult(output, state.stopper.best_epoch, state.epoch, state.stopper.best_loss, state.history)


@dataclass
class _Run:
    """What a run is made of, checked: its inputs, parameters, where it works, and its fingerprint."""

    untrained_model: Path
    training_data: Path
    validation_data: Path
    output: Path
    params: TrainingParameters
    device: torch.device
    world: World
    base: ModelSpec
    train_set: ImageDirectory
    val_set: ImageDirectory
    train_labels: np.ndarray
    val_labels: np.ndarray
    precision: str
    image_size: int
    transformation: TrainingTransformation | None
    workers: int
    run_parameters: dict  # what the result depends on, recorded in checkpoints
    run_id: dict  # what a checkpoint must match to be resumed

    @classmethod
    def of(cls, untrained_model: Path, training_data: Path, validation_data: Path, output: Path,
           params: TrainingParameters, device: torch.device, world: World) -> _Run:
        base = load_known_spec(untrained_model)
        train_set = ImageDirectory.load(training_data)
        val_set = ImageDirectory.load(validation_data)
        train_labels = train_set.require_labels("training data")
        val_labels = _labels_in_order(val_set, train_set.categories)
        params.check(len(train_set), world)
        if params.sync_batchnorm and world.distributed and device.type != "cuda":
            raise InvalidParameterError(f"{option('sync_batchnorm', True)} needs CUDA GPUs (gloo has no such kernel)",
                                        f"drop {option('sync_batchnorm', True)} on CPUs")
        precision = resolve_precision(params.precision, device)
        run_parameters = {**{k: v for k, v in asdict(params).items()
                             if k not in _FREE_PARAMETERS and _LATER_DEFAULTS.get(k, object()) != v},
                          "precision": precision}
        transformation = None
        if params.transformation is not None:  # its operations count, not where it lies
            operations = load_transformation(params.transformation)
            transformation = TrainingTransformation.of(operations, params.image_size,
                                                       lambda: _auto_size(base, train_set), str(params.transformation))
            run_parameters["transformation"] = [op.to_json() for op in operations]
        run_id = fingerprint({
            "parameters": _resumable(run_parameters),
            "training data": file_digest(train_set.root / IMAGE_LIST, train_set.root / SCHEMA_FILE),
            "validation data": file_digest(val_set.root / IMAGE_LIST, val_set.root / SCHEMA_FILE),
            "untrained model": file_digest(untrained_model / SPEC_FILE),
        })
        return cls(untrained_model, training_data, validation_data, output, params, device, world, base, train_set,
                   val_set, train_labels, val_labels, precision, _image_size(base, params, transformation, train_set),
                   transformation, worker_count(params.num_workers, processes=world.local_size), run_parameters, run_id)

    @property
    def work(self) -> Path:
        return resume_dir_for(self.output)

    @property
    def asked(self) -> dict:
        """The parameters the result depends on as the user gave them (a precision auto, a transformation's
        path), recorded in checkpoints to say what differs in a refused resume."""
        return {k: v for k, v in asdict(self.params).items() if k not in _FREE_PARAMETERS}

    @property
    def checkpoint(self) -> Path:
        return self.work / CHECKPOINT_FILE

    @property
    def seed(self) -> int:
        return as_uint32(self.params.random_seed)

    @property
    def learning_rate(self) -> float:
        """The learning rate the optimiser uses: the one asked for, scaled for the number of processes."""
        return self.params.learning_rate * self.params.learning_rate_factor(self.world.size)

    @property
    def share(self) -> int:
        """Training images per process and epoch."""
        return len(self.train_set) // self.world.size

    @property
    def drop_last(self) -> bool:
        return self.share % self.params.batch_size == 1  # a batch of one breaks BatchNorm

    @property
    def normalization(self) -> tuple[list[float], list[float]]:
        """The mean and std images are normalised with: a trained model's own (the designer's are 0.5), else
        those of the pretrained weights (torchvision's: most are ImageNet's, some 0.5), else ImageNet's."""
        if self.base.trained and self.base.input is not None:
            return list(self.base.input.mean), list(self.base.input.std)
        if self.base.pretrained:
            return list(self.preprocessing["mean"]), list(self.preprocessing["std"])
        return list(IMAGENET_MEAN), list(IMAGENET_STD)

    @property
    def preprocessing(self) -> dict:
        """What the pretrained weights expect, as the model directory records it (torchvision's otherwise)."""
        if self.base.preprocessing:
            return self.base.preprocessing
        return get_architecture(self.base.architecture).preprocessing.to_dict() if self.base.pretrained else {}

    @property
    def cached_size(self) -> int:
        """The side of the training images the decoded-image cache keeps (before the random operations)."""
        return self.transformation.cached_size if self.transformation else self.image_size

    @property
    def cached_shapes(self) -> bool:
        """Whether the cache keeps the training images in their own shapes (TrainingTransformation.keeps_shape)."""
        return self.transformation.keeps_shape if self.transformation else False

    @property
    def class_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Images per class, in the training data and in the validation data."""
        classes = len(self.train_set.categories)
        return balance.class_counts(self.train_labels, classes), balance.class_counts(self.val_labels, classes)


def _resumable(run_parameters: dict) -> dict:
    return {k: v for k, v in run_parameters.items() if k != "epochs"}  # the number of epochs may grow


def _what_differs(state: dict, run: _Run) -> str:
    """': --precision auto (fp32) then, --precision auto (bf16) now' for the parameters a checkpoint (its JSON
    ``state``) was made with that differ from this run's: each as the user gave it, and what it stood for where
    that is something else (a precision auto, a transformation's operations); one left at its default, at it."""
    before = state.get("parameters")
    if not isinstance(before, dict):
        return ""
    asked_then = state.get("asked") if isinstance(state.get("asked"), dict) else {}  # none in older checkpoints
    before, now = _resumable(before), _resumable(run.run_parameters)
    changed = []
    for name in [*now, *(name for name in before if name not in now)]:
        then_value, now_value = (values.get(name, _LATER_DEFAULTS.get(name)) for values in (before, now))
        if then_value != now_value:
            changed.append(f"{_as_given(name, asked_then.get(name, then_value), then_value)} then, "
                           f"{_as_given(name, run.asked.get(name, now_value), now_value)} now")
    return ": " + "; ".join(changed) if changed else " (by another version of imgtrain?)"


def _as_given(name: str, given: object, value: object) -> str:
    """A parameter as the user gave it, with what it stood for where that is something else."""
    if given == value:
        return option(name, given)
    if name == "transformation" and isinstance(value, list):
        value = ", ".join(f"{op[0]} {json.dumps(op[1])}" if op[1] != {} else str(op[0]) for op in value) \
            or "no operation"
    return f"{option(name, given)} ({value})"


def flags_of_earlier_defaults(output: Path) -> list[str]:
    """The flags that ask for what the interrupted run of ``output`` was made with where the defaults have changed
    since (``_LATER_DEFAULTS``: a run of an earlier version had a cosine schedule and no average of the weights):
    ``["--no-ema", "--lr-schedule=cosine"]``. `imgtrain ui`, whose form does not have them, resumes its runs with
    them. [] without a readable checkpoint, or for one of this version's defaults."""
    made_with = checkpoint_state(resume_dir_for(output) / CHECKPOINT_FILE).get("parameters")
    if not isinstance(made_with, dict):
        return []
    defaults = {f.name: f.default for f in fields(TrainingParameters)}
    flags: list[str] = []
    for name, earlier in _LATER_DEFAULTS.items():
        then = made_with.get(name, earlier)
        if name == "transformation" or then == defaults[name]:
            continue  # a transformation is a path the checkpoint does not keep; its operations are compared
        flag = "--" + name.replace("_", "-")
        if isinstance(defaults[name], bool):
            if isinstance(then, bool):  # never another value after a flag that takes none (--ema --output=...)
                flags.append(flag if then else f"--no-{flag[2:]}")
        elif isinstance(then, str) and then in _CHOICES.get(name, ()):
            flags.append(f"{flag}={then}")  # one argument, one of the option's choices
    return flags


def _take_work_directory(run: _Run, *, overwrite: bool, resume: bool, restart: bool, log) -> str:
    """Rank 0: 'complete' when the output is there already, 'published' when it waited in the work
    directory and is moved into place now, else 'train' (the work directory is this run's)."""
    output, work, epochs = run.output, run.work, run.params.epochs
    if resume and _is_complete(output, run.run_id, epochs):
        return "complete"
    check_output_writable(output, overwrite=overwrite)
    _claim(work, output, resume=resume, restart=restart)
    if resume and _is_complete(work, run.run_id, epochs, waiting_for=output):  # killed before publishing
        _remove_leftovers(work)
        publish(work, output)
        log(f"{output} was complete in {work}: moved into place")
        return "published"
    if not (resume and run.checkpoint.is_file()):
        if resume:
            _refuse_another_finished_run(work, output, run)
            log(f"no checkpoint of {output} found: starting from scratch")
        shutil.rmtree(work, ignore_errors=True)  # nothing of value: what there was, restart discards
    make_owned_dir(work)
    return "train"


def _refuse_another_finished_run(work: Path, output: Path, run: _Run) -> None:
    """A finished model that waits in the work directory to be moved into place, made by other data or parameters
    than this run's (another version's defaults, say), is a model, not leftovers: --resume does not discard it."""
    try:
        then = load_model_spec(work, need_trained=True).training
    except ImgtrainError:
        return  # no finished model there (the spec is written last)
    # The spec's parameters in the checkpoint's shape; it holds the image size used and the transformation's
    # path, not what the fingerprint takes: those two are not compared here.
    names = {f.name for f in fields(TrainingParameters)} - {*_FREE_PARAMETERS, "image_size", "transformation"}
    before = {k: then[k] for k in names if k in then and _LATER_DEFAULTS.get(k, object()) != then[k]}
    before |= {"precision": then.get("precision")} | {
        k: run.run_parameters[k] for k in ("image_size", "transformation") if k in run.run_parameters}
    raise CheckpointMismatchError(
        f"a finished run of {output} waits in {work} to be moved into place, made with other parameters"
        f"{_what_differs({'parameters': before}, run)}",
        f"run the command that made it with {option('resume', True)} to move it into place, or pass "
        f"{option('restart', True)} to discard it and train anew")


def _model_and_state(run: _Run, *, resume: bool, log, load: OtherLoad | None) -> tuple[Stepper, Fit, _RunFiles]:
    """The network, its optimiser and schedule, and the loop's state: fresh, or from the checkpoint."""
    params, device, world = run.params, run.device, run.world
    network = _initial_model(run.base, run.untrained_model, len(run.train_set.categories), run.image_size)
    if params.sync_batchnorm and world.distributed:
        network = nn.SyncBatchNorm.convert_sync_batchnorm(network)
    layout = memory_format(device, run.image_size)  # channels-last but for small images on a CPU
    network = network.to(device, memory_format=layout)
    steps_per_epoch = run.share // params.batch_size if run.drop_last else math.ceil(run.share / params.batch_size)
    optimizer = _make_optimizer(network, run.base, params.optimizer, run.learning_rate, device)
    average = WeightAverage(network) if params.ema else None
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_decay(params.warmup_epochs * steps_per_epoch, params.epochs * steps_per_epoch,
                                 params.lr_schedule))
    scaler = torch.amp.GradScaler(device.type, enabled=run.precision == "fp16")
    state = Fit(params.epochs, EarlyStopping(params.patience))
    # Every process built the same network; its dropout masks are its own. A checkpoint's streams replace these:
    # its GPU's too, where it holds one (one made on CPUs holds none, and each GPU then drew the seed's masks).
    seed_rank(run.seed, world.rank)
    chosen = None  # the thread count the checkpoint's run had (auto keeps it: the weights depend on it)
    resuming = resume and run.checkpoint.is_file()
    if resuming:
        saved = load_checkpoint(run.checkpoint, run.run_id, network, optimizer, schedule,
                                lambda state: _what_differs(state, run), rank=world.rank, device=device,
                                average=average)
        done_by = saved.get("world_size", 1)
        if done_by != world.size:
            raise CheckpointMismatchError(
                f"the checkpoint {run.checkpoint} was made by {done_by} process(es); this run has {world.size}",
                f"resume with {done_by} process(es) (torchrun --nnodes x --nproc-per-node = {done_by}), "
                f"or pass {option('restart', True)} to start again with {world.size}")
        scaler.load_state_dict(saved["scaler"])
        chosen = saved.get("threads")  # None from before it was recorded (all the cores) or from an adapting run
        state.epoch, state.stopper = saved["epoch"], EarlyStopping(**saved["early_stopping"])
        state.history = [EpochMetrics(**m) for m in saved["history"]]
        log(f"resuming {run.output} after epoch {state.epoch} from its checkpoint")
        _extend_schedule(schedule, optimizer, saved["parameters"].get("epochs"), params.epochs, state.epoch, log)
    model = ddp(network, device) if world.distributed else network
    if params.compile:
        model = torch.compile(model)
    # Each data set evened out by its own counts: the validation loss then weighs every class equally,
    # whatever the classes' shares in the training data.
    training, validation = (torch.tensor(balance.balanced_weights(counts), dtype=torch.float32, device=device)
                            for counts in run.class_counts)
    stepper = Stepper(model, network, optimizer, scaler, schedule, Normalize(*run.normalization, layout).to(device),
                      device, run.precision, params.learning_rate,
                      Threads(params.threads, log, start_load=None if resuming else load, chosen=chosen), world,
                      loss_fn=nn.CrossEntropyLoss(weight=training if params.class_weights == "balanced" else None),
                      validation_weights=validation if params.balanced else None, average=average)
    files = _RunFiles(run.work, world, network, optimizer, schedule, scaler, run.run_id, run.run_parameters, run.asked,
                      device, None if params.threads == ADAPT else stepper.threads.current, average)
    return stepper, state, files


def _feeders(run: _Run, caches: dict, log) -> tuple[Feeder, Feeder, dict[str, BadImagePolicy]]:
    """The training and validation batches of this process's shares, and what to do with a bad image."""
    params, world, size, t = run.params, run.world, run.image_size, run.transformation
    augment = t.augmentation() if t is not None else build_augmentation(size, params.augmentation)
    train_images = ImageDataset([run.train_set.path(i) for i in range(len(run.train_set))], run.train_labels, size,
                                augment=augment, cache=caches.get("training"),
                                prepare=t.preparation() if t is not None else Preparation(size))
    val_images = ImageDataset([run.val_set.path(i) for i in range(len(run.val_set))], run.val_labels, size,
                              cache=caches.get("validation"), prepare=Preparation(size, t.inference if t else None))
    feed = dict(batch_size=params.batch_size, workers=run.workers, device=run.device)
    balanced = run.train_labels if params.sampler == "balanced" else None
    train = Feeder(train_images, SeededSampler(len(train_images), run.seed, shuffle=True, rank=world.rank,
                                               ranks=world.size, balance_labels=balanced), drop_last=run.drop_last,
                   source=str(run.training_data), **feed)
    val = Feeder(val_images, SeededSampler(len(val_images), 0, shuffle=False, rank=world.rank, ranks=world.size),
                 source=str(run.validation_data), **feed)
    warn = world.own_log(log)
    return train, val, {"training": BadImagePolicy(params.on_bad_image, train_images, warn),
                        "validation": BadImagePolicy(params.on_bad_image, val_images, warn)}


def _describe(run: _Run, stepper: Stepper, caches: dict, log) -> None:
    """The run's first lines: what trains on what, and how."""
    params, base, world = run.params, run.base, run.world
    start = "fine-tuning ImageNet weights" if base.pretrained else "from scratch"
    if base.trained:
        start = f"from the trained model {run.untrained_model}"
    log(f"Training {base.architecture} ({start}) on {len(run.train_set):,} images in "
        f"{len(run.train_set.categories):,} categories, validating on {len(run.val_set):,}")
    if world.distributed:
        log(f"{world.size} process{'es' if world.size > 1 else ''} ({world.backend}): each takes "
            f"{params.batch_size} images a step, {world.size * params.batch_size} together; learning rate "
            f"{params.learning_rate:g} x {params.learning_rate_factor(world.size):g} ({option('lr_scaling')} "
            f"{params.lr_scaling}) = {run.learning_rate:g}")
    augmentation = params.augmentation
    if run.transformation is not None:
        t = run.transformation
        log(f"transformation {params.transformation}: {t.describe()}")
        augmentation = "the transformation's random operations" if t.random else "none"
    warmup = f"{params.warmup_epochs} epoch{'s' if params.warmup_epochs != 1 else ''} warm-up, then " \
        if params.warmup_epochs else ""
    log(f"device {run.device}, precision {run.precision}, image size {run.image_size}, batch size "
        f"{params.batch_size}, learning rate {run.learning_rate:g} ({warmup}{params.lr_schedule} to zero), "
        f"{params.optimizer}{' with ema' if params.ema else ''}, augmentation {augmentation}, up to {params.epochs} "
        f"epochs, patience {params.patience}, {run.workers} data workers, decoded-image cache "
        f"{'on' if any(caches.values()) else 'off'}, {stepper.threads.describe()}")
    training, validation = run.class_counts
    log(f"{balance.describe(run.train_set.categories, training, validation)}; "
        f"{option('class_weights', params.class_weights)}, {option('sampler', params.sampler)}"
        + ("; the validation loss that picks the best epoch is class-weighted too" if params.balanced else ""))
    empty = balance.without_images(run.train_set.categories, training)
    if empty:
        log(f"warning: {len(empty):,} of the {len(training):,} classes have no images in the training data "
            f"{run.training_data} ({some(empty)}): the model learns never to answer them; give them "
            "training images, or leave them out of the data")
    both = f"{option('class_weights', 'balanced')} and {option('sampler', 'balanced')}"
    if params.class_weights == "balanced" and params.sampler == "balanced":
        log(f"warning: {both} both even out the classes: together they over-correct (a small class then counts "
            "more than a large one); pick one")
    elif not params.balanced and balance.imbalance(training) >= balance.IMBALANCED:
        log(f"note: the largest class has {balance.ratio(balance.imbalance(training))} times the images of the "
            f"smallest: {both.replace(' and ', ' or ')} may serve the small classes better (README, "
            "\"Imbalanced classes\")")


def _tracked_parameters(run: _Run) -> dict:
    """What TensorBoard and MLflow are told of a run: its parameters, and what they resolved to."""
    return {**asdict(run.params), "architecture": run.base.architecture, "pretrained": run.base.pretrained,
            "image_size": run.image_size, "device": str(run.device), "precision": run.precision,
            "processes": run.world.size, "effective_learning_rate": run.learning_rate,
            "training_images": len(run.train_set), "validation_images": len(run.val_set),
            "classes": len(run.train_set.categories)}


def _trained_spec(run: _Run, state: Fit, bad: dict[str, set[int]], threads: int | str) -> ModelSpec:
    """The spec of the trained model: its labels, input, and the record of its training (with the images
    left out as bad, ``bad``: their indices in the training and the validation data)."""
    base, params = run.base, run.params
    data = {"training": run.train_set, "validation": run.val_set}
    return ModelSpec(
        architecture=base.architecture, pretrained=base.pretrained, options=base.options, trained=True,
        labels=list(run.train_set.categories), weights=WEIGHTS_FILE, versions=library_versions(),
        preprocessing=run.preprocessing,
        input=InputSpec(image_size=run.image_size, mean=list(run.normalization[0]), std=list(run.normalization[1]),
                        transformation=[op.to_json() for op in run.transformation.inference]
                        if run.transformation and run.transformation.inference else None),
        training={**asdict(params), "image_size": run.image_size, "num_workers": run.workers,
                  "device": str(run.device), "precision": run.precision, "processes": run.world.size,
                  "torch_threads": threads, "effective_learning_rate": run.learning_rate,
                  "best_epoch": state.stopper.best_epoch,
                  "stopped_epoch": state.epoch, "best_validation_loss": state.stopper.best_loss,
                  "best_validation_top1_accuracy": state.history[state.stopper.best_epoch - 1].validation_top1_accuracy,
                  "training_images": len(run.train_set), "validation_images": len(run.val_set),
                  "class_counts": balance.record(run.train_set.categories, *run.class_counts),
                  "bad_images": {name: [str(data[name].path(i)) for i in sorted(bad[name])[:BAD_IMAGES_KEPT]]
                                 for name in data},
                  "bad_image_counts": {name: len(bad[name]) for name in data},
                  "run_id": run.run_id})


def _write_report(run: _Run, spec: ModelSpec, state: Fit, train_feed: Feeder, log) -> None:
    """report.html and training_images.png. A page is not worth a run: should drawing it fail, the model
    is published without it, with a warning (`imgtrain report` can draw it later)."""
    try:
        images = _training_images(train_feed, run.train_set.categories)
        (run.work / TRAINING_IMAGES).write_bytes(images)
        page = training_page(spec, [asdict(m) for m in state.history], images, f"Training report: {run.output.name}")
        page.write(run.work / REPORT_FILE)
    except Exception as exc:  # matplotlib, a decoder, the disk: anything but the model itself
        log(f"warning: the training report could not be written ({type(exc).__name__}: {exc}); the model is "
            f"complete without it")


def _training_images(feed: Feeder, categories: list[str], count: int = 32) -> bytes:
    """A PNG of the first images of epoch 1 as the model saw them: resized, augmented, labelled."""
    feed.sampler.set_epoch(1)
    shown = []
    for item in itertools.islice(feed.sampler, count * 2):
        x, label, _, ok = feed.images[item]
        if ok:
            shown.append((x.permute(1, 2, 0).numpy(), categories[label]))
        if len(shown) == count:
            break
    return plots.image_grid([x for x, _ in shown], [c for _, c in shown])


class _Progress:
    """The epoch's progress bar (rank 0, on a terminal); ``show`` puts the running loss on it."""

    def __init__(self, batches: Iterable, description: str, *, show: bool | None) -> None:
        self.bar = bar(batches, what=description, unit="batch", show=show)

    def __iter__(self):
        return iter(self.bar)

    def show(self, loss: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)


@dataclass
class _RunFiles:
    """What the fit loop writes into the work directory: rank 0 writes, the other ranks do nothing."""

    work: Path
    world: World
    network: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    run_id: dict
    run_parameters: dict
    asked: dict
    device: torch.device
    threads: int | None  # torch's threads (None: adapting to the load): a resumed run under auto keeps them
    average: WeightAverage | None  # the weights' average, with --ema

    writer: BackgroundWriter = field(default_factory=lambda: BackgroundWriter(BACKGROUND_LIMIT))

    def save_best(self, network: nn.Module) -> None:
        if self.world.is_main:
            self.writer.wait()  # the last checkpoint first: the best model is never more than an epoch ahead of it
            _save_weights(network, self.work / WEIGHTS_FILE)

    def save_checkpoint(self, epoch: int, stopper: EarlyStopping, history: list[EpochMetrics]) -> None:
        """The checkpoint, then metrics.csv, written beside the next epoch's steps (``wait`` for them)."""
        generators = self.world.gather(rng_state(self.device))  # every process's, for each to resume its own
        if not self.world.is_main:
            return
        tensors, metadata = checkpoint_contents(self.network, self.optimizer, self.schedule, {
            "run_id": self.run_id, "parameters": self.run_parameters, "asked": self.asked, "epoch": epoch,
            "early_stopping": asdict(stopper), "history": [asdict(m) for m in history],
            "scaler": self.scaler.state_dict(), "world_size": self.world.size, "threads": self.threads}, generators,
            self.average)
        rows = list(history)

        def write(tensors: dict[str, torch.Tensor]) -> None:
            write_safetensors(tensors, self.work / CHECKPOINT_FILE, metadata=metadata)
            # Then the epoch's row: a row in metrics.csv (a point on `imgtrain ui`'s curves) always has its
            # checkpoint, so that a run stopped as soon as the row appears resumes after that epoch, not before it.
            _write_metrics(self.work / METRICS_FILE, rows)

        self.writer.start(write, tensors)

    def wait(self) -> None:
        """Until the last checkpoint is written (raising what failed it: a full disk)."""
        self.writer.wait()


def _remove_leftovers(work: Path) -> None:
    """Before a finished work directory becomes the output: no checkpoint, cache, MLflow run id or partial file."""
    (work / CHECKPOINT_FILE).unlink(missing_ok=True)
    (work / MLFLOW_RUN_FILE).unlink(missing_ok=True)
    remove_caches(work)
    for partial in work.glob(f"*{PARTIAL_SUFFIX}"):
        partial.unlink()
    for stray in work.glob(".tmp*"):  # safetensors' own temporary file, left by a write that was killed
        if stray.is_file():
            stray.unlink()


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
    """Resuming after ``done`` epochs to ``epochs``: fewer is refused, as many leaves nothing to train (said),
    and another number than the checkpoint's run had makes the epochs left follow the schedule of a run of that
    many epochs from where the checkpoint stands (the epochs done keep the schedule they had)."""
    if epochs < done:
        raise NotInRangeValueError("epochs", epochs, f"[{done}, inf)",
                                   f"the checkpoint has trained {done} epochs already: pass at least {done}, "
                                   f"or {option('restart', True)}")
    if epochs == done:
        log(f"the checkpoint has trained all {epochs} epochs of {option('epochs', epochs)}: nothing is left to "
            "train, and the model is written from the best of them")
    elif old_epochs is not None and old_epochs != epochs:
        for group, base, factor in zip(optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas, strict=True):
            group["lr"] = base * factor(schedule.last_epoch)
        log(f"training on to {epochs} epochs instead of {old_epochs}: the epochs left follow the learning-rate "
            f"schedule of a {epochs}-epoch run (so the weights differ from those of a fresh {epochs}-epoch run)")


def _result_of(output: Path, *, already_complete: bool = False) -> TrainResult:
    spec = load_model_spec(output, need_trained=True)
    history = [EpochMetrics(**row) for row in read_history(output)]
    t = spec.training
    return TrainResult(output, t["best_epoch"], t["stopped_epoch"], t["best_validation_loss"], history,
                       already_complete=already_complete)


def _warn_about_shared_images(train_set: ImageDirectory, val_set: ImageDirectory, log) -> None:
    """The same image in both sets inflates validation accuracy: say which files.

    The recorded sha256 only finds the candidates: each pair is checked against the files, since a
    tool that rewrote the images (the designer's Apply Image Transformation) leaves the keys stale."""
    if train_set.digests is None or val_set.digests is None:
        return
    seen = {d: i for i, d in enumerate(train_set.digests)}
    candidates = [(train_set.path(seen[d]), val_set.path(j)) for j, d in enumerate(val_set.digests) if d in seen]
    shared = [(a, b) for a, b in candidates if _same_bytes(a, b)]
    if shared:
        log(f"warning: {len(shared)} validation image(s) are also in the training data (same bytes), "
            f"e.g. {shared[0][1]} = {shared[0][0]}")


def _same_bytes(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()
    except OSError:
        return False


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


def _image_size(base: ModelSpec, params: TrainingParameters, transformation: TrainingTransformation | None,
                train_set: ImageDirectory) -> int:
    """The training image size: the transformation's, the one asked for, or one chosen from the images (the
    nearest the architecture takes); ImageSizeError, before anything is trained, for one it cannot take."""
    arch, fixed = get_architecture(base.architecture), _trained_size(base)
    if transformation is not None:
        arch.check_size(transformation.image_size, base.pretrained, f"the size {params.transformation} leaves",
                        trained_size=fixed,
                        hint=lambda side: transformation.size_hint(side) or f"pass {option('image_size', side)}")
        return transformation.image_size
    if params.image_size is not None:
        arch.check_size(params.image_size, base.pretrained, option("image_size", params.image_size),
                        trained_size=fixed)
        return params.image_size
    return _auto_size(base, train_set)


def _auto_size(base: ModelSpec, train_set: ImageDirectory) -> int:
    """The size chosen from the training images (training/image_size.py), made one the architecture takes."""
    return get_architecture(base.architecture).fit_size(auto_image_size(train_set), base.pretrained,
                                                        trained_size=_trained_size(base))


def _trained_size(base: ModelSpec) -> int | None:
    """A trained model's image size (a ViT's position embeddings fit that size alone)."""
    return base.input.image_size if base.trained and base.input is not None else None


def _initial_model(base: ModelSpec, path, num_classes: int, image_size: int) -> nn.Module:
    """The network to start from: a fresh (or ImageNet) one, or the weights of a trained model."""
    if not base.trained:
        return build_model(base.architecture, num_classes, pretrained=base.pretrained, image_size=image_size,
                           **base.options)
    model = load_trained_model(path).network
    if base.num_classes != num_classes:
        replace_head(model, num_classes)
    return model


def _make_optimizer(model: nn.Module, base: ModelSpec, kind: str, learning_rate: float,
                    device: torch.device) -> torch.optim.Optimizer:
    """AdamW by default; pretrained backbones learn at a tenth of the head's rate.

    Biases and normalisation weights get no weight decay. The fused implementations update
    all parameters in one kernel: on a CPU, 3x faster than the per-tensor loop.
    """
    head = head_of(model)
    backbone_lr = learning_rate * (0.1 if base.pretrained or base.trained else 1.0)
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        in_head = name.startswith(head + ".")
        groups.setdefault((in_head, p.ndim <= 1), []).append(p)
    decay = 0.05 if kind == "adamw" else 1e-4
    param_groups = [
        {"params": ps, "lr": learning_rate if in_head else backbone_lr, "weight_decay": 0.0 if no_decay else decay}
        for (in_head, no_decay), ps in sorted(groups.items())
    ]  # sorted: the head's groups come last, so param_groups[-1] carries the head's rate
    fused = device.type in ("cpu", "cuda")
    if kind == "sgd":
        return torch.optim.SGD(param_groups, lr=learning_rate, momentum=0.9, nesterov=True, fused=fused)
    return torch.optim.AdamW(param_groups, lr=learning_rate, fused=fused)


def _warmup_decay(warmup_steps: int, total_steps: int, shape: str) -> Callable[[int], float]:
    """The learning rate's factor at each step: a linear warm-up, then a decay to zero at the last step, linear
    (the default: what budgeted training found best for a fixed number of epochs, and measured here at least as
    good as the cosine on every bench set, better after the first epoch) or cosine (imgtrain's before)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress if shape == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    if shape not in LR_SCHEDULES:
        raise ValueError(f"no such learning-rate schedule: {shape!r}")
    return factor


def _save_weights(model: nn.Module, path: Path) -> None:
    write_safetensors({k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}, path)


def _write_metrics(path: Path, history: list[EpochMetrics]) -> None:
    """metrics.csv, and metrics.jsonl beside it (a number that is not finite, or missing, is null there)."""
    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=list(asdict(history[0])))
        writer.writeheader()
        writer.writerows(asdict(m) for m in history)
    with atomic_file(path.with_name(METRICS_JSONL)) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for m in history:
            row = {k: v if v is None or math.isfinite(v) else None for k, v in asdict(m).items()}
            out.write(json.dumps(row, allow_nan=False) + "\n")
