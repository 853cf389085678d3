"""A ComfyUI workflow: an API-format graph whose `{{name}}` placeholders and mapped inputs take an image's values."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_WHOLE = re.compile(r"^\s*\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}\s*$")


class WorkflowError(ValueError):
    """The workflow file or its field map cannot be used."""


@dataclass(frozen=True, slots=True)
class Workflow:
    """An API-format ComfyUI graph with `{{name}}` placeholders and/or explicit `node.inputs.field` targets."""

    graph: dict[str, Any]
    fields: dict[str, tuple[str, str]]  # value name -> (node id, input name)

    @classmethod
    def load(cls, path: str | Path, fields: Mapping[str, str] | None = None) -> Workflow:
        try:
            graph = json.loads(Path(path).read_text())
        except OSError as exc:
            raise WorkflowError(f"cannot read ComfyUI workflow {str(path)!r}: {exc}") from exc
        except ValueError as exc:
            raise WorkflowError(f"ComfyUI workflow {str(path)!r} is not JSON: {exc}") from exc
        return cls.from_graph(graph, fields, source=str(path))

    @classmethod
    def from_graph(cls, graph: Any, fields: Mapping[str, str] | None = None, *, source: str = "workflow") -> Workflow:
        if isinstance(graph, dict) and "nodes" in graph and "links" in graph:
            raise WorkflowError(
                f"{source} is in ComfyUI's UI format; export it with 'Save (API Format)' instead"
            )
        if not isinstance(graph, dict) or not graph:
            raise WorkflowError(f"{source}: expected an API-format graph: an object of nodes by id")
        for node_id, node in graph.items():
            if not isinstance(node, dict) or "class_type" not in node or not isinstance(node.get("inputs"), dict):
                raise WorkflowError(f"{source}: node {node_id!r} has no class_type and inputs (is it API format?)")
        targets: dict[str, tuple[str, str]] = {}
        for name, path in (fields or {}).items():
            targets[name] = _target(graph, name, path, source)
        workflow = cls(graph, targets)
        if "prompt" not in workflow.names():
            raise WorkflowError(
                f"{source}: nothing receives the prompt: put \"{{{{prompt}}}}\" in a text input "
                "or map it with a field such as prompt = \"6.inputs.text\""
            )
        return workflow

    def names(self) -> set[str]:
        """Every value name the workflow asks for, through placeholders or fields."""
        found: set[str] = set(self.fields)
        _walk_strings(self.graph, lambda s: found.update(_PLACEHOLDER.findall(s)))
        return found

    def render(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of the graph with placeholders and fields filled in; a missing value raises KeyError."""
        graph = _substitute(self.graph, values)
        for name, (node_id, input_name) in self.fields.items():
            graph[node_id]["inputs"][input_name] = values[name]
        assert isinstance(graph, dict)
        return graph


def _target(graph: dict[str, Any], name: str, path: str, source: str) -> tuple[str, str]:
    parts = path.split(".")
    if len(parts) == 3 and parts[1] == "inputs":
        node_id, input_name = parts[0], parts[2]
    elif len(parts) == 2:
        node_id, input_name = parts
    else:
        raise WorkflowError(f"{source}: field {name} = {path!r}: expected node.inputs.field, e.g. 6.inputs.text")
    node = graph.get(node_id)
    if node is None:
        raise WorkflowError(f"{source}: field {name} = {path!r}: there is no node {node_id!r}")
    if input_name not in node["inputs"]:
        known = ", ".join(sorted(node["inputs"])) or "none"
        raise WorkflowError(
            f"{source}: field {name} = {path!r}: node {node_id} ({node['class_type']}) has no input "
            f"{input_name!r} (it has: {known})"
        )
    return node_id, input_name


def _walk_strings(value: Any, visit: Callable[[str], object]) -> None:
    if isinstance(value, str):
        visit(value)
    elif isinstance(value, dict):
        for v in value.values():
            _walk_strings(v, visit)
    elif isinstance(value, list):
        for v in value:
            _walk_strings(v, visit)


def _substitute(value: Any, values: Mapping[str, Any]) -> Any:
    if isinstance(value, str):
        whole = _WHOLE.match(value)
        if whole:
            return values[whole.group(1)]  # typed: "{{seed}}" becomes the int
        if "{{" in value:
            return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), value)
        return value
    if isinstance(value, dict):
        return {k: _substitute(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, values) for v in value]
    return value
