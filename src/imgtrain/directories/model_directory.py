"""Model directories: an untrained spec (DenseNet / ResNet modules) or a trained model.

Layout::

    _meta.yaml          type: ModelDirectory, model: model_spec.yaml
    model_spec.yaml     architecture, options, and once trained: classes, input, training record
    model.safetensors   the weights (trained only)
    index_to_label.csv  class index -> label (trained only)
    metrics.csv         one row per epoch (trained only)
    metrics.jsonl       the same, one JSON object per epoch (trained only)

Opening one reads YAML with ``safe_load`` and tensors with safetensors: nothing in the
directory is ever imported, unpickled or executed. Building the network from one is
models/trained.py's work; this module needs no torch.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from imgtrain.directories.atomic import atomic_file
from imgtrain.directories.files import file_sha256, read_text
from imgtrain.directories.transformation_directory import parse_operations
from imgtrain.errors import InvalidModelDirectoryError, InvalidTransformationDirectoryError

META_FILE = "_meta.yaml"
SPEC_FILE = "model_spec.yaml"
WEIGHTS_FILE = "model.safetensors"
LABELS_FILE = "index_to_label.csv"
METRICS_FILE = "metrics.csv"
METRICS_JSONL = "metrics.jsonl"  # the same rows, one JSON object a line, for scripts
FLAVOR = "imgtrain"
DESIGNER = "designer"  # ModelSpec.made_by of a directory Azure ML designer wrote
DESIGNER_CLASSES = {"ResNet", "DenseNet"}
DESIGNER_IMAGE_SIZE = 224  # the designer's default Init Image Transformation ends in a 224 px centre crop
FORMAT_VERSION = 1
_TIMM_NAME = re.compile(r"timm/[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?")  # timm's model name, perhaps with a weights tag
HINT = ("make one with `imgtrain image-model`, `imgtrain densenet` or `imgtrain resnet` (untrained) or "
        "`imgtrain train-pytorch-model`")


@dataclass
class InputSpec:
    """How an image must be prepared for the model: what travels with the weights."""

    image_size: int
    mean: list[float]
    std: list[float]
    resize: str = "squash"  # the whole image is resized to image_size x image_size
    color_mode: str = "RGB"
    # a transformation's fixed operations, [[name, argument], ...] as in a TransformationDirectory: applied to
    # the decoded image first, then resized as above when they leave another shape
    transformation: list | None = None


@dataclass
class ModelSpec:
    architecture: str
    pretrained: bool
    # the builder's keyword arguments: memory_efficient / zero_init_residual / transform_input
    options: dict = field(default_factory=dict)
    trained: bool = False
    labels: list[str] = field(default_factory=list)
    input: InputSpec | None = None
    weights: str | None = None
    training: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    made_by: str = FLAVOR  # or DESIGNER: read from the designer's files (its weights a torch state dict)
    # how the pretrained weights expect their images (torchvision's resize_size, crop_size, interpolation, mean, std)
    preprocessing: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict:
        d = {"flavor": FLAVOR, "format_version": FORMAT_VERSION, **asdict(self)}
        d.pop("made_by")  # what imgtrain writes is imgtrain's
        if not self.preprocessing:
            d.pop("preprocessing")
        d["num_classes"] = self.num_classes
        if not self.trained:
            for key in ("labels", "input", "weights", "training", "num_classes"):
                d.pop(key)
        return d


def _a_file_name(name: object) -> bool:
    """Whether a spec's file name names a file right inside the model directory (no folder, no NUL byte)."""
    return isinstance(name, str) and "\x00" not in name and name not in ("", ".", "..") and Path(name).name == name


