"""Model directories Azure ML designer wrote, as its own code writes them: accepted to train from and to
score with, their stacked classifier and their normalisation respected, nothing in them ever run."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgtrain import load_trained_model, score_image_model, train_pytorch_model
from imgtrain.errors import ImgtrainError, InvalidModelDirectoryError
from test_fuzz_loaders import _copy_of, file_contents, json_values, names

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def designer_directory(root: Path, state: dict, *, model_name: str = "resnet18", pretrained: bool,
                       labels: list[str] | None = None, normaliser: dict | None = None) -> Path:
    """What the designer's ResNet module (no labels) or Train PyTorch Model (labels) writes."""
    root.mkdir(parents=True)
    (root / "_meta.yaml").write_text(yaml.safe_dump({
        "type": "ModelDirectory", "extension": {}, "model": "model_spec.yaml", "registerModel": True,
        "modelOutputPath": "trained_model_outputs"}))
    params = {"model_name": model_name, "pretrained": pretrained, "zero_init_residual": False}
    spec = {"flavor": {"name": "pytorch", "serialization_method": "state_dict"}, "model_file": "model",
            "time_created": "2023-03-01 10:00:00",
            "flavor_extras": {"module": "azureml.designer.modules.dl.pytorch.initialize_models.vision."
                                        "classification.resnet", "class": "ResNet", "is_cuda": False,
                              "init_params": params}}
    if labels is not None:
        params["num_classes"] = len(labels)
        spec.update({"task_type": "MultiClassification", "label_map_file": "index_to_label.csv",
                     "inputs": [{"name": "image", "pre_processor": {
                         "class": "ImageNormalizer", "init_params": normaliser or {"mean": [0.5] * 3,
                                                                                   "std": [0.5] * 3}}}]})
        with open(root / "index_to_label.csv", "w", newline="") as f:
            csv.writer(f).writerows([["", "label"], *enumerate(labels)])
    (root / "model_spec.yaml").write_text(yaml.safe_dump(spec))
    torch.save(state, root / "model")
    return root


@pytest.fixture(scope="module")
def designer(tmp_path_factory, trained_model) -> dict[str, Path]:
    """The designer's untrained ResNet-18 and, from imgtrain's trained model, the same network as the designer
    stores one it fine-tuned: the 1000-way ImageNet classifier with a Linear(1000, 3) stacked on it."""
    root = tmp_path_factory.mktemp("designer")
    import torchvision

    fresh = {f"model.{k}": v for k, v in torchvision.models.resnet18().state_dict().items()}
    untrained = designer_directory(root / "untrained", fresh, pretrained=False)
    ours = load_trained_model(trained_model)
    weights = {k: v.clone() for k, v in ours.network.state_dict().items()}
    fc_w, fc_b = weights.pop("fc.weight").double(), weights.pop("fc.bias").double()
    g = torch.Generator().manual_seed(0)
    first_w, first_b = torch.randn(1000, 512, generator=g, dtype=torch.float64) * 0.05, torch.randn(1000, generator=g,
                                                                                                  dtype=torch.float64)
    second_w = fc_w @ torch.linalg.pinv(first_w)  # second(first(x)) == fc(x)
    second_b = fc_b - second_w @ first_b
    state = {f"model.{k}": v for k, v in weights.items()}
    state.update({"model.fc.weight": first_w.float(), "model.fc.bias": first_b.float(),
                  "out_linear_model.weight": second_w.float(), "out_linear_model.bias": second_b.float()})
    trained = designer_directory(root / "trained", state, pretrained=True, labels=ours.labels, normaliser=IMAGENET)
    plain = designer_directory(root / "plain-stats", state, pretrained=True, labels=ours.labels)
    return {"untrained": untrained, "trained": trained, "plain-stats": plain, "root": root}


def _probabilities(scored: Path) -> np.ndarray:
    with open(scored / "scored.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return np.array([[float(v) for k, v in r.items() if k.startswith("Scored Probabilities_")] for r in rows])


def test_a_designer_model_scores_as_the_network_it_holds(designer, trained_model, image_dirs, tmp_path):
    model = load_trained_model(designer["trained"])
    assert model.labels == load_trained_model(trained_model).labels and model.spec.input.mean == IMAGENET["mean"]
    assert model.spec.made_by == "designer" and model.image_size == 224
    # The same network (its stacked head folded into one Linear) gives the same answers, at the same size
    ours = load_trained_model(trained_model)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.network(x), ours.network(x), atol=1e-3)
    score_image_model(designer["trained"], image_dirs["val"], tmp_path / "theirs", log=lambda m: None)
    assert _probabilities(tmp_path / "theirs").shape == (9, 3)
    # the designer's default normalisation, 0.5 and 0.5, when its spec gives no other
    assert load_trained_model(designer["plain-stats"]).spec.input.mean == [0.5, 0.5, 0.5]


