"""int8 exports: static post-training quantization with ONNX Runtime's quantizer, and its accuracy measured.

``imgtrain export --int8 --calibration-data C --validation-data V`` quantizes the exported ONNX graph
with ``onnxruntime.quantization.quantize_static``: QDQ format (QuantizeLinear/DequantizeLinear pairs,
which ONNX Runtime and OpenVINO both run as int8 kernels), weights int8 per output channel,
activations uint8 with their ranges taken (MinMax) from the calibration images, prepared as imgtrain
prepares them. No quantizer of imgtrain's own.

Then both graphs, fp32 and int8, score the held-out images V (a labelled ImageDirectory that shares no
image with C) in the engine the export is for, and the export records both top-1 accuracies, and how
often the two agree, in its metadata. Where int8 loses more than ``--max-accuracy-drop`` points of
top-1, the export is refused (AccuracyDropError) and nothing is written: a user never ships a silently
worse model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imgtrain.errors import (
    AccuracyDropError,
    InvalidDatasetError,
    InvalidParameterError,
    MissingDependencyError,
    check_range,
    option,
    some,
)

CALIBRATION_IMAGES = 256  # at most, spread evenly over the calibration set: MinMax ranges settle well before
_BATCH = 16
METHOD = "onnxruntime quantize_static, QDQ, weights int8 per channel, activations uint8 (MinMax calibration)"


@dataclass
class Quantized:
    calibration_images: int
    validation_images: int
    accuracy_fp32: float
    accuracy_int8: float  # the lowest of the engines'
    agreement: float  # the share of validation images both give the same label (the lowest of the engines')
    by_engine: dict[str, float]  # each engine's int8 accuracy

    @property
    def drop(self) -> float:
        """Points of top-1 lost (negative: gained)."""
        return 100 * (self.accuracy_fp32 - self.accuracy_int8)

    def metadata(self) -> dict[str, str]:
        return {"precision": "int8", "quantization": METHOD,
                "calibration_images": str(self.calibration_images), "validation_images": str(self.validation_images),
                "accuracy_fp32": f"{self.accuracy_fp32:.6f}", "accuracy_int8": f"{self.accuracy_int8:.6f}",
                "label_agreement": f"{self.agreement:.6f}",
                **{f"accuracy_int8_{engine}": f"{value:.6f}" for engine, value in self.by_engine.items()}}


def _quantization():
    try:
        from onnxruntime import quantization
    except ImportError:
        raise MissingDependencyError("--int8 quantizes with onnxruntime's quantizer",
                                     "install it with `pip install 'imgtrain[onnxruntime]'`") from None
    return quantization


def check_sets(labels: list[str], calibration: Path | str | None, validation: Path | str | None,
               max_accuracy_drop: float):
    """The calibration and held-out sets, checked before any work: both given, non-empty, labelled with the
    model's labels (the calibration set may be unlabelled, but not of one class), and sharing no image."""
    from imgtrain.directories.image_directory import ImageDirectory

    check_range("max_accuracy_drop", max_accuracy_drop, low=0, high=100,
                hint=f"pass {option('max_accuracy_drop')} in points of top-1 accuracy, from 0 to 100 (default 1)")
    if calibration is None or validation is None:
        raise InvalidParameterError(f"{option('int8')} needs {option('calibration_data')} (images whose activations "
                                    f"set the int8 ranges) and {option('validation_data')} (labelled images, held "
                                    "out, that measure what int8 costs)",
                                    "pass both: ImageDirectories, e.g. the training and the validation split")
    _quantization()
    sets = []
    for name, path in (("calibration_data", calibration), ("validation_data", validation)):
        data = ImageDirectory.load(path)
        if not len(data):
            raise InvalidDatasetError(f"{option(name)} {path} has no images", "pass an ImageDirectory with images")
        if data.labels is None and name == "validation_data":
            data.require_labels(f"{option(name)}")
        if data.labels is not None:
            used = sorted({data.categories[i] for i in np.unique(data.labels)})
            foreign = [c for c in used if c not in labels]
            if foreign:
                raise InvalidDatasetError(f"{option(name)} {path} has categories the model does not know: "
                                          f"{some(foreign)}", f"pass images of the model's labels: {some(labels)}")
            if name == "calibration_data" and len(used) == 1 and len(labels) > 1:
                raise InvalidDatasetError(f"{option(name)} {path} holds one category ({some(used)}): its "
                                          "activations would set ranges that the other categories overflow",
                                          "calibrate on images of every category, such as the training split")
        sets.append(data)
    calibration_set, validation_set = sets
    if calibration_set.digests and validation_set.digests:
        shared = set(calibration_set.digests) & set(validation_set.digests)
        if shared:
            raise InvalidDatasetError(f"{option('validation_data')} {validation} shares {len(shared):,} image(s) with "
                                      f"{option('calibration_data')} {calibration}: the accuracy check needs images "
                                      "the calibration did not see", "pass a held-out set, such as the validation "
                                                                     "split")
    elif Path(calibration).resolve() == Path(validation).resolve():
        raise InvalidDatasetError(f"{option('validation_data')} is {option('calibration_data')}: the accuracy check "
                                  "needs images the calibration did not see", "pass a held-out set")
    return calibration_set, validation_set


