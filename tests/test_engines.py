"""The engines (torch, ONNX Runtime, OpenVINO) on the suite's trained model, int8 exports and their accuracy
check, and the bad exports, sets and installs they must name."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_image

RUNTIMES = [name for name in ("onnxruntime", "openvino") if importlib.util.find_spec(name)]


def _table(answers, labels):
    return [a.label for a in answers], np.array([[a.probabilities[label] for label in labels] for a in answers])


@pytest.mark.parametrize("engine", ["torch", *RUNTIMES])
def test_every_engine_gives_torch_fp32s_labels_and_probabilities(trained_model, image_dirs, engine):
    """At its default precision (bf16 where the CPU has it natively), each engine agrees with torch fp32 on the label
    of >= 99.5% of the images and on every probability within 0.02."""
    from imgtrain import load_trained_model, predict

    model = load_trained_model(trained_model)
    reference, expected = _table(predict(model, image_dirs["all"], precision="fp32", device="cpu"), model.labels)
    lines = []
    labels, got = _table(predict(trained_model, image_dirs["all"], engine=engine, device="cpu", log=lines.append),
                         model.labels)
    assert any(f"engine {engine} (" in line for line in lines), lines
    agree = np.mean([a == b for a, b in zip(labels, reference, strict=True)])
    assert agree >= 0.995 and np.abs(got - expected).max() <= 0.02, (agree, np.abs(got - expected).max())


@pytest.mark.skipif(not RUNTIMES, reason="no engine besides torch is installed (imgtrain[onnxruntime])")
def test_auto_times_the_engines_once_and_keeps_its_choice_outside_the_model(trained_model, image_dirs, tmp_path):
    from imgtrain import predict

    before = sorted(p.name for p in Path(trained_model).iterdir())
    first, second = [], []
    predict(trained_model, image_dirs["val"], engine="auto", device="cpu", log=first.append)
    predict(trained_model, image_dirs["val"], engine="auto", device="cpu", log=second.append)
    measured = next(line for line in first if line.startswith("Engine auto:"))
    assert "measured now" in measured and "torch (" in measured and " ms an image" in measured, measured
    remembered = next(line for line in second if line.startswith("Engine auto:"))
    assert "measured now" not in remembered and "the fastest here when measured" in remembered, remembered
    cached = Path(os.environ["IMGTRAIN_CACHE"])
    assert list(cached.glob("engines/*.json")) and list(cached.glob("onnx/*/model.onnx"))
    assert sorted(p.name for p in Path(trained_model).iterdir()) == before  # nothing written into the model


@pytest.mark.skipif(not RUNTIMES, reason="no engine besides torch is installed (imgtrain[onnxruntime])")
def test_an_int8_export_records_its_accuracy_and_scores_as_a_model_directory_does(trained_model, image_dirs, tmp_path):
    """OpenVINO's where it is installed (its IR, converted from ONNX Runtime's quantized graph), else ONNX's."""
    from imgtrain import load_trained_model, predict
    from imgtrain.deploy.export import export_model

    format = "openvino" if "openvino" in RUNTIMES else "onnx"
    lines = []
    path = export_model(trained_model, tmp_path / "int8", format=format, int8=True,
                        calibration_data=image_dirs["train"], validation_data=image_dirs["val"], log=lines.append)
    assert any(line.startswith("int8: top-1") and "held-out images" in line for line in lines), lines
    meta = json.loads((path.parent / "metadata.json").read_text())
    assert meta["precision"] == "int8" and int(meta["validation_images"]) == 9 and int(meta["calibration_images"]) == 27
    assert float(meta["accuracy_fp32"]) - float(meta["accuracy_int8"]) <= 0.01
    if format == "openvino":  # its weights are an input too: no output may land on them
        from imgtrain import score_image_model
        from imgtrain.errors import OutputNotWritableError

        _refused(lambda: score_image_model(path, image_dirs["val"], path.parent / "model.bin", overwrite=True),
                 OutputNotWritableError, "model.bin")
    labels = load_trained_model(trained_model).labels
    got, _ = _table(predict(path.parent, image_dirs["all"], device="cpu"), labels)
    reference, _ = _table(predict(trained_model, image_dirs["all"], precision="fp32", device="cpu"), labels)
    assert np.mean([a == b for a, b in zip(got, reference, strict=True)]) >= 0.97


def _converted(root: Path, classes: dict[str, int], tmp_path: Path, name: str, solid: bool = False) -> Path:
    """An ImageDirectory of PNGs in the given class folders (``solid``: every pixel black)."""
    from imgtrain import convert_to_image_directory

    rng = np.random.default_rng(3)
    for label, count in classes.items():
        (root / label).mkdir(parents=True)
        for i in range(count):
            make_image(root / label / f"{i}.png", 0 if solid else int(rng.integers(0, 255)), rng)
    out = tmp_path / name
    convert_to_image_directory(root, out, log=lambda m: None)
    return out


