"""Where a model's arithmetic runs: torch, ONNX Runtime or OpenVINO (``--engine``).

Scoring, ``predict`` and ``serve`` hand an engine batches of prepared images (uint8 ``[N, 3, S, S]``,
any strides) and get each image's class probabilities back (float32 ``[N, C]``). Decoding and the
resize stay imgtrain's (data/picture.py) whatever the engine, so the engines differ only in their
arithmetic:

- ``torch``: the model directory's network, as training left it (channels-last, bf16 autocast where
  the CPU or GPU runs it natively: ``--precision``).
- ``onnxruntime`` and ``openvino`` (the extras ``imgtrain[onnxruntime]``, ``imgtrain[openvino]``): the
  graph ``imgtrain export`` writes (uint8 images in, probabilities out, the normalisation inside). A
  model directory is exported once, checked against its network, and kept in imgtrain's cache
  (``$IMGTRAIN_CACHE``, else ``$XDG_CACHE_HOME/imgtrain`` or ``~/.cache/imgtrain``), never in the model
  directory; an exported model (``model.onnx``, an OpenVINO ``model.xml``, or their folder) runs as it
  is, int8 exports included. ONNX Runtime runs fp32 (the graph's own precision); OpenVINO runs bf16
  where the CPU has it natively, as torch does, else fp32. Both run on the CPU only.
- ``auto``: on a GPU, torch. On a CPU, each engine installed that can run the model is timed on a few
  batches (once per model, machine, thread count and batch size: the choice is kept in the cache), and
  the fastest runs; the log says which, and the times. An engine that fails to load is left out with a
  warning naming it and why; asked for by name, its failure is an error.

A ``.pt2`` export is not opened: torch.export.load unpickles its weights, and imgtrain opens no pickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imgtrain.errors import (
    EngineError,
    InvalidModelDirectoryError,
    InvalidModelFileError,
    InvalidParameterError,
    MissingDependencyError,
    check_choice,
    option,
)

ENGINES = ("auto", "torch", "onnxruntime", "openvino")
RUNTIMES = ENGINES[1:]
INPUT, OUTPUT = "images", "probabilities"
MODEL_FILES = {"model.onnx": "onnx", "model.xml": "openvino"}  # an export folder's model file, by format
METADATA_FILE = "metadata.json"
_PACKAGES = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino", "onnx")}
_TIMED_BATCHES, _WARM_BATCHES = 3, 2
_HINT = "pass a trained model directory, or a model.onnx or model.xml that `imgtrain export` wrote (or its folder)"


def cache_root() -> Path:
    """imgtrain's cache: ``$IMGTRAIN_CACHE``, else ``$XDG_CACHE_HOME/imgtrain``, else ``~/.cache/imgtrain``."""
    if os.environ.get("IMGTRAIN_CACHE"):
        return Path(os.environ["IMGTRAIN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imgtrain"


# --- The model, whatever its form -------------------------------------------------------------------


@dataclass
class ScoringModel:
    """What scoring and serving need of a model: its labels and input, and where its arithmetic lives
    (a model directory's network, or an exported graph)."""

    path: Path  # as named: the model directory, or the exported model's file
    format: str  # "directory", "onnx" or "openvino"
    labels: list[str]
    image_size: int
    architecture: str
    transformation: list | None
    identity: Path  # the file whose sha256 names the model: its weights, or the exported file
    quantized: bool = False  # an int8 export
    trained: object | None = None  # the TrainedModel of a model directory
    metadata: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def preparation(self):
        from imgtrain.data.transforms import Preparation
        from imgtrain.directories.transformation_directory import parse_operations

        pairs = self.transformation
        return Preparation(self.image_size, parse_operations(pairs, f"{self.path}: transformation") if pairs else None)

    def runtimes(self) -> tuple[str, ...]:
        """The engines that can run it."""
        return RUNTIMES if self.format == "directory" else (
            ("onnxruntime", "openvino") if self.format == "onnx" else ("openvino",))


def open_model(model) -> ScoringModel:
    """A TrainedModel, a model directory, or an export (model.onnx, model.xml, or the folder holding one),
    checked: InvalidModelFileError naming what is wrong with an export, before any work."""
    from imgtrain.models.trained import TrainedModel, load_trained_model

    if isinstance(model, ScoringModel):
        return model
    if isinstance(model, TrainedModel):
        return _of_trained(model)
    from imgtrain.directories.model_directory import SPEC_FILE

    path = Path(model)
    if path.is_dir():
        found = [path / name for name in MODEL_FILES if (path / name).is_file()]
        if not found or (path / SPEC_FILE).exists():  # a model directory is one, whatever else it holds
            return _of_trained(load_trained_model(path))
        path = found[0]
    if path.suffix == ".pt2" and path.is_file():
        raise InvalidModelFileError(f"{path} is a torch.export archive, whose weights load through pickle, which can "
                                    "run code: imgtrain does not open it", "score the model directory it came from, "
                                    "or export it with --format onnx or openvino")
    if path.name.endswith(".onnx") and path.is_file():
        return _of_onnx(path)
    if path.suffix == ".xml" and path.is_file():
        return _of_openvino(path)
    if not path.exists():
        raise InvalidModelDirectoryError(f"{path} does not exist", _HINT)
    raise InvalidModelFileError(f"{path} is not a model imgtrain can score", _HINT)


def _of_trained(trained) -> ScoringModel:
    spec = trained.spec
    return ScoringModel(trained.path, "directory", list(spec.labels), spec.input.image_size, spec.architecture,
                        spec.input.transformation, trained.path / spec.weights, trained=trained)


def _need(engine: str):
    """The engine's module, or MissingDependencyError with the pip command."""
    names = _PACKAGES[engine]
    try:
        return [importlib.import_module(name) for name in names][0]
    except ImportError:  # not installed, or installed broken (a missing shared library)
        raise MissingDependencyError(f"the {engine} engine needs the {' and '.join(names)} packages",
                                     f"install them with `pip install 'imgtrain[{engine}]'`") from None


def _of_onnx(path: Path) -> ScoringModel:
    if importlib.util.find_spec("onnx") is None:
        raise MissingDependencyError(f"reading {path} needs the onnx package",
                                     "install it with `pip install 'imgtrain[onnxruntime]'` (or [openvino])")
    import onnx
    from google.protobuf.message import DecodeError

    try:
        graph = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as exc:
        raise InvalidModelFileError(f"{path} cannot be read as ONNX ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0][:200] if str(exc) else 'damaged'})",
                                    "export the model again") from None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _tensors(graph.graph)):
        raise InvalidModelFileError(f"{path} keeps its weights in other files, which imgtrain does not read",
                                    "export the model again: imgtrain's exports hold their weights inside")
    metadata = {entry.key: entry.value for entry in graph.metadata_props}

    def shape(value) -> list:
        return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]

    inputs, outputs = list(graph.graph.input), list(graph.graph.output)
    init = {t.name for t in graph.graph.initializer}
    inputs = [i for i in inputs if i.name not in init]
    signature = ([(i.name, shape(i), i.type.tensor_type.elem_type == onnx.TensorProto.UINT8) for i in inputs],
                 [(o.name, shape(o)) for o in outputs])
    return _of_export(path, "onnx", metadata, signature)


