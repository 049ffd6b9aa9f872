"""A trained model directory, loaded: the network built from imgtrain's registry, with its weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from imgtrain.directories.files import check_regular
from imgtrain.directories.model_directory import DESIGNER, HINT, ModelSpec
from imgtrain.errors import InvalidModelDirectoryError
from imgtrain.models.registry import build_model, load_known_spec, load_weights


@dataclass
class TrainedModel:
    """A network ready to predict (on the CPU, in eval mode) and the spec that says how to feed it."""

    network: nn.Module
    spec: ModelSpec
    path: Path

    @property
    def labels(self) -> list[str]:
        """The class names, in the order of the network's outputs."""
        return self.spec.labels

    @property
    def image_size(self) -> int:
        return self.spec.input.image_size

    @property
    def preparation(self):
        """What a decoded image goes through before the network: the recorded transformation's fixed
        operations if any, then resized to the model's size."""
        from imgtrain.data.transforms import Preparation
        from imgtrain.directories.transformation_directory import parse_operations

        pairs = self.spec.input.transformation
        return Preparation(self.image_size, parse_operations(pairs, "the model's transformation") if pairs else None)

    def __iter__(self):
        """``network, spec = load_trained_model(...)`` as before the fields had names."""
        return iter((self.network, self.spec))


def load_trained_model(root: Path | str) -> TrainedModel:
    """Open a trained model directory: build its architecture from the registry, load its safetensors
    weights. Nothing in the directory is imported, unpickled or run."""
    root = Path(root)
    spec = load_known_spec(root, need_trained=True)
    path = root / spec.weights
    if spec.made_by == DESIGNER:  # a torch state dict the designer saved, read as tensors only
        from imgtrain.models.designer import designer_state

        state = designer_state(path, spec)
    else:
        try:
            check_regular(path)
            state = load_file(path)
        except (FileNotFoundError, SafetensorError, OSError) as exc:
            raise InvalidModelDirectoryError(f"cannot read weights {path} ({exc})", HINT) from None
    network = build_model(spec.architecture, spec.num_classes, image_size=spec.input.image_size, **spec.options)
    try:
        load_weights(network, state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise InvalidModelDirectoryError(
            f"weights {path} do not fit {spec.architecture} with {spec.num_classes} classes "
            f"({first[1].strip() if len(first) > 1 else first[0]})", HINT) from None
    network.eval()
    return TrainedModel(network, spec, root)
