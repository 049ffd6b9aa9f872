"""Init Image Transformation and Apply Image Transformation: the designer's format both ways, the modes,
seeded random operations, real grayscale, and named errors for what is not a transformation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from imgtrain.data.transformation import apply_image_transformation, init_image_transformation
from imgtrain.directories.image_directory import ImageDirectory
from imgtrain.errors import InvalidTransformationDirectoryError


def test_init_writes_the_designers_files(tmp_path):
    init_image_transformation(tmp_path / "defaults")
    assert json.loads((tmp_path / "defaults" / "_transforms.json").read_text()) == [
        ["Resize", 256], ["CenterCrop", 224], ["RandomHorizontalFlip", {}]]
    assert (tmp_path / "defaults" / "_meta.yaml").read_text() == (
        "type: TransformationDirectory\nextension: {}\ntransform_type: Image\n")
    # the designer's own example, from the command line
    run_cli("init-image-transformation", "--size", "40", "--crop-size", "32", "--pad", "--padding", "2",
            "--color-jitter", "--random-rotation", "--random-rotation-degrees", "10", "--output", tmp_path / "t")
    assert json.loads((tmp_path / "t" / "_transforms.json").read_text()) == [
        ["Resize", 40], ["CenterCrop", 32], ["Pad", 2], ["ColorJitter", {}], ["RandomHorizontalFlip", {}],
        ["RandomRotation", 10]]
    r = run_cli("init-image-transformation", "--no-resize", "--no-center-crop", "--no-random-horizontal-flip",
                "--output", tmp_path / "none")
    assert json.loads((tmp_path / "none" / "_transforms.json").read_text()) == []
    assert r.stdout.strip() == f"Image transformation (no operation) written to {tmp_path / 'none'}"
    r = run_cli("init-image-transformation", "--random-rotation-degrees", "200", "--output", tmp_path / "x",
                check=False)
    assert r.returncode == 1 and "--random-rotation-degrees is 200" in r.stderr and not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def coloured(tmp_path_factory):
    """An ImageDirectory of 6 colourful, asymmetric images (a red left half, a blue right half)."""
    from imgtrain import convert_to_image_directory

    root = tmp_path_factory.mktemp("coloured")
    for k in range(6):
        pixels = np.zeros((48, 64, 3), dtype=np.uint8)
        pixels[:, :32] = (220, 30, 30)
        pixels[:, 32:] = (30, 30, 200 - 10 * k)
        path = root / "src" / ("a" if k % 2 else "b") / f"{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    convert_to_image_directory(root / "src", root / "images", log=lambda m: None)
    return root


def _pixels(directory, i: int) -> np.ndarray:
    data = ImageDirectory.load(directory)
    return np.asarray(Image.open(data.path(i)))


def test_apply_keeps_ids_and_categories_and_drops_random_operations_at_inference(coloured, tmp_path):
    t = tmp_path / "t"
    init_image_transformation(t, size=32, crop_size=24, random_horizontal_flip=True, random_vertical_flip=True)
    source = ImageDirectory.load(coloured / "images")
    inference = apply_image_transformation(t, coloured / "images", tmp_path / "inference", mode="inference",
                                           log=lambda m: None)
    assert inference.ids.tolist() == source.ids.tolist() and inference.categories == source.categories
    assert inference.labels.tolist() == source.labels.tolist()
    assert all(f.endswith(".png") for f in inference.files)
    for i in range(len(inference)):
        pixels = _pixels(tmp_path / "inference", i)
        assert pixels.shape == (24, 24, 3) and inference.sizes[i].tolist() == [24, 24]
        assert pixels[12, 2, 0] > 150 and pixels[12, 21, 2] > 100  # red stays left, blue right: nothing flipped
    # training: seeded flips, some images flipped, the same files again with the same seed
    first = apply_image_transformation(t, coloured / "images", tmp_path / "train1", random_seed=3,
                                       log=lambda m: None)
    again = apply_image_transformation(t, coloured / "images", tmp_path / "train2", random_seed=3,
                                       log=lambda m: None)
    assert first.digests == again.digests
    flipped = [_pixels(tmp_path / "train1", i)[12, 2, 0] < 100 for i in range(len(first))]
    assert any(flipped) and not all(flipped)


def test_grayscale_really_converts_and_designer_modes_are_understood(coloured, tmp_path):
    t = tmp_path / "t"
    run_cli("init-image-transformation", "--no-resize", "--no-center-crop", "--grayscale", "--output", t)
    apply_image_transformation(t, coloured / "images", tmp_path / "grey", mode="For inference", log=lambda m: None)
    pixels = _pixels(tmp_path / "grey", 0).astype(int)
    assert pixels.shape == (48, 64, 3) and (pixels[..., 0] == pixels[..., 1]).all() and pixels.std() > 10


def test_what_is_not_a_transformation_is_a_named_error(coloured, tmp_path):
    t = tmp_path / "t"
    init_image_transformation(t)
    for path, message in [(coloured / "images", r"is not a TransformationDirectory \(its type is 'ImageDirectory'\)"),
                          (tmp_path / "missing", "does not exist")]:
        with pytest.raises(InvalidTransformationDirectoryError, match=message):
            apply_image_transformation(path, coloured / "images", tmp_path / "o", log=lambda m: None)
    for content, message in [
        ('[["os.system", "rm -rf /"]]', "'os.system' is not an image operation imgtrain knows"),
        ('[["Resize", "256"]]', r"Resize's argument is '256', not a number >= 0 \(size\)"),
        ('[["Resize", {"interpolation": "__import__"}]]', "Resize takes no 'interpolation'"),
        ('[["RandomHorizontalFlip", 0.5]]', "not an object"),
        ('{"Resize": 256}', "not a list"),
        ("not json", "cannot be read"),
    ]:
        (t / "_transforms.json").write_text(content)
        with pytest.raises(InvalidTransformationDirectoryError, match=message):
            apply_image_transformation(t, coloured / "images", tmp_path / "o", log=lambda m: None)
    assert not (tmp_path / "o").exists()
    r = run_cli("apply-image-transformation", "--transformation", coloured / "images", "--dataset",
                coloured / "images", "--output", tmp_path / "o", check=False)
    assert r.returncode == 1 and r.stderr.startswith("error: InvalidTransformationDirectoryError: ")
    assert len(r.stderr.strip().splitlines()) == 1
    help_text = run_cli("apply-image-transformation", "--help").stdout
    assert "inference: drops the random ones (RandomResizedCrop" in " ".join(help_text.split())
    # an image smaller than a crop: named, with what to do (torchvision's ValueError came with a traceback)
    init_image_transformation(tmp_path / "crop", resize=False, center_crop=False, random_crop=True,
                              random_crop_size=56)
    r = run_cli("apply-image-transformation", "--transformation", tmp_path / "crop", "--dataset",
                coloured / "images", "--output", tmp_path / "o", check=False)
    error = r.stderr.splitlines()[-1]
    assert r.returncode == 1 and error.startswith("error: BadImageError: image ") and "64 x 48 px" in error
    assert "pad_if_needed" in error and "Traceback" not in r.stderr and not (tmp_path / "o").exists()


def test_the_sizes_a_transformation_makes():
    from imgtrain.data.transformation import ImageTransformation, TrainingTransformation
    from imgtrain.errors import InvalidParameterError

    def plan(image_size=None, **params):
        return TrainingTransformation.of(ImageTransformation(**params).operations(), image_size, lambda: 64)

    designer = plan()  # Resize 256, CenterCrop 224, RandomHorizontalFlip
    assert (designer.cached_size, designer.image_size) == (224, 224)
    assert [op.name for op in designer.fixed] == ["Resize", "CenterCrop"] == [op.name for op in designer.inference]
    assert [op.name for op in designer.random] == ["RandomHorizontalFlip"]
    crops = plan(center_crop=False, random_resized_crop=True, random_size=200)  # cached 256 squares, 200 crops
    assert (crops.cached_size, crops.image_size) == (256, 200) and [op.name for op in crops.inference] == ["Resize"]
    padded = plan(size=40, crop_size=32, pad=True, padding=4, random_crop=True, random_crop_size=32)
    assert (padded.cached_size, padded.image_size) == (40, 32)
    flips = plan(resize=False, center_crop=False)  # no size in it: the one asked for, else the fallback
    assert (flips.cached_size, flips.image_size) == (64, 64)
    assert plan(96, resize=False, center_crop=False).image_size == 96
    with pytest.raises(InvalidParameterError, match="96 disagrees with the transformation, whose operations make 224"):
        plan(96)


def test_a_size_hint_names_what_each_operation_makes():
    """The hint that says how to change a transformation to the size an architecture takes: where a Pad follows
    the crop, it names what the crop makes and what the Pad adds (it said the CenterCrop made the padded size);
    a RandomResizedCrop larger than the Resize before it needs no larger Resize (it resizes what it crops), a
    CenterCrop does (it would pad the picture with black)."""
    from imgtrain.data.transformation import ImageTransformation, TrainingTransformation
    from imgtrain.errors import speaking_command_line

    def hint(side: int, **params) -> str:
        operations = ImageTransformation(random_horizontal_flip=False, **params).operations()
        with speaking_command_line():
            return TrainingTransformation.of(operations, None, lambda: 64).size_hint(side)

    assert hint(48, size=30, crop_size=30, pad=True, padding=5) == (
        "make a transformation that leaves 48 x 48 images instead (this one leaves 40 x 40: its CenterCrop makes "
        "30 x 30, its Pad adds 10): init-image-transformation with --crop-size 38 and --size 38, its other "
        "parameters as before")
    assert hint(64, size=48, center_crop=False, random_resized_crop=True, random_size=40) == (
        "make a transformation that leaves 64 x 64 images instead (this one's RandomResizedCrop makes 40 x 40): "
        "init-image-transformation with --random-size 64, its other parameters as before")
    assert hint(64, size=48, crop_size=40).endswith("(this one's CenterCrop makes 40 x 40): init-image-transformation "
                                                    "with --crop-size 64 and --size 64, its other parameters as before")


def test_random_operations_are_seeded_per_image_and_epoch():
    import random

    import torch

    from imgtrain.data.transformation import ImageTransformation
    from imgtrain.data.transforms import RandomOperations

    ops = ImageTransformation(resize=False, center_crop=False, random_rotation=True, random_rotation_degrees=30,
                              random_erasing=True).operations()
    augment = RandomOperations(ops, 24)
    x = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    first, again = augment(x, random.Random(7)), augment(x, random.Random(7))
    assert first.shape == (3, 24, 24) and first.dtype == torch.uint8  # squashed to the model's size
    assert torch.equal(first, again) and not torch.equal(first, augment(x, random.Random(8)))
    assert torch.equal(torch.rand(1), before)  # torch's own generator is left as it was


@pytest.fixture(scope="module")
def trained_with_transformation(tmp_path_factory, image_dirs):
    from imgtrain import train_pytorch_model

    root = tmp_path_factory.mktemp("with-transformation")
    init_image_transformation(root / "t", size=40, crop_size=32, random_rotation=True, random_rotation_degrees=10)
    logged = []
    train_pytorch_model(image_dirs["untrained"], image_dirs["train"], image_dirs["val"], root / "model",
                        epochs=2, batch_size=8, num_workers=0, transformation=root / "t", log=logged.append)
    return root, logged


def test_training_with_a_transformation_records_and_scoring_applies_it(trained_with_transformation, image_dirs,
                                                                       tmp_path):
    import torch
    import yaml
    from torchvision.transforms.v2 import functional

    from imgtrain import predict
    from imgtrain.data.decode import load_rgb
    from imgtrain.data.transforms import Normalize
    from imgtrain.models.trained import load_trained_model

    root, logged = trained_with_transformation
    spec = yaml.safe_load((root / "model" / "model_spec.yaml").read_text())
    assert spec["input"]["image_size"] == 32  # the size the operations make, not the data's default
    assert spec["input"]["transformation"] == [["Resize", 40], ["CenterCrop", 32]]  # the random ones dropped
    assert spec["training"]["transformation"] == str(root / "t")
    assert any("Resize, CenterCrop once (32 px, cached), RandomHorizontalFlip, RandomRotation every epoch" in m
               for m in logged)
    assert any("augmentation the transformation's random operations" in m for m in logged)
    # Scoring applies the recorded operations by itself: the same as doing them by hand.
    model = load_trained_model(root / "model")
    data = ImageDirectory.load(image_dirs["val"])
    paths = [data.path(i) for i in range(3)]
    by_hand = torch.stack([functional.center_crop(functional.resize(functional.pil_to_tensor(load_rgb(p)), 40), 32)
                           for p in paths])
    normalize = Normalize(model.spec.input.mean, model.spec.input.std)
    with torch.inference_mode():
        expected = model.network.eval()(normalize(by_hand)).softmax(dim=1).numpy()
    answers = predict(model, paths, precision="fp32", device="cpu")  # where `expected` was computed
    got = np.array([[a.probabilities[label] for label in model.labels] for a in answers])
    assert np.allclose(got, expected, atol=1e-5)


def test_the_endpoint_applies_the_recorded_transformation(trained_with_transformation, image_dirs):
    """`imgtrain serve` decodes in worker threads and runs the transformation's operations (torch) in its
    network's thread: its answers are predict's."""
    import asyncio

    from imgtrain import load_trained_model, predict
    from imgtrain.deploy.serve import Endpoint, ServeOptions

    root, _ = trained_with_transformation
    model = load_trained_model(root / "model")
    data = ImageDirectory.load(image_dirs["val"])
    paths = [data.path(i) for i in range(3)]
    answers = predict(model, paths, precision="fp32")
    expected = np.array([[a.probabilities[label] for label in model.labels] for a in answers])
    endpoint = Endpoint(root / "model", "t", ServeOptions(precision="fp32"), log=lambda m: None)
    try:
        assert not endpoint.preparation.plain
        got = asyncio.run(endpoint.probabilities([p.read_bytes() for p in paths], [p.name for p in paths]))
    finally:
        endpoint.close()
    assert np.allclose(got, expected, atol=1e-5)


def test_an_image_that_fits_the_decoding_budget_alone_is_decoded_and_one_that_does_not_is_named(
        trained_with_transformation):
    """A model with a transformation keeps each image's decoded picture until the request is answered. One image
    is decoded once at a time, so its own decode is all it needs (its picture was counted on top of it: an image
    that fitted got 413, 'send fewer in a request', which a request of one cannot follow); one that does not fit
    is a bad image (400), as the README says."""
    import asyncio
    import io

    from imgtrain.deploy.serve import Endpoint, RequestError, ServeOptions

    root, _ = trained_with_transformation
    out = io.BytesIO()
    Image.new("RGBA", (2000, 2000), (10, 200, 30, 128)).save(out, "PNG")  # takes 35 MB to decode, its picture 15
    said = {}
    for limit in (40, 30):
        endpoint = Endpoint(root / "model", "t", ServeOptions(max_decode_mb=limit, precision="fp32", device="cpu"),
                            log=lambda m: None)
        try:
            said[limit] = asyncio.run(endpoint.probabilities([out.getvalue()], ["big.png"])).shape
        except RequestError as exc:
            said[limit] = (exc.status, exc.message)
        finally:
            endpoint.close()
    assert said == {40: (1, 3), 30: (400, "big.png: too large to decode: 2000 x 2000 pixels in mode RGBA take 35 MB "
                                          "to decode, over the limit of 30 MB")}


def test_the_exported_preprocess_refuses_a_model_with_a_transformation(trained_with_transformation, image_dirs,
                                                                       tmp_path):
    """preprocess() squashes the whole picture, as a model without a transformation takes it: for one with a
    Resize 40 and a CenterCrop 32 it gave probabilities up to 0.085 from scoring's, and other labels, without a
    word. It now refuses, naming the operations and what to do (rgb(), then them: the test above)."""
    import importlib.util

    from imgtrain.deploy.export import export_model

    root, _ = trained_with_transformation
    export_model(root / "model", tmp_path / "onnx", log=lambda m: None)
    spec = importlib.util.spec_from_file_location("preprocess", tmp_path / "onnx" / "preprocess.py")
    preprocess = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preprocess)
    image = ImageDirectory.load(image_dirs["val"]).path(0)
    with pytest.raises(ValueError) as caught:
        preprocess.preprocess(image, 32)
    assert str(caught.value) == (
        "this model was trained with a transformation, [['Resize', 40], ['CenterCrop', 32]], which preprocess() "
        "does not apply (it squashes the whole picture, as a model without one takes it): decode with "
        "rgb(source, draft_size), then apply those torchvision.transforms.v2 operations to the uint8 image, as the "
        "metadata's 'resize' says")
    assert preprocess.rgb(image, 40).mode == "RGB"


def test_an_exported_transformation_model_fed_by_its_metadata_answers_as_scoring(trained_with_transformation,
                                                                                 tmp_path):
    """Large JPEGs decoded at the scale the metadata's draft_size says (the Resize's 40 px), then the operations
    of ``transformation``: the ONNX graph gives predict's probabilities (a full decode gave other ones)."""
    import importlib.util

    import onnxruntime
    import torch
    from torchvision.transforms import v2

    from imgtrain import predict
    from imgtrain.deploy.export import export_model
    from test_deploy import _photos

    root, _ = trained_with_transformation
    paths = _photos(tmp_path / "photos", count=4)
    answers = predict(root / "model", paths, precision="fp32", device="cpu")
    expected = np.array([list(a.probabilities.values()) for a in answers])
    export_model(root / "model", tmp_path / "onnx", log=lambda m: None)
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["draft_size"] == "40" and json.loads(meta["transformation"]) == [["Resize", 40], ["CenterCrop", 32]]
    spec = importlib.util.spec_from_file_location("preprocess", tmp_path / "onnx" / "preprocess.py")
    preprocess = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preprocess)
    operations = v2.Compose([getattr(v2, name)(argument) for name, argument in json.loads(meta["transformation"])])
    x = torch.stack([operations(v2.functional.pil_to_tensor(preprocess.rgb(p, int(meta["draft_size"]))))
                     for p in paths])
    got = session.run(["probabilities"], {"images": x.permute(0, 2, 3, 1).contiguous().numpy()})[0]
    assert np.abs(got - expected).max() < 1e-5


