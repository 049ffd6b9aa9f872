"""A pipeline file, shaped like Azure ML's v2 pipeline jobs, read and checked before anything runs.

::

    type: pipeline
    inputs:
      photos: {type: uri_folder, path: photos}          # paths relative to the file
      epochs: 5                                         # a value that parameters may bind to
    jobs:
      convert: {component: convert-to-image-directory, inputs: {source: ${{parent.inputs.photos}}}}
      split:
        component: split-image-directory
        inputs: {source: ${{parent.jobs.convert.outputs.output}}, fraction: 0.9}
      ...
    outputs:
      model: ${{parent.jobs.train.outputs.output}}      # or a step binds `outputs: {output: ${{parent.outputs.model}}}`

Every mistake is one line naming the step (InvalidPipelineError): an unknown component, port or
parameter, a value of the wrong type, a missing or dangling binding, a cycle.
"""

from __future__ import annotations

import difflib
import graphlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from imgtrain.directories.files import read_text
from imgtrain.errors import InvalidPipelineError
from imgtrain.pipeline.components import COMPONENTS, SHORT_NAMES, Component, fits

_BINDING = re.compile(r"^\$\{\{\s*parent\.(?:inputs\.(?P<input>[\w-]+)|jobs\.(?P<job>[\w-]+)\.outputs\.(?P<port>\w+)"
                      r"|outputs\.(?P<output>[\w-]+))\s*\}\}$")
PORT_TYPES = ("uri_folder", "uri_file")
_JOB_KEYS = {"component", "inputs", "outputs", "type", "display_name", "description",
             "name", "tags", "compute", "environment_variables"}  # the last four: Azure's, read and ignored


@dataclass(frozen=True)
class Source:
    """Where a step's input comes from: a pipeline input, or another step's output port."""

    input: str | None = None
    job: str | None = None
    port: str | None = None

    def __str__(self) -> str:
        return f"inputs.{self.input}" if self.input is not None else f"{self.job}.{self.port}"


@dataclass
class Step:
    name: str
    component: Component
    inputs: dict[str, Source] = field(default_factory=dict)
    parameters: dict[str, object] = field(default_factory=dict)
    published: dict[str, str] = field(default_factory=dict)  # output port -> the pipeline output it publishes


@dataclass
class Pipeline:
    path: Path
    inputs: dict[str, tuple[str, Path]]  # name -> (uri_folder | uri_file, path)
    values: dict[str, object]  # pipeline inputs that are plain values, for parameters
    steps: dict[str, Step]  # in an order they can run in
    outputs: dict[str, tuple[str, str]]  # published name -> (step, port)
    force_rerun: bool = False  # settings.force_rerun, as Azure has it


def load_pipeline(path: Path | str) -> Pipeline:
    path = Path(path)
    try:
        raw = yaml.safe_load(read_text(path))
    except FileNotFoundError:
        raise InvalidPipelineError(f"{path} does not exist", "pass a pipeline file (.yaml)") from None
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise InvalidPipelineError(f"{path} cannot be read as YAML ({str(exc).splitlines()[0]})", _HINT) from None
    if not isinstance(raw, dict) or raw.get("type") != "pipeline":
        raise InvalidPipelineError(f"{path} is not a pipeline file (it needs `type: pipeline`)", _HINT)
    # Azure's keys that say where and how it runs (compute, experiment, identity) are read and ignored.
    unknown = sorted(set(raw) - {"type", "inputs", "jobs", "outputs", "display_name", "description",
                                 "experiment_name", "settings", "$schema", "name", "tags", "compute",
                                 "identity"}, key=str)
    if unknown:
        raise InvalidPipelineError(f"{path}: unknown key {unknown[0]!r} at the top", _HINT)
    settings = raw.get("settings") or {}
    if not isinstance(settings, dict) or not isinstance(settings.get("force_rerun", False), bool):
        raise InvalidPipelineError(f"{path}: settings must be a mapping, and its force_rerun true or false", _HINT)
    inputs, values = _pipeline_inputs(raw.get("inputs") or {}, path)
    jobs = raw.get("jobs")
    if not isinstance(jobs, dict) or not jobs:
        raise InvalidPipelineError(f"{path} has no jobs", "add `jobs:`, one entry per step")
    steps = {str(name): _step(str(name), job, inputs, values, jobs, path) for name, job in jobs.items()}
    outputs = _pipeline_outputs(raw.get("outputs") or {}, steps, path)
    return Pipeline(path, inputs, values, _in_order(steps, path), outputs, settings.get("force_rerun", False))