def _numbers(value) -> list[float]:
    """The numbers in an operation's argument: a number, or keyword arguments holding numbers and lists."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [n for item in value for n in _numbers(item)] if isinstance(value, list | tuple) else []


def _tensors(graph):
    """Every tensor a graph holds: its initializers, and those of its nodes' attributes and subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def _reason(exc: BaseException) -> str:
    """An exception's message in one line: OpenVINO's first line names only where it was raised."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    told = [line for line in lines if not line.startswith(("Exception from", "Check '"))] or lines
    return f"{type(exc).__name__}: {' '.join(told)[:300] if told else 'no reason given'}"


def _of_openvino(path: Path) -> ScoringModel:
    ov = _need("openvino")
    try:
        model = ov.Core().read_model(str(path))
    except Exception as exc:  # OpenVINO raises RuntimeError, or its own, for a damaged file
        raise InvalidModelFileError(f"{path} cannot be read as an OpenVINO model ({_reason(exc)})",
                                    "export the model again (model.xml and model.bin, side by side)") from None
    metadata = {}
    if model.has_rt_info(["imgtrain"]):
        with contextlib.suppress(Exception):  # rt_info of another shape: no metadata, refused below
            metadata = {key: value.astype(str) for key, value in model.get_rt_info()["imgtrain"].items()}

    def shape(port) -> list:
        return [d.get_length() if d.is_static else None for d in port.get_partial_shape()]

    signature = ([(i.get_any_name(), shape(i), i.get_element_type() == ov.Type.u8) for i in model.inputs],
                 [(o.get_any_name(), shape(o)) for o in model.outputs])
    return _of_export(path, "openvino", metadata, signature)


def _of_export(path: Path, format: str, metadata: dict, signature) -> ScoringModel:
    """An export's metadata checked against its graph's input and output."""
    def bad(what: str) -> InvalidModelFileError:
        return InvalidModelFileError(f"{path}: {what}", "export the model again with `imgtrain export`")

    if "labels" not in metadata or "image_size" not in metadata:
        raise bad("it has no labels or image_size in its metadata: it is not a model `imgtrain export` wrote")
    try:
        labels = json.loads(metadata["labels"])
        size = int(metadata["image_size"])
        transformation = json.loads(metadata["transformation"]) if metadata.get("transformation") else None
    except (ValueError, TypeError):
        raise bad("its labels, image_size or transformation metadata cannot be read") from None
    if not (isinstance(labels, list) and labels and all(isinstance(x, str) and x for x in labels)
            and len(set(labels)) == len(labels)):
        raise bad("its labels metadata is not a list of distinct names")
    if not 1 <= size <= 8192:
        raise bad(f"its image_size metadata is {size}, not a size in pixels from 1 to 8192")
    inputs, outputs = signature
    if len(inputs) != 1 or inputs[0][0] != INPUT or not inputs[0][2] or len(inputs[0][1]) != 4 \
            or inputs[0][1][1:] != [size, size, 3]:
        got = ", ".join(f"{name} {shape}{'' if u8 else ' (not uint8)'}" for name, shape, u8 in inputs)
        raise bad(f"its input is {got or 'none'}, not {INPUT} uint8 [N, {size}, {size}, 3] as its metadata says")
    if len(outputs) != 1 or outputs[0][0] != OUTPUT or len(outputs[0][1]) != 2 \
            or outputs[0][1][1] != len(labels):
        got = ", ".join(f"{name} {shape}" for name, shape in outputs)
        raise bad(f"its output is {got or 'none'}, not {OUTPUT} [N, {len(labels)}] for its {len(labels)} labels")
    if transformation is not None:
        from imgtrain.directories.transformation_directory import parse_operations
        from imgtrain.errors import InvalidTransformationDirectoryError

        try:
            operations = parse_operations(transformation, "its transformation metadata")
        except InvalidTransformationDirectoryError as exc:
            raise bad(exc.message) from None
        sizes = [n for op in operations for n in _numbers(op.argument)]
        if any(n > 8192 for n in sizes):
            raise bad(f"its transformation metadata asks for a size of {max(sizes):g} pixels, over 8,192")
    return ScoringModel(path, format, labels, size, metadata.get("architecture", "exported model"),
                        transformation, path, quantized=metadata.get("precision") == "int8", metadata=metadata)


# --- The engines ------------------------------------------------------------------------------------


class Engine:
    """Runs prepared images through the model: uint8 ``[N, 3, S, S]`` -> float32 probabilities ``[N, C]``."""

    name = ""
    precision = ""
    classes = 0  # the columns every answer must have (the graph's runtimes: checked on each batch)

    def _checked(self, run: Callable[[], np.ndarray], count: int) -> np.ndarray:
        """A runtime's answer, or EngineError naming why it failed or what it gave instead."""
        try:
            out = run()
        except Exception as exc:  # whatever the runtime raises on a graph it cannot run
            raise EngineError(f"the {self.name} engine failed on a batch of {count} ({_reason(exc)})",
                              f"pass another {option('engine')}") from None
        if out.shape != (count, self.classes):
            raise EngineError(f"the {self.name} engine answered shape {list(out.shape)} for {count} images and "
                              f"{self.classes} labels", "export the model again with `imgtrain export`")
        return out

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name} ({self.precision})"


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, model: ScoringModel, device: torch.device, precision: str) -> None:
        from imgtrain.data.transforms import Normalize, memory_format
        from imgtrain.precision import autocast

        spec = model.trained.spec
        self.precision, self._device = precision, device
        layout = memory_format(device, spec.input.image_size)  # as training evaluated it
        self._network = model.trained.network.to(device, memory_format=layout).eval()
        self._normalize = Normalize(spec.input.mean, spec.input.std, layout).to(device)
        self._autocast = lambda: autocast(precision, device)

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), self._autocast():
            logits = self._network(self._normalize(batch.to(self._device, non_blocking=True)))
            return logits.float().softmax(dim=1).cpu().numpy()