def library_versions() -> dict[str, str]:
    """The versions that made a model directory, recorded in its spec (read from the installed
    packages' metadata: importing torch to ask would take seconds)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from imgtrain import __version__

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:  # installed without its metadata (a source build, say)
            return "unknown"

    return {"imgtrain": __version__, "torch": installed("torch"), "torchvision": installed("torchvision"),
            "python": platform.python_version()}


def write_model_directory(root: Path, spec: ModelSpec) -> None:
    """Write the label map (of a trained model), the meta file and, last and atomically, the spec
    into ``root``: a directory with a spec is complete."""
    if spec.trained:
        with open(root / LABELS_FILE, "w", newline="", encoding="utf-8") as out:
            writer = csv.writer(out)
            writer.writerow(["", "label"])  # the designer's header (pandas' unnamed index column)
            writer.writerows(enumerate(spec.labels))
    (root / META_FILE).write_text(
        yaml.safe_dump({"type": "ModelDirectory", "model": SPEC_FILE}, sort_keys=False), encoding="utf-8")
    with atomic_file(root / SPEC_FILE) as tmp:
        tmp.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False), encoding="utf-8")


def load_model_spec(root: Path | str, *, need_trained: bool | None = None) -> ModelSpec:
    """Read and check a model directory's spec; ``need_trained`` demands one kind."""
    root = Path(root)
    if not root.is_dir():
        raise InvalidModelDirectoryError(f"{root} is not a directory", HINT)
    meta = _read_yaml(root / META_FILE, root)
    if not isinstance(meta, dict) or meta.get("type") != "ModelDirectory":
        kind = meta.get("type") if isinstance(meta, dict) else None
        raise InvalidModelDirectoryError(f"{root} is not a model directory (its type is {kind!r})", HINT)
    raw = _read_yaml(root / SPEC_FILE, root)
    if not isinstance(raw, dict):
        raise InvalidModelDirectoryError(f"{root / SPEC_FILE} is not a mapping", HINT)
    if isinstance(raw.get("flavor"), dict):
        spec = _designer_spec(raw, root)
        if need_trained is True and not spec.trained:
            raise InvalidModelDirectoryError(f"{root} is an untrained designer model directory",
                                             "train it first with `imgtrain train-pytorch-model`")
        return spec
    if raw.get("flavor") != FLAVOR:
        raise InvalidModelDirectoryError(
            f"{root} was made neither by imgtrain nor by the designer's DenseNet, ResNet or Train PyTorch Model "
            f"(flavor {raw.get('flavor')!r}); imgtrain never imports or unpickles what such a directory names",
            HINT)
    version = raw.get("format_version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        newer = type(version) is int and version > FORMAT_VERSION
        raise InvalidModelDirectoryError(
            f"{root / SPEC_FILE} has format version {version!r}; this imgtrain reads versions 1 to {FORMAT_VERSION}",
            "upgrade imgtrain (`pip install -U imgtrain`) to read it" if newer else
            "make the model directory again with this imgtrain")
    spec = _spec_from_dict(raw, root)
    if need_trained is True and not spec.trained:
        raise InvalidModelDirectoryError(f"{root} is an untrained model directory",
                                         "train it first with `imgtrain train-pytorch-model`")
    if need_trained is False and spec.trained:
        raise InvalidModelDirectoryError(f"{root} is already a trained model directory",
                                         "pass the output of `imgtrain image-model`, `imgtrain densenet` or "
                                         "`imgtrain resnet`")
    return spec


def _read_yaml(path: Path, root: Path):
    try:
        return yaml.safe_load(read_text(path))
    except FileNotFoundError:
        raise InvalidModelDirectoryError(f"{root} is not a model directory (no {path.name})", HINT) from None
    except OSError as exc:  # a pipe or a device in its place, a permission
        raise InvalidModelDirectoryError(f"{path} cannot be read ({exc.strerror or exc})", HINT) from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError covers UnicodeDecodeError
        raise InvalidModelDirectoryError(f"{path} is not valid YAML ({exc})", HINT) from None


def _designer_spec(raw: dict, root: Path) -> ModelSpec:
    """A model directory Azure ML designer wrote (its DenseNet or ResNet module, or its Train PyTorch Model):
    the architecture and options from flavor_extras, and once trained the labels, the normalisation and the
    state-dict file. Only what imgtrain's registry builds is accepted; the module path it names is never
    imported, and the weights are read with torch's weights-only loader (models/designer.py)."""
    def bad(what: str) -> InvalidModelDirectoryError:
        return InvalidModelDirectoryError(
            f"{root / SPEC_FILE}: {what}", "imgtrain reads the designer's DenseNet and ResNet model directories, "
            "untrained or trained, as the designer writes them")

    flavor, extras = raw.get("flavor") or {}, raw.get("flavor_extras")
    if flavor.get("name") != "pytorch" or flavor.get("serialization_method") != "state_dict":
        raise bad(f"flavor {flavor!r} is not the designer's pytorch state_dict")
    if not isinstance(extras, dict) or extras.get("class") not in DESIGNER_CLASSES:
        kind = extras.get("class") if isinstance(extras, dict) else None
        raise bad(f"model class {kind!r} is not one of the designer's {sorted(DESIGNER_CLASSES)}")
    params = extras.get("init_params")
    if not isinstance(params, dict) or not isinstance(params.get("model_name"), str) \
            or not params["model_name"].isidentifier():
        raise bad("flavor_extras.init_params.model_name is missing")
    options = {k: params[k] for k in ("memory_efficient", "zero_init_residual") if isinstance(params.get(k), bool)}
    weights = raw.get("model_file", "model")
    if not _a_file_name(weights):
        raise bad("model_file must name a file inside the directory")
    spec = ModelSpec(architecture=params["model_name"], pretrained=params.get("pretrained") is True, options=options,
                     weights=weights, made_by=DESIGNER)
    if "num_classes" not in params:
        return spec  # the designer's untrained directory: DenseNet or ResNet, not yet trained
    label_map = raw.get("label_map_file") or LABELS_FILE
    if not _a_file_name(label_map):
        raise bad("label_map_file must name a file inside the directory")
    labels = _designer_labels(root / label_map, root)
    if type(params["num_classes"]) is not int or params["num_classes"] != len(labels):
        raise bad(f"num_classes {params['num_classes']!r} but {len(labels)} labels in its label map")
    mean, std = [0.5] * 3, [0.5] * 3  # the designer's ImageNormalizer
    inputs = raw.get("inputs")
    for entry in inputs if isinstance(inputs, list) else []:
        processor = entry.get("pre_processor") if isinstance(entry, dict) else None
        found = processor.get("init_params") if isinstance(processor, dict) else None
        if isinstance(found, dict) and "mean" in found and "std" in found:
            mean, std = found["mean"], found["std"]
    if not all(isinstance(v, list) and len(v) == 3 and all(type(x) in (int, float) for x in v)
               for v in (mean, std)) or min(std) <= 0:
        raise bad("the image normaliser must give 3 means and 3 positive stds")
    spec.trained, spec.labels = True, labels
    spec.input = InputSpec(image_size=DESIGNER_IMAGE_SIZE, mean=[float(x) for x in mean], std=[float(x) for x in std])
    spec.training = {"made_by": "Azure ML designer", "time_created": str(raw.get("time_created", ""))}
    return spec


def _designer_labels(path: Path, root: Path) -> list[str]:
    """index_to_label.csv, with the designer's header (,label) or imgtrain's earlier one (index,label)."""
    try:
        rows = list(csv.reader(io.StringIO(read_text(path), newline="")))
    except (OSError, ValueError, csv.Error) as exc:  # ValueError: not UTF-8
        raise InvalidModelDirectoryError(f"{path} cannot be read ({exc})", HINT) from None
    body = rows[1:] if rows and rows[0][-1:] == ["label"] else rows
    try:
        pairs = sorted((int(index), label) for index, label in body)
    except ValueError:
        raise InvalidModelDirectoryError(f"{path} is not a list of index,label rows", HINT) from None
    if [i for i, _ in pairs] != list(range(len(pairs))) or not pairs:
        raise InvalidModelDirectoryError(f"{path}: the indices must run 0, 1, 2, ...", HINT)
    return [label for _, label in pairs]


def _spec_from_dict(raw: dict, root: Path) -> ModelSpec:
    def bad(what: str) -> InvalidModelDirectoryError:
        return InvalidModelDirectoryError(f"{root / SPEC_FILE}: {what}", HINT)

    arch = raw.get("architecture")
    if not isinstance(arch, str) or not (arch.isidentifier() or _TIMM_NAME.fullmatch(arch)):
        # which ones imgtrain builds is models/' to say
        raise bad(f"unknown architecture {arch!r}: not a model name")
    options = raw.get("options") or {}
    allowed = {"memory_efficient", "zero_init_residual", "transform_input"}
    if not isinstance(options, dict) or set(options) - allowed or not all(
            isinstance(v, bool) for v in options.values()):
        raise bad(f"options must be booleans among {sorted(allowed)}")
    preprocessing = raw.get("preprocessing") or {}
    if not isinstance(preprocessing, dict):
        raise bad("preprocessing must be a mapping")
    spec = ModelSpec(architecture=arch, pretrained=bool(raw.get("pretrained", False)), options=options,
                     trained=bool(raw.get("trained", False)), versions=raw.get("versions") or {},
                     preprocessing=preprocessing)
    if not spec.trained:
        return spec
    labels = raw.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise bad("labels must be a non-empty list of strings")
    inp = raw.get("input")
    try:
        spec.input = InputSpec(**inp)
        size_ok = type(spec.input.image_size) is int and 8 <= spec.input.image_size <= 4096
        stats_ok = all(isinstance(v, list) and len(v) == 3 and all(type(x) in (int, float) for x in v)
                       for v in (spec.input.mean, spec.input.std)) and min(spec.input.std) > 0
    except TypeError:
        size_ok = stats_ok = False
    if not (size_ok and stats_ok):
        raise bad("input must give image_size (8..4096) and 3 means and 3 positive stds")
    if spec.input.transformation is not None:
        try:  # checked as a TransformationDirectory's are: known operations, plain arguments
            parse_operations(spec.input.transformation, f"{root / SPEC_FILE}, input transformation")
        except InvalidTransformationDirectoryError as exc:
            raise InvalidModelDirectoryError(exc.message, HINT) from None
    weights = raw.get("weights")
    if not _a_file_name(weights):
        raise bad("weights must name a file inside the directory")
    training = raw.get("training") or {}
    if not isinstance(training, dict):
        raise bad("training must be a mapping")
    spec.labels, spec.weights, spec.training = labels, weights, training
    return spec


def weights_sha256(root: Path | str) -> str:
    """The sha256 of a trained model directory's weights file: what names the model, wherever it is moved."""
    root = Path(root)
    spec = load_model_spec(root, need_trained=True)
    try:
        return file_sha256(root / spec.weights)
    except OSError as exc:
        raise InvalidModelDirectoryError(f"the weights {root / spec.weights} cannot be read ({exc.strerror or exc})",
                                         HINT) from None