def _batches(data, indices, preparation):
    """Prepared images, uint8 [N, S, S, 3] in batches, with their labels: made as they are asked for (a
    validation set of 50,000 images is never in memory at once)."""
    for start in range(0, len(indices), _BATCH):
        chunk = indices[start:start + _BATCH]
        images = torch.stack([preparation.load(data.path(int(i))) for i in chunk]).permute(0, 2, 3, 1).numpy()
        yield np.ascontiguousarray(images), None if data.labels is None else data.labels[chunk]


def quantize(fp32: Path, int8: Path, *, labels: list[str], preparation, calibration_set, validation_set,
             max_accuracy_drop: float, evaluate_int8: Callable[[Path], dict[str, Callable[[np.ndarray], np.ndarray]]],
             evaluate_fp32: Callable[[Path], Callable[[np.ndarray], np.ndarray]],
             log: Callable[[str], None]) -> Quantized:
    """``fp32`` (an ONNX graph) quantized to ``int8``, then both scored on the held-out images: AccuracyDropError
    when int8 loses more than ``max_accuracy_drop`` points in any engine that may run it. ``evaluate_fp32``
    loads a graph and returns what scores a batch; ``evaluate_int8``, that for each engine that may run it."""
    quantization = _quantization()
    count = min(CALIBRATION_IMAGES, len(calibration_set))
    chosen = np.unique(np.linspace(0, len(calibration_set) - 1, count).round().astype(int))
    log(f"Quantizing to int8: calibrating on {len(chosen):,} images of {calibration_set.root}")
    calibration = iter(_batches(calibration_set, chosen, preparation))

    class Reader(quantization.CalibrationDataReader):
        def get_next(self):
            batch = next(calibration, None)
            return None if batch is None else {"images": batch[0]}

    from imgtrain.deploy.export import quiet

    prepared = int8.with_name("prepared.onnx")
    with quiet():
        quantization.shape_inference.quant_pre_process(str(fp32), str(prepared))
        quantization.quantize_static(str(prepared), str(int8), Reader(), quant_format=quantization.QuantFormat.QDQ,
                                     activation_type=quantization.QuantType.QUInt8,
                                     weight_type=quantization.QuantType.QInt8, per_channel=True,
                                     calibrate_method=quantization.CalibrationMethod.MinMax)
    prepared.unlink()
    with contextlib.suppress(FileNotFoundError):
        int8.with_name(int8.name.replace(".onnx", "-inferred.onnx")).unlink()  # older quantizers leave it
    log(f"Measuring int8 against fp32 on {len(validation_set):,} held-out images of {validation_set.root}")
    truth, fp32_labels = [], []
    run_fp32, runs_int8 = evaluate_fp32(fp32), evaluate_int8(int8)
    int8_labels: dict[str, list[int]] = {engine: [] for engine in runs_int8}
    for images, batch_labels in _batches(validation_set, np.arange(len(validation_set)), preparation):
        names = [validation_set.categories[i] for i in batch_labels]
        truth += [labels.index(name) for name in names]
        fp32_labels += run_fp32(images).argmax(axis=1).tolist()
        for engine, run in runs_int8.items():
            int8_labels[engine] += run(images).argmax(axis=1).tolist()
    truth_a, fp32_a = np.asarray(truth), np.asarray(fp32_labels)
    by_engine = {engine: float((np.asarray(got) == truth_a).mean()) for engine, got in int8_labels.items()}
    agreement = min(float((np.asarray(got) == fp32_a).mean()) for got in int8_labels.values())
    result = Quantized(len(chosen), len(truth), float((fp32_a == truth_a).mean()), min(by_engine.values()),
                       agreement, by_engine)
    change = f"{abs(result.drop):.2f} points {'lost' if result.drop >= 0 else 'gained'}"
    if len(by_engine) > 1:  # the lowest is the one reported: each engine's, as the runtimes differ a little
        change += ", " + ", ".join(f"{engine} {value:.2%}" for engine, value in by_engine.items())
    log(f"int8: top-1 {result.accuracy_int8:.2%} against fp32 {result.accuracy_fp32:.2%} on "
        f"{result.validation_images:,} held-out images ({change}; the labels agree on {result.agreement:.2%})")
    if result.drop > max_accuracy_drop:
        raise AccuracyDropError(f"int8 loses {result.drop:.2f} points of top-1 accuracy on {validation_set.root} "
                                f"({result.accuracy_fp32:.2%} in fp32, {result.accuracy_int8:.2%} in int8), more than "
                                f"{option('max_accuracy_drop', f'{max_accuracy_drop:g}')} allows: nothing was written",
                                "calibrate on more, or more varied, images (the training split), export in fp32, or "
                                f"raise {option('max_accuracy_drop')} if that loss is acceptable")
    return result
