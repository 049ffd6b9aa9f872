"""The imgtrain command line: one sub-command per designer module. Thin: parse, call, report.

Errors print one line, ``error: <Name>: <what is wrong>. <how to fix it>``, and exit 1
(``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import difflib
import os
import signal
import sys

from imgtrain import __version__
from imgtrain.errors import DISK_FULL, ImgtrainError, one_line, speaking_command_line
from imgtrain.models.names import DENSENET_DEFAULT, DENSENET_NAMES, RESNET_DEFAULT, RESNET_NAMES
from imgtrain.process import LAUNCHER_PID, Terminated, die_with_launcher, launched_by_torchrun, rank, sigterm_interrupts

# Each module's short name, beside the designer's.
ALIASES = {"convert-to-image-directory": "convert", "split-image-directory": "split",
           "train-pytorch-model": "train", "score-image-model": "score", "evaluate-model": "evaluate"}


class _Parser(argparse.ArgumentParser):
    """No abbreviated flags (``--epoch 2`` is a mistake, not ``--epochs 2``), and a suggestion for a
    mistyped flag, command or choice: ``did you mean --batch-size?``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)
        self._given: list[str] = []

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        if message.startswith("the following arguments are required"):  # a mistyped one among them?
            unknown = [a for a in self._given if a.startswith("--") and a.split("=", 1)[0] not in self._flags()]
            hint = self._suggestion(unknown)
            if hint:
                message += f" (you typed {' '.join(unknown)}{hint})"
        super().error(message)

    def _flags(self) -> list[str]:
        return [s for a in self._actions for s in a.option_strings]

    def _suggestion(self, tokens: list[str]) -> str:
        close = [m for token in tokens if token.startswith("-")
                 for m in difflib.get_close_matches(token.split("=", 1)[0], self._flags(), n=1)]
        return f"; did you mean {' or '.join(dict.fromkeys(close))}?" if close else ""

    def _check_value(self, action: argparse.Action, value) -> None:
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as exc:
            close = difflib.get_close_matches(str(value), [str(c) for c in action.choices or ()], n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise argparse.ArgumentError(action, exc.message + hint) from None

    def unrecognized(self, extras: list[str]) -> None:
        self.error(f"unrecognized arguments: {' '.join(extras)}" + self._suggestion(extras))


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        # A default of None is explained in the help text itself ("default: ...").
        return action.help if action.default is None else super()._get_help_string(action)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _on_bad_image(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--on-bad-image", choices=("skip", "fail"), default="skip",
                   help=f"an image that cannot be decoded: skip leaves it out and names it, fail {what}")


def _threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", default=None, metavar="N|auto|adapt",
                   help="torch's CPU threads. auto (default, or $IMGTRAIN_THREADS): the cores this process may "
                        "use, in training less those other processes keep busy as it starts; fixed for the run "
                        "and recorded (a resumed run keeps them; --threads N with the count a run used gives its "
                        "weights again); adapt: fewer while other processes keep cores busy (fastest on a shared "
                        "machine; the weights then depend on the load); N: exactly N")


def _engine(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=("auto", "torch", "onnxruntime", "openvino"), default=None,
                   help="what runs the network: torch; onnxruntime or openvino (imgtrain[onnxruntime], "
                        "imgtrain[openvino]; on the CPU); auto: on a CPU the fastest installed, timed once per model "
                        "and machine and remembered in imgtrain's cache (README, \"Engines\"). Default: torch for a "
                        "model directory, auto for an export")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.add_argument("--quiet", action="store_true",
                   help="print only warnings and errors: no progress bars, no summaries")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


class _Log:
    """Where a module's messages go: stderr, or with --quiet only its warnings (and the lines that go with one)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.in_warning = quiet, False

    def __call__(self, message: str) -> None:
        if self.quiet:
            self.in_warning = message.startswith(("warning", "error")) or (message[:1].isspace() and self.in_warning)
            if not self.in_warning:
                return
        print(message, file=sys.stderr, flush=True)


def _say(args, text: str) -> None:
    """A command's summary on stdout, unless --quiet."""
    if not args.quiet:
        print(text)


def _progress(args) -> bool | None:
    return False if args.quiet else None  # None: bars on a terminal only


def _convert(args) -> None:
    from imgtrain.data.convert import convert_to_image_directory

    result = convert_to_image_directory(args.source, args.output, on_bad_image=args.on_bad_image,
                                        overwrite=args.overwrite, log=_Log(args.quiet), progress=_progress(args))
    _say(args, f"{result.summary()}; ImageDirectory written to {result.output}")


def _split(args) -> None:
    from imgtrain.data.split import split_image_directory

    a, b = split_image_directory(args.source, args.output_a, args.output_b, fraction=args.fraction,
                                 random_seed=args.random_seed, overwrite=args.overwrite)
    _say(args, f"Split into {a:,} images ({args.output_a}) and {b:,} images ({args.output_b})")


def _densenet(args) -> None:
    from imgtrain.models.untrained import densenet

    spec = densenet(args.output, model_name=args.model_name, pretrained=args.pretrained,
                    memory_efficient=args.memory_efficient, overwrite=args.overwrite)
    _say(args, f"Untrained {spec.architecture} ({'pretrained' if spec.pretrained else 'from scratch'}) "
               f"written to {args.output}")


