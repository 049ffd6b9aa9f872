"""The modules a pipeline file may use, as components: their input ports, output ports and parameters.

Named as the Python API names them (``untrained_model``, ``output_a``, ``random_seed``), so that a
step reads like the call it makes. Kept here by hand, light to import (no torch); a test holds it
to the functions' real signatures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# A parameter's kind: what a YAML value must be.
INT, FLOAT, BOOL, STR = "integer", "number", "boolean", "string"
OPTIONAL_INT = "integer or null"


@dataclass(frozen=True)
class Component:
    name: str  # the CLI name, as in `imgtrain <name>`
    function: str  # module:function of the Python API
    inputs: tuple[str, ...]  # input ports: folders (or files) made by another step or given to the pipeline
    outputs: tuple[str, ...]  # output ports: the folders the step writes
    parameters: dict[str, str] = field(default_factory=dict)  # name -> kind
    optional: tuple[str, ...] = ()  # input ports that may be left unbound


_TRAINING = {"epochs": INT, "batch_size": INT, "learning_rate": FLOAT, "random_seed": INT, "patience": INT,
             "warmup_epochs": INT, "lr_schedule": STR, "image_size": OPTIONAL_INT, "device": STR, "precision": STR,
             "optimizer": STR, "augmentation": STR, "ema": BOOL, "num_workers": OPTIONAL_INT, "on_bad_image": STR,
             "cache": BOOL, "lr_scaling": STR, "sync_batchnorm": BOOL, "compile": BOOL, "class_weights": STR,
             "sampler": STR}
_TRANSFORMATION = {"resize": BOOL, "size": INT, "center_crop": BOOL, "crop_size": INT, "pad": BOOL, "padding": INT,
                   "color_jitter": BOOL, "grayscale": BOOL, "random_resized_crop": BOOL, "random_size": INT,
                   "random_crop": BOOL, "random_crop_size": INT, "random_horizontal_flip": BOOL,
                   "random_vertical_flip": BOOL, "random_rotation": BOOL, "random_rotation_degrees": FLOAT,
                   "random_affine": BOOL, "random_affine_degrees": FLOAT, "random_grayscale": BOOL,
                   "random_perspective": BOOL, "random_erasing": BOOL}

COMPONENTS: dict[str, Component] = {c.name: c for c in [
    Component("convert-to-image-directory", "imgtrain.data.convert:convert_to_image_directory", ("source",),
              ("output",), {"on_bad_image": STR}),
    Component("split-image-directory", "imgtrain.data.split:split_image_directory", ("source",),
              ("output_a", "output_b"), {"fraction": FLOAT, "random_seed": INT}),
    Component("init-image-transformation", "imgtrain.data.transformation:init_image_transformation", (),
              ("output",), _TRANSFORMATION),
    Component("apply-image-transformation", "imgtrain.data.transformation:apply_image_transformation",
              ("transformation", "dataset"), ("output",), {"mode": STR, "random_seed": INT}),
    Component("densenet", "imgtrain.models.untrained:densenet", (), ("output",),
              {"model_name": STR, "pretrained": BOOL, "memory_efficient": BOOL}),
    Component("resnet", "imgtrain.models.untrained:resnet", (), ("output",),
              {"model_name": STR, "pretrained": BOOL, "zero_init_residual": BOOL}),
    Component("image-model", "imgtrain.models.untrained:image_model", (), ("output",),
              {"model_name": STR, "pretrained": BOOL}),
    Component("train-pytorch-model", "imgtrain.training.train:train_pytorch_model",
              ("untrained_model", "training_data", "validation_data", "transformation"), ("output",), _TRAINING,
              optional=("transformation",)),
    Component("score-image-model", "imgtrain.scoring.score:score_image_model", ("trained_model", "dataset"),
              ("output",), {"batch_size": INT, "device": STR, "num_workers": OPTIONAL_INT, "precision": STR,
                            "on_bad_image": STR, "top_k": OPTIONAL_INT}),
    Component("evaluate-model", "imgtrain.scoring.evaluate:evaluate_model", ("scored_dataset",), ("output",)),
]}
SHORT_NAMES = {"convert": "convert-to-image-directory", "split": "split-image-directory",
               "train": "train-pytorch-model", "score": "score-image-model", "evaluate": "evaluate-model"}


def fits(kind: str, value: object) -> bool:
    """Whether a YAML value is of a parameter's kind (a whole number is a number too; true is not one)."""
    if kind == BOOL:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == INT:
        return isinstance(value, int)
    if kind == OPTIONAL_INT:
        return value is None or isinstance(value, int)
    if kind == FLOAT:
        return isinstance(value, (int, float))
    return isinstance(value, str)
