"""Export a trained model to the standard runtimes: ONNX (``model.onnx``), OpenVINO (``model.xml`` and
``model.bin``) and torch.export (``model.pt2``); ONNX and OpenVINO in int8 too (deploy/quantize.py).

Both hold one graph with one contract, so that a caller needs neither imgtrain nor its preprocessing code:

- input ``images``: uint8 ``[N, H, W, 3]``, RGB as decoded, H = W = the model's image size, any N;
- output ``probabilities``: float32 ``[N, C]``, the classes in the order of the ``labels`` metadata;
- inside the graph: the scaling to [0, 1], the normalisation with the model's mean and std, the
  network and the softmax. Outside it: decoding and the resize to the model's size, which the
  ``resize`` metadata spells out (with ``draft_size``, and ``transformation`` where the model records
  one), and ``preprocess.py``, written beside the model, does: it is imgtrain's own decoding code
  (data/picture.py), Pillow and numpy only, so that a runtime fed by it answers as imgtrain does.

The metadata travels inside the file (ONNX ``metadata_props``; OpenVINO's ``rt_info`` under ``imgtrain``;
the .pt2 archive's extra files) and in ``metadata.json`` beside it. Every export is checked before it is
published: an fp32 graph must give the network's own probabilities on a batch of images; an int8 graph
must keep its top-1 accuracy on held-out images within ``--max-accuracy-drop`` of fp32's. ONNX and
OpenVINO exports score with imgtrain itself (``score-image-model --trained-model model.onnx``,
deploy/engines.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgtrain.data import picture
from imgtrain.deploy.quantize import check_sets
from imgtrain.directories.atomic import atomic_output_dir, check_not_an_input, check_output_writable
from imgtrain.errors import (
    ExportError,
    InvalidParameterError,
    MissingDependencyError,
    check_choice,
    check_range,
    option,
)
from imgtrain.models.trained import TrainedModel, load_trained_model

FORMATS = ("onnx", "openvino", "pt2")
FILES = {"onnx": "model.onnx", "openvino": "model.xml", "pt2": "model.pt2"}
METADATA_FILE, PREPROCESS_FILE = "metadata.json", "preprocess.py"
INPUT, OUTPUT = "images", "probabilities"
DEFAULT_OPSET = 20  # torch 2.14's own; named here so that a newer torch does not change what files hold
MIN_OPSET = 18  # torch's exporter writes opset 18 operators: asked for fewer, it wrote 18 all the same
_EXPORTER_LOGS = ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo")
_RTOL, _ATOL = 1e-3, 1e-5  # how close the exported graph's probabilities must be to the network's


class Deployable(nn.Module):
    """uint8 ``[N, H, W, 3]`` RGB images -> float32 ``[N, C]`` class probabilities."""

    def __init__(self, network: nn.Module, mean, std) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        return self.network((x - self.mean) / self.std).softmax(dim=1)


def metadata_of(model: TrainedModel) -> dict[str, str]:
    """The exported model's metadata: every value a string, as ONNX's metadata_props hold them."""
    from imgtrain import __version__

    spec = model.spec
    draft = model.preparation.draft_size  # None: a crop of the full picture comes first, JPEGs decode in full
    steps = _steps()
    if not draft:
        del steps[2]
    if spec.input.transformation:
        steps[4] = ("The operations of transformation (torchvision.transforms.v2 on the uint8 image, in order), "
                    "then, when they leave another shape, a resize to image_size x image_size with torchvision's "
                    "antialiased bilinear resize (preprocess.py's preprocess() refuses this model: rgb(), then "
                    "those).")
    recipe = " ".join(f"{n}. {text}" for n, text in steps.items())
    meta = {"labels": json.dumps(model.labels, ensure_ascii=False), "image_size": str(model.image_size),
            "draft_size": str(draft or 0), "resize": f"As preprocess.py (imgtrain's data/picture.py) does: {recipe}",
            "input": f"{INPUT}: uint8 [N, {model.image_size}, {model.image_size}, 3], RGB",
            "output": f"{OUTPUT}: float32 [N, {len(model.labels)}], in the order of labels",
            "architecture": spec.architecture, "mean": json.dumps(spec.input.mean), "std": json.dumps(spec.input.std),
            "producer": f"imgtrain {__version__}"}
    if spec.input.transformation:
        meta["transformation"] = json.dumps(spec.input.transformation)
    return meta


def _steps() -> dict[int, str]:
    """picture.py's numbered steps, as its docstring says them (said once, there), FORMATS spelt out."""
    text = picture.__doc__.split("\n1. ", 1)[1].split("\n\n", 1)[0]
    found = re.findall(r"(\d)\. (.*?)(?=\n\d\. |\Z)", "1. " + text, re.S)
    steps = {int(n): " ".join(step.split()) for n, step in found}
    steps[1] = steps[1].replace("formats=FORMATS", f"formats={list(picture.FORMATS)}")
    return steps