def _channels_last(batch: torch.Tensor) -> np.ndarray:
    """``[N, 3, S, S]`` as the graph's ``[N, S, S, 3]`` array (no copy where the batch is channels-last already)."""
    return batch.permute(0, 2, 3, 1).contiguous().numpy()


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"

    def __init__(self, file: Path, threads: int, precision: str, classes: int) -> None:
        ort = _need("onnxruntime")
        self.classes = classes
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3  # its warnings (a node it places on the CPU, ...) are not the user's
        self.precision = precision
        self._session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        images = _channels_last(batch)
        return self._checked(lambda: self._session.run([OUTPUT], {INPUT: images})[0], len(images))


class OpenVinoEngine(Engine):
    name = "openvino"

    def __init__(self, file: Path, threads: int, precision: str, quantized: bool, classes: int) -> None:
        ov = _need("openvino")
        self.classes = classes
        hint = "bf16" if precision == "bf16" else "f32"
        self.precision = f"int8, the rest {precision}" if quantized else precision
        compiled = ov.Core().compile_model(str(file), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                              "INFERENCE_PRECISION_HINT": hint,
                                                              "PERFORMANCE_HINT": "LATENCY"})
        self._request = compiled.create_infer_request()

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        images = _channels_last(batch)
        return self._checked(lambda: np.array(self._request.infer({0: images})[0], dtype=np.float32), len(images))