_HINT = "see the README, \"Pipelines\""


def _pipeline_inputs(raw: object, path: Path) -> tuple[dict[str, tuple[str, Path]], dict[str, object]]:
    if not isinstance(raw, dict):
        raise InvalidPipelineError(f"{path}: inputs must be a mapping of names", _HINT)
    folders, values = {}, {}
    for name, spec in raw.items():
        if isinstance(spec, dict):
            kind, where = spec.get("type"), spec.get("path")
            if kind not in PORT_TYPES or not isinstance(where, str) or not where:
                raise InvalidPipelineError(f"{path}: input {name!r} needs a type (uri_folder or uri_file) and a path",
                                           _HINT)
            folders[str(name)] = (kind, Path(os.path.normpath(path.parent / where)))
        elif spec is None or isinstance(spec, (bool, int, float, str)):
            values[str(name)] = spec
        else:
            raise InvalidPipelineError(f"{path}: input {name!r} is neither a folder or file nor a value", _HINT)
    return folders, values


def _binding(value: object) -> re.Match | None:
    return _BINDING.match(value.strip()) if isinstance(value, str) else None


def _step(name: str, job: object, inputs: dict, values: dict, jobs: dict, path: Path) -> Step:
    where = f"{path}: step {name!r}"
    if not isinstance(job, dict):
        raise InvalidPipelineError(f"{where} is not a mapping", _HINT)
    extra = sorted(set(job) - _JOB_KEYS, key=str)
    if extra:
        raise InvalidPipelineError(f"{where}: unknown key {extra[0]!r}", f"a step has {', '.join(sorted(_JOB_KEYS))}")
    wanted = job.get("component")
    component = COMPONENTS.get(SHORT_NAMES.get(wanted, wanted)) if isinstance(wanted, str) else None
    if component is None:
        close = difflib.get_close_matches(str(wanted), [*COMPONENTS, *SHORT_NAMES], n=1)
        raise InvalidPipelineError(f"{where}: unknown component {wanted!r}",
                                   f"did you mean {close[0]}?" if close else f"use one of {', '.join(COMPONENTS)}")
    step = Step(name, component)
    given = job.get("inputs") or {}
    if not isinstance(given, dict):
        raise InvalidPipelineError(f"{where}: inputs must be a mapping", _HINT)
    for key, value in given.items():
        key = str(key)
        found = _binding(value)
        if key in component.inputs:
            step.inputs[key] = _source(found, value, key, where, inputs, jobs)
        elif key in component.parameters:
            if found and found["input"] is not None and found["input"] in values:
                value = values[found["input"]]
            elif found:
                raise InvalidPipelineError(f"{where}: parameter {key} can bind only to a value among the pipeline's "
                                           f"inputs, not {value.strip()}", _HINT)
            if not fits(component.parameters[key], value):
                raise InvalidPipelineError(f"{where}: parameter {key} is {value!r}; it must be a "
                                           f"{component.parameters[key]}", _HINT)
            step.parameters[key] = value
        else:
            close = difflib.get_close_matches(key, [*component.inputs, *component.parameters], n=1)
            hint = f"did you mean {close[0]}?" if close else (
                f"its inputs: {', '.join(component.inputs) or 'none'}; its parameters: "
                f"{', '.join(component.parameters) or 'none'}")
            raise InvalidPipelineError(f"{where}: {component.name} has no input or parameter {key!r}", hint)
    missing = [port for port in component.inputs if port not in step.inputs and port not in component.optional]
    if missing:
        raise InvalidPipelineError(f"{where}: input {missing[0]} is not bound",
                                   "bind it to ${{parent.inputs.NAME}} or ${{parent.jobs.STEP.outputs.PORT}}")
    outputs = job.get("outputs") or {}
    if not isinstance(outputs, dict):
        raise InvalidPipelineError(f"{where}: outputs must be a mapping", _HINT)
    for port, value in outputs.items():
        if port not in component.outputs:
            raise InvalidPipelineError(f"{where}: {component.name} has no output {port!r}",
                                       f"its outputs: {', '.join(component.outputs)}")
        found = _binding(value)
        if not found or found["output"] is None:
            raise InvalidPipelineError(f"{where}: output {port} must bind to ${{{{parent.outputs.NAME}}}}", _HINT)
        step.published[str(port)] = found["output"]
    return step