def test_a_transformation_trains_deterministically_and_is_named_when_wrong(trained_with_transformation, image_dirs,
                                                                            tmp_path, cli_in_process):
    from imgtrain import train_pytorch_model

    class Interrupt(BaseException):
        pass

    def interrupt_after_epoch_1(message: str) -> None:
        if message.startswith("epoch 1/"):
            raise Interrupt

    # Interrupted after epoch 1, resumed, with worker processes this time: the very weights of the
    # uninterrupted run in one process (the random operations draw by image and epoch, not by worker).
    root, _ = trained_with_transformation
    args = (image_dirs["untrained"], image_dirs["train"], image_dirs["val"], tmp_path / "again")
    with pytest.raises(Interrupt):
        train_pytorch_model(*args, epochs=2, batch_size=8, num_workers=2, transformation=root / "t",
                            log=interrupt_after_epoch_1)
    train_pytorch_model(*args, epochs=2, batch_size=8, num_workers=2, transformation=root / "t", resume=True,
                        log=lambda m: None)
    weights = (tmp_path / "again" / "model.safetensors").read_bytes()
    assert weights == (root / "model" / "model.safetensors").read_bytes()
    common = ["train-pytorch-model", "--untrained-model", image_dirs["untrained"], "--training-data",
              image_dirs["train"], "--validation-data", image_dirs["val"], "--transformation"]
    for extra, message in [(["--augmentation", "shift-flip"], "shift-flip and --transformation both augment"),
                           (["--image-size", "64"], "--image-size 64 disagrees with"),
                           ([], "is not a TransformationDirectory")]:
        given = image_dirs["val"] if not extra else root / "t"
        r = cli_in_process(*common, given, *extra, "--output", tmp_path / "x")
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "x").exists()