def _resnet(args) -> None:
    from imgtrain.models.untrained import resnet

    spec = resnet(args.output, model_name=args.model_name, pretrained=args.pretrained,
                  zero_init_residual=args.zero_init_residual, overwrite=args.overwrite)
    _say(args, f"Untrained {spec.architecture} ({'pretrained' if spec.pretrained else 'from scratch'}) "
               f"written to {args.output}")


def _image_model(args) -> None:
    from imgtrain.models.untrained import image_model

    spec = image_model(args.output, model_name=args.model_name, pretrained=args.pretrained, overwrite=args.overwrite)
    _say(args, f"Untrained {spec.architecture} ({'pretrained' if spec.pretrained else 'from scratch'}) "
               f"written to {args.output}")


def _explain(args) -> None:
    from imgtrain.scoring.explain import explain

    explain(args.trained_model, args.dataset, args.output, images=args.images, device=args.device,
            overwrite=args.overwrite, log=_Log(args.quiet))


def _train(args) -> None:
    from imgtrain.training.train import TrainingParameters, train_pytorch_model

    params = TrainingParameters(
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
        random_seed=args.random_seed, patience=args.patience, warmup_epochs=args.warmup_epochs,
        lr_schedule=args.lr_schedule,
        image_size=args.image_size, device=args.device, precision=args.precision, optimizer=args.optimizer,
        augmentation=args.augmentation, ema=args.ema, num_workers=args.num_workers, on_bad_image=args.on_bad_image,
        cache=args.cache, threads=args.threads, lr_scaling=args.lr_scaling, sync_batchnorm=args.sync_batchnorm,
        compile=args.compile, class_weights=args.class_weights, sampler=args.sampler,
        transformation=args.transformation)
    result = train_pytorch_model(args.untrained_model, args.training_data, args.validation_data,
                                 args.output, params, overwrite=args.overwrite, resume=args.resume,
                                 restart=args.restart, log=_Log(args.quiet), progress=_progress(args),
                                 tensorboard=args.tensorboard, mlflow=args.mlflow, log_every=args.log_every)
    if rank() != 0:
        return  # rank 0 says it
    best = result.history[result.best_epoch - 1]
    summary = (f"best epoch {result.best_epoch} of {result.stopped_epoch}, validation loss "
               f"{best.validation_loss:.4f}, top-1 accuracy {best.validation_top1_accuracy:.2%}")
    if result.already_complete:
        _say(args, f"{result.output} is already complete ({summary}); nothing was changed")
    else:
        _say(args, f"Trained model written to {result.output} ({summary}); report: {result.output / 'report.html'}")


def _start_torchrun(argv: list[str], processes: int) -> int:
    """``--nproc-per-node N`` on one machine: torchrun --standalone starts N processes of this same
    command (without that flag), each with its share of the CPU threads."""
    from imgtrain.errors import DistributedRunError
    from imgtrain.threads import available_cores

    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            rest.append(arg)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, available_cores() // processes)))
    os.environ[LAUNCHER_PID] = str(os.getpid())  # the processes end with this one (process.die_with_launcher)
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    for name in list(logging.root.manager.loggerDict):  # torchrun's own reports of failures: ours below
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)

    from torch.distributed.elastic.multiprocessing.api import SignalException

    try:
        run(get_args_parser().parse_args(["--standalone", f"--nproc-per-node={processes}", "-m", "imgtrain", *rest]))
    except (KeyboardInterrupt, SignalException) as exc:  # Ctrl-C, or the job stopped: torchrun ended its processes
        number = getattr(exc, "sigval", signal.SIGINT)
        print(f"error: {_stopped_by(number)}; no output was written (re-run with --resume to continue from the "
              "last epoch)", file=sys.stderr)
        return 128 + number
    except ChildFailedError as exc:
        codes = sorted({f.exitcode for f in exc.failures.values()})
        print(f"error: {DistributedRunError.__name__}: {len(exc.failures)} of {processes} processes failed "
              f"(exit code {', '.join(map(str, codes))}); their errors are above", file=sys.stderr)
        return 1
    return 0


def _score(args) -> None:
    from imgtrain.scoring.score import score_image_model
    from imgtrain.scoring.table import SCORED_FILE

    result = score_image_model(args.trained_model, args.dataset, args.output, batch_size=args.batch_size,
                               device=args.device, num_workers=args.num_workers, precision=args.precision,
                               engine=args.engine, on_bad_image=args.on_bad_image, top_k=args.top_k,
                               threads=args.threads,
                               overwrite=args.overwrite, log=_Log(args.quiet), progress=_progress(args))
    if rank() != 0:
        return  # rank 0 says it
    _say(args, f"Scored {result.num_images:,} images; scores written to {result.output / SCORED_FILE}")


def _evaluate(args) -> None:
    from imgtrain.scoring.evaluate import METRICS_JSON, evaluate_model

    metrics = evaluate_model(args.scored_dataset, args.output, overwrite=args.overwrite, log=_Log(args.quiet))
    _say(args, f"Accuracy {metrics['accuracy']:.2%} (macro F1 {metrics['f1_macro']:.4f}) on "
               f"{metrics['num_images']:,} images; metrics written to {args.output}/{METRICS_JSON}; report: "
               f"{args.output}/report.html")


