"""ComfyUI: an API-format workflow with placeholders, queued on a ComfyUI server and polled to completion.

Protocol (ComfyUI's HTTP API as of its 2024-2025 releases): `POST /prompt` queues a graph and answers
`prompt_id` (or 400 with `error` and `node_errors`); `GET /history/{prompt_id}` is empty until the
prompt has run, then holds its status and outputs; `GET /view` serves an output file; `GET /queue`
lists running and pending prompts; `POST /queue {"delete": [...]}` drops pending ones and
`POST /interrupt {"prompt_id": ...}` stops the running one. Completion is followed by polling
/history rather than the websocket: a poll cannot miss an event, and a worker needs no socket per image.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.services.image_service import (
    GeneratedImage,
    ImageRequest,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    _content_type,
    _error_text,
    _HttpProvider,
    provider_params,
)

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_WHOLE = re.compile(r"^\s*\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}\s*$")
POLL_FAILURES = 5  # consecutive failed /history polls before the image fails (retryably)
QUEUE_CHECK_SECONDS = 5.0  # how often a prompt missing from /history is looked for in /queue
INTERRUPT_TIMEOUT_SECONDS = 2.0
REMEMBERED_PROMPTS = 4096  # request_id -> prompt_id entries kept for cancels; oldest dropped first
MESSAGE_CHARS = 1000


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


def parse_fields(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """`prompt=6.inputs.text,seed=3.inputs.seed` (the environment form) or a mapping (the catalogue form)."""
    if not spec:
        return {}
    if isinstance(spec, Mapping):
        return {str(k): str(v) for k, v in spec.items()}
    out: dict[str, str] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        name, sep, path = part.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise WorkflowError(f"COMFYUI_FIELDS entry {part.strip()!r} is not name=node.inputs.field")
        out[name.strip()] = path.strip()
    return out


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


def _walk_strings(value: Any, visit: Any) -> None:
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


def _clip(text: str) -> str:
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 1] + "…"


def _validation_text(body: Any) -> str:
    """ComfyUI's 400: a top-level `error` and, per node, `class_type` and `errors` with message and details."""
    if not isinstance(body, dict):
        return str(body)
    err = body.get("error")
    head = err.get("message") or err.get("type") if isinstance(err, dict) else err
    parts = [str(head)] if head else []
    nodes = body.get("node_errors")
    if isinstance(nodes, dict):
        for node_id, info in nodes.items():
            if not isinstance(info, dict):
                continue
            reasons = []
            for e in info.get("errors") or []:
                if isinstance(e, dict):
                    msg, details = str(e.get("message", "")), str(e.get("details", ""))
                    reasons.append(f"{msg}: {details}" if details and details != msg else msg)
            parts.append(f"node {node_id} ({info.get('class_type', '?')}): {'; '.join(reasons) or 'invalid'}")
    if not parts and isinstance(err, dict) and err.get("details"):
        parts.append(str(err["details"]))
    return "; ".join(parts) or json.dumps(body)[:MESSAGE_CHARS]


