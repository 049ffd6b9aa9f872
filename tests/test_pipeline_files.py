"""Pipeline files: read and checked before anything runs, every mistake one line naming the step."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import shutil
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
    # and a pipeline file reaches every training parameter (torch's threads are the machine's, not the pipeline's)
    train = COMPONENTS["train-pytorch-model"]
    assert {f.name for f in dataclasses.fields(TrainingParameters)} - {"threads"} <= {*train.parameters,
                                                                                     *train.inputs}


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


@pytest.mark.parametrize("change, message, line", [
    (("component: evaluate-model", "component: evaluate-models"),
     "step 'evaluate': unknown component 'evaluate-models'. did you mean evaluate-model?", "evaluate-models"),
    (("epochs: 5", "epoch: 5"), "step 'train': train-pytorch-model has no input or parameter 'epoch'. did you mean "
                                "epochs?", "epoch: 5"),
    (("epochs: 5", "epochs: five"), "step 'train': parameter epochs is 'five'; it must be an integer", "five"),
    (("fraction: 0.9", "fraction: true"), "step 'split': parameter fraction is True; it must be a number", "true"),
    (('      validation_data: "${{parent.jobs.split.outputs.output_b}}"\n', ""),
     "step 'train': input validation_data is not bound", "  train:"),
    (("parent.jobs.split.outputs.output_b}}\"\n      epochs", "parent.jobs.spilt.outputs.output_b}}\"\n      epochs"),
     "step 'train': input validation_data binds to the step 'spilt', which does not exist. did you mean split?",
     "spilt"),
    (("parent.jobs.split.outputs.output_a", "parent.jobs.split.outputs.outpt_a"),
     "step 'train': input training_data binds to split.outpt_a, but split-image-directory has no output 'outpt_a'. "
     "did you mean output_a?", "outpt_a"),
    (("parent.inputs.digits", "parent.inputs.digit"),
     "step 'convert': input source binds to the pipeline input 'digit', which is not declared (or is a value, not a "
     "folder or file). did you mean digits?", "inputs.digit}"),
    (('inputs: {source: "${{parent.inputs.digits}}"}', 'inputs: {source: "${{parent.jobs.evaluate.outputs.output}}"}'),
     "steps convert -> split -> untrained", None),
    (("type: pipeline", "type: command"), "is not a pipeline file (it needs `type: pipeline`)", None),
    (('  evaluation: "${{parent.jobs.evaluate.outputs.output}}"', '  evaluation: "${{parent.jobs.judge.outputs.x}}"'),
     "output 'evaluation' binds to judge.x, which no step writes", "judge"),
    (("inputs:\n  digits", "input:\n  digits"), "unknown key 'input' at the top. did you mean inputs?", "input:"),
    (("    component: resnet\n", "    component: resnet\n    componnet: resnet\n"),
     "step 'untrained': unknown key 'componnet'. did you mean component?", "componnet"),
    # names become folders: never a path
    (("  evaluation: ", "  ../../escaped-outside: "), "the output name '../../escaped-outside' is not a plain name",
     "escaped-outside"),
    (("  evaluation: ", "  /tmp/absolute: "), "the output name '/tmp/absolute' is not a plain name", "absolute"),
    (("  evaluate:\n", "  ../evaluate:\n"), "the step name '../evaluate' is not a plain name", "../evaluate"),
    (("  model: {type: uri_folder}", "  model: {type: uri_folder}\n  evaluation: {type: uri_folder}"),
     "'evaluation' is given twice (first on line", "  evaluation: \""),
    (("  score:\n", "  evaluate: {component: evaluate-model}\n  score:\n"), "'evaluate' is given twice",
     "  evaluate:\n    component"),
    (("  split:\n", "\tsplit:\n"), "not valid YAML (found character '\\t' that cannot start any token)", "\tsplit"),
    (("  untrained:\n", "  on:\n"), "the step name True is read as a bool, not a name. quote it in the file", "  on:"),
    # a few bytes of aliases for a list of 8**3 items: named by its kind, never printed whole
    (("fraction: 0.9", "fraction: [&a [&b [&c [x, x], *c], *b], *a, *a]"),
     "step 'split': parameter fraction is a list of 3 item(s); it must be a number", "fraction"),
])
def test_every_mistake_is_one_line_naming_the_step(tmp_path, change, message, line):
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
    if line is not None:  # the line of the file where the mistake is
        number = bad.read_text()[:bad.read_text().index(line)].count("\n") + 1
        assert f"bad.yaml:{number}:" in r.stderr, (number, r.stderr)


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


def test_a_rerun_runs_only_what_changed_and_gives_the_same_bytes(tmp_path, labelled_folder, monkeypatch):
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
    # Other code (a new default, a new way to compute, under the same version number): nothing is reused. The
    # digest is of imgtrain's source files as they lie; here it stands for an edited one.
    from imgtrain.pipeline import run

    assert re.fullmatch(r"[0-9a-f]{64}", run.code_digest.__wrapped__())
    monkeypatch.setattr(run, "code_digest", lambda: "another version of the code")
    rerun = run_pipeline(file, tmp_path / "out4", log=lambda m: None)
    assert [r.reused for r in rerun] == [False] * 6


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
    assert len(_entries(cache)) == 3  # convert, split and untrained were complete; train was not
    runs = run_pipeline(file, log=lambda m: None, force_rerun=True)
    assert [r.reused for r in runs] == [False] * 6  # --force-rerun runs everything
    assert not list(cache.glob("partial-*")) and len(_entries(cache)) == 6
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == [".locks"]
    assert (tmp_path / "p-output" / "model" / "model.safetensors").is_file()
    r = run_cli("pipeline", "run", file, check=False)
    assert r.returncode == 1 and "OutputExistsError" in r.stderr  # published outputs are not replaced unasked
    r = run_cli("pipeline", "run", file, "--overwrite")
    assert "6 reused" in r.stderr and r.stdout.strip() == "0 step(s) run, 6 reused"


def _entries(cache: Path) -> list[Path]:
    return [p for p in cache.iterdir() if not p.name.startswith(("partial-", "."))]


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_output_over_an_input_the_file_or_the_cache_is_refused(tmp_path):
    """--overwrite never lets publishing replace the pipeline's own inputs, its file or its cache: each is refused
    before any step runs, and the inputs stay byte for byte."""
    from conftest import make_labelled_folder
    from imgtrain.pipeline.run import CACHE_FOLDER

    photos = make_labelled_folder(tmp_path / "data" / "photos-in", per_class=2)
    file = tmp_path / "p.yaml"
    file.write_text("type: pipeline\ninputs:\n  photos: {type: uri_folder, path: data/photos-in}\njobs:\n"
                    "  convert: {component: convert, inputs: {source: \"${{parent.inputs.photos}}\"}}\n")
    run_cli("pipeline", "run", file)  # the cache holds the convert step now
    before, cache_before = _contents(photos), _contents(tmp_path / CACHE_FOLDER)
    for output, message in [(photos, "is the pipeline input 'photos'"),
                            (photos / "convert", "is inside the pipeline input 'photos'"),
                            (tmp_path / "data", "holds the pipeline input 'photos'"),
                            (tmp_path / CACHE_FOLDER, "is the step cache"),
                            (tmp_path / CACHE_FOLDER / "out", "is inside the step cache"),
                            (tmp_path, "holds the pipeline input")]:
        r = run_cli("pipeline", "run", file, "--output", output, "--overwrite", check=False)
        assert r.returncode == 1 and r.stderr.startswith("error: OutputNotWritableError: the output "), r.stderr
        assert message in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    r = run_cli("pipeline", "run", file, "--cache", photos / "cache", "--overwrite", check=False)
    assert r.returncode == 1 and "the step cache" in r.stderr and "is inside the pipeline input 'photos'" in r.stderr
    assert _contents(photos) == before and _contents(tmp_path / CACHE_FOLDER) == cache_before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CACHE_FOLDER, "data", "p-output", "p.yaml"]


def test_two_runs_sharing_a_cache_leave_each_other_alone(tmp_path, labelled_folder):
    """Two pipeline files in one folder share its cache: a second run started while the first trains neither
    deletes the first's work in progress nor computes the same step again; it waits and reuses it."""
    from imgtrain.pipeline.run import run_pipeline

    first = _small_pipeline(tmp_path, labelled_folder, epochs=3)
    second = tmp_path / "q.yaml"
    second.write_text(first.read_text())
    process = subprocess.Popen([sys.executable, "-m", "imgtrain", "pipeline", "run", str(first)],
                               stderr=subprocess.PIPE, text=True)
    said = []
    for line in process.stderr:
        said.append(line)
        if line.startswith("epoch 1/3"):  # the first run is training, in its partial folder
            break
    heard: list[str] = []
    runs = run_pipeline(second, log=heard.append)
    said += process.stderr.readlines()
    assert process.wait(timeout=120) == 0, "".join(said)
    ran_first = {line.split()[1] for line in said if line.startswith("step ") and line.rstrip().endswith("running")}
    ran_second = {r.name for r in runs if not r.reused}
    assert not ran_first & ran_second and ran_first | ran_second == {r.name for r in runs}, (said, heard)
    assert "train" in ran_first  # the second run found it in progress: it waited, and did not train again
    for name in ("model/model.safetensors", "evaluation/metrics.json"):
        assert (tmp_path / "p-output" / name).read_bytes() == (tmp_path / "q-output" / name).read_bytes()


