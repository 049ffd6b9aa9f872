"""Score Image Model and Evaluate Model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import make_labelled_folder
from imgtrain import evaluate_model, score_image_model
from imgtrain.errors import InvalidDatasetError, InvalidModelDirectoryError, NotLabeledDatasetError

QUIET = {"log": lambda m: None}


def read_scored(path):
    with open(path / "scored.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_scores_an_image_directory(tmp_path, trained_model, image_dirs):
    result = score_image_model(trained_model, image_dirs["val"], tmp_path / "s", batch_size=4, num_workers=0,
                               **QUIET)
    rows = read_scored(tmp_path / "s")
    assert result.num_images == len(rows) == 9
    assert list(rows[0]) == ["id", "image", "category", "Scored Probabilities_bright", "Scored Probabilities_dark",
                             "Scored Probabilities_mid", "Scored Labels"]
    probs = np.array([[float(r[f"Scored Probabilities_{c}"]) for c in ("bright", "dark", "mid")] for r in rows])
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    assert [r["Scored Labels"] for r in rows] == [("bright", "dark", "mid")[i] for i in probs.argmax(axis=1)]
    assert sum(r["Scored Labels"] == r["category"] for r in rows) >= 8


def test_scores_plain_folders(tmp_path, trained_model):
    labelled = make_labelled_folder(tmp_path / "new", per_class=2, seed=5)
    score_image_model(trained_model, labelled, tmp_path / "s1", num_workers=0, **QUIET)
    rows = read_scored(tmp_path / "s1")
    assert len(rows) == 6 and rows[0]["image"] == "bright/000.png" and rows[0]["category"] == "bright"
    score_image_model(trained_model, labelled / "dark", tmp_path / "s2", num_workers=0, **QUIET)
    rows = read_scored(tmp_path / "s2")
    assert len(rows) == 2 and "category" not in rows[0] and "id" not in rows[0]
    with pytest.raises(NotLabeledDatasetError, match="no true labels"):
        evaluate_model(tmp_path / "s2", tmp_path / "e", **QUIET)
    assert not (tmp_path / "e").exists()


def test_score_refuses_an_untrained_model_and_empty_folders(tmp_path, image_dirs, trained_model):
    with pytest.raises(InvalidModelDirectoryError, match="untrained"):
        score_image_model(image_dirs["untrained"], image_dirs["val"], tmp_path / "s", **QUIET)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidDatasetError, match="no image found"):
        score_image_model(trained_model, tmp_path / "empty", tmp_path / "s", **QUIET)


def test_evaluate_metrics_and_confusion_matrix(tmp_path):
    scored = tmp_path / "scored"
    scored.mkdir()
    truth = ["a", "a", "a", "b", "b", "c"]
    predicted = ["a", "a", "b", "b", "b", "a"]
    with open(scored / "scored.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "category", "Scored Probabilities_a", "Scored Probabilities_b",
                    "Scored Probabilities_c", "Scored Labels"])
        for i, (t, p) in enumerate(zip(truth, predicted, strict=True)):
            w.writerow([f"{i}.png", t, 0.5, 0.3, 0.2, p])
    metrics = evaluate_model(scored, tmp_path / "eval", **QUIET)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["precision_micro"] == metrics["recall_micro"] == pytest.approx(4 / 6)
    # per class: a: P 2/3 R 2/3; b: P 2/3 R 1; c: P 0 R 0
    assert metrics["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert metrics["precision_macro"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert metrics["recall_macro"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert metrics["confusion_matrix"]["counts"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert metrics["confusion_matrix"]["normalized"][0] == pytest.approx([2 / 3, 1 / 3, 0])
    on_disk = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert on_disk["accuracy"] == metrics["accuracy"]
    assert (tmp_path / "eval" / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