def _windows(picture: np.ndarray, crop: np.ndarray) -> list[tuple[int, int]]:
    """Where ``crop`` (C x h x w) sits in ``picture`` (C x H x W) as a sub-window of its very pixels."""
    h, w = crop.shape[-2:]
    return [(y, x) for y in range(picture.shape[1] - h + 1) for x in range(picture.shape[2] - w + 1)
            if np.array_equal(picture[:, y:y + h, x:x + w], crop)]


def test_a_random_crop_crops_the_picture_anew_every_epoch(tmp_path, image_dirs):
    """RandomCrop alone, as Apply Image Transformation runs it: a 32 px window of the picture, another one
    every epoch (training squashed each picture to 32 px first, so the crop took the whole of it, the
    same every epoch). The cache keeps the picture as the fixed operations leave it, whatever its shape;
    a picture smaller than the crop is a bad image, named with its size."""
    import torch

    from imgtrain import convert_to_image_directory, train_pytorch_model
    from imgtrain.data.loading import open_caches
    from imgtrain.distributed import ALONE
    from imgtrain.training.train import TrainingParameters, _feeders, _Run

    rng = np.random.default_rng(5)
    for name, sizes in (("a", [(40, 56), (44, 44)]), ("b", [(36, 48), (24, 24), (48, 40)])):
        for n, (h, w) in enumerate(sizes):
            (tmp_path / "src" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "src" / name / f"{n}.png")
    convert_to_image_directory(tmp_path / "src", tmp_path / "data", log=lambda m: None)
    data = ImageDirectory.load(tmp_path / "data")
    init_image_transformation(tmp_path / "t", resize=False, center_crop=False, random_horizontal_flip=False,
                              random_crop=True, random_crop_size=32)
    params = TrainingParameters(transformation=tmp_path / "t", batch_size=2, num_workers=0)
    run = _Run.of(image_dirs["untrained"], tmp_path / "data", tmp_path / "data", tmp_path / "m", params,
                  torch.device("cpu"), ALONE)
    assert run.image_size == 32
    said: list[str] = []
    feed, _, bad = _feeders(run, {}, said.append)
    images = feed.images
    big = [i for i in range(len(data)) if Image.open(data.path(i)).size == (56, 40)][0]
    picture = np.asarray(Image.open(data.path(big))).transpose(2, 0, 1)
    draws = [images[(big, seed)] for seed in range(6)]
    assert all(ok and x.shape == (3, 32, 32) for x, _, _, ok in draws)
    where = [_windows(picture, x.numpy()) for x, _, _, _ in draws]
    assert all(len(w) == 1 for w in where), "a crop is a window of the picture's own pixels, not a squashed whole"
    assert len({w[0] for w in where}) > 1, "another window in another epoch"

    # The cache keeps the picture itself (its own shape), and the draws from it are the same windows.
    (tmp_path / "work").mkdir()
    caches = open_caches(tmp_path / "work", {"training": (len(data), run.cached_size, run.cached_shapes)},
                         make=True, shared=True, barrier=lambda: None, log=said.append)
    feed, _, bad = _feeders(run, caches, said.append)
    for seed in range(6):
        assert torch.equal(feed.images[(big, seed)][0], draws[seed][0])
    assert np.array_equal(caches["training"].get(big).numpy(), picture)

    # A picture smaller than the crop: left out and named (skip), or the error (fail), with its size.
    small = [i for i in range(len(data)) if Image.open(data.path(i)).size == (24, 24)][0]
    x, y, index, ok = torch.utils.data.default_collate([feed.images[(small, 0)], feed.images[(big, 0)]])
    assert ok.tolist() == [False, True]
    assert bad["training"].filter([x, y, index, ok])[2].tolist() == [big]
    [warning] = [m for m in said if m.startswith("warning: skipping")]
    assert f"{data.path(small)}: the transformation's random operations cannot take it as its fixed ones " \
           "leave it, 24 x 24 px (Required crop size (32, 32) is larger than input image size (24, 24))" in warning

    # A real run, with worker processes sharing the cache: the weights of a run without them.
    weights = []
    for workers in (0, 2):
        train_pytorch_model(image_dirs["untrained"], tmp_path / "data", tmp_path / "data", tmp_path / f"m{workers}",
                            epochs=1, batch_size=2, num_workers=workers, transformation=tmp_path / "t",
                            log=said.append)
        weights.append((tmp_path / f"m{workers}" / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]
    assert "transformation " + str(tmp_path / "t") + ": nothing once (each picture in the shape they leave, " \
           "cached up to 8,192 pixels), RandomCrop every epoch; scoring applies nothing" in said


def test_a_one_channel_grayscale_trains_alike_with_and_without_the_cache(tmp_path, image_dirs):
    """["Grayscale", {"num_output_channels": 1}] (the designer's Init writes 3): every image it prepares is one
    grey channel thrice, as Grayscale with 3 makes it, with the decoded-image cache or without it (the cache
    refused the one-channel validation images with a ValueError and a traceback). The trained model scores."""
    from imgtrain import score_image_model, train_pytorch_model
    from imgtrain.data.transforms import Preparation
    from imgtrain.directories.transformation_directory import Operation, write_transformation

    fixed = [Operation("Resize", 40), Operation("Grayscale", {"num_output_channels": 1})]
    d, results = image_dirs, []
    x = Preparation(32, fixed).load(ImageDirectory.load(d["val"]).path(0))
    assert x.shape == (3, 32, 32) and bool((x == x[0]).all())
    (tmp_path / "t").mkdir()
    write_transformation(tmp_path / "t", [*fixed, Operation("RandomCrop", 32)])
    for cache in (True, False):
        results.append(train_pytorch_model(d["untrained"], d["train"], d["val"], tmp_path / f"m{cache}", epochs=2,
                                           batch_size=8, num_workers=0, precision="fp32", cache=cache,
                                           transformation=tmp_path / "t", log=lambda m: None))
    assert [m.train_loss for m in results[0].history] == [m.train_loss for m in results[1].history]
    assert [m.validation_loss for m in results[0].history] == [m.validation_loss for m in results[1].history]
    scored = score_image_model(tmp_path / "mTrue", d["val"], tmp_path / "scored", log=lambda m: None)
    assert scored.num_images == len(ImageDirectory.load(d["val"]))
