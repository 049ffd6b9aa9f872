"""DenseNet / ResNet modules, the registry, pretrained weights from torchvision's cache."""

from __future__ import annotations

import pytest
import torch
import torchvision
import yaml

from imgtrain import densenet, resnet
from imgtrain.directories.model_directory import load_model_spec
from imgtrain.errors import InvalidParameterError, WeightsUnavailableError
from imgtrain.models.names import model_names
from imgtrain.models.registry import build_model
from imgtrain.models.weights import weights_cache_path


def test_untrained_directories_hold_a_spec_and_no_code(tmp_path):
    resnet(tmp_path / "r", model_name="resnet34", pretrained=False, zero_init_residual=True)
    densenet(tmp_path / "d", model_name="densenet121", pretrained=False, memory_efficient=True)
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["_meta.yaml", "model_spec.yaml"]
    spec = yaml.safe_load((tmp_path / "d" / "model_spec.yaml").read_text())
    assert spec["architecture"] == "densenet121" and spec["options"] == {"memory_efficient": True}
    assert spec["trained"] is False and spec["pretrained"] is False
    assert load_model_spec(tmp_path / "r").options == {"zero_init_residual": True}


def test_model_names_match_the_designer():
    assert model_names("densenet") == ["densenet121", "densenet161", "densenet169", "densenet201"]
    assert model_names("resnet") == ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                                     "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2"]
    with pytest.raises(InvalidParameterError, match="not a resnet model"):
        resnet("unused", model_name="densenet121")


def test_offline_without_cached_weights_names_the_file(tmp_path, monkeypatch, cli_in_process):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsUnavailableError) as err:
        resnet(tmp_path / "out", model_name="resnet18")
    text = str(err.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in text
    assert "pretrained=False" in text and "download.pytorch.org" in text  # in Python, Python's words
    assert not (tmp_path / "out").exists()
    r = cli_in_process("densenet", "--output", tmp_path / "d")  # TORCH_HOME as above
    assert r.returncode == 1 and r.stderr.startswith("error: WeightsUnavailableError: pretrained weights for "
                                                     "densenet201 are not cached")
    assert len(r.stderr.strip().splitlines()) == 1


def place_fake_imagenet_weights(name: str, seed: int = 0) -> dict:
    """Stand-in ImageNet weights, saved where torchvision's download would put them."""
    torch.manual_seed(seed)
    state = getattr(torchvision.models, name)(weights=None).state_dict()
    path = weights_cache_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def test_pretrained_replaces_the_imagenet_head(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    imagenet = place_fake_imagenet_weights("resnet18")
    resnet(tmp_path / "r", model_name="resnet18")  # pretrained by default, found in the cache
    assert load_model_spec(tmp_path / "r").pretrained
    model = build_model("resnet18", 7, pretrained=True)
    assert isinstance(model.fc, torch.nn.Linear) and model.fc.out_features == 7  # replaced, not stacked
    assert torch.equal(model.conv1.weight, imagenet["conv1.weight"])
    assert torch.equal(model.layer4[1].bn2.running_var, imagenet["layer4.1.bn2.running_var"])


def test_densenet_pretrained_and_memory_efficient(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    imagenet = place_fake_imagenet_weights("densenet121")
    model = build_model("densenet121", 3, pretrained=True, memory_efficient=True)
    assert model.classifier.out_features == 3
    assert torch.equal(model.features.conv0.weight, imagenet["features.conv0.weight"])
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()  # gradient checkpointing path runs


def test_list_models_reads_torchvisions_registries():
    import torchvision.models as tvm

    from conftest import run_cli
    from imgtrain.errors import InvalidParameterError
    from imgtrain.models.catalog import catalog, select

    every = run_cli("list-models", "--quiet").stdout.splitlines()[2:]
    assert sorted(line.split()[0] for line in every) == sorted(tvm.list_models(module=tvm))  # none kept by hand
    rows = {line.split()[0]: line.split() for line in every}
    assert rows["resnet18"][1:4] == ["resnet", "11.7", "1.81"] and rows["resnet18"][-2:] == ["imgtrain", "resnet"]
    assert rows["efficientnet_b3"][4:7] == ["82.0%", "47", "300"]
    assert rows["efficientnet_b3"][-2:] == ["imgtrain", "image-model"]
    known = catalog()
    sizes = [r.params for r in select(known, "mobilenet", sort="params")]
    assert len(sizes) == 3 and sizes == sorted(sizes, reverse=True)
    assert [r.name for r in select(known, "vit_*", sort="accuracy")][0] == "vit_h_14"
    with pytest.raises(InvalidParameterError, match="no torchvision classifier matches 'nothing-like-it'"):
        select(known, "nothing-like-it")


def test_the_designer_modules_weight_files_are_torchvisions():
    """names.py knows the DenseNet and ResNet weight files without importing torchvision: they must be the
    files of torchvision's DEFAULT weights, which the registry loads."""
    from imgtrain.models.names import FAMILIES, WEIGHTS_URLS
    from imgtrain.models.registry import get_architecture

    assert list(WEIGHTS_URLS) == list(FAMILIES)
    assert WEIGHTS_URLS == {name: get_architecture(name).weights.url for name in FAMILIES}
    assert {get_architecture(name).family for name in FAMILIES} == {"densenet", "resnet"}