def export_model(
    trained_model: TrainedModel | Path | str,
    output: Path | str,
    *,
    format: str = "onnx",
    opset: int | None = None,
    int8: bool = False,
    calibration_data: Path | str | None = None,
    validation_data: Path | str | None = None,
    max_accuracy_drop: float = 1.0,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> Path:
    """Export a trained model directory to ``output``/model.onnx, model.xml (OpenVINO, with model.bin) or
    model.pt2 (with metadata.json and preprocess.py); returns the model file's path. ``opset``: the ONNX
    opset (default: 20). ``int8``: quantized with ``calibration_data``'s images, refused when it loses more
    than ``max_accuracy_drop`` points of top-1 on ``validation_data`` (held out, labelled)."""
    check_choice("format", format, FORMATS)
    if opset is not None and format != "onnx":
        # Refused rather than ignored: a file made "with opset 13" that holds no such thing misleads.
        holds = "a .pt2 holds torch's own" if format == "pt2" else "an OpenVINO model holds OpenVINO's own"
        raise InvalidParameterError(f"{option('opset')} is for ONNX: {holds} operators, which have no opset",
                                    f"leave out {option('opset')}, or pass {option('format', 'onnx')}")
    if int8 and format == "pt2":
        raise InvalidParameterError(f"{option('int8')} is for ONNX and OpenVINO exports",
                                    f"pass {option('format', 'onnx')} or {option('format', 'openvino')}")
    if not int8 and (calibration_data is not None or validation_data is not None):
        raise InvalidParameterError(f"{option('calibration_data')} and {option('validation_data')} are for "
                                    f"{option('int8')}", f"add {option('int8')}, or leave them out")
    if format in ("onnx", "openvino"):
        newest = _onnx_modules()[0].defs.onnx_opset_version()  # asked for a newer one, the exporter wrote 18
        check_range("opset", DEFAULT_OPSET if opset is None else opset, low=MIN_OPSET, high=newest,
                    hint=f"pass an {option('opset')} from {MIN_OPSET} (torch's exporter writes no older one) to "
                         f"{newest} (the newest the installed onnx knows)")
        opset = DEFAULT_OPSET if opset is None else opset
    model = trained_model if isinstance(trained_model, TrainedModel) else None
    inputs = {"trained model": model.path if model else trained_model, "calibration data": calibration_data,
              "validation data": validation_data}
    check_not_an_input(output, {what: path for what, path in inputs.items() if path is not None})
    model = model or load_trained_model(trained_model)
    if format == "openvino":
        from imgtrain.deploy.engines import _need

        _need("openvino")
    sets = check_sets(model.labels, calibration_data, validation_data, max_accuracy_drop) if int8 else None
    check_output_writable(Path(output), overwrite=overwrite)
    size = model.image_size
    deployable = Deployable(model.network.float().eval(), model.spec.input.mean, model.spec.input.std).eval()
    example = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    metadata = metadata_of(model)
    what = {"onnx": f"ONNX opset {opset}", "openvino": "OpenVINO", "pt2": "torch.export"}[format]
    log(f"Exporting {model.spec.architecture} ({len(model.labels)} classes, {size} px) to {what}"
        + (", int8" if int8 else ""))
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        path = tmp / FILES[format]
        if format == "pt2":
            _pt2(deployable, example, path, metadata, model.spec.architecture)
        else:
            graph = tmp / ("model.onnx" if format == "onnx" and not int8 else "fp32.onnx")
            _onnx(deployable, example, graph, metadata, opset or DEFAULT_OPSET, model.spec.architecture)
            if int8:
                graph = _int8(model, graph, path, format, sets, max_accuracy_drop, metadata, log)
            if format == "openvino":
                _openvino(deployable, example, graph, path, metadata, model.spec.architecture, check=not int8)
                graph.unlink()
            elif graph != path:
                graph.replace(path)
            for leftover in tmp.glob("*.onnx"):
                if leftover != path:
                    leftover.unlink()
        (tmp / PREPROCESS_FILE).write_text(_preprocess_source(model), encoding="utf-8")
        (tmp / METADATA_FILE).write_text(json.dumps({**metadata, "labels": model.labels}, indent=2,
                                                    ensure_ascii=False), encoding="utf-8")
    return Path(output) / FILES[format]


def _engine_threads() -> int:
    from imgtrain.threads import Threads, parse_threads

    return Threads(parse_threads(None), lambda m: None).current


def _int8(model: TrainedModel, fp32: Path, path: Path, format: str, sets, max_accuracy_drop: float,
          metadata: dict[str, str], log: Callable[[str], None]) -> Path:
    """``fp32`` quantized (deploy/quantize.py), measured as it will run (the very file shipped, in the engine the
    format is for, at that engine's default precision), its metadata updated."""
    from imgtrain.deploy.engines import OnnxRuntimeEngine, OpenVinoEngine, ScoringModel, _precision_for
    from imgtrain.deploy.quantize import quantize

    threads = _engine_threads()

    def scorer(engine):
        return lambda images: engine(torch.from_numpy(images).permute(0, 3, 1, 2))

    classes = len(model.labels)

    def int8_engines(quantized: Path) -> dict:
        """What runs the shipped file by default: each engine installed that can (an ONNX file: ONNX Runtime, and
        OpenVINO where it is installed, which --engine auto may pick), at its default precision."""
        shipped = ScoringModel(path, format, model.labels, model.image_size, model.spec.architecture, None,
                               path, quantized=True)
        precision = _precision_for("openvino", shipped, "auto", torch.device("cpu"))
        if format == "openvino":  # OpenVINO's converter makes the graph that ships: that one is measured
            _openvino(None, None, quantized, path, metadata, model.spec.architecture, check=False)
            return {"openvino": scorer(OpenVinoEngine(path, threads, precision, True, classes))}
        runs = {"onnxruntime": scorer(OnnxRuntimeEngine(quantized, threads, "int8", classes))}
        if importlib.util.find_spec("openvino") is not None:
            runs["openvino"] = scorer(OpenVinoEngine(quantized, threads, precision, True, classes))
        return runs

    int8 = fp32.with_name("int8.onnx")
    result = quantize(fp32, int8, labels=model.labels, preparation=model.preparation, calibration_set=sets[0],
                      validation_set=sets[1], max_accuracy_drop=max_accuracy_drop, evaluate_int8=int8_engines,
                      evaluate_fp32=lambda graph: scorer(OnnxRuntimeEngine(graph, threads, "fp32", classes)), log=log)
    metadata.update(result.metadata())
    onnx = _onnx_modules()[0]
    graph = onnx.load(str(int8))
    del graph.metadata_props[:]
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(int8))
    return int8