def _init_transformation(args) -> None:
    from dataclasses import fields

    from imgtrain.data.transformation import ImageTransformation, init_image_transformation

    params = ImageTransformation(**{f.name: getattr(args, f.name) for f in fields(ImageTransformation)})
    operations = init_image_transformation(args.output, params, overwrite=args.overwrite)
    listed = ", ".join(op.name for op in operations) or "no operation"
    _say(args, f"Image transformation ({listed}) written to {args.output}")


def _apply_transformation(args) -> None:
    from imgtrain.data.transformation import apply_image_transformation

    result = apply_image_transformation(args.transformation, args.dataset, args.output, mode=args.mode,
                                        random_seed=args.random_seed, overwrite=args.overwrite,
                                        progress=_progress(args), log=_Log(args.quiet))
    _say(args, f"{len(result):,} transformed images written to {args.output}")


def _pipeline_show(args) -> None:
    from imgtrain.pipeline.file import describe, load_pipeline

    print(describe(load_pipeline(args.file)))


def _pipeline_run(args) -> None:
    from imgtrain.pipeline.run import run_pipeline

    runs = run_pipeline(args.file, args.output, force_rerun=args.force_rerun, cache=args.cache,
                        overwrite=args.overwrite, log=_Log(args.quiet))
    _say(args, f"{sum(not r.reused for r in runs)} step(s) run, {sum(r.reused for r in runs)} reused")


def _report(args) -> None:
    from imgtrain.scoring.report import report

    report(args.trained_model, args.output, scored_dataset=args.scored_dataset, overwrite=args.overwrite,
           log=_Log(quiet=True))  # its warnings; the summary below says where the page is
    _say(args, f"Report written to {args.output}")


def _export(args) -> None:
    from imgtrain.deploy.export import export_model

    path = export_model(args.trained_model, args.output, format=args.format, opset=args.opset, int8=args.int8,
                        calibration_data=args.calibration_data, validation_data=args.validation_data,
                        max_accuracy_drop=args.max_accuracy_drop, overwrite=args.overwrite, log=_Log(args.quiet))
    _say(args, f"Exported to {path} (metadata in {path.parent / 'metadata.json'})")


def _serve(args) -> None:
    from imgtrain.deploy.serve import ServeOptions, serve

    options = ServeOptions(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                           max_queue=args.max_queue, max_body_mb=args.max_body_mb,
                           max_bodies_mb=args.max_bodies_mb, body_timeout_s=args.body_timeout_s,
                           header_timeout_s=args.header_timeout_s, max_connections=args.max_connections,
                           max_decode_mb=args.max_decode_mb, threads=args.threads,
                           precision=args.precision, device=args.device, engine=args.engine)
    serve(args.trained_model, host=args.host, port=args.port, name=args.name, options=options,
          log=_Log(args.quiet))


def _ui(args) -> None:
    from imgtrain.ui.app import run_ui

    run_ui(args.workspace, data=args.data, host=args.host, port=args.port, token=args.token, log=_Log(args.quiet))


