"""``imgtrain report``: one page for a trained model, its training and, given a scored data set, its evaluation."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from imgtrain.directories.atomic import check_output_writable
from imgtrain.errors import OutputNotWritableError
from imgtrain.reports.evaluation import evaluation_page
from imgtrain.reports.training import training_page_of
from imgtrain.scoring.evaluate import metrics_of, mistakes_of, read_scored


def report(
    trained_model: Path | str,
    output: Path | str,
    *,
    scored_dataset: Path | str | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> Path:
    """Write ``output`` (an HTML file): the model's training report and, with ``scored_dataset`` (the output
    of Score Image Model, labelled), its evaluation on those images."""
    output = Path(output)
    if output.is_dir():
        raise OutputNotWritableError(f"the output {output} is a folder: the report is one HTML file",
                                     f"name a file, e.g. {output / 'report.html'}")
    inputs = {"trained model": trained_model, **({"scored dataset": scored_dataset} if scored_dataset else {})}
    check_output_writable(output, overwrite=overwrite, inputs=inputs)
    page = training_page_of(Path(trained_model), title=f"Report: {Path(trained_model).name}")
    if scored_dataset is not None:
        table = read_scored(Path(scored_dataset))
        mistakes = mistakes_of(table)
        overlays = []
        if mistakes and importlib.util.find_spec("captum") is not None:
            from imgtrain.scoring.explain import mistake_overlays

            overlays = mistake_overlays(Path(trained_model), mistakes)
        page.extend(evaluation_page(metrics_of(table), mistakes, title=f"Evaluation on {Path(scored_dataset).name}",
                                    overlays=overlays))
    page.write(output)
    log(f"Report written to {output}")
    return output
