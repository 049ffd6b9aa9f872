"""The HTML reports: what they hold, that they are self-contained, and what a browser shows of them."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_labelled_folder, run_cli
from imgtrain import evaluate_model, score_image_model

CHROMIUM_MISSING = ("Debian's chromium is not installed: the reports are not rendered. Install it with "
                    "`apt-get install -y chromium` (`.ci/run` does) to run this test")


@pytest.fixture(scope="module")
def reports(tmp_path_factory, trained_model) -> dict[str, Path]:
    """A trained model's report, and the evaluation of images it gets wrong: validation images whose
    dark and mid folders were swapped, so that the model is confidently wrong on them."""
    root = tmp_path_factory.mktemp("reports")
    swapped = make_labelled_folder(root / "swapped", per_class=4, seed=5, swap={"dark": "mid", "mid": "dark"})
    score_image_model(trained_model, swapped, root / "scored", log=lambda m: None)
    evaluate_model(root / "scored", root / "evaluation", log=lambda m: None)
    run_cli("report", trained_model, "--scored-dataset", root / "scored", "--output", root / "combined.html")
    return {"training": trained_model / "report.html", "evaluation": root / "evaluation" / "report.html",
            "combined": root / "combined.html", "scored": root / "scored", "root": root}


def _self_contained(page: str) -> None:
    assert "<script" not in page.lower()  # reads without JavaScript
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page, re.I)  # fetches nothing
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)


def test_the_training_report_shows_the_run(reports, trained_model):
    page = reports["training"].read_text()
    _self_contained(page)
    assert "Training report: model" in page
    assert 'id="curves-figure"' in page and 'id="images-figure"' in page
    for label, count in [("bright", 9), ("dark", 9), ("mid", 9)]:  # the class table: training and validation
        assert re.search(rf"<td>{label}</td><td class=\"n\">{count}</td>", page), label
    assert "No image that training met was bad" in page
    assert "<td>class_weights</td><td>none</td>" in page and "<td>precision</td><td>fp32</td>" in page
    assert (trained_model / "training_images.png").is_file()
    grid = np.asarray(Image.open(trained_model / "training_images.png").convert("L"), dtype=float)
    assert grid.std() > 20  # images in it, not a blank canvas


def test_the_evaluation_report_shows_the_worst_mistakes(reports):
    page = reports["evaluation"].read_text()
    _self_contained(page)
    assert 'id="confusion-figure"' in page
    assert re.search(r"<td>dark</td>(<td class=\"n\">[0-9.]+</td>){3}<td class=\"n\">4</td>", page)
    mistakes = re.findall(r'<div class="mistake"><img src="data:image/png;base64,[^"]+" alt="([^"]+)">'
                          r"<div>.*?true: (\w+)<br>predicted: (\w+) \(([0-9.]+)%\)</div>", page)
    assert len(mistakes) >= 6, page[-3000:]  # the swapped dark and mid images
    assert all(true != predicted for _, true, predicted, _ in mistakes)
    confidence = [float(p) for *_, p in mistakes]
    assert confidence == sorted(confidence, reverse=True)  # the most confident first
    assert mistakes[0][0].startswith(("dark/", "mid/"))
    if importlib.util.find_spec("captum") is not None:  # imgtrain[explain]: where the model looked, for 8 of them
        explained = re.findall(r'<figure><img src="data:image/png;base64,[^"]+" alt="([^"]+)">', page.split(
            'id="explanations"')[1])
        assert explained == [m[0] for m in mistakes[:8]]


def test_report_combines_both_and_refuses_what_it_should(reports, trained_model, tmp_path):
    page = reports["combined"].read_text()
    _self_contained(page)
    assert "Report: model" in page and "Evaluation on scored" in page
    assert 'id="curves-figure"' in page and 'id="confusion-figure"' in page
    alone = tmp_path / "alone.html"
    r = run_cli("report", trained_model, "--output", alone)
    assert r.stdout.strip() == f"Report written to {alone}" and "confusion" not in alone.read_text()
    for args, start in [
        ([trained_model, "--output", alone], "error: OutputExistsError: output"),
        ([trained_model, "--output", trained_model / "r.html"], "error: OutputNotWritableError: the output"),
        ([reports["scored"], "--output", tmp_path / "x.html"], "error: InvalidModelDirectoryError:"),
        ([trained_model, "--scored-dataset", trained_model, "--output", tmp_path / "x.html"],
         "error: InvalidDatasetError:"),
        ([trained_model, "--output", tmp_path], "error: OutputNotWritableError: the output"),
    ]:
        r = run_cli("report", *args, check=False)
        assert r.returncode == 1 and r.stderr.startswith(start), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.html").exists()


def _chromium() -> str | None:
    for candidate in ("/usr/lib/chromium/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def screenshot(page: Path, out: Path, profile: Path, height: int) -> np.ndarray:
    """The page as headless Chromium draws it, an RGB array (the window is ``height`` px tall)."""
    browser = _chromium()
    if browser is None:
        pytest.skip(CHROMIUM_MISSING)
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--no-first-run", "--log-level=3", f"--user-data-dir={profile}",
                        f"--screenshot={out}", f"--window-size=1280,{height}", page.absolute().as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and out.is_file(), r.stderr[-2000:]
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)


def _pixels_near(shot: np.ndarray, colour: tuple[int, int, int], tolerance: int = 30) -> int:
    return int((np.abs(shot - np.array(colour)).max(axis=2) <= tolerance).sum())


BLUE, ORANGE, DARKEST_BLUES = (31, 119, 180), (255, 127, 14), (8, 48, 107)  # matplotlib's C0, C1; 'Blues' at 1


def test_a_browser_shows_the_plots(reports, tmp_path):
    """Render every page in headless Chromium and look at the screenshot's pixels: the curves (matplotlib's
    blue and orange lines), the confusion matrix (its darkest blue), the images. The same pages with their
    pictures taken out show none of it: the test can tell a page with plots from a blank one."""
    # The evaluation page without its saliency overlays (imgtrain[explain]), whose colour map has every colour
    evaluation = tmp_path / "evaluation.html"
    evaluation.write_text(re.sub(r'<h2 id="explanations">.*(?=</body>)', "", reports["evaluation"].read_text(),
                                 flags=re.S))
    pages = {"training": reports["training"], "evaluation": evaluation, "combined": reports["combined"]}
    shots = {name: screenshot(page, tmp_path / f"{name}.png", tmp_path / "profile", 4000)
             for name, page in pages.items()}
    blank = tmp_path / "combined-blank.html"  # the page that has every plot, with its pictures taken out
    blank.write_text(re.sub(r'src="data:image/png;base64,[^"]+"', 'src=""', reports["combined"].read_text()))
    shots["combined-blank"] = screenshot(blank, tmp_path / "combined-blank.png", tmp_path / "profile", 4000)
    for name, shot in shots.items():
        curves, matrix = _pixels_near(shot, BLUE) + _pixels_near(shot, ORANGE), _pixels_near(shot, DARKEST_BLUES, 20)
        inked = float((shot.min(axis=2) < 200).mean())  # share of pixels that are not near-white
        has_curves, has_matrix = name in ("training", "combined"), name in ("evaluation", "combined")
        print(f"{name}: curve pixels {curves}, matrix pixels {matrix}, inked {inked:.3f}")
        if name.endswith("-blank"):
            assert curves < 200 and matrix < 200, name
        else:
            assert (curves > 2000) == has_curves, (name, curves)
            assert (matrix > 2000) == has_matrix, (name, matrix)
            assert inked > 2 * float((shots["combined-blank"].min(axis=2) < 200).mean()), name
    # the curves sit in the top part of the training report, under the headline figures
    top = shots["training"][:1200]
    assert _pixels_near(top, BLUE) > 1000 and _pixels_near(top, ORANGE) > 1000


def test_images_gone_since_scoring_show_as_not_found(reports, tmp_path):
    """The scored table names images that were moved away: the report still comes, saying so."""
    moved = tmp_path / "scored"
    shutil.copytree(reports["scored"], moved)
    meta = (moved / "_meta.yaml").read_text()
    (moved / "_meta.yaml").write_text(re.sub(r"image_root: .*", f"image_root: {tmp_path / 'gone'}", meta))
    evaluate_model(moved, tmp_path / "evaluation", log=lambda m: None)
    page = (tmp_path / "evaluation" / "report.html").read_text()
    assert page.count("(image not found)") >= 6 and "true: dark" in page


def test_labels_and_names_are_text_and_a_missing_probability_goes_last():
    from imgtrain.reports.evaluation import evaluation_page, worst_mistakes
    from imgtrain.scoring.evaluate import classification_metrics, confusion_matrix

    labels = ['<b>"bold"</b>', "a&b"]
    truth, predicted = [labels[0], labels[1], labels[0]], [labels[1], labels[0], labels[1]]
    metrics = classification_metrics(confusion_matrix(truth, predicted, labels), labels)
    counts = confusion_matrix(truth, predicted, labels)
    metrics["confusion_matrix"] = {"labels": labels, "counts": counts.tolist(),
                                   "normalized": (counts / counts.sum(1, keepdims=True)).tolist()}
    mistakes = worst_mistakes(truth, predicted, np.array([0.6, np.nan, 0.9]), ["x/1.png", "<img src=x>", "x/3.png"],
                              root=None)
    assert [m.image for m in mistakes] == ["x/3.png", "x/1.png", "<img src=x>"]  # NaN last
    assert all(m.path is None for m in mistakes)  # relative names without a root are never guessed
    page = evaluation_page(metrics, mistakes).render()
    assert '<b>"bold"' not in page and "<img src=x>" not in page
    assert "&lt;b&gt;&quot;bold&quot;&lt;/b&gt;" in page and "a&amp;b" in page


def test_a_damaged_or_changed_model_gets_a_report_of_what_it_has(reports, trained_model, tmp_path):
    """A damaged training record is a warning and a page of what can be read, never a traceback; a model whose
    weights changed since it scored is refused by report and left unexplained by evaluate; missing weights are
    named."""
    import yaml
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(trained_model, model)
    (model / "metrics.csv").write_text((trained_model / "metrics.csv").read_text().splitlines()[0] + "\n")
    r = run_cli("report", model, "--output", tmp_path / "header-only.html")
    assert "warning: the training record of" in r.stderr and "cannot be read (ValueError" in r.stderr, r.stderr
    assert "No training curves" in (tmp_path / "header-only.html").read_text()
    shutil.copy(trained_model / "metrics.csv", model / "metrics.csv")
    spec = yaml.safe_load((model / "model_spec.yaml").read_text())
    spec["training"]["best_epoch"] = 99
    (model / "model_spec.yaml").write_text(yaml.safe_dump(spec))
    r = run_cli("report", model, "--output", tmp_path / "best-99.html")
    assert "best epoch 99 of" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # the model that scored, changed since (the same folder, other weights)
    shutil.copy(trained_model / "model_spec.yaml", model / "model_spec.yaml")
    score_image_model(model, reports["root"] / "swapped", tmp_path / "scored", log=lambda m: None)
    weights = load_file(model / "model.safetensors")
    weights["fc.bias"] = weights["fc.bias"] + 1
    save_file(weights, model / "model.safetensors")
    r = run_cli("report", model, "--scored-dataset", tmp_path / "scored", "--output", tmp_path / "x.html", check=False)
    assert r.returncode == 1 and r.stderr.startswith(f"error: InvalidDatasetError: the model {model} has changed "
                                                     f"since it scored {tmp_path / 'scored'} (other weights)"), r.stderr
    said: list[str] = []
    evaluate_model(tmp_path / "scored", tmp_path / "evaluation", log=said.append)
    assert any("has changed since it scored" in m and "leaves out where the model looked" in m for m in said), said
    (model / "model.safetensors").unlink()
    r = run_cli("report", model, "--scored-dataset", tmp_path / "scored", "--output", tmp_path / "x.html", check=False)
    assert r.returncode == 1 and r.stderr.startswith("error: InvalidModelDirectoryError: the weights "), r.stderr
    assert len(r.stderr.splitlines()) == 1
