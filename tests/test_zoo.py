"""Every image classifier torchvision ships, from imgtrain's registry: built, trained a step, saved, reloaded, scored.

Each architecture runs at 64 px (or the nearest size it takes), with a plain SGD step (memory: twice the
weights). The suite runs the smallest architecture of each family and the six the README compares (21,
half a minute); ``IMGTRAIN_TEST_ZOO=all`` runs all 80, the giants included (ViT-H/14 and RegNetY-128GF, 640M
parameters each: 5 minutes in all on 2 cores). The whole pipeline (image-model, train, score) runs for the
families whose wiring differs: auxiliary classifiers and transform_input, fixed input sizes, other weights'
statistics.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from conftest import run_cli
from imgtrain import image_model, predict, score_image_model, train_pytorch_model
from imgtrain.directories.atomic import write_safetensors
from imgtrain.directories.model_directory import (
    InputSpec,
    ModelSpec,
    library_versions,
    load_model_spec,
    write_model_directory,
)
from imgtrain.errors import ImageSizeError, InvalidParameterError
from imgtrain.models.catalog import catalog
from imgtrain.models.registry import architecture_names, build_model, get_architecture, head_of
from imgtrain.models.trained import load_trained_model
from imgtrain.models.weights import weights_cache_path


def test_the_registry_is_torchvisions():
    names = architecture_names()
    assert list(names) == torchvision.models.list_models(module=torchvision.models)
    families = {get_architecture(n).family for n in names}
    assert {"convnext", "efficientnet", "regnet", "mobilenetv3", "shufflenetv2", "mnasnet", "squeezenet",
            "googlenet", "inception", "vgg", "vision_transformer", "swin_transformer", "maxvit", "densenet",
            "resnet"} <= families


COMPARED = {"resnet18", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "convnext_tiny",
            "shufflenet_v2_x1_0"}  # the README's "which model" (bench/zoo.py)


def _in_the_suite() -> set[str]:
    """The smallest architecture of each family (and of Swin V2, EfficientNetV2), and the ones the README
    compares."""
    smallest = {}
    for row in sorted(catalog(), key=lambda r: r.params):
        smallest.setdefault(row.family, row.name)
    return set(smallest.values()) | COMPARED | {"swin_v2_t", "efficientnet_v2_s"}  # V2s: other blocks, same family


QUICK = _in_the_suite()
ALL = os.environ.get("IMGTRAIN_TEST_ZOO") == "all"


@pytest.mark.parametrize("name", architecture_names())
def test_every_architecture_trains_saves_reloads_and_scores(name, tmp_path, labelled_folder):
    if name not in QUICK and not ALL:
        pytest.skip("a large architecture: IMGTRAIN_TEST_ZOO=all runs it")
    arch = get_architecture(name)
    size = arch.fit_size(64, pretrained=False)  # at 32 px some (RegNet) have 1x1 maps and wild gradients
    torch.manual_seed(0)
    model = build_model(name, 3, image_size=size)
    head = model.get_submodule(head_of(model))
    assert (head.out_features if isinstance(head, torch.nn.Linear) else head.out_channels) == 3
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    logits = model(torch.rand(4, 3, size, size))
    assert logits.shape == (4, 3)  # one output: no auxiliary logits while training
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    torch.optim.SGD(model.parameters(), lr=1e-3).step()
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the step changed nothing"

    labels = ["bright", "dark", "mid"]
    write_model_directory(tmp_path, ModelSpec(
        architecture=name, pretrained=False, trained=True, labels=labels, weights="model.safetensors",
        input=InputSpec(image_size=size, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        versions=library_versions()))
    write_safetensors({k: v.contiguous() for k, v in after.items()}, tmp_path / "model.safetensors")
    loaded = load_trained_model(tmp_path)
    model.eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        assert torch.isfinite(expected).all()
        torch.testing.assert_close(loaded.network(x), expected)
    images = sorted((labelled_folder / "dark").glob("*.png"))[:2]
    found = predict(loaded, images, batch_size=2)
    assert [p.image for p in found] == [str(i) for i in images]
    assert all(p.label in labels and abs(sum(p.probabilities.values()) - 1) < 1e-4 for p in found)


def place_fake_imagenet_weights(name: str) -> None:
    """Stand-in ImageNet weights where torchvision's download would put them, as torchvision's builder makes
    the network for its weights (auxiliary classifiers included)."""
    torch.manual_seed(0)
    with pytest.warns(FutureWarning) if name in ("googlenet", "inception_v3") else contextlib.nullcontext():
        network = torchvision.models.get_model(name, weights=None)
    path = weights_cache_path(name, get_architecture(name).weights.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), path)


def _pipeline(tmp_path, image_dirs, untrained, **training):
    out = tmp_path / "model"
    train_pytorch_model(untrained, image_dirs["train"], image_dirs["val"], out, epochs=1, batch_size=8,
                        num_workers=0, log=lambda m: None, **training)
    score_image_model(out, image_dirs["val"], tmp_path / "scored")
    return load_model_spec(out), (tmp_path / "scored" / "scored.csv").read_text().splitlines()


def test_googlenet_pretrained_drops_its_auxiliary_classifiers_and_keeps_transform_input(
        tmp_path, monkeypatch, image_dirs, cli_in_process):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    place_fake_imagenet_weights("googlenet")
    r = cli_in_process("image-model", "--model-name", "googlenet", "--output", tmp_path / "untrained")
    assert r.returncode == 0, r.stderr
    spec = load_model_spec(tmp_path / "untrained")
    assert spec.options == {"transform_input": True}
    assert spec.preprocessing == {"resize_size": 256, "crop_size": 224, "interpolation": "bilinear",
                                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    trained, rows = _pipeline(tmp_path, image_dirs, tmp_path / "untrained", image_size=32)
    assert trained.options == {"transform_input": True} and trained.preprocessing == spec.preprocessing
    assert len(rows) == 1 + 9  # the header and the validation images
    network = load_trained_model(tmp_path / "model").network
    assert network.transform_input and network.aux1 is None and network.fc.out_features == 3


def test_the_weights_preprocessing_travels_to_the_trained_model(tmp_path, monkeypatch, image_dirs):
    """EfficientNetV2-L's weights want images scaled to [-1, 1] (mean and std 0.5): training and scoring
    normalise so, as the directory records. Its 118M parameters are too many for a test: a spec that records
    0.5 for mobilenet_v3_small's weights shows the same path."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert get_architecture("efficientnet_v2_l").preprocessing.mean == (0.5, 0.5, 0.5)
    place_fake_imagenet_weights("mobilenet_v3_small")
    image_model(tmp_path / "untrained", model_name="mobilenet_v3_small")
    spec_file = tmp_path / "untrained" / "model_spec.yaml"
    raw = yaml.safe_load(spec_file.read_text())
    assert raw["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    raw["preprocessing"].update(mean=[0.5] * 3, std=[0.5] * 3)
    spec_file.write_text(yaml.safe_dump(raw))
    trained, _ = _pipeline(tmp_path, image_dirs, tmp_path / "untrained")
    assert trained.input.mean == [0.5] * 3 and trained.input.std == [0.5] * 3


def test_vit_from_scratch_fits_the_chosen_size_to_its_patches(tmp_path, image_dirs):
    image_model(tmp_path / "untrained", model_name="vit_b_32", pretrained=False)
    trained, rows = _pipeline(tmp_path, image_dirs, tmp_path / "untrained", image_size=64)
    assert trained.input.image_size == 64
    network = load_trained_model(tmp_path / "model").network
    assert network.image_size == 64 and network.heads.head.out_features == 3


def test_sizes_an_architecture_cannot_take_are_refused_before_training(tmp_path, image_dirs, cli_in_process):
    image_model(tmp_path / "maxvit", model_name="maxvit_t", pretrained=False)
    r = cli_in_process("train-pytorch-model", "--untrained-model", tmp_path / "maxvit", "--training-data",
                       image_dirs["train"], "--validation-data", image_dirs["val"], "--image-size", "256", "--output",
                       tmp_path / "out")
    assert r.returncode == 1 and not (tmp_path / "out").exists()
    assert r.stderr.strip() == ("error: ImageSizeError: maxvit_t cannot take 256 px images (--image-size 256); it "
                                "takes multiples of 224 from 224 to 4032 px. pass --image-size 448, or leave it out "
                                "and imgtrain chooses one")
    vit = get_architecture("vit_b_16")
    assert vit.sizes(pretrained=True) == (224, 1, 224) and vit.sizes(pretrained=False) == (32, 16, 4096)
    with pytest.raises(ImageSizeError, match=r"vit_b_16 cannot take 64 px images \(x\); it takes 224 px only "
                                             r"with its ImageNet weights"):
        vit.check_size(64, True, "x")
    with pytest.raises(ImageSizeError, match="takes 64 px only .its training size."):
        vit.check_size(96, False, "x", trained_size=64)
    assert get_architecture("inception_v3").fit_size(32, pretrained=False) == 75  # chosen sizes are fitted


def test_a_size_hint_under_a_transformation_is_one_the_user_can_follow(tmp_path, image_dirs, capsys):
    """Where the transformation's operations make the size, the hint says how to change them (passing
    --image-size is refused there as disagreeing with them); where they make no square, --image-size
    decides, and the hint to pass it works. Each hint is followed, and the size is then taken: the run
    gets as far as the output, which exists."""
    import re

    from imgtrain.cli import main
    from imgtrain.data.transformation import init_image_transformation

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model_spec.yaml").write_text("an earlier output\n")

    def train(model: Path, transformation: Path, *extra: str) -> str:
        main(["train", "--untrained-model", str(model), "--training-data", str(image_dirs["train"]),
              "--validation-data", str(image_dirs["val"]), "--output", str(tmp_path / "out"), "--transformation",
              str(transformation), *extra])
        return capsys.readouterr().err.strip()

    init_image_transformation(tmp_path / "t40", size=48, crop_size=40)
    image_model(tmp_path / "vit", model_name="vit_b_32", pretrained=False)
    image_model(tmp_path / "inception", model_name="inception_v3", pretrained=False)
    for model, side in (("vit", 64), ("inception", 75)):
        said = train(tmp_path / model, tmp_path / "t40")
        assert said.startswith("error: ImageSizeError: ") and "cannot take 40 px images" in said, said
        assert said.endswith(f"make a transformation that leaves {side} x {side} images instead (this one's "
                             f"CenterCrop makes 40 x 40): init-image-transformation with --crop-size {side} and "
                             f"--size {side}, its other parameters as before"), said
        assert "--image-size" not in said.split(". ", 1)[1]
        flags = re.search(r"with --crop-size (\d+) and --size (\d+)", said).groups()
        init_image_transformation(tmp_path / f"t{side}", size=int(flags[1]), crop_size=int(flags[0]))
        assert train(tmp_path / model, tmp_path / f"t{side}").startswith("error: OutputExistsError"), model
    # A Resize of the shorter side and flips make no square: --image-size decides, as the hint says.
    init_image_transformation(tmp_path / "shorter", size=40, center_crop=False)
    said = train(tmp_path / "vit", tmp_path / "shorter")
    assert said.endswith("it takes multiples of 32 from 32 to 4096 px. pass --image-size 64"), said
    assert train(tmp_path / "vit", tmp_path / "shorter", "--image-size", "64").startswith("error: OutputExistsError")


def test_unknown_names_get_the_closest_ones(tmp_path, cli_in_process):
    with pytest.raises(InvalidParameterError, match=r"unknown model name 'convnext_tiney' \(did you mean "
                                                    r"convnext_tiny"):
        image_model(tmp_path / "m", model_name="convnext_tiney", pretrained=False)
    r = cli_in_process("image-model", "--model-name", "resnet19", "--no-pretrained", "--output", tmp_path / "m")
    assert r.returncode == 1 and "did you mean resnet18" in r.stderr and "imgtrain list-models" in r.stderr
    assert not (tmp_path / "m").exists()


def _fake_timm_weights(hub: Path, name: str) -> torch.nn.Module:
    """A timm network's weights in the Hugging Face Hub's cache layout, where timm's download would put them."""
    import timm
    from safetensors.torch import save_file

    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    folder = hub / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    torch.manual_seed(0)
    network = timm.create_model(name, pretrained=False)
    save_file(network.state_dict(), folder / "snapshots" / commit / "model.safetensors")
    return network


def test_timm_models_pretrained_from_the_hub_cache_and_from_scratch(tmp_path, monkeypatch, image_dirs,
                                                                    cli_in_process):
    pytest.importorskip("timm")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    imagenet = _fake_timm_weights(tmp_path / "hub", "convnext_nano")
    run_cli("image-model", "--model-name", "timm/convnext_nano", "--output", tmp_path / "untrained",
            env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    spec = load_model_spec(tmp_path / "untrained")
    assert spec.architecture == "timm/convnext_nano" and spec.pretrained
    assert spec.preprocessing["interpolation"] == "bicubic" and spec.preprocessing["crop_size"] == 224
    model = build_model("timm/convnext_nano", 3, pretrained=True)
    assert torch.equal(model.stem[0].weight, imagenet.stem[0].weight)  # the file's weights
    assert head_of(model) == "head.fc" and model.head.fc.out_features == 3  # timm's reset_classifier
    trained, rows = _pipeline(tmp_path, image_dirs, tmp_path / "untrained", image_size=32)
    assert trained.architecture == "timm/convnext_nano" and len(rows) == 1 + 9
    # from scratch, and a size a fixed-size timm model cannot take
    image_model(tmp_path / "vit", model_name="timm/vit_tiny_patch16_224", pretrained=False)
    with pytest.raises(ImageSizeError, match="timm/vit_tiny_patch16_224 cannot take 64 px images .* 224 px only"):
        train_pytorch_model(tmp_path / "vit", image_dirs["train"], image_dirs["val"], tmp_path / "v", image_size=64)
    r = run_cli("image-model", "--model-name", "timm/resnet18", "--output", tmp_path / "offline", check=False,
                env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert r.returncode == 1 and "WeightsUnavailableError: pretrained weights for timm/resnet18 are not cached" in \
        r.stderr and "models--timm--resnet18" in r.stderr and "--no-pretrained" in r.stderr
    # no network, downloads allowed: one line at once, not the Hub client's half a minute of retries
    r = run_cli("image-model", "--model-name", "timm/resnet18", "--output", tmp_path / "offline", check=False,
                env={"HF_HUB_CACHE": str(tmp_path / "hub"), "IMGTRAIN_OFFLINE": "0",
                     "HF_ENDPOINT": "https://hub.imgtrain-test.invalid"})
    assert r.returncode == 1 and r.stderr.startswith("error: WeightsUnavailableError: pretrained weights for "
                                                     "timm/resnet18 are not cached and the Hugging Face Hub cannot "
                                                     "be reached (hub.imgtrain-test.invalid: "), r.stderr
    assert len(r.stderr.splitlines()) == 1 and "models--timm--resnet18" in r.stderr
    listed = cli_in_process("list-models", "timm/convnext_n*", "--quiet")
    assert listed.returncode == 0 and "timm/convnext_nano " in listed.stdout


def test_timm_names_without_timm_say_how_to_install_it(tmp_path):
    """timm made unimportable (a package of that name that fails to import, first on the path)."""
    shadow = tmp_path / "shadow" / "timm"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'timm'\")\n")
    r = run_cli("image-model", "--model-name", "timm/convnext_nano", "--no-pretrained", "--output", tmp_path / "m",
                check=False, env={"PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"),
                                                                  *filter(None, [os.environ.get("PYTHONPATH")])])})
    assert r.returncode == 1 and r.stderr.strip() == (
        "error: MissingDependencyError: timm's models (timm/NAME) need timm, which is not installed. install it "
        "with `pip install 'imgtrain[timm]'`")