def _openvino(deployable: Deployable | None, example: torch.Tensor | None, onnx_file: Path, path: Path,
              metadata: dict[str, str], architecture: str, *, check: bool) -> None:
    """The ONNX graph converted by OpenVINO's own converter to its IR (model.xml, model.bin), the metadata in
    its rt_info; an fp32 one checked against the network."""
    import openvino as ov

    try:
        converted = ov.convert_model(str(onnx_file))
        for key, value in metadata.items():
            converted.set_rt_info(value, ["imgtrain", key])
        ov.save_model(converted, str(path), compress_to_fp16=False)
    except Exception as exc:
        raise _refused(architecture, "OpenVINO", exc, f"try {option('format', 'onnx')}") from None
    if check:
        from imgtrain.deploy.engines import OpenVinoEngine

        engine = OpenVinoEngine(path, _engine_threads(), "fp32", False, len(json.loads(metadata["labels"])))
        _check_same(deployable, lambda x: engine(x.permute(0, 3, 1, 2)), example, architecture, "OpenVINO")


def _preprocess_source(model: TrainedModel) -> str:
    """preprocess.py: imgtrain's data/picture.py, whose preprocess() refuses a model trained with a transformation
    (it would squash the picture the operations crop, and answer otherwise than imgtrain without a word)."""
    source = Path(picture.__file__).read_text(encoding="utf-8")
    if not model.spec.input.transformation:
        return source
    unset = "\nTRANSFORMATION = None\n"
    assert source.count(unset) == 1, "picture.py sets TRANSFORMATION once"
    return source.replace(unset, f"\nTRANSFORMATION = {list(map(list, model.spec.input.transformation))!r}\n")


