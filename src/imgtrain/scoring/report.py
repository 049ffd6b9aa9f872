"""``imgtrain report``: one page for a trained model, its training and, given a scored data set, its evaluation."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from imgtrain.directories.atomic import check_output_writable
from imgtrain.errors import InvalidDatasetError, OutputNotWritableError
from imgtrain.reports.evaluation import evaluation_page, unknown_labels_note
from imgtrain.reports.training import training_page_of
from imgtrain.scoring.evaluate import metrics_of, mistakes_of, not_the_scoring_model, read_scored


def report(
    trained_model: Path | str,
    output: Path | str,
    *,
    scored_dataset: Path | str | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> Path:
    """Write ``output`` (an HTML file): the model's training report and, with ``scored_dataset`` (the output
    of Score Image Model, labelled), its evaluation on those images. A model without a training history (the
    designer's) gets what it has, and a warning says what is missing; a data set another model scored is
    refused."""
    output, trained_model = Path(output), Path(trained_model)
    if output.is_dir():
        raise OutputNotWritableError(f"the output {output} is a folder: the report is one HTML file",
                                     f"name a file, e.g. {output / 'report.html'}")
    inputs = {"trained model": trained_model, **({"scored dataset": scored_dataset} if scored_dataset else {})}
    check_output_writable(output, overwrite=overwrite, inputs=inputs)
    if scored_dataset is not None:
        _check_scored_by(trained_model, Path(scored_dataset))
    page = training_page_of(trained_model, title=f"Report: {trained_model.name}", log=log)
    if scored_dataset is not None:
        table = read_scored(Path(scored_dataset))
        mistakes = mistakes_of(table)
        overlays = []
        if mistakes and importlib.util.find_spec("captum") is not None:
            from imgtrain.scoring.explain import mistake_overlays

            overlays = mistake_overlays(trained_model, mistakes)
        metrics = metrics_of(table)
        if metrics["unknown_true_labels"]:
            log(f"warning: {unknown_labels_note(metrics)}")
        page.extend(evaluation_page(metrics, mistakes, title=f"Evaluation on {Path(scored_dataset).name}",
                                    overlays=overlays))
    page.write(output)
    log(f"Report written to {output}")
    return output


def _check_scored_by(model: Path, scored: Path) -> None:
    """Refuse a scored data set that another model scored (or this one before its weights changed): its
    mistakes are that model's, and the page would explain them with this one."""
    reason = not_the_scoring_model(scored, model)
    if reason:
        raise InvalidDatasetError(f"{reason}: its predictions and mistakes are that model's",
                                  f"score the images with this model first (imgtrain score-image-model "
                                  f"--trained-model {model} ...), or report the model that scored them")
