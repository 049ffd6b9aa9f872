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

Every mistake is one line naming the line of the file and the step (InvalidPipelineError): an unknown
key, component, port or parameter (with the closest name), a key given twice, a name that is not a plain
name (outputs and steps become folders), a value of the wrong type, a missing or dangling binding, a cycle.
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
_NAME = re.compile(r"^[\w-]{1,100}$", re.ASCII)  # what a binding can name; outputs and steps become folders
_TOP_KEYS = {"type", "inputs", "jobs", "outputs", "display_name", "description", "experiment_name", "settings",
             "$schema", "name", "tags", "compute", "identity"}  # Azure's where-and-how keys: read and ignored
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
        raw = yaml.load(read_text(path), Loader=_Loader)  # noqa: S506 (a SafeLoader that refuses duplicate keys)
    except FileNotFoundError:
        raise InvalidPipelineError(f"{path} does not exist", "pass a pipeline file (.yaml)") from None
    except _DuplicateKey as exc:
        raise InvalidPipelineError(f"{path}:{exc.line}: {_shown(exc.key)} is given twice (first on line {exc.first})",
                                   "keep one: YAML would silently keep the last") from None
    except yaml.MarkedYAMLError as exc:  # a syntax error: where, and what YAML found there
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise InvalidPipelineError(f"{where}: not valid YAML ({exc.problem or exc.context})", _HINT) from None
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "nested too deeply"
        raise InvalidPipelineError(f"{path} cannot be read as YAML ({reason})", _HINT) from None
    if not isinstance(raw, dict) or raw.get("type") != "pipeline":
        raise InvalidPipelineError(f"{path} is not a pipeline file (it needs `type: pipeline`)", _HINT)
    unknown = sorted(set(raw) - _TOP_KEYS, key=str)
    if unknown:
        raise InvalidPipelineError(f"{_at(path, raw, unknown[0])}: unknown key {_shown(unknown[0])} at the top",
                                   _closest(unknown[0], _TOP_KEYS, _HINT))
    settings = raw.get("settings") or {}
    if not isinstance(settings, dict) or not isinstance(settings.get("force_rerun", False), bool):
        raise InvalidPipelineError(f"{_at(path, raw, 'settings')}: settings must be a mapping, and its force_rerun "
                                   "true or false", _HINT)
    inputs, values = _pipeline_inputs(raw.get("inputs") or {}, path)
    jobs = raw.get("jobs")
    if not isinstance(jobs, dict) or not jobs:
        raise InvalidPipelineError(f"{path} has no jobs", "add `jobs:`, one entry per step")
    for name in jobs:
        _check_name(name, "step", path, jobs)
    steps = {name: _step(name, job, inputs, values, jobs, path) for name, job in jobs.items()}
    outputs = _pipeline_outputs(raw.get("outputs") or {}, steps, path)
    return Pipeline(path, inputs, values, _in_order(steps, path), outputs, settings.get("force_rerun", False))


class _DuplicateKey(Exception):
    def __init__(self, key: object, line: int, first: int) -> None:
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


class _Mapping(dict):
    """A YAML mapping that remembers the line of each key, for messages."""

    lines: dict


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error, not the last one silently kept
    (two jobs of one name), and each mapping knows its keys' lines."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Mapping:
    lines: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden on purpose
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            if key in lines:
                raise _DuplicateKey(key, line, lines[key])
            lines[key] = line
        except TypeError:  # an unhashable key: construct_mapping names it
            pass
    mapping = _Mapping(loader.construct_mapping(node, deep=True))
    mapping.lines = lines
    return mapping


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _at(path: Path, mapping: object, key: object) -> str:
    """``file:line`` of a key in a mapping (the file alone where the line is not known)."""
    line = getattr(mapping, "lines", {}).get(key)
    return f"{path}:{line}" if line else str(path)


def _closest(word: object, choices, otherwise: str) -> str:
    close = difflib.get_close_matches(str(word), sorted(map(str, choices)), n=1)
    return f"did you mean {close[0]}?" if close else otherwise