def test_a_partial_folder_is_removed_only_when_no_run_holds_its_step(tmp_path):
    """A run removes a killed run's temporary folder only when the lock of that step's key is free: a live run in
    another container (whose pid means nothing here) keeps its folder, a dead one's goes, whatever its marker."""
    from imgtrain.directories.atomic import make_owned_dir
    from imgtrain.pipeline.run import _key_lock, _remove_partials

    store = tmp_path / "cache"
    live, dead = "a" * 32, "b" * 32
    elsewhere = make_owned_dir(store / f"partial-{live}-x1")
    (elsewhere / ".owner-pid").write_text("999999999 1")  # a pid that is no process here
    ours = make_owned_dir(store / f"partial-{dead}-x2")  # a marker naming a live process (this one)
    (store / "partial-notakey-x3").mkdir()  # not a step's folder: left alone
    with _key_lock(store, live) as held:  # the live run computing its step
        assert held
        _remove_partials(store)
    assert elsewhere.is_dir() and not ours.exists() and (store / "partial-notakey-x3").is_dir()
    _remove_partials(store)
    assert not elsewhere.exists()


def test_a_read_only_cache_still_serves_its_entries(tmp_path):
    """Every step cached, the cache mounted read-only (a shared, archived cache): the run reuses and publishes."""
    from conftest import make_labelled_folder
    from imgtrain.pipeline.run import CACHE_FOLDER

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    make_labelled_folder(tmp_path / "photos", per_class=2)
    file = tmp_path / "p.yaml"
    file.write_text("type: pipeline\ninputs:\n  photos: {type: uri_folder, path: photos}\njobs:\n"
                    "  convert: {component: convert, inputs: {source: \"${{parent.inputs.photos}}\"}}\n")
    run_cli("pipeline", "run", file)
    shutil.rmtree(tmp_path / CACHE_FOLDER / ".locks", ignore_errors=True)  # none to open: a fresh lock is refused
    cache = tmp_path / CACHE_FOLDER
    script = (f"mount --bind {cache} {cache} && mount -o remount,bind,ro {cache} || exit 99\n"
              f"{sys.executable} -m imgtrain pipeline run {file} --output {tmp_path / 'again'}")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], capture_output=True,
                       text=True, timeout=300)
    if r.returncode == 99:
        pytest.skip(f"this machine cannot mount a read-only folder for the test: {r.stderr.strip()}")
    assert r.returncode == 0 and "reused from the cache" in r.stderr, r.stderr
    assert _contents(tmp_path / "again" / "convert") == _contents(tmp_path / "p-output" / "convert")


def test_folder_digests_tell_names_from_bytes(tmp_path):
    from imgtrain.pipeline.run import _folder_digest

    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a").write_bytes(b"1")
    (tmp_path / "one" / "b").write_bytes(b"2")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a").write_bytes(b"1b\0" + b"2")
    assert _folder_digest(tmp_path / "one") != _folder_digest(tmp_path / "two")
