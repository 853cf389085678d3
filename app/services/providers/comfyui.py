"""ComfyUI: an API-format workflow (see comfyui_workflow.py) queued on a ComfyUI server and polled to completion.

Protocol (ComfyUI's HTTP API as of its 2024-2025 releases): `POST /prompt` queues a graph and answers
`prompt_id` (or 400 with `error` and `node_errors`); `GET /history/{prompt_id}` is empty until the
prompt has run, then holds its status and outputs; `GET /view` serves an output file; `GET /queue`
lists running and pending prompts; `POST /queue {"delete": [...]}` drops pending ones and
`POST /interrupt {"prompt_id": ...}` stops the running one. Completion is followed by polling
/history rather than the websocket: a poll cannot miss an event, and a worker needs no socket per image.
The websocket only adds progress, when someone listens (comfyui_progress.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import OrderedDict
from typing import Any

import httpx

from app.services.providers.base import (
    GeneratedImage,
    ImageRequest,
    ProviderError,
    ProviderKind,
    ProviderRejected,
    ProviderUnavailable,
    provider_params,
    request_values,
)
from app.services.providers.comfyui_progress import ProgressSocket, ws_url
from app.services.providers.comfyui_workflow import Workflow, WorkflowError
from app.services.providers.http import HttpProvider, content_type, error_text
from app.services.providers.progress import ProgressFeed

POLL_FAILURES = 5  # consecutive failed /history polls before the image fails (retryably)
QUEUE_CHECK_SECONDS = 5.0  # how often a prompt missing from /history is looked for in /queue
INTERRUPT_TIMEOUT_SECONDS = 2.0
REMEMBERED_PROMPTS = 4096  # request_id -> prompt_id entries kept for cancels; oldest dropped first
MESSAGE_CHARS = 1000


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


class ComfyUIProvider(HttpProvider):
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
        self.progress = ProgressSocket(ws_url(self.base_url, self.client_id), self._headers())
        # request_id -> prompt_id of images in flight, and of cancelled ones until interrupt() takes them.
        self._prompts: OrderedDict[str, str] = OrderedDict()

    async def generate(self, request: ImageRequest) -> GeneratedImage:
        graph = self._render(request)
        prompt_id = str(uuid.uuid4())
        key = request.request_id or prompt_id
        self._remember(key, prompt_id)
        feed = ProgressFeed(request.on_progress)
        watched = [prompt_id] if feed.wanted else []
        for pid in watched:
            self.progress.watch(pid, feed)  # before the prompt is queued, so its first events are ours
        cancelled = False
        try:
            prompt_id = await self._submit(graph, prompt_id)
            self._remember(key, prompt_id)
            if watched and prompt_id not in watched:  # an older server chose its own id
                watched.append(prompt_id)
                self.progress.watch(prompt_id, feed)
            entry = await self._wait(prompt_id)
            return await self._fetch(entry)
        except asyncio.CancelledError:
            cancelled = True  # keep the prompt id: the worker calls interrupt() next
            raise
        finally:
            if not cancelled:
                self._prompts.pop(key, None)
            for pid in watched:
                self.progress.unwatch(pid)
            await feed.aclose()

    async def aclose(self) -> None:
        await self.progress.aclose()

    async def interrupt(self, request: ImageRequest) -> None:
        """Drops the image's prompt from ComfyUI's queue, or stops it if it is the one running; nothing else."""
        prompt_id = self._prompts.pop(request.request_id, None)
        if prompt_id is None:
            return
        await self._drop(prompt_id)

    # -- steps ------------------------------------------------------------------------------------
    def _values(self, request: ImageRequest) -> dict[str, Any]:
        allowed = provider_params(request.params, ProviderKind.COMFYUI)
        values: dict[str, Any] = {k: v for k, v in allowed.items() if isinstance(v, str | int | float | bool)}
        values.update(request_values(request))
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
            text = _validation_text(answer) if answer is not None else error_text(response)
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
            raise self._error(ProviderRejected, f"GET /history answered {response.status_code} {error_text(response)}")
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
        ctype = content_type(data)
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
