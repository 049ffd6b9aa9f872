"""imgtrain explain: the saliency is real (a model that must look at one corner is seen looking there)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from imgtrain import convert_to_image_directory, image_model, split_image_directory, train_pytorch_model

captum = pytest.importorskip("captum")

SIDE, MARK = 64, 12  # the marker: a MARK x MARK square in the top-left corner of a SIDE x SIDE image


def _marked_folder(root: Path, per_class: int = 60) -> Path:
    """Noisy pictures with a few random bright blobs anywhere; class 'marked' has a red square in the top-left
    corner, class 'plain' does not: the corner alone tells them apart."""
    rng = np.random.default_rng(0)
    for label in ("marked", "plain"):
        (root / label).mkdir(parents=True)
        for n in range(per_class):
            pixels = rng.normal(110, 35, size=(SIDE, SIDE, 3))
            for _ in range(3):  # distractors, away from the corner
                y, x = rng.integers(MARK + 4, SIDE - 10, size=2)
                pixels[y:y + 8, x:x + 8] = rng.integers(0, 255, size=3)
            if label == "marked":
                pixels[:MARK, :MARK] = (230, 20, 20)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / label / f"{n:03d}.png")
    return root


@pytest.fixture(scope="module")
def corner_model(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corner")
    convert_to_image_directory(_marked_folder(root / "folder"), root / "all")
    split_image_directory(root / "all", root / "train", root / "val", fraction=0.75)
    image_model(root / "untrained", model_name="resnet18", pretrained=False)
    result = train_pytorch_model(root / "untrained", root / "train", root / "val", root / "model", epochs=4,
                                 image_size=SIDE, num_workers=0, precision="fp32", log=lambda m: None)
    assert max(m.validation_top1_accuracy for m in result.history) >= 0.95
    return {"root": root, "model": root / "model", "val": root / "val"}


def test_a_model_that_must_look_at_a_corner_is_seen_looking_there(corner_model, tmp_path):
    from imgtrain import explain

    out = tmp_path / "explained"
    found = explain(corner_model["model"], corner_model["val"], out, images=30, log=lambda m: None)
    marked = [e for e in found if e.truth == "marked" and e.predicted == "marked"]
    assert len(marked) >= 10 and all(e.method == "Grad-CAM" for e in found)
    quarter = SIDE // 2
    # The map's mass above its own floor (its median: Grad-CAM leaves a faint haze everywhere), and its peak
    above = [np.clip(e.saliency - np.median(e.saliency), 0, None) for e in marked]
    shares = [a[:quarter, :quarter].sum() / a.sum() for a in above]
    peaks = [np.unravel_index(e.saliency.argmax(), e.saliency.shape) for e in marked]
    print(f"saliency mass in the top-left quarter: median {np.median(shares):.2f}, min {min(shares):.2f}")
    assert np.median(shares) > 0.6 and min(shares) > 0.4  # a uniform map puts 0.25 there
    assert all(y < quarter and x < quarter for y, x in peaks)
    assert (out / "index.html").is_file() and len(list(out.glob("*.png"))) == len(found)
    page = (out / "index.html").read_text()
    assert page.count("<figure") == len(found) and "Grad-CAM" in page
    picture = np.asarray(Image.open(out / "000.png").convert("RGB"))
    assert picture.shape[1] > picture.shape[0]  # the image beside its overlay
    listed = json.loads((out / "explanations.json").read_text())  # what the page of `imgtrain ui` reads
    assert [(x["file"], x["image"], x["truth"], x["predicted"], x["method"]) for x in listed] == [
        (f"{n:03d}.png", e.image, e.truth, e.predicted, e.method) for n, e in enumerate(found)]


def test_transformers_get_integrated_gradients_and_the_cli_names_mistakes_first(corner_model, tmp_path,
                                                                                 cli_in_process):
    from imgtrain.models.registry import build_model
    from imgtrain.scoring.explain import method_for, saliency

    vit = build_model("vit_b_32", 2, image_size=64)
    torch.nn.init.normal_(vit.heads.head.weight)  # torchvision starts the head at zero: no gradient at all
    assert method_for(vit) == "integrated gradients" and method_for(build_model("resnet18", 2)) == "Grad-CAM"
    maps = saliency(vit.eval(), torch.rand(2, 3, 64, 64, requires_grad=True), [0, 1], "integrated gradients")
    assert maps.shape == (2, 64, 64) and np.isclose(maps.max(), 1.0) and (maps >= 0).all()
    r = run_cli("explain", "--trained-model", corner_model["model"], "--dataset", corner_model["val"], "--images",
                "3", "--output", tmp_path / "e")
    assert "Explanations of 3 images written to" in r.stderr
    again = cli_in_process("explain", "--trained-model", corner_model["model"], "--dataset", corner_model["val"],
                           "--output", tmp_path / "e")
    assert again.returncode == 1 and "OutputExistsError" in again.stderr
    if not torch.cuda.is_available():  # tests/test_cuda.py explains on a GPU where there is one
        gpu = cli_in_process("explain", "--trained-model", corner_model["model"], "--dataset", corner_model["val"],
                             "--output", tmp_path / "g", "--device", "cuda")
        assert gpu.returncode == 1 and "no CUDA GPU is available" in gpu.stderr and "Traceback" not in gpu.stderr
        assert not (tmp_path / "g").exists()