# --- Which engine ------------------------------------------------------------------------------------


def _precision_for(engine: str, model: ScoringModel, asked: str, device: torch.device) -> str:
    from imgtrain.precision import cpu_has_native_bf16, resolve_precision

    if engine == "torch":
        return resolve_precision(asked, device)
    if model.quantized and engine == "onnxruntime":
        return "int8"
    allowed = ("auto", "fp32") if engine == "onnxruntime" else ("auto", "fp32", "bf16")
    if asked not in allowed:
        raise InvalidParameterError(f"{option('precision', asked)} is not one the {engine} engine runs",
                                    f"pass {option('precision')} {' or '.join(allowed)}, or "
                                    f"{option('engine', 'torch')}")
    if asked == "auto":
        return "bf16" if engine == "openvino" and cpu_has_native_bf16() else "fp32"
    return asked


def _runs(engine: str, model: ScoringModel, precision: str, device: torch.device) -> bool:
    """Whether the engine runs the model in the precision asked (auto leaves the others out, without a word)."""
    try:
        _precision_for(engine, model, precision, device)
    except InvalidParameterError:
        return False
    return True


def _onnx_of(model: ScoringModel, log: Callable[[str], None]) -> Path:
    """The model's ONNX graph: an export's own file, or a model directory's export, made once and cached."""
    if model.format != "directory":
        return model.path
    import torch.version

    from imgtrain.deploy.export import DEFAULT_OPSET, export_model
    from imgtrain.directories.files import file_sha256
    from imgtrain.directories.model_directory import SPEC_FILE

    key = hashlib.sha256("\n".join([file_sha256(model.identity), file_sha256(model.path / SPEC_FILE),
                                    torch.version.__version__, str(DEFAULT_OPSET)]).encode()).hexdigest()[:32]
    folder = cache_root() / "onnx" / key
    graph, digest = folder / "model.onnx", folder / "model.onnx.sha256"
    try:
        if graph.is_file() and digest.is_file() and digest.read_text().strip() == file_sha256(graph):
            return graph
        log(f"Exporting {model.architecture} to ONNX for the engines, once (kept in {folder})")
        folder.parent.mkdir(parents=True, exist_ok=True)
        export_model(model.trained, folder, format="onnx", overwrite=True, log=lambda m: None)
        digest.write_text(file_sha256(graph))  # what a later run checks the graph against (a damaged one is made anew)
    except OSError as exc:
        raise EngineError(f"imgtrain's cache {folder} cannot be written ({type(exc).__name__}: {exc})",
                          "set IMGTRAIN_CACHE to a folder you may write, or pass --engine torch") from None
    return graph


