"""Score Image Model and Evaluate Model."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from conftest import make_labelled_folder, run_cli
from imgtrain import evaluate_model, score_image_model
from imgtrain.errors import (
    InvalidDatasetError,
    InvalidModelDirectoryError,
    NotInRangeValueError,
    NotLabeledDatasetError,
)

QUIET = {"log": lambda m: None}


def read_scored(path):
    with open(path / "scored.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_scores_an_image_directory(tmp_path, trained_model, image_dirs):
    result = score_image_model(trained_model, image_dirs["val"], tmp_path / "s", batch_size=4, num_workers=0,
                               **QUIET)
    rows = read_scored(tmp_path / "s")
    assert result.num_images == len(rows) == 9
    assert list(rows[0]) == ["id", "image", "original_path", "category", "Scored Probabilities_bright",
                             "Scored Probabilities_dark", "Scored Probabilities_mid", "Scored Labels"]
    assert rows[0]["original_path"].startswith(rows[0]["category"] + "/")  # the file it was converted from
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


def test_scores_files_lists_and_globs(tmp_path, trained_model, labelled_folder):
    files = sorted((labelled_folder / "dark").glob("*.png"))[:2]
    score_image_model(trained_model, files[0], tmp_path / "one", num_workers=0, **QUIET)
    rows = read_scored(tmp_path / "one")
    assert [r["image"] for r in rows] == [str(files[0])] and rows[0]["Scored Labels"] == "dark"
    score_image_model(trained_model, [*files, str(labelled_folder / "bright" / "*.jpg")], tmp_path / "many",
                      num_workers=0, **QUIET)
    rows = read_scored(tmp_path / "many")
    jpgs = sorted((labelled_folder / "bright").glob("*.jpg"))
    assert [r["image"] for r in rows] == [str(p) for p in [*files, *jpgs]] and "category" not in rows[0]
    r = run_cli("score", "--trained-model", trained_model, "--dataset", *files, "--output", tmp_path / "cli",
                "--top-k", "2")
    assert "Scored 2 images" in r.stdout
    rows = read_scored(tmp_path / "cli")
    assert list(rows[0])[-4:] == ["Top 1 Label", "Top 1 Probability", "Top 2 Label", "Top 2 Probability"]
    for row in rows:
        assert row["Top 1 Label"] == row["Scored Labels"]
        assert float(row["Top 1 Probability"]) >= float(row["Top 2 Probability"])
        assert float(row["Top 2 Probability"]) == float(row[f"Scored Probabilities_{row['Top 2 Label']}"])
    for dataset, message in [(str(tmp_path / "*.gif"), "no image file or folder matches"),
                             (tmp_path / "missing.png", "does not exist")]:
        with pytest.raises(InvalidDatasetError, match=message):
            score_image_model(trained_model, dataset, tmp_path / "x", **QUIET)
    with pytest.raises(NotInRangeValueError, match=r"parameter top_k is 4, allowed: \[1, 3\]"):
        score_image_model(trained_model, files, tmp_path / "x", top_k=4, **QUIET)
    import shutil

    shutil.copytree(labelled_folder, tmp_path / "copy" / "shades")
    (tmp_path / "copy" / "notes.txt").write_text("not an image")
    result = score_image_model(trained_model, str(tmp_path / "copy" / "*"), tmp_path / "folders", **QUIET)
    assert result.num_images == 36  # the folders a pattern matches are scored as folders; the text file is left out
    from imgtrain.errors import OutputNotWritableError

    with pytest.raises(OutputNotWritableError, match="is inside the dataset"):
        score_image_model(trained_model, [tmp_path / "copy" / "shades" / "mid", tmp_path / "copy" / "shades" / "dark"],
                          tmp_path / "copy" / "shades" / "dark" / "scores", **QUIET)


def test_original_names_survive_convert_and_show_in_scores(tmp_path, trained_model):
    from imgtrain import convert_to_image_directory

    make_labelled_folder(tmp_path / "photos", per_class=2, seed=3)
    convert_to_image_directory(tmp_path / "photos" / "dark", tmp_path / "flat", **QUIET)  # unlabeled, flat
    score_image_model(trained_model, tmp_path / "flat", tmp_path / "s", num_workers=0, **QUIET)
    rows = read_scored(tmp_path / "s")
    assert [(r["image"], r["original_path"]) for r in rows] == [("image/0_0.png", "000.png"),
                                                                 ("image/0_1.jpg", "001.jpg")]


def test_predict_in_python(tmp_path, trained_model, labelled_folder, image_dirs):
    from imgtrain import load_trained_model, predict
    from imgtrain.errors import BadImageError

    dark = sorted((labelled_folder / "dark").glob("*.png"))[0]
    [answer] = predict(trained_model, dark)
    assert answer.image == str(dark) and answer.label == "dark"
    assert answer.probability == max(answer.probabilities.values()) and sum(answer.probabilities.values()) == (
        pytest.approx(1, abs=1e-4))
    assert answer.top(2)[0] == ("dark", answer.probability) and len(answer.top(2)) == 2
    model = load_trained_model(trained_model)  # loaded once, used for many calls
    assert model.labels == ["bright", "dark", "mid"] and model.image_size == 32
    folder = predict(model, labelled_folder / "bright")
    assert len(folder) == 12 and sum(p.label == "bright" for p in folder) >= 11
    assert [p.label for p in predict(model, [dark, dark])] == ["dark", "dark"]
    assert len(predict(model, image_dirs["val"])) == 9
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(BadImageError, match="broken.png: not an image"):
        predict(model, [dark, tmp_path / "broken.png"])
    assert len(predict(model, [dark, tmp_path / "broken.png"], on_bad_image="skip")) == 1


def test_evaluate_agrees_with_scikit_learn(tmp_path):
    """Every figure as scikit-learn's default gives it: macro averages over the classes among the true or the
    predicted labels, whatever other classes the model has (some cases have classes in neither)."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    from imgtrain.scoring.evaluate import classification_metrics, confusion_matrix

    rng = np.random.default_rng(0)
    for case in range(20):
        labels = [f"c{i}" for i in range(int(rng.integers(2, 8)))]
        truth = list(rng.choice(labels[: max(1, len(labels) - case % 4)] + ["unknown"] * (case % 2),
                                size=int(rng.integers(1, 60))))
        predicted = list(rng.choice(labels[: max(1, len(labels) - case % 3)], size=len(truth)))
        every = labels + sorted(set(truth) - set(labels))
        ours = classification_metrics(confusion_matrix(truth, predicted, every), every)
        assert ours["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
        assert ours["macro_average_classes"] == sorted(set(truth) | set(predicted), key=every.index)
        for average in ("micro", "macro", "weighted"):
            p, r, f, _ = precision_recall_fscore_support(truth, predicted, average=average, zero_division=0)
            assert (ours[f"precision_{average}"], ours[f"recall_{average}"], ours[f"f1_{average}"]) == (
                pytest.approx(p), pytest.approx(r), pytest.approx(f)), (case, average)
        p, r, f, support = precision_recall_fscore_support(truth, predicted, labels=every, zero_division=0)
        for i, label in enumerate(every):
            assert ours["per_class"][label] == pytest.approx(
                {"precision": p[i], "recall": r[i], "f1": f[i], "support": support[i]}), (case, label)


def _scored_csv(folder, truth, predicted, labels):
    """A scored.csv as Score Image Model writes it, for a model with ``labels``."""
    folder.mkdir()
    with open(folder / "scored.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "category", *[f"Scored Probabilities_{label}" for label in labels], "Scored Labels"])
        for i, (t, p) in enumerate(zip(truth, predicted, strict=True)):
            w.writerow([f"{i}.png", t, *[0.9 if label == p else 0.1 / (len(labels) - 1) for label in labels], p])
    return folder


def test_macro_figures_leave_out_the_models_classes_absent_from_the_data(tmp_path):
    """A 10-class model right on every image of 2 classes: every macro figure is 1, as scikit-learn's default
    says, not 0.2 (the 8 classes with no image and no answer are not averaged); metrics.json and the report
    say over which classes."""
    from sklearn.metrics import precision_recall_fscore_support

    labels = [f"class{i}" for i in range(10)]
    truth = ["class3"] * 4 + ["class7"] * 6
    metrics = evaluate_model(_scored_csv(tmp_path / "perfect", truth, truth, labels), tmp_path / "e1", **QUIET)
    assert metrics["accuracy"] == 1.0
    assert (metrics["precision_macro"], metrics["recall_macro"], metrics["f1_macro"]) == (1.0, 1.0, 1.0)
    assert metrics["macro_average_classes"] == ["class3", "class7"]
    assert metrics["per_class"]["class0"]["support"] == 0 and len(metrics["per_class"]) == 10
    assert json.loads((tmp_path / "e1" / "metrics.json").read_text())["macro_average_rule"] == (
        "unweighted mean over the classes among the true or the predicted labels (scikit-learn's default)")
    page = (tmp_path / "e1" / "report.html").read_text()
    assert "Macro figures are the unweighted mean over the 2 classes among the true or the predicted labels" in page
    assert "the model&#x27;s 8 other classes (class0, class1, class2, class4" in page
    # the review's case: a 3-class model on 2 classes, recall 3/4 and 1/3: macro recall 0.542 (not 0.361)
    truth = ["a"] * 4 + ["b"] * 6
    predicted = ["a", "a", "a", "b"] + ["b"] * 2 + ["a"] * 4
    metrics = evaluate_model(_scored_csv(tmp_path / "two", truth, predicted, ["a", "b", "c"]), tmp_path / "e2",
                             **QUIET)
    p, r, f, _ = precision_recall_fscore_support(truth, predicted, average="macro", zero_division=0)
    assert (metrics["precision_macro"], metrics["recall_macro"], metrics["f1_macro"]) == (
        pytest.approx(p), pytest.approx(r), pytest.approx(f))
    assert round(metrics["recall_macro"], 3) == 0.542


def test_true_labels_the_model_never_knew_are_named(tmp_path):
    """A textures model evaluated on photos of cats and dogs: 0% is right, and a warning says why, naming the
    classes, on the command line and in the report."""
    truth = ["cat"] * 3 + ["dog"] * 2 + ["woven"]
    predicted = ["woven", "dotted", "woven", "dotted", "dotted", "woven"]
    scored = _scored_csv(tmp_path / "scored", truth, predicted, ["dotted", "woven"])
    said: list[str] = []
    metrics = evaluate_model(scored, tmp_path / "e", log=said.append)
    assert metrics["unknown_true_labels"] == ["cat", "dog"]
    warning = ("warning: 5 of 6 scored images have a true label the model does not know (cat, dog): the model can "
               "never give it, so they all count as errors")
    assert any(line.startswith(warning) for line in said), said
    assert "Warning: 5 of 6 scored images have a true label the model does not know (cat, dog)" in (
        tmp_path / "e" / "report.html").read_text()
    r = run_cli("evaluate-model", "--scored-dataset", scored, "--output", tmp_path / "e2")
    assert warning in r.stderr
    quiet: list[str] = []
    metrics = evaluate_model(_scored_csv(tmp_path / "known", ["dotted"], ["woven"], ["dotted", "woven"]),
                             tmp_path / "e3", log=quiet.append)
    assert metrics["unknown_true_labels"] == [] and not any("warning" in line for line in quiet)


def test_labels_in_a_warning_are_shown_escaped_on_one_line(tmp_path):
    """True labels that are empty, hold a line break or a terminal's escape sequence: the warning naming them stays
    one line, shows each one's characters (the empty one as ''), and sends nothing to the terminal. The start of
    a run that names classes without training images shows them alike."""
    from imgtrain.training import balance

    scored = _scored_csv(tmp_path / "scored", ["", "nl\nx", "\x1b[31mred", "dotted"], ["dotted"] * 4,
                         ["dotted", "woven"])
    r = run_cli("evaluate-model", "--scored-dataset", scored, "--output", tmp_path / "e")
    [warning] = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert "3 of 4 scored images have a true label the model does not know ('', \\x1b[31mred, nl\\nx): " in warning
    assert "\x1b" not in r.stderr
    counts = np.array([0, 0, 3])
    assert balance.describe(["", "a\tb", "c"], counts, counts) == (
        "classes (training/validation images): '' 0/0, a\\tb 0/0, c 3/3; imbalance 1:1")


def _designer_scored(folder, truth, predicted, labels, *, label_column="category"):
    """A scored DataFrameDirectory as the designer's Score Model writes it: Parquet only, no scored.csv."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    folder.mkdir()
    columns = {label_column: truth, "id": list(range(len(truth)))}
    for label in labels:
        columns[f"Scored Probabilities_{label}"] = [0.9 if p == label else 0.1 / (len(labels) - 1) for p in predicted]
    columns["Scored Labels"] = predicted
    pq.write_table(pa.table(columns), folder / "_data.parquet")
    (folder / "_meta.yaml").write_text(yaml.safe_dump({
        "type": "DataFrameDirectory", "extension": {}, "format": "Parquet", "data": "_data.parquet",
        "samples": "_samples.json", "schema": "schema/_schema.json", "visualization": "_data.visualization"}))
    (folder / "schema").mkdir()
    (folder / "schema" / "_schema.json").write_text(json.dumps({
        "columnAttributes": [{"name": n, "type": "Numeric"} for n in columns],
        "labelColumns": {"True Labels": label_column},
        "scoreColumns": {"Multi Class Assigned Labels": "Scored Labels"}}))


def test_score_writes_the_designers_dataframe_directory_beside_scored_csv(tmp_path, trained_model, image_dirs):
    import pyarrow.parquet as pq
    import yaml

    score_image_model(trained_model, image_dirs["val"], tmp_path / "s", top_k=2, num_workers=0, **QUIET)
    rows = read_scored(tmp_path / "s")
    meta = yaml.safe_load((tmp_path / "s" / "_meta.yaml").read_text())
    assert {k: meta[k] for k in ("type", "format", "data", "schema", "samples", "visualization")} == {
        "type": "DataFrameDirectory", "format": "Parquet", "data": "_data.parquet",
        "schema": "schema/_schema.json", "samples": "_samples.json", "visualization": "_data.visualization"}
    assert meta["extension"]["image_root"] and meta["extension"]["csv"] == "scored.csv"
    table = pq.read_table(tmp_path / "s" / "_data.parquet").to_pydict()
    assert list(table) == list(rows[0])  # the same columns, in the same order
    assert table["id"] == [int(r["id"]) for r in rows] and table["category"] == [r["category"] for r in rows]
    for column in ("Scored Probabilities_dark", "Top 2 Probability"):
        assert np.allclose(table[column], [float(r[column]) for r in rows], rtol=1e-5)
    assert table["Scored Labels"] == [r["Scored Labels"] for r in rows]
    schema = json.loads((tmp_path / "s" / "schema" / "_schema.json").read_text())
    assert schema["labelColumns"] == {"True Labels": "category"}
    assert schema["scoreColumns"]["Multi Class Assigned Labels"] == "Scored Labels"
    assert {a["name"]: a["elementType"]["typeName"] for a in schema["columnAttributes"]}["id"] == "int64"
    assert len(json.loads((tmp_path / "s" / "_samples.json").read_text())) == 3
    # Evaluate reads either file to the same figures.
    from_csv = evaluate_model(tmp_path / "s", tmp_path / "e1", **QUIET)
    (tmp_path / "s" / "scored.csv").unlink()
    from_parquet = evaluate_model(tmp_path / "s", tmp_path / "e2", **QUIET)
    assert from_parquet == from_csv
    assert (tmp_path / "e2" / "report.html").stat().st_size > 10_000


def test_evaluate_reads_the_designers_scored_dataframe_directory(tmp_path):
    truth = ["cat", "cat", "dog", "dog", "bird"]
    predicted = ["cat", "dog", "dog", "dog", "cat"]
    _designer_scored(tmp_path / "scored", truth, predicted, ["bird", "cat", "dog"], label_column="label")
    metrics = evaluate_model(tmp_path / "scored", tmp_path / "eval", **QUIET)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["confusion_matrix"]["labels"] == ["bird", "cat", "dog"]  # the probability columns' order
    assert metrics["per_class"]["dog"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8,
                                                        "support": 2})
    assert "id 1" in (tmp_path / "eval" / "report.html").read_text()  # the rows are named by their ids
    run_cli("evaluate-model", "--scored-dataset", str(tmp_path / "scored"), "--output", str(tmp_path / "eval2"))


def test_numeric_labels_of_a_designer_table_compare_alike_whatever_their_column_type(tmp_path):
    """The designer's table may hold its truth as integers and its scored labels as floats: 0 and 0.0 are the
    same label (the accuracy was 0, every "0" against "0.0"); a NaN true label is missing, a named error (it
    became a class "nan", with a warning that the model did not know it)."""
    _designer_scored(tmp_path / "mixed", [0, 0, 1, 1], [0.0, 1.0, 1.0, 1.0], ["0", "1"])
    metrics = evaluate_model(tmp_path / "mixed", tmp_path / "e", **QUIET)
    assert metrics["accuracy"] == 0.75 and metrics["confusion_matrix"]["labels"] == ["0", "1"]
    assert metrics["unknown_true_labels"] == []
    _designer_scored(tmp_path / "nan", [0.0, float("nan"), 1.0], [0.0, 1.0, 1.0], ["0", "1"])
    with pytest.raises(InvalidDatasetError, match="data row 2 has no 'category'"):
        evaluate_model(tmp_path / "nan", tmp_path / "e2", **QUIET)


def test_unreadable_dataframe_directories_get_named_errors(tmp_path):
    _designer_scored(tmp_path / "bad", ["a"], ["a"], ["a", "b"])
    (tmp_path / "bad" / "_data.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InvalidDatasetError, match="not a readable Parquet file"):
        evaluate_model(tmp_path / "bad", tmp_path / "e", **QUIET)
    (tmp_path / "bad" / "_data.parquet").unlink()
    os.mkfifo(tmp_path / "bad" / "_data.parquet")  # read blindly, a pipe would wait for ever
    with pytest.raises(InvalidDatasetError, match="named pipe"):
        evaluate_model(tmp_path / "bad", tmp_path / "e", **QUIET)
    (tmp_path / "bad" / "_data.parquet").unlink()
    with pytest.raises(InvalidDatasetError, match="holds no _data.parquet"):
        evaluate_model(tmp_path / "bad", tmp_path / "e", **QUIET)
    meta = (tmp_path / "bad" / "_meta.yaml")
    meta.write_text(meta.read_text().replace("format: Parquet", "format: Csv"))
    result = run_cli("evaluate-model", "--scored-dataset", str(tmp_path / "bad"), "--output", str(tmp_path / "e"),
                     check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "format 'Csv'" in result.stderr and "InvalidDatasetError" in result.stderr
    assert not (tmp_path / "e").exists()
