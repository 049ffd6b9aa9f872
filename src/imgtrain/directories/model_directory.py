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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from imgtrain.directories.atomic import atomic_file
from imgtrain.directories.files import read_text
from imgtrain.errors import InvalidModelDirectoryError

META_FILE = "_meta.yaml"
SPEC_FILE = "model_spec.yaml"
WEIGHTS_FILE = "model.safetensors"
LABELS_FILE = "index_to_label.csv"
METRICS_FILE = "metrics.csv"
METRICS_JSONL = "metrics.jsonl"  # the same rows, one JSON object a line, for scripts
FLAVOR = "imgtrain"
FORMAT_VERSION = 1
HINT = "make one with `imgtrain densenet` or `imgtrain resnet` (untrained) or `imgtrain train-pytorch-model`"


@dataclass
class InputSpec:
    """How an image must be prepared for the model: what travels with the weights."""

    image_size: int
    mean: list[float]
    std: list[float]
    resize: str = "squash"  # the whole image is resized to image_size x image_size
    color_mode: str = "RGB"


@dataclass
class ModelSpec:
    architecture: str
    pretrained: bool
    options: dict = field(default_factory=dict)  # memory_efficient / zero_init_residual
    trained: bool = False
    labels: list[str] = field(default_factory=list)
    input: InputSpec | None = None
    weights: str | None = None
    training: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict:
        d = {"flavor": FLAVOR, "format_version": FORMAT_VERSION, **asdict(self)}
        d["num_classes"] = self.num_classes
        if not self.trained:
            for key in ("labels", "input", "weights", "training", "num_classes"):
                d.pop(key)
        return d


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
    if raw.get("flavor") != FLAVOR:
        raise InvalidModelDirectoryError(
            f"{root} was not made by imgtrain (flavor {raw.get('flavor')!r}); a designer model file is a "
            "pickle, which imgtrain never opens because unpickling can run any code",
            "retrain the model with imgtrain",
        )
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
                                         "pass the output of `imgtrain densenet` or `imgtrain resnet`")
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


def _spec_from_dict(raw: dict, root: Path) -> ModelSpec:
    def bad(what: str) -> InvalidModelDirectoryError:
        return InvalidModelDirectoryError(f"{root / SPEC_FILE}: {what}", HINT)

    arch = raw.get("architecture")
    if not isinstance(arch, str) or not arch.isidentifier():  # which ones imgtrain builds is models/' to say
        raise bad(f"unknown architecture {arch!r}: not a model name")
    options = raw.get("options") or {}
    allowed = {"memory_efficient", "zero_init_residual"}
    if not isinstance(options, dict) or set(options) - allowed or not all(
            isinstance(v, bool) for v in options.values()):
        raise bad(f"options must be booleans among {sorted(allowed)}")
    spec = ModelSpec(architecture=arch, pretrained=bool(raw.get("pretrained", False)), options=options,
                     trained=bool(raw.get("trained", False)), versions=raw.get("versions") or {})
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
    weights = raw.get("weights")
    if not isinstance(weights, str) or Path(weights).name != weights:
        raise bad("weights must name a file inside the directory")
    training = raw.get("training") or {}
    if not isinstance(training, dict):
        raise bad("training must be a mapping")
    spec.labels, spec.weights, spec.training = labels, weights, training
    return spec