def _refused(call, error, message: str, out: Path | None = None):
    with pytest.raises(error) as caught:
        call()
    assert message in str(caught.value), (message, str(caught.value))
    assert out is None or not out.exists()


@pytest.mark.skipif(not RUNTIMES, reason="needs onnxruntime's quantizer (imgtrain[onnxruntime])")
def test_int8_calibration_and_held_out_sets_are_checked_before_any_work(trained_model, image_dirs, tmp_path,
                                                                         cli_in_process):
    from imgtrain.deploy.export import export_model
    from imgtrain.directories.image_directory import ImageDirectory, write_image_directory_files
    from imgtrain.errors import InvalidDatasetError, InvalidParameterError

    one_class = _converted(tmp_path / "one", {"dark": 4}, tmp_path, "one-class")  # one folder: unlabelled
    write_image_directory_files(one_class, ImageDirectory.load(one_class).files, ["dark"], [0] * 4)  # labelled
    empty = _converted(tmp_path / "two", {"dark": 1, "mid": 1}, tmp_path, "empty")
    write_image_directory_files(empty, [], ["dark", "mid"], [])
    foreign = _converted(tmp_path / "other", {"dark": 2, "purple": 2}, tmp_path, "foreign")
    out, lines = tmp_path / "never", []
    cases = [
        ((one_class, image_dirs["val"]), InvalidDatasetError, "holds one category (dark)"),
        ((empty, image_dirs["val"]), InvalidDatasetError, "empty"),
        ((foreign, image_dirs["val"]), InvalidDatasetError, "has categories the model does not know: purple"),
        ((image_dirs["train"], image_dirs["all"]), InvalidDatasetError, "shares 27 image(s) with"),
        ((image_dirs["train"], None), InvalidParameterError, "needs calibration_data"),
    ]
    for (calibration, validation), error, message in cases:
        _refused(lambda c=calibration, v=validation: export_model(trained_model, out, int8=True, calibration_data=c,
                                                                  validation_data=v, log=lines.append),
                 error, message, out)
    assert not any("Quantizing" in line for line in lines), lines
    r = cli_in_process("export", trained_model, "--calibration-data", image_dirs["train"], "--output", tmp_path / "x")
    assert r.returncode == 1 and r.stderr.strip() == ("error: InvalidParameterError: --calibration-data and "
                                                      "--validation-data are for --int8. add --int8, or leave them "
                                                      "out"), r.stderr


@pytest.mark.skipif(not RUNTIMES, reason="needs onnxruntime's quantizer (imgtrain[onnxruntime])")
def test_an_int8_export_that_loses_accuracy_is_refused_and_nothing_is_written(trained_model, image_dirs, tmp_path):
    """Calibrated on black images, the activations' ranges are far too narrow for real ones: int8 collapses."""
    from imgtrain.deploy.export import export_model
    from imgtrain.errors import AccuracyDropError

    black = _converted(tmp_path / "black", {"dark": 3, "mid": 3}, tmp_path, "black-set", solid=True)
    out = tmp_path / "int8"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier export")
    _refused(lambda: export_model(trained_model, out, int8=True, calibration_data=black,
                                  validation_data=image_dirs["val"], overwrite=True, log=lambda m: None),
             AccuracyDropError, "points of top-1 accuracy")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # the earlier output stands, and no temporary is left
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.skipif("onnxruntime" not in RUNTIMES, reason="imgtrain[onnxruntime] is not installed")
def test_damaged_or_mismatched_exports_are_named_before_any_work(trained_model, image_dirs, tmp_path,
                                                                   cli_in_process):
    import onnx

    from imgtrain import predict
    from imgtrain.deploy.engines import _onnx_of, open_model
    from imgtrain.errors import InvalidModelFileError, InvalidParameterError

    good = _onnx_of(open_model(trained_model), lambda m: None)  # the engines' export of it, as `export` writes it
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[:5000])

    def edited(name: str, **changes) -> Path:
        graph = onnx.load(str(good))
        for entry in graph.metadata_props:
            if entry.key in changes:
                entry.value = changes.pop(entry.key)
        for key, value in changes.items():
            graph.metadata_props.add(key=key, value=value)
        path = tmp_path / name
        onnx.save(graph, str(path))
        return path

    pt2 = tmp_path / "model.pt2"
    pt2.write_bytes(b"PK\x03\x04")
    graph = onnx.load(str(good))  # a class dimension left open: 2 labels would meet the graph's 3 columns
    graph.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "classes"
    for entry in graph.metadata_props:
        entry.value = json.dumps(["a", "b"]) if entry.key == "labels" else entry.value
    onnx.save(graph, str(tmp_path / "open.onnx"))
    graph = onnx.load(str(good))  # a node's tensor read from a file beside the model
    tensor = onnx.helper.make_tensor("leak", onnx.TensorProto.FLOAT, [3], [0.0, 0.0, 0.0])
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="secret.bin")
    graph.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["leaked"], value=tensor))
    onnx.save(graph, str(tmp_path / "external.onnx"))
    cases = [
        (tmp_path / "open.onnx", "not probabilities [N, 2] for its 2 labels"),
        (tmp_path / "external.onnx", "keeps its weights in other files"),
        (edited("huge.onnx", transformation=json.dumps([["Resize", 100000]])), "a size of 100000 pixels"),
        (edited("size.onnx", image_size="64"), "its input is images [None, 32, 32, 3], not images uint8 [N, 64, 64"),
        (edited("labels.onnx", labels=json.dumps(["a", "b"])), "not probabilities [N, 2] for its 2 labels"),
        (edited("dup.onnx", labels=json.dumps(["a", "a", "b"])), "not a list of distinct names"),
        (pt2, "whose weights load through pickle"),
    ]
    for model, message in cases:
        _refused(lambda m=model: predict(m, image_dirs["val"]), InvalidModelFileError, message)
    _refused(lambda: predict(good, image_dirs["val"], engine="torch"), InvalidParameterError,
             "the torch engine does not run")
    lines = []  # bf16 asked of an ONNX export: auto keeps to the engines that run it (onnxruntime does not)
    assert predict(good, image_dirs["val"], precision="bf16", log=lines.append)
    assert not any("onnxruntime" in line for line in lines), lines
    mixed = tmp_path / "mixed"  # a model directory that also holds an export is a model directory
    mixed.mkdir()
    for item in Path(trained_model).iterdir():
        if item.is_file():
            (mixed / item.name).write_bytes(item.read_bytes())
    (mixed / "model.onnx").write_bytes(good.read_bytes())
    assert open_model(mixed).format == "directory"
    r = cli_in_process("score-image-model", "--trained-model", truncated, "--dataset", image_dirs["val"], "--output",
                       tmp_path / "scored")
    assert r.returncode == 1 and not (tmp_path / "scored").exists(), r.stderr
    assert r.stderr.startswith(f"error: InvalidModelFileError: {truncated} cannot be read as ONNX") \
        and len(r.stderr.strip().splitlines()) == 1, r.stderr