def _list_models(args) -> None:
    from imgtrain.models.catalog import catalog, select, table, timm_catalog

    timm = (args.pattern or "").startswith("timm/")
    rows = select(timm_catalog() if timm else catalog(), args.pattern, pretrained=args.pretrained, sort=args.sort)
    print(table(rows))
    _say(args, f"{len(rows)} of timm's image classifiers (imgtrain[timm]); the image size of its default weights"
         if timm else f"{len(rows)} of torchvision's image classifiers; GFLOPs at the image size shown, top-1 of its "
                      "ImageNet weights ('timm/*' lists timm's). The last column: the command that builds it.")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="imgtrain", formatter_class=_Formatter,
        description="Train, score and evaluate PyTorch image classifiers: the Azure ML designer's "
                    "image modules, as a command line.",
        epilog="Pipeline: convert-to-image-directory -> split-image-directory (-> init-image-transformation, "
               "apply-image-transformation) -> densenet | resnet | image-model -> train-pytorch-model -> "
               "score-image-model -> evaluate-model (short names in parentheses); `report` puts a model's training "
               "and evaluation on one HTML page.\n"
               "Run `imgtrain <command> --help` for a command's parameters.")
    parser.add_argument("--version", action="version", version=f"imgtrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    parser.commands = sub.choices  # name or alias -> the command's parser

    def command(name: str, func, help_text: str) -> argparse.ArgumentParser:
        aliases = [ALIASES[name]] if name in ALIASES else []
        p = sub.add_parser(name, aliases=aliases, help=help_text, description=help_text, formatter_class=_Formatter)
        p.set_defaults(func=func)
        return p

    p = command("convert-to-image-directory", _convert,
                "Convert a folder with one sub-folder per category (or a flat folder, or a .zip/.tar/.tar.gz/"
                ".tgz/.tar.bz2/.tbz2/.tar.xz archive of one) into an ImageDirectory.")
    p.add_argument("source", help="folder or archive of images")
    p.add_argument("--output", required=True, help="the ImageDirectory to write")
    _on_bad_image(p, "stops before anything is written")
    _common(p)

    p = command("split-image-directory", _split,
                "Split an ImageDirectory in two, stratified by category and seeded; both keep every category.")
    p.add_argument("source", help="the ImageDirectory to split")
    p.add_argument("--fraction", type=float, default=0.9, help="share of each category in the first output, in (0, 1)")
    p.add_argument("--random-seed", type=_int, default=42,
                   help="seed of the split, any integer; 42, the designer's, puts the same images on each side as "
                        "the designer's module does")
    p.add_argument("--output-a", required=True, help="ImageDirectory receiving the fraction (e.g. training)")
    p.add_argument("--output-b", required=True, help="ImageDirectory receiving the rest (e.g. validation)")
    _common(p)

    for name, func, names, default, extra in [
        ("densenet", _densenet, DENSENET_NAMES, DENSENET_DEFAULT,
         ("--memory-efficient", "gradient checkpointing: less memory, slower training")),
        ("resnet", _resnet, RESNET_NAMES, RESNET_DEFAULT,
         ("--zero-init-residual", "start each residual block's last BatchNorm at zero (from scratch only)")),
    ]:
        title = {"densenet": "DenseNet", "resnet": "ResNet"}[name]
        p = command(name, func, f"Write an untrained {title} model directory (a spec, no code).")
        about = {"resnet": "the designer's default resnext101_32x8d is a large network (89M parameters, 340 MB of "
                           "pretrained weights, 16 GFLOPs an image at 224 px): on a CPU, resnet18 (1.8 GFLOPs) "
                           "trains many times faster",
                 "densenet": "the designer's default densenet201 has 20M parameters (77 MB of pretrained "
                             "weights, 4.3 GFLOPs an image at 224 px); densenet121 needs two thirds of that"}
        p.add_argument("--model-name", choices=names, default=default, help=f"architecture; {about[name]}")
        p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                       help="start from torchvision's ImageNet weights, downloaded once into torch's cache "
                            "($TORCH_HOME/hub/checkpoints; offline, the error names the file to place there); "
                            "--no-pretrained starts from random weights and needs no download")
        p.add_argument(extra[0], action="store_true", help=extra[1])
        p.add_argument("--output", required=True, help="the model directory to write")
        _common(p)

    p = command("image-model", _image_model,
                "Write an untrained model directory for any image classifier torchvision ships: ConvNeXt, "
                "EfficientNet(V2), RegNet, MobileNetV2/V3, ShuffleNetV2, MNASNet, SqueezeNet, GoogLeNet, Inception "
                "V3, VGG, ViT, Swin, MaxViT, DenseNet, ResNet (`imgtrain list-models` compares them).")
    p.add_argument("--model-name", required=True, help="an architecture `imgtrain list-models` lists, e.g. "
                                                       "mobilenet_v3_large or convnext_tiny; timm/NAME (e.g. "
                                                       "timm/convnext_nano) builds timm's, with imgtrain[timm]")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from torchvision's ImageNet weights, downloaded once into torch's cache "
                        "($TORCH_HOME/hub/checkpoints; offline, the error names the file to place there); the "
                        "directory records how they expect their images; --no-pretrained starts from random weights")
    p.add_argument("--output", required=True, help="the model directory to write")
    _common(p)

    p = command("train-pytorch-model", _train,
                "Train an untrained model directory on a labelled ImageDirectory; keep the epoch with the "
                "lowest validation loss; stop after --patience epochs without improvement.")
    p.add_argument("--untrained-model", required=True,
                   help="output of `imgtrain image-model`, `imgtrain densenet` or `imgtrain resnet`")
    p.add_argument("--training-data", required=True, help="labelled ImageDirectory to learn from")
    p.add_argument("--validation-data", required=True, help="labelled ImageDirectory with the same categories")
    p.add_argument("--output", required=True, help="the trained model directory to write")
    p.add_argument("--epochs", type=_int, default=5, help="passes over the training set, > 0")
    p.add_argument("--batch-size", type=_int, default=16,
                   help="images per step (per process with several: --nproc-per-node, torchrun), from 2 "
                        "(BatchNorm needs two) to the number of training images")
    p.add_argument("--learning-rate", type=float, default=0.001,
                   help="peak learning rate, > 0 (pretrained backbones use a tenth of it)")
    p.add_argument("--random-seed", type=_int, default=1,
                   help="any integer (taken modulo 2**32); same seed, same machine: same weights")
    p.add_argument("--patience", type=_int, default=3,
                   help="epochs without a lower validation loss before stopping early, > 0")
    p.add_argument("--warmup-steps", "--warmup-epochs", dest="warmup_epochs", type=_int, default=0, metavar="EPOCHS",
                   help="the designer's 'Warmup steps', counted in epochs as there: epochs of linear "
                        "learning-rate warm-up before the decay, >= 0")
    p.add_argument("--lr-schedule", choices=("linear", "cosine"), default="linear",
                   help="after the warm-up, the learning rate falls to zero at the last step: in a straight line "
                        "(linear, the default) or along a cosine (cosine: what imgtrain did before)")
    p.add_argument("--image-size", type=_int, default=None,
                   help="side of the square images the model sees, 32 to 4096 (default: the median shorter side of the "
                        "training images, rounded up to a multiple of 32, between 32 and 224)")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU if there is one), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: bf16 autocast where the CPU or GPU runs it natively, fp16 with loss scaling on "
                        "GPUs without bf16, fp32 otherwise")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                   help="adamw (weight decay 0.05) or the designer's SGD (momentum 0.9, Nesterov, 1e-4)")
    p.add_argument("--augmentation", choices=("shift", "shift-flip", "none"), default="shift",
                   help="per-epoch augmentation: shift moves images by up to 1/16 of their side (safe for "
                        "digits and text); shift-flip adds horizontal flips (photos only)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate, and keep as the model, an exponential moving average of the weights (its window "
                        "about the last ninth of the steps so far): good models sooner. --no-ema: the weights "
                        "themselves")
    p.add_argument("--transformation", default=None, metavar="T",
                   help="a TransformationDirectory (`imgtrain init-image-transformation`, or the designer's) in place "
                        "of --augmentation: its fixed operations (Resize, CenterCrop, Pad, Grayscale) run once per "
                        "image, before the decoded-image cache; its random ones anew every epoch, seeded, on the "
                        "image as the fixed ones leave it (as apply-image-transformation runs them). The "
                        "model's image size is the size the operations make (where they make no square: "
                        "--image-size, else their Resize's); the model records the fixed operations and scoring "
                        "applies them")
    p.add_argument("--class-weights", choices=("none", "balanced"), default="none",
                   help="balanced: weight each class's loss by the inverse of its share of the training images "
                        "(a class with a tenth of the images weighs ten times as much)")
    p.add_argument("--sampler", choices=("uniform", "balanced"), default="uniform",
                   help="uniform: every training image once an epoch; balanced: every class drawn equally often "
                        "(small classes repeated, large ones sampled). With either balanced choice the validation "
                        "loss that picks the best epoch weighs every class equally too")
    p.add_argument("--num-workers", type=_int, default=None,
                   help="DataLoader worker processes (default: one per CPU core, at most 8)")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the decoded images at training size in a memory-mapped file beside the output "
                        "after the first epoch, instead of decoding them again every epoch")
    _threads(p)
    p.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also write TensorBoard event files into DIR (`tensorboard --logdir DIR`): every figure of "
                        "metrics.csv per epoch, the running loss and learning rate every --log-every steps. Needs "
                        "`pip install 'imgtrain[tensorboard]'`")
    p.add_argument("--mlflow", nargs="?", const=True, default=False, metavar="URI",
                   help="also log the run to MLflow: parameters, figures per epoch (and every --log-every steps), "
                        "and the model directory as the artifact `model`. To URI if given, else to "
                        "$MLFLOW_TRACKING_URI, else to ./mlruns; experiment $MLFLOW_EXPERIMENT_NAME or imgtrain. "
                        "Needs `pip install 'imgtrain[mlflow]'`")
    p.add_argument("--log-every", type=_int, default=50, metavar="STEPS",
                   help="steps between the running figures sent to TensorBoard and MLflow (on a GPU, read every "
                        "50 steps at most)")
    p.add_argument("--nproc-per-node", type=_int, default=None, metavar="N",
                   help="train with N processes on this machine (one per GPU, or CPU processes sharing its "
                        "cores), started by torchrun; --batch-size is per process. On several machines, start "
                        "`torchrun ... -m imgtrain train-pytorch-model` on each instead (docs/distributed.md)")
    p.add_argument("--lr-scaling", choices=("auto", "none", "sqrt", "linear"), default="auto",
                   help="with N processes the batch grows N-fold: multiply the learning rate by 1, sqrt(N) or N. "
                        "auto: sqrt(N) for adamw (square-root rule for Adam), N for sgd (the designer's rule)")
    p.add_argument("--sync-batchnorm", action="store_true",
                   help="with several GPUs, BatchNorm statistics over every process's batch (for small batches)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model: slower to start (35 s for ResNet-50 on an H200), faster steps "
                        "(1.6x there): for long GPU runs")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue an interrupted run of the same command from its last checkpoint (an epoch); "
                            "with a larger --epochs, train on to that many epochs")
    again.add_argument("--restart", action="store_true",
                       help="discard the checkpoint of an interrupted run and start again")
    _on_bad_image(p, "stops the run")
    _common(p)

    p = command("score-image-model", _score,
                "Score images with a trained model: one probability column per category and the predicted label. "
                "Under torchrun (`torchrun --nproc-per-node N -m imgtrain score ...`) the processes share the "
                "images out and rank 0 writes the one table.")
    p.add_argument("--trained-model", required=True,
                   help="output of `imgtrain train-pytorch-model`, or of `imgtrain export` (model.onnx, model.xml or "
                        "their folder)")
    p.add_argument("--dataset", required=True, nargs="+", metavar="DATASET",
                   help="an ImageDirectory; a folder of images (one sub-folder per category, or flat); or image "
                        "files and glob patterns ('photos/*.jpg', quoted, or expanded by the shell)")
    p.add_argument("--output", required=True, help="directory to write scored.csv into")
    p.add_argument("--batch-size", type=_int, default=64, help="images per batch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: bf16 where the CPU or GPU runs it natively, fp16 on other GPUs, else fp32")
    p.add_argument("--num-workers", type=_int, default=None,
                   help="DataLoader worker processes (default: one per CPU core, at most 8)")
    p.add_argument("--top-k", type=_int, default=None, metavar="K",
                   help="add the K most probable labels of each image with their probabilities")
    _engine(p)
    _threads(p)
    _on_bad_image(p, "stops the run")
    _common(p)

    p = command("evaluate-model", _evaluate,
                "Evaluate scored images: accuracy, micro/macro precision, recall, F1, per-class figures and a "
                "confusion matrix (metrics.json, confusion_matrix.png).")
    p.add_argument("--scored-dataset", required=True, help="output of `imgtrain score-image-model`")
    p.add_argument("--output", required=True, help="directory to write the metrics into")
    _common(p)

    p = command("init-image-transformation", _init_transformation,
                "Write an image transformation (a TransformationDirectory, in the designer's format) for "
                "`imgtrain apply-image-transformation`.")
    on_off = argparse.BooleanOptionalAction
    for flag, default, text in [
        ("--resize", True, "resize the shorter side to --size (the whole image when it is square)"),
        ("--size", 256, "size for --resize, >= 1"),
        ("--center-crop", True, "crop the centre to --crop-size x --crop-size"),
        ("--crop-size", 224, "side of the centre crop, >= 1"),
        ("--pad", False, "pad every side with --padding black pixels"),
        ("--padding", 0, "pixels of padding, >= 0"),
        ("--color-jitter", False, "random brightness, contrast and saturation (0.4 each; random: dropped at "
                                  "inference)"),
        ("--grayscale", False, "make the images grey (three equal channels)"),
        ("--random-resized-crop", False, "a random part (8-100%% of the area, aspect 3/4-4/3) resized to "
                                         "--random-size"),
        ("--random-size", 256, "size for --random-resized-crop, >= 1"),
        ("--random-crop", False, "a random --random-crop-size square"),
        ("--random-crop-size", 224, "side of the random crop, >= 1"),
        ("--random-horizontal-flip", True, "mirror half of the images left to right (wrong for digits and text)"),
        ("--random-vertical-flip", False, "turn half of the images upside down"),
        ("--random-rotation", False, "rotate by up to +-degrees"),
        ("--random-rotation-degrees", 0.0, "degrees for --random-rotation, 0 to 180"),
        ("--random-affine", False, "a random affine transform rotating by up to +-degrees"),
        ("--random-affine-degrees", 0.0, "degrees for --random-affine, 0 to 180"),
        ("--random-grayscale", False, "make a tenth of the images grey"),
        ("--random-perspective", False, "distort half of the images' perspective"),
        ("--random-erasing", False, "erase a random rectangle in half of the images"),
    ]:
        if isinstance(default, bool):
            p.add_argument(flag, action=on_off, default=default, help=text)
        else:
            p.add_argument(flag, type=type(default) if isinstance(default, float) else _int, default=default,
                           help=text)
    p.add_argument("--output", required=True, help="the TransformationDirectory to write")
    _common(p)

    p = command("apply-image-transformation", _apply_transformation,
                "Apply an image transformation to every image of an ImageDirectory; write the result as a new "
                "ImageDirectory (same ids and categories, images as PNG).")
    p.add_argument("--transformation", required=True, help="output of `imgtrain init-image-transformation`")
    p.add_argument("--dataset", required=True, help="the ImageDirectory to transform")
    p.add_argument("--mode", choices=("training", "inference"), default="training",
                   help="training: every operation; inference: drops the random ones (RandomResizedCrop, "
                        "RandomCrop, RandomHorizontalFlip, RandomVerticalFlip, RandomRotation, RandomAffine, "
                        "RandomGrayscale, RandomPerspective, RandomErasing, and ColorJitter); Resize, CenterCrop, "
                        "Pad and Grayscale stay")
    p.add_argument("--random-seed", type=_int, default=1,
                   help="seed of the random operations: with the image's id, it decides each image's draw")
    p.add_argument("--output", required=True, help="the ImageDirectory to write")
    _common(p)

    p = command("pipeline", None, "Pipelines as code: a YAML file of steps shaped like Azure ML's v2 pipeline jobs "
                                  "(README, \"Pipelines\").")
    actions = p.add_subparsers(dest="action", required=True, metavar="<action>")
    q = actions.add_parser("show", help="check a pipeline file and print its graph: the steps in the order they "
                                        "run, where each input comes from, what is published",
                           formatter_class=_Formatter)
    q.add_argument("file", help="the pipeline file (.yaml)")
    q.set_defaults(func=_pipeline_show)
    _common(q)
    q = actions.add_parser("run", help="run a pipeline file: every step whose inputs and parameters changed, the "
                                       "others reused from the cache; publish its outputs",
                           formatter_class=_Formatter)
    q.add_argument("file", help="the pipeline file (.yaml)")
    q.add_argument("--output", default=None,
                   help="where the pipeline's outputs go, one folder each (default: <file name>-output beside the "
                        "file)")
    q.add_argument("--force-rerun", action="store_true", help="run every step again, as Azure's force_rerun")
    q.add_argument("--cache", default=None, metavar="DIR",
                   help="the cache of step outputs (default: .imgtrain-cache beside the file)")
    q.set_defaults(func=_pipeline_run)
    _common(q)

    p = command("report", _report,
                "Write one self-contained HTML page for a trained model: its training (curves, data, the images "
                "as the model saw them, parameters) and, with --scored-dataset, its evaluation (confusion "
                "matrix, per-class figures, the worst mistakes).")
    p.add_argument("trained_model", metavar="MODEL", help="output of `imgtrain train-pytorch-model`")
    p.add_argument("--scored-dataset", default=None,
                   help="a labelled output of `imgtrain score-image-model` to evaluate on the same page")
    p.add_argument("--output", required=True, help="the HTML file to write, e.g. report.html")
    _common(p)

    p = command("list-models", _list_models,
                "A table of every image classifier torchvision ships, to choose from: family, parameters, GFLOPs "
                "at its default image size, ImageNet top-1 of its pretrained weights, weight file size, default "
                "image size; read from torchvision's own registries (nothing is built or downloaded).")
    p.add_argument("pattern", nargs="?", default=None,
                   help="a shell pattern ('efficientnet*') or part of a name ('mobilenet'); default: all of "
                        "torchvision's; 'timm/*' (or 'timm/convnext*') lists timm's, with imgtrain[timm]")
    p.add_argument("--pretrained", action="store_true", help="only those with pretrained ImageNet weights")
    p.add_argument("--sort", choices=("name", "params", "gflops", "accuracy"), default="name",
                   help="name (default), or most parameters, GFLOPs or accuracy first")
    p.add_argument("--quiet", action="store_true", help="the table alone, without the line after it")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")

    p = command("explain", _explain,
                "Show where a trained model looked: for each image, the image beside a saliency map over it "
                "(Grad-CAM for convolutional networks, integrated gradients for ViT, Swin and MaxViT), with the "
                "true and predicted label and the probability; PNG files and one HTML page (index.html). With "
                "labelled images, the mistakes come first, the most confident first. Needs imgtrain[explain].")
    p.add_argument("--trained-model", required=True, help="output of `imgtrain train-pytorch-model`")
    p.add_argument("--dataset", required=True, nargs="+",
                   help="an ImageDirectory, a folder, or image files and glob patterns, as score takes")
    p.add_argument("--images", type=_int, default=16, help="how many images to explain")
    p.add_argument("--output", required=True, help="the folder to write the PNG files and index.html into")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU if there is one), cpu, cuda or cuda:N")
    _common(p)

    p = command("export", _export,
                "Export a trained model for standard runtimes: ONNX (model.onnx), OpenVINO (model.xml, model.bin) or "
                "torch.export (model.pt2); ONNX and OpenVINO in int8 too, its accuracy checked on held-out images. "
                "Input `images`: uint8 [N, H, W, 3] RGB at the model's image size (resized outside the graph, as "
                "the `resize` metadata says, and preprocess.py, written beside it, does); output `probabilities`: "
                "float32 [N, C]; metadata `labels`, `image_size`, `resize`. Checked against the model before it is "
                "written.")
    p.add_argument("trained_model", metavar="MODEL", help="output of `imgtrain train-pytorch-model`")
    p.add_argument("--format", choices=("onnx", "openvino", "pt2"), default="onnx",
                   help="onnx (needs imgtrain[export]), openvino (imgtrain[openvino]) or pt2 (torch.export.save; "
                        "torch.export.load reads it). imgtrain scores and serves onnx and openvino exports")
    p.add_argument("--opset", type=_int, default=None, help="the ONNX opset (default: 20); for --format onnx only")
    p.add_argument("--int8", action="store_true",
                   help="quantize to int8 (static, ONNX Runtime's quantizer; imgtrain[onnxruntime]): 2-3x faster on "
                        "a CPU; needs --calibration-data and --validation-data")
    p.add_argument("--calibration-data", default=None, metavar="IMAGEDIR",
                   help="with --int8: an ImageDirectory whose images set the int8 ranges (up to 256 of them, of "
                        "every category: the training split)")
    p.add_argument("--validation-data", default=None, metavar="IMAGEDIR",
                   help="with --int8: a labelled ImageDirectory, sharing no image with --calibration-data, on which "
                        "int8's top-1 accuracy is measured against fp32's and recorded in the metadata")
    p.add_argument("--max-accuracy-drop", type=float, default=1.0, metavar="POINTS",
                   help="with --int8: refuse the export (nothing written) when int8 loses more than this many points "
                        "of top-1 accuracy on --validation-data")
    p.add_argument("--output", required=True, help="the folder to write the model file and metadata.json into")
    _common(p)

    p = command("serve", _serve,
                "Serve a trained model over HTTP: the Open Inference Protocol (KServe v2, Triton) at "
                "/v2/models/NAME/infer and TorchServe's shape at /predictions/NAME, with dynamic batching "
                "(README, \"Serve\"). Runs until SIGTERM or Ctrl-C, which let the requests in flight finish.")
    p.add_argument("trained_model", metavar="MODEL",
                   help="output of `imgtrain train-pytorch-model`, or of `imgtrain export` (model.onnx, model.xml or "
                        "their folder)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=_int, default=8080, help="the port to listen on")
    p.add_argument("--name", default=None, help="the model's name in the URLs (default: MODEL's folder name)")
    p.add_argument("--max-batch-size", type=_int, default=16,
                   help="images of concurrent requests run through the network together, at most (a request "
                        "of more runs in batches of this many)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a batch waits for requests still being decoded (a lone client never waits)")
    p.add_argument("--max-queue", type=_int, default=256, help="images waiting, at most; more get 503 at once")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="a larger request body gets 413")
    p.add_argument("--max-bodies-mb", type=float, default=None,
                   help="memory that request bodies may hold at once, each counted at 3 times its size (its bytes, "
                        "what parsing makes of them, its images); a request whose body finds no room within a "
                        "second gets 503 with Retry-After, its body unread (default: 256, or 3 x --max-body-mb "
                        "where that is more)")
    p.add_argument("--body-timeout-s", type=float, default=60.0,
                   help="a request body not all there this many seconds after its turn to be read gets 408")
    p.add_argument("--header-timeout-s", type=float, default=5.0,
                   help="a connection whose request headers are not all there this many seconds after it opens "
                        "(or after the request's first byte, on a connection kept alive) is closed, with 408")
    p.add_argument("--max-connections", type=_int, default=512,
                   help="connections open at once; one more gets 503 with Retry-After as it is accepted, unless "
                        "the one that has waited longest for its request's headers, over a second, can be closed "
                        "to make room; the default fits a limit of 1,024 open files (ulimit -n)")
    p.add_argument("--max-decode-mb", type=float, default=512.0,
                   help="memory that decoding requests' images may hold at once (counted from their headers: "
                        "pixels x bytes of the copies a decode holds); more wait; an image that alone needs more "
                        "gets 400, a request whose images together do, 413")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU if there is one), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: bf16 where the CPU or GPU runs it natively, fp16 on other GPUs, else fp32 (fp32 "
                        "answers as `imgtrain score --precision fp32` and an ONNX export do)")
    _engine(p)
    _threads(p)
    p.add_argument("--quiet", action="store_true", help="print only warnings and errors")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")

    p = command("ui", _ui,
                "Open imgtrain in a browser: open a folder of images, train, watch the curves, look at the "
                "mistakes, try the model and export it (README, \"The web page\"). Prints one URL with its "
                "access token; runs until Ctrl-C or SIGTERM (training jobs go on, and the next start finds them).")
    p.add_argument("--workspace", default="imgtrain-workspace",
                   help="the folder that holds the page's data sets and runs (made if missing); every run is a "
                        "model directory the CLI reads")
    p.add_argument("--data", action="append", default=[], metavar="FOLDER",
                   help="a folder whose sub-folders and archives the page may open (repeat for more); the page "
                        "opens nothing outside these and the workspace")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on; anything but loopback lets others reach it (with the token)")
    p.add_argument("--port", type=_int, default=8765, help="the port to listen on (0: any free one)")
    p.add_argument("--token", default=None,
                   help="the access token the URL carries (default: a new random one each start)")
    p.add_argument("--quiet", action="store_true", help="print only warnings and errors")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def _stopped_by(number: int) -> str:
    return "terminated (SIGTERM)" if number == signal.SIGTERM else "interrupted"


