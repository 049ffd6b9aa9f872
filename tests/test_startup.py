"""Commands that compute no tensors answer at once: they never import torch, torchvision or scikit-learn.

(How fast they start is measured in bench/, "start-up"; here, only what they import.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_models import place_fake_imagenet_weights

HEAVY = ("torch", "torchvision", "sklearn", "scipy", "matplotlib.pyplot")

_PROBE = f"""
import json, sys
from imgtrain.cli import main
code = main(sys.argv[1:])
print(json.dumps({{"code": code, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def imports_of(*args) -> dict:
    r = subprocess.run([sys.executable, "-c", _PROBE, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def scored(tmp_path_factory, trained_model, image_dirs):
    from imgtrain import score_image_model

    out = tmp_path_factory.mktemp("scored") / "s"
    score_image_model(trained_model, image_dirs["val"], out, num_workers=0, log=lambda m: None)
    return out


def test_light_commands_import_no_torch(tmp_path, labelled_folder, image_dirs, scored, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    place_fake_imagenet_weights("resnet18")  # cached weights: nothing to download, so no torch either
    for args in [
        ("convert-to-image-directory", labelled_folder, "--output", tmp_path / "all"),
        ("split-image-directory", image_dirs["all"], "--output-a", tmp_path / "a", "--output-b", tmp_path / "b"),
        ("resnet", "--model-name", "resnet18", "--no-pretrained", "--output", tmp_path / "r1"),
        ("resnet", "--model-name", "resnet18", "--output", tmp_path / "r2"),
        ("densenet", "--model-name", "densenet121", "--no-pretrained", "--output", tmp_path / "d"),
        ("evaluate-model", "--scored-dataset", scored, "--output", tmp_path / "e"),
        ("init-image-transformation", "--output", tmp_path / "t"),
        ("pipeline", "show", Path(__file__).parent.parent / "examples" / "pipeline.yaml"),
    ]:
        result = imports_of(*args)
        assert result == {"code": 0, "heavy": []}, (args, result)


def test_weights_cache_path_is_torchs(tmp_path, monkeypatch):
    import torch.hub

    from imgtrain.models.weights import torch_hub_dir

    for env in ({"TORCH_HOME": str(tmp_path / "t")}, {"XDG_CACHE_HOME": str(tmp_path / "x")}, {}):
        for name in ("TORCH_HOME", "XDG_CACHE_HOME"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        probe = subprocess.run([sys.executable, "-c", "from imgtrain.models.weights import torch_hub_dir as d; "
                                "import sys; print(d()); print('torch' in sys.modules)"],
                               capture_output=True, text=True, check=True).stdout.split()
        assert probe == [torch.hub.get_dir(), "False"]  # the same folder, found without importing torch
        assert str(torch_hub_dir()) == torch.hub.get_dir()


def test_the_layers_point_one_way(trained_model):
    """Scoring needs nothing of training; reading a model directory needs nothing of models/ (which
    builds networks from it)."""
    probe = f"""
import sys
from imgtrain.directories.model_directory import load_model_spec
load_model_spec({str(trained_model)!r}, need_trained=True)
after_directories = sorted(m for m in sys.modules if m.startswith("imgtrain.models"))
import imgtrain.scoring.score, imgtrain.scoring.evaluate
print(after_directories, sorted(m for m in sys.modules if m.startswith("imgtrain.training")))
"""
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[] []", r.stdout


def test_the_benchmarks_help_lists_every_section():
    """bench/run.py --help (its section list once held a bare %, which argparse took for a format)."""
    bench = Path(__file__).resolve().parent.parent / "bench"
    r = subprocess.run([sys.executable, str(bench / "run.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "serve:" in r.stdout and "zoo:" in r.stdout


def test_only_the_command_line_imports_the_web_page():
    """imgtrain.ui is a room on top: it uses the modules; no module uses it (the CLI starts it)."""
    import re
    from pathlib import Path

    src = Path(__file__).resolve().parent.parent / "src" / "imgtrain"
    users = sorted(str(p.relative_to(src)) for p in src.rglob("*.py")
                   if "ui" not in p.relative_to(src).parts[:1] and re.search(r"imgtrain\.ui\b", p.read_text()))
    assert users == ["cli.py"]