def _shown(value: object) -> str:
    """A value from the file, for a message: a scalar's repr, cut short; a list or mapping by its kind (a few
    hundred bytes of YAML aliases can stand for a list whose repr would take gigabytes)."""
    if isinstance(value, (list, dict)):
        return f"a {'list' if isinstance(value, list) else 'mapping'} of {len(value)} item(s)"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_name(name: object, what: str, path: Path, mapping: dict) -> None:
    """A step's or an output's name becomes a folder (in the cache, and under --output): a plain name only."""
    if not isinstance(name, str):  # YAML reads on, off, yes, no, true, null and numbers as other types
        raise InvalidPipelineError(f"{_at(path, mapping, name)}: the {what} name {_shown(name)} is read as a "
                                   f"{type(name).__name__}, not a name", "quote it in the file, or choose another name")
    if not _NAME.match(name):
        raise InvalidPipelineError(f"{_at(path, mapping, name)}: the {what} name {_shown(name)} is not a plain name",
                                   "use letters, digits, _ and - (at most 100): it names a folder and a binding")


_HINT = "see the README, \"Pipelines\""


def _pipeline_inputs(raw: object, path: Path) -> tuple[dict[str, tuple[str, Path]], dict[str, object]]:
    if not isinstance(raw, dict):
        raise InvalidPipelineError(f"{path}: inputs must be a mapping of names", _HINT)
    folders, values = {}, {}
    for name, spec in raw.items():
        _check_name(name, "input", path, raw)
        if isinstance(spec, dict):
            kind, where = spec.get("type"), spec.get("path")
            if kind not in PORT_TYPES or not isinstance(where, str) or not where:
                raise InvalidPipelineError(f"{_at(path, raw, name)}: input {_shown(name)} needs a type (uri_folder or "
                                           "uri_file) and a path", _HINT)
            folders[name] = (kind, Path(os.path.normpath(path.parent / where)))
        elif spec is None or isinstance(spec, (bool, int, float, str)):
            values[name] = spec
        else:
            raise InvalidPipelineError(f"{_at(path, raw, name)}: input {_shown(name)} is neither a folder or file "
                                       "nor a value", _HINT)
    return folders, values


def _binding(value: object) -> re.Match | None:
    return _BINDING.match(value.strip()) if isinstance(value, str) else None


def _step(name: str, job: object, inputs: dict, values: dict, jobs: dict, path: Path) -> Step:
    def where(mapping: object = jobs, key: object = name) -> str:
        return f"{_at(path, mapping, key)}: step {_shown(name)}"

    if not isinstance(job, dict):
        raise InvalidPipelineError(f"{where()} is not a mapping", _HINT)
    extra = sorted(set(job) - _JOB_KEYS, key=str)
    if extra:
        raise InvalidPipelineError(f"{where(job, extra[0])}: unknown key {_shown(extra[0])}",
                                   _closest(extra[0], _JOB_KEYS, f"a step has {', '.join(sorted(_JOB_KEYS))}"))
    wanted = job.get("component")
    component = COMPONENTS.get(SHORT_NAMES.get(wanted, wanted)) if isinstance(wanted, str) else None
    if component is None:
        raise InvalidPipelineError(f"{where(job, 'component')}: unknown component {_shown(wanted)}",
                                   _closest(wanted, [*COMPONENTS, *SHORT_NAMES], f"use one of {', '.join(COMPONENTS)}"))
    step = Step(name, component)
    given = job.get("inputs") or {}
    if not isinstance(given, dict):
        raise InvalidPipelineError(f"{where(job, 'inputs')}: inputs must be a mapping", _HINT)
    for key, value in given.items():
        here = where(given, key)
        key = str(key)
        found = _binding(value)
        if key in component.inputs:
            step.inputs[key] = _source(found, value, key, here, inputs, jobs)
        elif key in component.parameters:
            if found and found["input"] is not None and found["input"] in values:
                value = values[found["input"]]
            elif found:
                raise InvalidPipelineError(f"{here}: parameter {key} can bind only to a value among the pipeline's "
                                           f"inputs, not {value.strip()}", _closest(found["input"], values, _HINT))
            if not fits(component.parameters[key], value):
                kind = component.parameters[key]
                raise InvalidPipelineError(f"{here}: parameter {key} is {_shown(value)}; it must be "
                                           f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}", _HINT)
            step.parameters[key] = value
        else:
            raise InvalidPipelineError(f"{here}: {component.name} has no input or parameter {_shown(key)}",
                                       _closest(key, [*component.inputs, *component.parameters],
                                                f"its inputs: {', '.join(component.inputs) or 'none'}; its "
                                                f"parameters: {', '.join(component.parameters) or 'none'}"))
    missing = [port for port in component.inputs if port not in step.inputs and port not in component.optional]
    if missing:
        raise InvalidPipelineError(f"{where()}: input {missing[0]} is not bound",
                                   "bind it to ${{parent.inputs.NAME}} or ${{parent.jobs.STEP.outputs.PORT}}")
    outputs = job.get("outputs") or {}
    if not isinstance(outputs, dict):
        raise InvalidPipelineError(f"{where(job, 'outputs')}: outputs must be a mapping", _HINT)
    for port, value in outputs.items():
        if port not in component.outputs:
            raise InvalidPipelineError(f"{where(outputs, port)}: {component.name} has no output {_shown(port)}",
                                       _closest(port, component.outputs,
                                                f"its outputs: {', '.join(component.outputs)}"))
        found = _binding(value)
        if not found or found["output"] is None:
            raise InvalidPipelineError(f"{where(outputs, port)}: output {port} must bind to "
                                       "${{parent.outputs.NAME}}", _HINT)
        _check_name(found["output"], "output", path, outputs)
        step.published[str(port)] = found["output"]
    return step