def main(argv: list[str] | None = None) -> int:
    torchrun = launched_by_torchrun()
    # A rank ends with its launcher, even one killed with SIGKILL; imgtrain's own launcher says how a run ended
    launcher_speaks = die_with_launcher() if torchrun else False
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        parser.commands[args.command].unrecognized(extras)
    if getattr(args, "nproc_per_node", None) is not None:
        if args.nproc_per_node < 1:
            parser.commands[args.command].error(f"argument --nproc-per-node: {args.nproc_per_node} is not >= 1")
        if not torchrun:
            return _start_torchrun(sys.argv[1:] if argv is None else list(argv), args.nproc_per_node)
    from imgtrain.progress import quiet

    try:
        # SIGTERM unwinds as Ctrl-C does, in torchrun's processes too (torchrun passes on the signal it gets)
        with speaking_command_line(), quiet(args.quiet), sigterm_interrupts():
            args.func(args)
    except ImgtrainError as exc:
        if args.debug:
            raise
        who = f"rank {rank()}: " if torchrun and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else ""
        print(f"error: {who}{type(exc).__name__}: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        number = exc.signal_number if isinstance(exc, Terminated) else signal.SIGINT
        if rank() != 0 or launcher_speaks:
            return 128 + number  # rank 0, or the launcher, says it
        resumable = args.func is _train
        again = " (re-run with --resume to continue from the last epoch)" if resumable else ""
        print(f"error: {_stopped_by(number)}; no output was written{again}", file=sys.stderr)
        return 128 + number
    except OSError as exc:  # the file system said no: a full disk, a name too long, a permission
        if args.debug:
            raise
        hint = ""
        if exc.errno in DISK_FULL:
            hint = (". no output was written; free space on that disk, then re-run with --resume to continue from "
                    "the last epoch" if args.func is _train else
                    ". no output was written; free space on that disk, or write the output to another one")
        print(f"error: {type(exc).__name__}: {one_line(exc)}{hint}", file=sys.stderr)
        return 1
    return 0