class ComfyUIProvider(_HttpProvider):
    """A ComfyUI server running one API-format workflow per image: POST /prompt, poll /history, GET /view."""

    name = "comfyui"

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        *,
        workflow: Workflow,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = 30.0,
        output_node: str | None = None,
        poll_seconds: float = 0.5,
        prompt_timeout: float = 600.0,
    ) -> None:
        super().__init__(client, base_url, api_key=api_key, model=model, timeout=timeout)
        output_node = output_node or None
        if output_node is not None and output_node not in workflow.graph:
            raise WorkflowError(f"output node {output_node!r} is not a node of the workflow")
        self.workflow = workflow
        self._names = workflow.names()
        self.output_node = output_node
        self.poll_seconds = poll_seconds
        self.prompt_timeout = prompt_timeout
        self.client_id = str(uuid.uuid4())
        # request_id -> prompt_id of images in flight, and of cancelled ones until interrupt() takes them.
        self._prompts: OrderedDict[str, str] = OrderedDict()

    async def generate(self, request: ImageRequest) -> GeneratedImage:
        graph = self._render(request)
        prompt_id = str(uuid.uuid4())
        key = request.request_id or prompt_id
        self._remember(key, prompt_id)
        cancelled = False
        try:
            prompt_id = await self._submit(graph, prompt_id)
            self._remember(key, prompt_id)
            entry = await self._wait(prompt_id)
            return await self._fetch(entry)
        except asyncio.CancelledError:
            cancelled = True  # keep the prompt id: the worker calls interrupt() next
            raise
        finally:
            if not cancelled:
                self._prompts.pop(key, None)

    async def interrupt(self, request: ImageRequest) -> None:
        """Drops the image's prompt from ComfyUI's queue, or stops it if it is the one running; nothing else."""
        prompt_id = self._prompts.pop(request.request_id, None)
        if prompt_id is None:
            return
        await self._drop(prompt_id)

    # -- steps ------------------------------------------------------------------------------------
    def _values(self, request: ImageRequest) -> dict[str, Any]:
        allowed = provider_params(request.params, "comfyui")
        values: dict[str, Any] = {k: v for k, v in allowed.items() if isinstance(v, str | int | float | bool)}
        values.update(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or "",
            seed=request.seed,
            width=request.width,
            height=request.height,
        )
        if request.model or self.model:
            values["model"] = request.model or self.model
        return values

    def _render(self, request: ImageRequest) -> dict[str, Any]:
        values = self._values(request)
        missing = sorted(self._names - set(values))
        if missing:
            known = ", ".join(sorted(values))
            raise self._error(
                ProviderRejected,
                f"the workflow asks for {', '.join(missing)}, which this image has no value for "
                f"(known: {known}; add the rest to params)",
            )
        return self.workflow.render(values)

    def _remember(self, key: str, prompt_id: str) -> None:
        self._prompts[key] = prompt_id
        self._prompts.move_to_end(key)
        while len(self._prompts) > REMEMBERED_PROMPTS:
            self._prompts.popitem(last=False)

    async def _submit(self, graph: dict[str, Any], prompt_id: str) -> str:
        # Servers since mid-2025 take the client's prompt_id, so a cancel during this call finds it;
        # older ones choose their own and it is taken from the answer.
        body = {"prompt": graph, "client_id": self.client_id, "prompt_id": prompt_id}
        response = await self._request("POST", "/prompt", body=body)
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if response.status_code >= 400:
            text = _validation_text(answer) if answer is not None else _error_text(response)
            raise self._error(ProviderRejected, _clip(f"workflow rejected ({response.status_code}): {text}"))
        if not isinstance(answer, dict) or not answer.get("prompt_id"):
            raise self._error(ProviderRejected, f"POST /prompt answered {response.status_code} without a prompt_id")
        return str(answer["prompt_id"])

    async def _wait(self, prompt_id: str) -> dict[str, Any]:
        """The prompt's history entry once it has run; polls /history, and /queue now and then."""
        started = time.monotonic()
        deadline = started + self.prompt_timeout
        next_queue_check = started + QUEUE_CHECK_SECONDS
        failures = 0
        while True:
            try:
                entry = await self._history(prompt_id)
                failures = 0
            except ProviderUnavailable:
                failures += 1
                if failures >= POLL_FAILURES:
                    raise
                entry = None
            if entry is not None:
                return self._finished(prompt_id, entry)
            now = time.monotonic()
            if now >= deadline:
                await self._drop(prompt_id)
                raise self._error(
                    ProviderUnavailable, f"prompt {prompt_id} did not finish within {self.prompt_timeout:g}s",
                    retryable=True,
                )
            if now >= next_queue_check and failures == 0:
                next_queue_check = now + QUEUE_CHECK_SECONDS
                if await self._queue_state(prompt_id) is None and await self._history(prompt_id) is None:
                    raise self._error(
                        ProviderUnavailable,
                        f"prompt {prompt_id} is neither queued nor finished: was the server restarted "
                        "or its queue cleared?",
                        retryable=True,
                    )
            await asyncio.sleep(self.poll_seconds)

    async def _history(self, prompt_id: str) -> dict[str, Any] | None:
        response = await self._request("GET", f"/history/{prompt_id}")
        if response.status_code >= 400:
            raise self._error(ProviderRejected, f"GET /history answered {response.status_code} {_error_text(response)}")
        try:
            body = response.json()
        except ValueError:
            return None
        entry = body.get(prompt_id) if isinstance(body, dict) else None
        return entry if isinstance(entry, dict) else None

    def _finished(self, prompt_id: str, entry: dict[str, Any]) -> dict[str, Any]:
        status = entry.get("status") if isinstance(entry.get("status"), dict) else {}
        assert isinstance(status, dict)
        if status.get("status_str") != "error":
            return entry
        events = {m[0]: m[1] for m in status.get("messages") or [] if isinstance(m, list | tuple) and len(m) == 2}
        error = events.get("execution_error")
        if isinstance(error, dict):
            node = f"node {error.get('node_id', '?')} ({error.get('node_type', '?')})"
            kind = error.get("exception_type")
            message = str(error.get("exception_message", "")).strip() or "no message"
            raise self._error(
                ProviderRejected, _clip(f"{node} failed: {f'{kind}: ' if kind else ''}{message}")
            )
        stopped = events.get("execution_interrupted")
        if isinstance(stopped, dict):
            # Not by us (our cancel ends this task first): someone stopped it on the server; try again.
            raise self._error(
                ProviderUnavailable,
                f"prompt {prompt_id} was interrupted on the server at node {stopped.get('node_id', '?')}",
                retryable=True,
            )
        raise self._error(ProviderRejected, f"prompt {prompt_id} failed without an execution_error message")

    async def _fetch(self, entry: dict[str, Any]) -> GeneratedImage:
        image = self._pick_output(entry.get("outputs"))
        params = {k: str(image.get(k, "")) for k in ("filename", "subfolder", "type")}
        response = await self._request("GET", "/view", params=params)
        if response.status_code >= 400:
            raise self._error(
                ProviderRejected, f"GET /view of {params['filename']!r} answered {response.status_code}"
            )
        data = response.content
        if not data:
            raise self._error(ProviderRejected, f"output {params['filename']!r} is empty")
        ctype = _content_type(data)
        if ctype == "application/octet-stream":
            ctype = response.headers.get("content-type", ctype).split(";")[0]
        return GeneratedImage(data, ctype)

    def _pick_output(self, outputs: Any) -> dict[str, Any]:
        """The configured output node's first image, else the first saved ("output") image, else any image."""
        if not isinstance(outputs, dict):
            outputs = {}
        nodes = [self.output_node] if self.output_node else list(outputs)
        images = [
            img
            for node_id in nodes
            for img in (outputs.get(node_id) or {}).get("images") or []
            if isinstance(img, dict) and img.get("filename")
        ]
        if not images:
            where = f"node {self.output_node}" if self.output_node else "the workflow"
            raise self._error(ProviderRejected, f"{where} produced no image (does it end in a SaveImage node?)")
        saved = [img for img in images if img.get("type") == "output"]
        return (saved or images)[0]

    async def _queue_state(self, prompt_id: str, *, timeout: float | None = None) -> str | None:
        """"running", "pending" or None, from GET /queue (items are [number, prompt_id, ...])."""
        response = await self._request("GET", "/queue", timeout=timeout)
        try:
            body = response.json()
        except ValueError:
            return None
        if not isinstance(body, dict):
            return None
        for state, key in (("running", "queue_running"), ("pending", "queue_pending")):
            for item in body.get(key) or []:
                if isinstance(item, list | tuple) and len(item) > 1 and item[1] == prompt_id:
                    return state
        return None

    async def _drop(self, prompt_id: str) -> None:
        """Best effort: the prompt is deleted if pending, interrupted if running, left alone otherwise."""
        with contextlib.suppress(ProviderError, httpx.HTTPError):
            # Delete first: a no-op unless pending, and a deleted prompt cannot start in the meantime.
            await self._request("POST", "/queue", body={"delete": [prompt_id]}, timeout=INTERRUPT_TIMEOUT_SECONDS)
            if await self._queue_state(prompt_id, timeout=INTERRUPT_TIMEOUT_SECONDS) == "running":
                # Older servers ignore prompt_id and stop whatever runs: the check keeps that ours.
                await self._request(
                    "POST", "/interrupt", body={"prompt_id": prompt_id}, timeout=INTERRUPT_TIMEOUT_SECONDS
                )
