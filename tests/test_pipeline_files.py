"""Pipeline files: read and checked before anything runs, every mistake one line naming the step."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli
from imgtrain.errors import InvalidPipelineError
from imgtrain.pipeline.components import COMPONENTS, SHORT_NAMES
from imgtrain.pipeline.file import load_pipeline

EXAMPLE = Path(__file__).parent.parent / "examples" / "pipeline.yaml"


def test_the_components_are_the_modules_python_functions():
    """The hand-kept table of ports and parameters says what the functions really take."""
    from imgtrain.data.transformation import ImageTransformation
    from imgtrain.training.train import TrainingParameters

    for component in COMPONENTS.values():
        module, name = component.function.split(":")
        function = getattr(importlib.import_module(module), name)
        signature = inspect.signature(function).parameters
        takes = set(signature)
        if "overrides" in takes:  # the parameters come as keywords of a dataclass
            takes |= {f.name for f in dataclasses.fields(
                TrainingParameters if name == "train_pytorch_model" else ImageTransformation)}
        assert set(component.inputs) | set(component.outputs) | set(component.parameters) <= takes, component.name
        positional = [p.name for p in signature.values() if p.default is inspect.Parameter.empty
                      and p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        required = [port for port in component.inputs if port not in component.optional]
        assert positional == [*required, *component.outputs], component.name
        assert set(component.optional) <= set(component.inputs)
    assert set(SHORT_NAMES.values()) <= set(COMPONENTS)


def test_the_demo_pipeline_reads_and_shows_its_graph():
    pipeline = load_pipeline(EXAMPLE)
    assert list(pipeline.steps) == ["convert", "split", "untrained", "train", "score", "evaluate"]
    assert pipeline.outputs == {"model": ("train", "output"), "evaluation": ("evaluate", "output")}
    assert pipeline.steps["train"].parameters == {"epochs": 5}
    assert str(pipeline.steps["train"].inputs["validation_data"]) == "split.output_b"
    shown = run_cli("pipeline", "show", EXAMPLE).stdout
    assert "step   train      train-pytorch-model  [untrained_model <- untrained.output" in shown
    assert "output model <- train.output" in shown


def test_a_training_step_may_take_a_transformation(tmp_path):
    text = EXAMPLE.read_text().replace("  train:\n", "  augment:\n    component: init-image-transformation\n"
                                       "    inputs: {size: 36, crop_size: 32}\n  train:\n")
    text = text.replace("      epochs: 5\n",
                        "      epochs: 5\n      transformation: ${{parent.jobs.augment.outputs.output}}\n")
    (tmp_path / "p.yaml").write_text(text)
    pipeline = load_pipeline(tmp_path / "p.yaml")
    assert str(pipeline.steps["train"].inputs["transformation"]) == "augment.output"
    assert list(pipeline.steps).index("augment") < list(pipeline.steps).index("train")
    assert "transformation" not in load_pipeline(EXAMPLE).steps["train"].inputs  # optional


def test_azures_own_keys_are_read(tmp_path):
    """A file written for Azure ML: where and how it runs is ignored, settings.force_rerun is honoured."""
    azure = ("$schema: https://azuremlschemas.azureedge.net/latest/pipelineJob.schema.json\n"
             "experiment_name: digits\ntags: {team: vision}\ncompute: azureml:gpu-cluster\n"
             "settings: {default_compute: azureml:cpu-cluster, force_rerun: true}\n")
    text = EXAMPLE.read_text().replace("type: pipeline\n", "type: pipeline\n" + azure)
    text = text.replace("    component: resnet\n", "    component: resnet\n    compute: azureml:cpu\n    tags: {}\n")
    (tmp_path / "p.yaml").write_text(text)
    assert load_pipeline(tmp_path / "p.yaml").force_rerun and not load_pipeline(EXAMPLE).force_rerun
    (tmp_path / "p.yaml").write_text(text.replace("force_rerun: true", "force_rerun: yes please"))
    with pytest.raises(InvalidPipelineError, match="force_rerun true or false"):
        load_pipeline(tmp_path / "p.yaml")


@pytest.mark.parametrize("change, message", [
    (("component: evaluate-model", "component: evaluate-models"),
     "step 'evaluate': unknown component 'evaluate-models'. did you mean evaluate-model?"),
    (("epochs: 5", "epoch: 5"), "step 'train': train-pytorch-model has no input or parameter 'epoch'. did you mean "
                                "epochs?"),
    (("epochs: 5", "epochs: five"), "step 'train': parameter epochs is 'five'; it must be a integer"),
    (("fraction: 0.9", "fraction: true"), "step 'split': parameter fraction is True; it must be a number"),
    (('      validation_data: "${{parent.jobs.split.outputs.output_b}}"\n', ""),
     "step 'train': input validation_data is not bound"),
    (("parent.jobs.split.outputs.output_b}}\"\n      epochs", "parent.jobs.spilt.outputs.output_b}}\"\n      epochs"),
     "step 'train': input validation_data binds to the step 'spilt', which does not exist"),
    (("parent.jobs.split.outputs.output_a", "parent.jobs.split.outputs.output_c"),
     "step 'train': input training_data binds to split.output_c, but split-image-directory has no output 'output_c'"),
    (("parent.inputs.digits", "parent.inputs.photos"),
     "step 'convert': input source binds to the pipeline input 'photos', which is not declared"),
    (('inputs: {source: "${{parent.inputs.digits}}"}', 'inputs: {source: "${{parent.jobs.evaluate.outputs.output}}"}'),
     "steps convert -> split -> untrained"),
    (("type: pipeline", "type: command"), "is not a pipeline file (it needs `type: pipeline`)"),
    (('  evaluation: "${{parent.jobs.evaluate.outputs.output}}"', '  evaluation: "${{parent.jobs.judge.outputs.x}}"'),
     "output 'evaluation' binds to judge.x, which no step writes"),
])
def test_every_mistake_is_one_line_naming_the_step(tmp_path, change, message):
    old, new = change
    text = EXAMPLE.read_text()
    assert old in text, old
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(old, new))
    r = run_cli("pipeline", "show", bad, check=False)
    assert r.returncode == 1 and r.stderr.startswith("error: InvalidPipelineError: "), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    if message.startswith("steps "):  # a cycle: the steps in it, in some order
        assert "read each other's outputs in a cycle" in r.stderr and "convert" in r.stderr, r.stderr
    else:
        assert message in r.stderr, r.stderr


def _small_pipeline(folder: Path, source: Path, epochs: int) -> Path:
    file = folder / "p.yaml"
    file.write_text(f"""