def _broken(name: str, **attributes):
    """A module standing in for an engine installed broken."""
    import importlib.machinery
    import types

    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attributes)
    return module


@pytest.mark.skipif("onnxruntime" not in RUNTIMES, reason="imgtrain[onnxruntime] is not installed")
def test_an_engine_that_fails_to_load_is_left_out_by_auto_and_an_error_when_asked_for(trained_model, image_dirs,
                                                                                      monkeypatch):
    """An onnxruntime installed broken (its session cannot be made): auto warns, naming it and why, and runs on;
    asked for by name it is an error. An engine whose import fails is MissingDependencyError with the pip line."""
    from imgtrain import predict
    from imgtrain.errors import EngineError, MissingDependencyError

    predict(trained_model, image_dirs["val"], engine="onnxruntime")  # the model's ONNX graph made and cached
    cached = next(Path(os.environ["IMGTRAIN_CACHE"]).glob("onnx/*/model.onnx"))
    cached.write_bytes(cached.read_bytes()[:1000])  # damaged: made anew, not trusted
    lines = []
    predict(trained_model, image_dirs["val"], engine="openvino", log=lines.append)
    assert any(line.startswith("Exporting resnet18 to ONNX for the engines") for line in lines), lines

    def no_session(*args, **kwargs):
        raise RuntimeError("this build has no CPU provider")

    class SessionOptions:
        pass

    monkeypatch.setitem(sys.modules, "onnxruntime", _broken("onnxruntime", SessionOptions=SessionOptions,
                                                            InferenceSession=no_session))
    for choice in Path(os.environ["IMGTRAIN_CACHE"]).glob("engines/*.json"):
        choice.unlink()  # auto times them anew (the ONNX graph stays made)
    lines = []
    assert predict(trained_model, image_dirs["val"], engine="auto", log=lines.append)
    assert any(line.startswith("warning: the onnxruntime engine could not load") and "no CPU provider" in line
               and line.endswith("auto goes on without it") for line in lines), lines
    assert not list(Path(os.environ["IMGTRAIN_CACHE"]).glob("engines/*.json"))  # a choice made without it is not kept
    _refused(lambda: predict(trained_model, image_dirs["val"], engine="onnxruntime"), EngineError,
             "the onnxruntime engine could not load")
    monkeypatch.setitem(sys.modules, "openvino", None)  # importing it raises ImportError
    _refused(lambda: predict(trained_model, image_dirs["val"], engine="openvino"), MissingDependencyError,
             "install them with `pip install 'imgtrain[openvino]'`")