def device_for(device: str, engine: str | None, model: ScoringModel) -> torch.device:
    """``--device`` resolved for the engine: ``auto`` is the CPU where only a CPU engine can run (an export,
    or onnxruntime or openvino asked for), so that a GPU machine scores an export without being told."""
    from imgtrain.device import resolve_device

    cpu_only = engine in ("onnxruntime", "openvino") or model.format != "directory"
    return resolve_device("cpu" if device == "auto" and cpu_only else device)


def make_engine(engine: str, model: ScoringModel, *, device: torch.device, precision: str, threads: int,
                log: Callable[[str], None] = lambda m: None) -> Engine:
    """The engine named (not ``auto``), loaded: MissingDependencyError, or EngineError naming why it failed."""
    if engine not in model.runtimes():
        what = "a model directory" if model.format == "directory" else f"an {model.format} export"
        raise InvalidParameterError(f"the {engine} engine does not run {model.path} ({what})",
                                    f"pass {option('engine')} {' or '.join(('auto',) + model.runtimes())}")
    if engine != "torch" and device.type != "cpu":
        raise InvalidParameterError(f"the {engine} engine runs on the CPU, not {device}",
                                    f"pass {option('device', 'cpu')}, or {option('engine', 'torch')}")
    resolved = _precision_for(engine, model, precision, device)
    if engine != "torch":
        _need(engine)
    try:
        if engine == "torch":
            return TorchEngine(model, device, resolved)
        file = _onnx_of(model, log)
        if engine == "onnxruntime":
            return OnnxRuntimeEngine(file, threads, resolved, model.num_classes)
        return OpenVinoEngine(file, threads, resolved, model.quantized, model.num_classes)
    except (MissingDependencyError, InvalidParameterError, EngineError):
        raise
    except Exception as exc:  # whatever the runtime raises on a graph it cannot take
        raise EngineError(f"the {engine} engine could not load {model.path}: {_reason(exc)}",
                          f"pass another {option('engine')}") from None


def load_engine(engine: str | None, model: ScoringModel, *, device: torch.device, precision: str, threads: int,
                batch_size: int, log: Callable[[str], None]) -> Engine:
    """The engine asked for, or with ``auto`` the fastest of those that can run the model here (timed once
    per model, machine, threads and batch size; the choice is cached). Logs which, and why. None, the
    default: torch for a model directory (the arithmetic training validated), ``auto`` for an export."""
    if engine is None:
        engine = "torch" if model.format == "directory" else "auto"
    check_choice("engine", engine, ENGINES)
    if engine != "auto":
        return make_engine(engine, model, device=device, precision=precision, threads=threads, log=log)
    if device.type != "cpu":
        if model.format != "directory":
            raise InvalidParameterError(f"{model.path} is an {model.format} export, which runs on the CPU here",
                                        f"pass {option('device', 'cpu')}")
        return make_engine("torch", model, device=device, precision=precision, threads=threads, log=log)
    candidates = [e for e in model.runtimes()
                  if (e == "torch" or all(importlib.util.find_spec(p) for p in _PACKAGES[e]))
                  and _runs(e, model, precision, device)]
    if not candidates:
        raise InvalidParameterError(f"no engine installed runs {model.path} in {option('precision', precision)}",
                                    f"pass {option('precision', 'auto')}")
    if len(candidates) == 1:
        return make_engine(candidates[0], model, device=device, precision=precision, threads=threads, log=log)
    batch = max(1, min(batch_size, 16))
    record = _cache_file(model, candidates, precision, threads, batch)
    chosen = _cached(record)
    if chosen in candidates:
        try:
            built = make_engine(chosen, model, device=device, precision=precision, threads=threads, log=log)
            log(f"Engine auto: {built.describe()}, the fastest here when measured (kept in {record})")
            return built
        except (EngineError, MissingDependencyError) as exc:
            log(f"warning: {exc.message}; auto times the others")
            candidates.remove(chosen)
    return _fastest(candidates, model, device, precision, threads, batch, record, log)