@contextlib.contextmanager
def quiet(*loggers: str):
    """Keep what an exporter or quantizer prints, and logs to ``loggers`` (the root logger when none are named),
    out of the user's terminal: the outcome is what counts."""
    quieted = [logging.getLogger(name) for name in loggers or (None,)]
    levels = [logger.level for logger in quieted]
    for logger in quieted:
        logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, level in zip(quieted, levels, strict=True):
            logger.setLevel(level)


def _batch_dim():
    return {INPUT: {0: torch.export.Dim("batch", min=1, max=65536)}}


def _refused(architecture: str, what: str, exc: BaseException, hint: str) -> ExportError:
    reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return ExportError(f"{architecture} could not be exported to {what}: {type(exc).__name__}: {reason[:300]}", hint)


def _onnx_modules():
    """onnx and onnxscript (which torch's ONNX exporter needs), or MissingDependencyError."""
    try:
        import onnx
        import onnxscript
    except ImportError:
        raise MissingDependencyError("exporting to ONNX needs the onnx and onnxscript packages",
                                     "install them with `pip install 'imgtrain[export]'`") from None
    return onnx, onnxscript


def _onnx(deployable: Deployable, example: torch.Tensor, path: Path, metadata: dict[str, str], opset: int,
          architecture: str) -> None:
    onnx = _onnx_modules()[0]
    what = f"ONNX opset {opset}"
    hint = f"try another {option('opset')} (from {MIN_OPSET} to {onnx.defs.onnx_opset_version()}), or " \
           f"{option('format', 'pt2')}"
    try:
        with quiet(*_EXPORTER_LOGS):  # the exporter prints its progress, and logs the tracebacks it recovers from
            program = torch.onnx.export(deployable, (example,), input_names=[INPUT], output_names=[OUTPUT],
                                        dynamic_shapes=_batch_dim(), opset_version=opset, dynamo=True,
                                        verbose=False)
        if program is None:
            raise RuntimeError("the exporter gave no program")
        program.save(str(path))
        graph = onnx.load(str(path))
        got = {entry.domain or "ai.onnx": entry.version for entry in graph.opset_import}.get("ai.onnx")
        if got != opset:
            raise RuntimeError(f"the exporter wrote opset {got}, not {opset}")
        for key, value in metadata.items():
            graph.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(graph)
        onnx.save(graph, str(path))
    except ExportError:
        raise
    except Exception as exc:  # whatever the exporter raises, the user gets one named line
        raise _refused(architecture, what, exc, hint) from None
    try:
        import onnxruntime
    except ImportError:
        return  # the export is checked where onnxruntime is installed (imgtrain[export] brings it)
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise _refused(architecture, what, exc, hint + " (onnxruntime could not load it)") from None
    _check_same(deployable, lambda x: session.run([OUTPUT], {INPUT: x.numpy()})[0], example, architecture, what)


def _pt2(deployable: Deployable, example: torch.Tensor, path: Path, metadata: dict[str, str],
         architecture: str) -> None:
    try:
        with quiet(*_EXPORTER_LOGS):
            program = torch.export.export(deployable, (example,), dynamic_shapes=_batch_dim())
        torch.export.save(program, str(path), extra_files=dict(metadata))
        loaded = torch.export.load(str(path)).module()
    except Exception as exc:
        raise _refused(architecture, "torch.export", exc, "try --format onnx") from None
    _check_same(deployable, lambda x: loaded(x).detach().numpy(), example, architecture, "torch.export")


def _check_same(deployable: Deployable, run: Callable[[torch.Tensor], np.ndarray], example: torch.Tensor,
                architecture: str, what: str) -> None:
    """The exported graph against the network, on another batch size than the example's."""
    images = torch.randint(0, 256, (3, *example.shape[1:]), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = deployable(images).numpy()
    got = np.asarray(run(images))
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=_RTOL, atol=_ATOL):
        worst = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("nan")
        raise ExportError(f"the {what} export of {architecture} does not compute what the model does (shape "
                          f"{got.shape} for {expected.shape}, largest difference {worst:.3g})",
                          "report it, naming the architecture; --format pt2 or onnx may do")