def _source(found: re.Match | None, value: object, port: str, where: str, inputs: dict, jobs: dict) -> Source:
    if found is None or found["output"] is not None:
        raise InvalidPipelineError(f"{where}: input {port} is {value!r}, not a binding",
                                   "bind it to ${{parent.inputs.NAME}} or ${{parent.jobs.STEP.outputs.PORT}}")
    if found["input"] is not None:
        if found["input"] not in inputs:
            raise InvalidPipelineError(f"{where}: input {port} binds to the pipeline input {found['input']!r}, "
                                       "which is not declared (or is a value, not a folder or file)",
                                       "declare it under `inputs:` with a type and a path")
        return Source(input=found["input"])
    job, output = found["job"], found["port"]
    if job not in jobs:
        raise InvalidPipelineError(f"{where}: input {port} binds to the step {job!r}, which does not exist", _HINT)
    other = jobs[job].get("component") if isinstance(jobs[job], dict) else None
    other = COMPONENTS.get(SHORT_NAMES.get(other, other)) if isinstance(other, str) else None
    if other is not None and output not in other.outputs:
        raise InvalidPipelineError(f"{where}: input {port} binds to {job}.{output}, but {other.name} has no output "
                                   f"{output!r}", f"its outputs: {', '.join(other.outputs)}")
    return Source(job=job, port=output)


def _pipeline_outputs(raw: object, steps: dict[str, Step], path: Path) -> dict[str, tuple[str, str]]:
    if not isinstance(raw, dict):
        raise InvalidPipelineError(f"{path}: outputs must be a mapping of names", _HINT)
    bound = {name: (step.name, port) for step in steps.values() for port, name in step.published.items()}
    outputs = {}
    for name, value in raw.items():
        name, found = str(name), _binding(value)
        if found and found["job"] is not None:
            step = steps.get(found["job"])
            if step is None or found["port"] not in step.component.outputs:
                raise InvalidPipelineError(f"{path}: output {name!r} binds to {found['job']}.{found['port']}, "
                                           "which no step writes", _HINT)
            outputs[name] = (found["job"], found["port"])
        elif found is None and (value is None or isinstance(value, dict)):  # declared; a step binds to it
            if name not in bound:
                raise InvalidPipelineError(f"{path}: output {name!r} is declared but no step binds to it", _HINT)
            outputs[name] = bound[name]
        else:
            raise InvalidPipelineError(f"{path}: output {name!r} must be ${{{{parent.jobs.STEP.outputs.PORT}}}}", _HINT)
    for name, source in bound.items():
        outputs.setdefault(name, source)
    return outputs


def _in_order(steps: dict[str, Step], path: Path) -> dict[str, Step]:
    """The steps in an order they can run in (a step after the ones it reads from; else in the file's order)."""
    graph = graphlib.TopologicalSorter({name: {s.job for s in step.inputs.values() if s.job} for name, step in
                                        steps.items()})
    try:
        graph.prepare()
    except graphlib.CycleError as exc:
        cycle = exc.args[1]
        raise InvalidPipelineError(f"{path}: steps {' -> '.join(cycle)} read each other's outputs in a cycle",
                                   "a step can only read what steps before it wrote") from None
    order: list[str] = []
    ready: list[str] = []
    while graph.is_active():
        ready = sorted([*ready, *graph.get_ready()], key=list(steps).index)
        order.append(ready.pop(0))  # the first in the file of those that can run
        graph.done(order[-1])
    return {name: steps[name] for name in order}


def describe(pipeline: Pipeline) -> str:
    """The graph in words: the inputs, each step with where its inputs come from, and what is published."""
    lines = [f"pipeline {pipeline.path}: {len(pipeline.steps)} step(s)"]
    for name, (kind, where) in pipeline.inputs.items():
        lines.append(f"  input  {name} ({kind}): {where}")
    for name, value in pipeline.values.items():
        lines.append(f"  input  {name} = {value!r}")
    width = max(len(name) for name in pipeline.steps)
    for step in pipeline.steps.values():
        reads = ", ".join(f"{port} <- {source}" for port, source in step.inputs.items())
        settings = ", ".join(f"{k}={v!r}" for k, v in step.parameters.items())
        lines.append(f"  step   {step.name:<{width}}  {step.component.name}"
                     + (f"  [{reads}]" if reads else "") + (f"  ({settings})" if settings else "")
                     + f"  -> {', '.join(step.component.outputs)}")
    for name, (step, port) in pipeline.outputs.items():
        lines.append(f"  output {name} <- {step}.{port}")
    if not pipeline.outputs:
        lines.append("  outputs: none declared, so every step's output is published")
    return "\n".join(lines)