def test_training_starts_from_designer_directories(designer, image_dirs, tmp_path):
    d = image_dirs
    args = {"epochs": 1, "batch_size": 8, "image_size": 32, "num_workers": 0, "precision": "fp32",
            "log": lambda m: None}
    from_untrained = train_pytorch_model(designer["untrained"], d["train"], d["val"], tmp_path / "a", **args)
    spec = load_trained_model(from_untrained.output).spec
    assert spec.architecture == "resnet18" and not spec.pretrained and spec.input.mean == IMAGENET["mean"]
    from_trained = train_pytorch_model(designer["trained"], d["train"], d["val"], tmp_path / "b", **args)
    assert from_trained.history[0].validation_top1_accuracy > 0.9  # it starts from what the designer learnt
    with_its_stats = train_pytorch_model(designer["plain-stats"], d["train"], d["val"], tmp_path / "c", **args)
    assert load_trained_model(with_its_stats.output).spec.input.mean == [0.5, 0.5, 0.5]  # kept for fine-tuning


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {Path(__file__).parent / 'pwned'}",))


def test_what_the_designer_never_wrote_is_refused(designer, tmp_path):
    hostile = tmp_path / "hostile"
    import shutil

    shutil.copytree(designer["trained"], hostile)
    (hostile / "model").write_bytes(pickle.dumps({"model.fc.weight": _Payload()}))
    with pytest.raises(InvalidModelDirectoryError, match="weights-only loader"):
        load_trained_model(hostile)
    assert not (Path(__file__).parent / "pwned").exists()
    torch.save({"model.fc.weight": torch.zeros(1), "evil.tensor": torch.zeros(1)}, hostile / "model")
    with pytest.raises(InvalidModelDirectoryError, match="tensors no designer model has: evil.tensor"):
        load_trained_model(hostile)
    spec = yaml.safe_load((hostile / "model_spec.yaml").read_text())
    spec["flavor_extras"]["class"] = "os.system"
    (hostile / "model_spec.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(InvalidModelDirectoryError, match="model class 'os.system' is not one of the designer's"):
        load_trained_model(hostile)
    with pytest.raises(InvalidModelDirectoryError, match="untrained designer model directory"):
        load_trained_model(designer["untrained"])


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(changes=st.dictionaries(st.sampled_from(["flavor", "flavor_extras", "model_file", "label_map_file", "inputs",
                                                "init_params"]), json_values | names, min_size=1, max_size=3),
       labels=st.none() | file_contents)
def test_designer_specs_with_hostile_fields(tmp_path_factory, designer, changes, labels):
    """Whatever a designer-looking spec and label map hold: it opens, or one of imgtrain's named errors."""
    with _copy_of(designer["trained"], tmp_path_factory) as root:
        spec = yaml.safe_load((root / "model_spec.yaml").read_text())
        params = changes.pop("init_params", None)
        if params is not None:
            spec["flavor_extras"]["init_params"] = params
        spec.update(changes)
        (root / "model_spec.yaml").write_text(yaml.safe_dump(spec))
        if labels is not None:
            (root / "index_to_label.csv").write_bytes(labels)
        try:
            load_trained_model(root)
        except ImgtrainError:
            pass


def test_a_report_of_a_designer_model_and_of_a_data_set_another_model_scored(designer, trained_model, image_dirs,
                                                                            tmp_path, cli_in_process):
    """The designer records no training history: `report` writes what the model has and says what is missing.
    A data set scored by another model (here the designer's, the same network in another file) is refused,
    since its mistakes would be explained with a model that did not make them; the same model moved is not."""
    import shutil

    from conftest import run_cli

    run_cli("score", "--trained-model", designer["trained"], "--dataset", image_dirs["val"], "--output",
            tmp_path / "scored-by-designer", "--device", "cpu")
    r = run_cli("report", designer["trained"], "--scored-dataset", tmp_path / "scored-by-designer", "--output",
                tmp_path / "designer.html")
    assert r.stderr.startswith("warning: ") and "holds no training history (metrics.csv)" in r.stderr, r.stderr
    assert "Azure ML designer" in r.stderr and "Traceback" not in r.stderr
    page = (tmp_path / "designer.html").read_text()
    assert "No training curves" in page and "resnet18" in page and "Evaluation on scored-by-designer" in page
    assert all(label in page for label in load_trained_model(trained_model).labels)

    r = cli_in_process("report", trained_model, "--scored-dataset", tmp_path / "scored-by-designer", "--output",
                       tmp_path / "mixed.html")
    assert r.returncode == 1 and r.stderr.startswith("error: InvalidDatasetError: "), r.stderr
    assert f"was scored by another model ({designer['trained'].resolve()}), not {trained_model}" in r.stderr
    assert len(r.stderr.splitlines()) == 1 and not (tmp_path / "mixed.html").exists()

    moved = tmp_path / "moved-model"
    shutil.copytree(designer["trained"], moved)
    r = cli_in_process("report", moved, "--scored-dataset", tmp_path / "scored-by-designer", "--output",
                       tmp_path / "ok.html")
    assert r.returncode == 0, r.stderr

    # images of classes the model never knew (a table of another tool's, with no record of who scored it)
    from test_score_evaluate import _scored_csv

    known = load_trained_model(trained_model).labels
    photos = _scored_csv(tmp_path / "photos", ["cat", "dog", known[0]], known, known)
    r = cli_in_process("report", designer["trained"], "--scored-dataset", photos, "--output", tmp_path / "photos.html")
    assert r.returncode == 0, r.stderr
    assert "warning: 2 of 3 scored images have a true label the model does not know (cat, dog)" in r.stderr, r.stderr
