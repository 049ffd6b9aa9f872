"""imgtrain: turn a folder of labelled images into a trained, scored and evaluated classifier.

The designer's modules, one function each, and ``predict`` for answers in Python::

    from imgtrain import (convert_to_image_directory, split_image_directory, resnet,
                          train_pytorch_model, score_image_model, evaluate_model, predict)

Importing imgtrain before torch shortens OpenMP's spin-wait (see imgtrain.threads): it keeps
training fast when other processes share the CPU.
"""

from __future__ import annotations

import importlib

from imgtrain.threads import configure_openmp

__version__ = "0.1.0"
configure_openmp()

_API = {
    "convert_to_image_directory": "imgtrain.data.convert",
    "split_image_directory": "imgtrain.data.split",
    "init_image_transformation": "imgtrain.data.transformation",
    "apply_image_transformation": "imgtrain.data.transformation",
    "densenet": "imgtrain.models.untrained",
    "resnet": "imgtrain.models.untrained",
    "image_model": "imgtrain.models.untrained",
    "train_pytorch_model": "imgtrain.training.train",
    "TrainingParameters": "imgtrain.training.train",
    "score_image_model": "imgtrain.scoring.score",
    "evaluate_model": "imgtrain.scoring.evaluate",
    "ImageDirectory": "imgtrain.directories.image_directory",
    "load_trained_model": "imgtrain.models.trained",
    "TrainedModel": "imgtrain.models.trained",
    "predict": "imgtrain.scoring.score",
    "explain": "imgtrain.scoring.explain",
    "Prediction": "imgtrain.scoring.score",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    # Lazy, so that `imgtrain --help` and `import imgtrain.errors` do not pay for importing torch.
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'imgtrain' has no attribute {name!r}")