def _source(found: re.Match | None, value: object, port: str, where: str, inputs: dict, jobs: dict) -> Source:
    if found is None or found["output"] is not None:
        raise InvalidPipelineError(f"{where}: input {port} is {_shown(value)}, not a binding",
                                   "bind it to ${{parent.inputs.NAME}} or ${{parent.jobs.STEP.outputs.PORT}}")
    if found["input"] is not None:
        if found["input"] not in inputs:
            raise InvalidPipelineError(f"{where}: input {port} binds to the pipeline input {_shown(found['input'])}, "
                                       "which is not declared (or is a value, not a folder or file)",
                                       _closest(found["input"], inputs,
                                                "declare it under `inputs:` with a type and a path"))
        return Source(input=found["input"])
    job, output = found["job"], found["port"]
    if job not in jobs:
        raise InvalidPipelineError(f"{where}: input {port} binds to the step {_shown(job)}, which does not exist",
                                   _closest(job, jobs, _HINT))
    other = jobs[job].get("component") if isinstance(jobs[job], dict) else None
    other = COMPONENTS.get(SHORT_NAMES.get(other, other)) if isinstance(other, str) else None
    if other is not None and output not in other.outputs:
        raise InvalidPipelineError(f"{where}: input {port} binds to {job}.{output}, but {other.name} has no output "
                                   f"{_shown(output)}", _closest(output, other.outputs,
                                                           f"its outputs: {', '.join(other.outputs)}"))
    return Source(job=job, port=output)


def _pipeline_outputs(raw: object, steps: dict[str, Step], path: Path) -> dict[str, tuple[str, str]]:
    if not isinstance(raw, dict):
        raise InvalidPipelineError(f"{path}: outputs must be a mapping of names", _HINT)
    bound = {name: (step.name, port) for step in steps.values() for port, name in step.published.items()}
    outputs = {}
    for name, value in raw.items():
        _check_name(name, "output", path, raw)
        here, found = _at(path, raw, name), _binding(value)
        if found and found["job"] is not None:
            step = steps.get(found["job"])
            if step is None or found["port"] not in step.component.outputs:
                hint = (_closest(found["job"], steps, _HINT) if step is None else
                        _closest(found["port"], step.component.outputs,
                                 f"its outputs: {', '.join(step.component.outputs)}"))
                raise InvalidPipelineError(f"{here}: output {_shown(name)} binds to {found['job']}.{found['port']}, "
                                           "which no step writes", hint)
            outputs[name] = (found["job"], found["port"])
        elif found is None and (value is None or isinstance(value, dict)):  # declared; a step binds to it
            if name not in bound:
                raise InvalidPipelineError(f"{here}: output {_shown(name)} is declared but no step binds to it",
                                           _closest(name, bound, _HINT))
            outputs[name] = bound[name]
        else:
            raise InvalidPipelineError(f"{here}: output {_shown(name)} must be "
                                       "${{parent.jobs.STEP.outputs.PORT}}", _HINT)
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
        lines.append(f"  input  {name} = {_shown(value)}")
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