def _fastest(candidates: list[str], model: ScoringModel, device: torch.device, precision: str, threads: int,
             batch: int, record: Path, log: Callable[[str], None]) -> Engine:
    """Each candidate loaded and warmed, then timed in turns (so that a change in the machine's speed falls on
    all alike); the fastest kept, its choice written to ``record``."""
    images = torch.randint(0, 256, (batch, 3, model.image_size, model.image_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    built: dict[str, Engine] = {}
    for name in candidates:
        try:
            engine = make_engine(name, model, device=device, precision=precision, threads=threads, log=log)
            for _ in range(_WARM_BATCHES):
                engine(images)
        except (EngineError, MissingDependencyError) as exc:
            log(f"warning: {exc.message}; auto goes on without it")
            continue
        except Exception as exc:  # a runtime that loads a graph it then cannot run
            log(f"warning: the {name} engine failed on {model.path} ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else 'no reason given'}); auto goes "
                "on without it")
            continue
        built[engine.describe()] = engine
    if not built:
        raise EngineError(f"no engine could load {model.path}", "see the warnings above")
    runs: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(_TIMED_BATCHES):
        for name, engine in built.items():
            start = time.perf_counter()
            engine(images)
            runs[name].append(time.perf_counter() - start)
    times = {name: statistics.median(values) / batch * 1000 for name, values in runs.items()}
    best = min(times, key=times.get)
    others = ", ".join(f"{name} {ms:.2f}" for name, ms in times.items() if name != best)
    kept = "not kept: an engine failed, so it is timed again next time"
    if len(built) == len(candidates):
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            tmp = record.with_name(f".{record.name}.{os.getpid()}")
            tmp.write_text(json.dumps({"engine": built[best].name, "ms_per_image": times, "batch_size": batch,
                                       "measured": time.strftime("%Y-%m-%d %H:%M:%S")}), encoding="utf-8")
            tmp.replace(record)
            kept = f"the choice is kept in {record}"
        except OSError as exc:
            kept = f"not kept: imgtrain's cache cannot be written ({type(exc).__name__})"
    log(f"Engine auto: {best}, {times[best]:.2f} ms an image at batch {batch} (measured now; "
        f"{others or 'no other engine'}); {kept}")
    return built[best]


def _cache_file(model: ScoringModel, candidates: list[str], precision: str, threads: int, batch: int) -> Path:
    """Where the choice for this model on this machine is kept: named by a hash of everything that sets it."""
    from imgtrain.directories.files import file_sha256

    versions = [f"{name}={_version(name)}" for name in ("torch", "onnxruntime", "openvino") if name in candidates]
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
                   cpu) + next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                                if line.startswith("flags")), "")
    key = "\n".join([file_sha256(model.identity), model.format, precision, str(threads), str(batch), cpu,
                     sys.version, *versions])
    return cache_root() / "engines" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "none"


def _cached(record: Path) -> str | None:
    try:
        value = json.loads(record.read_text(encoding="utf-8")).get("engine")
    except (OSError, ValueError, AttributeError):
        return None
    return value if value in RUNTIMES else None