type: pipeline
inputs:
  shades: {{type: uri_folder, path: {source}}}
jobs:
  convert: {{component: convert, inputs: {{source: "${{{{parent.inputs.shades}}}}"}}}}
  split:
    component: split
    inputs: {{source: "${{{{parent.jobs.convert.outputs.output}}}}", fraction: 0.75}}
  untrained: {{component: resnet, inputs: {{model_name: resnet18, pretrained: false}}}}
  train:
    component: train
    inputs:
      untrained_model: "${{{{parent.jobs.untrained.outputs.output}}}}"
      training_data: "${{{{parent.jobs.split.outputs.output_a}}}}"
      validation_data: "${{{{parent.jobs.split.outputs.output_b}}}}"
      epochs: {epochs}
      batch_size: 8
      image_size: 32
      num_workers: 0
  score:
    component: score
    inputs: {{trained_model: "${{{{parent.jobs.train.outputs.output}}}}",
             dataset: "${{{{parent.jobs.split.outputs.output_b}}}}", num_workers: 0}}
  evaluate: {{component: evaluate, inputs: {{scored_dataset: "${{{{parent.jobs.score.outputs.output}}}}"}}}}
outputs:
  model: "${{{{parent.jobs.train.outputs.output}}}}"
  evaluation: "${{{{parent.jobs.evaluate.outputs.output}}}}"
""")
    return file


def test_a_rerun_runs_only_what_changed_and_gives_the_same_bytes(tmp_path, labelled_folder):
    from imgtrain.pipeline.run import run_pipeline

    file = _small_pipeline(tmp_path, labelled_folder, epochs=1)
    said: list[str] = []
    started = time.perf_counter()
    first = run_pipeline(file, tmp_path / "out1", log=said.append)
    took = time.perf_counter() - started
    assert [r.reused for r in first] == [False] * 6
    assert sorted(p.name for p in (tmp_path / "out1").iterdir()) == ["evaluation", "model"]
    started = time.perf_counter()
    again = run_pipeline(file, tmp_path / "out2", log=said.append)
    assert [r.reused for r in again] == [True] * 6 and time.perf_counter() - started < took / 4
    for name in ("model/model.safetensors", "model/model_spec.yaml", "evaluation/metrics.json"):
        assert (tmp_path / "out1" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes(), name
    assert said[-1].startswith("pipeline done: 0 step(s) run, 6 reused")
    # another number of epochs: only training and what follows it run again
    _small_pipeline(tmp_path, labelled_folder, epochs=2)
    changed = run_pipeline(file, tmp_path / "out3", log=lambda m: None)
    assert {r.name: r.reused for r in changed} == {"convert": True, "split": True, "untrained": True,
                                                   "train": False, "score": False, "evaluate": False}
    assert (tmp_path / "out3" / "model" / "model.safetensors").read_bytes() != (
        tmp_path / "out1" / "model" / "model.safetensors").read_bytes()


def test_a_killed_run_leaves_no_half_entry(tmp_path, labelled_folder):
    from imgtrain.pipeline.run import CACHE_FOLDER, run_pipeline

    file = _small_pipeline(tmp_path, labelled_folder, epochs=3)
    process = subprocess.Popen([sys.executable, "-m", "imgtrain", "pipeline", "run", str(file)],
                               stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if line.startswith("epoch 1/3"):  # training, in the middle of the train step
            process.kill()
            break
    process.wait(timeout=60)
    cache = tmp_path / CACHE_FOLDER
    entries = [p for p in cache.iterdir() if not p.name.startswith("partial-")]
    assert len(entries) == 3  # convert, split and untrained were complete; train was not
    runs = run_pipeline(file, log=lambda m: None, force_rerun=True)
    assert [r.reused for r in runs] == [False] * 6  # --force-rerun runs everything
    assert not list(cache.glob("partial-*")) and len(list(cache.iterdir())) == 6
    assert (tmp_path / "p-output" / "model" / "model.safetensors").is_file()
    r = run_cli("pipeline", "run", file, check=False)
    assert r.returncode == 1 and "OutputExistsError" in r.stderr  # published outputs are not replaced unasked
    r = run_cli("pipeline", "run", file, "--overwrite")
    assert "6 reused" in r.stderr and r.stdout.strip() == "0 step(s) run, 6 reused"
