"""Local servers speaking the OpenAI Images and AUTOMATIC1111 txt2img protocols, with scripted faults.

    with ProviderServer("openai") as server:   # or "automatic1111"; api_key=..., latency=...
        server.script("500", "429:2", "ok")      # next answers: a 500, a 429 with Retry-After: 2, then images
        server.script(["500", "ok"])             # a list works too
        ... point IMAGE_PROVIDER_URL at server.url ...
        server.requests                          # [{"path", "json", "headers", "at"}, ...]

Script steps: "ok", "500", "502", "503", "429" or "429:<Retry-After value>" (seconds or an HTTP date),
"400:<message>" (the protocol's error JSON carrying that message, any text: a lone surrogate such as
"\\ud800" goes out as its JSON escape, as servers that cut text mid-character send it), "hang" (never answers within a
client's timeout), "garbage" (200 with no image), "cut" (a streamed answer that ends after its first
partial image). When the script is empty, every answer is "ok" (after `latency` seconds), or with
`fault_rates={"500": 0.05, "429": 0.02}` a step drawn at those rates (seeded by `seed`); each entry of
`server.requests` records the step it got. `api_key`
makes the server answer 401 without that bearer key.

Progress: an OpenAI request with `stream: true` is answered with Server-Sent Events, `partial_images`
`image_generation.partial_image` events then `image_generation.completed`, spread over `latency`.
A1111's `GET /sdapi/v1/progress` describes the txt2img request in flight (its `steps`, default 20,
advancing over `latency`, with a small `current_image`), or an idle server; `server.progress_polls`
counts the calls.
`server.url` is the base a provider is configured with: `<root>/v1` for openai, `<root>` for A1111.
`server.interrupts` counts POSTs to /sdapi/v1/interrupt; `server.max_in_flight` is the most requests
it ever held at once. The server runs uvicorn in a daemon thread of the calling process, so a fixture
in any test module can start one and hand `server.url` to worker processes.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import Any, Self

import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from app.harness import free_port, wait_until


def png(width: int, height: int, colour: tuple[int, int, int] = (200, 80, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, "PNG")
    return buf.getvalue()


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps({'type': event, **data})}\n\n"


class ScriptedServer:
    """A Starlette app served by uvicorn on a thread, on a free port, with a script of answers."""

    def __init__(self, routes: list[Route], what: str) -> None:
        self.port = free_port()
        self.what = what
        self._script: deque[str] = deque()
        self._lock = threading.Lock()
        config = uvicorn.Config(Starlette(routes=routes), host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def script(self, *steps: str | Iterable[str]) -> None:
        """Queue the next answers, in order; ok once they are used up."""
        with self._lock:
            for step in steps:
                self._script.extend([step] if isinstance(step, str) else step)

    def start(self) -> Self:
        self._thread.start()
        wait_until(lambda: self._server.started, 10, what=self.what)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._server.force_exit = True  # do not wait for "hang" requests
        self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ProviderServer(ScriptedServer):
    def __init__(self, kind: str, *, latency: float = 0.0, api_key: str | None = None,
                 fault_rates: dict[str, float] | None = None, seed: int = 0) -> None:
        assert kind in ("openai", "automatic1111")
        self.kind = kind
        self.latency = latency
        self.api_key = api_key
        self.fault_rates = dict(fault_rates or {})  # unscripted answers: step -> probability, e.g. {"500": 0.05}
        self._random = random.Random(seed)
        self.requests: list[dict[str, Any]] = []
        self.interrupts = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.progress_polls = 0
        self._job: dict[str, Any] | None = None  # the A1111 txt2img request in flight
        super().__init__([Route("/v1/images/generations", self._openai, methods=["POST"]),
                          Route("/sdapi/v1/txt2img", self._a1111, methods=["POST"]),
                          Route("/sdapi/v1/progress", self._a1111_progress, methods=["GET"]),
                          Route("/sdapi/v1/interrupt", self._interrupt, methods=["POST"])], "provider test server")

    @property
    def url(self) -> str:
        root = f"http://127.0.0.1:{self.port}"
        return root + "/v1" if self.kind == "openai" else root

    def _next(self) -> str:
        with self._lock:
            if self._script:
                return self._script.popleft()
            draw = self._random.random()
            for step, rate in self.fault_rates.items():
                if draw < rate:
                    return step
                draw -= rate
            return "ok"

    async def _common(self, request: Request) -> tuple[dict[str, Any], Response | None]:
        body = await request.json()
        record = {"path": request.url.path, "json": body, "headers": dict(request.headers), "at": time.monotonic()}
        self.requests.append(record)
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return body, self._error(401, "Incorrect API key provided")
        step = record["step"] = self._next()
        if step == "cut":
            body["_cut"] = True
        if self.latency and not body.get("stream"):  # a stream spreads the latency over its events
            await asyncio.sleep(self.latency)
        code, _, arg = step.partition(":")
        if code == "hang":
            await asyncio.sleep(3600)
        if code == "429":
            return body, self._error(429, "Rate limit reached", {"Retry-After": arg} if arg else None)
        if code in ("500", "502", "503"):
            return body, self._error(int(code), "The server had an error while processing your request")
        if code == "400":
            return body, self._error(400, arg or "Bad request")
        if code == "garbage":
            return body, JSONResponse({"data": [], "images": []})
        return body, None

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        if self.kind == "openai":
            payload: dict[str, Any] = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
        else:
            payload = {"error": "HTTPException", "detail": message, "body": "", "errors": ""}
        # json.dumps escapes what is not ASCII, so any message renders (Starlette's would refuse a lone surrogate).
        return Response(json.dumps(payload), status_code=status, headers=headers, media_type="application/json")

    async def _track(self, handler: Any, request: Request) -> JSONResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1

    async def _openai(self, request: Request) -> Response:
        async def handle(request: Request) -> Response:
            body, error = await self._common(request)
            if error is not None:
                return error
            width, height = (int(v) for v in body.get("size", "64x64").split("x"))
            if body.get("stream"):
                return StreamingResponse(self._image_events(body, width, height), media_type="text/event-stream")
            return JSONResponse({"created": int(time.time()),
                                 "data": [{"b64_json": base64.b64encode(png(width, height)).decode()}]})

        return await self._track(handle, request)

    async def _image_events(self, body: dict[str, Any], width: int, height: int) -> AsyncIterator[str]:
        partials = int(body.get("partial_images", 0))
        for index in range(partials):
            await asyncio.sleep(self.latency / (partials + 1))
            shade = 60 + 60 * index
            yield _sse("image_generation.partial_image", {
                "b64_json": base64.b64encode(png(16, 16, (shade, shade, shade))).decode(),
                "partial_image_index": index, "output_format": "png", "size": f"{width}x{height}"})
            if body.get("_cut"):
                return
        await asyncio.sleep(self.latency / (partials + 1))
        yield _sse("image_generation.completed", {
            "b64_json": base64.b64encode(png(width, height)).decode(), "output_format": "png",
            "size": f"{width}x{height}", "usage": {"total_tokens": 0}})

    async def _a1111(self, request: Request) -> JSONResponse:
        async def handle(request: Request) -> JSONResponse:
            self._job = {"started": time.monotonic(), "steps": 20}
            try:
                body, error = await self._common(request)
            finally:
                self._job = None
            if error is not None:
                return error
            image = base64.b64encode(png(int(body["width"]), int(body["height"]), (40, 80, 200))).decode()
            return JSONResponse({"images": [image], "parameters": body, "info": "{}"})

        return await self._track(handle, request)

    async def _a1111_progress(self, request: Request) -> JSONResponse:
        self.progress_polls += 1
        job = self._job
        if job is None:
            return JSONResponse({"progress": 0, "eta_relative": 0, "current_image": None, "textinfo": None,
                                 "state": {"job_count": 0, "sampling_step": 0, "sampling_steps": 0}})
        steps = int(self.requests[-1]["json"].get("steps", job["steps"])) if self.requests else job["steps"]
        elapsed = time.monotonic() - job["started"]
        step = min(steps, int(steps * elapsed / self.latency)) if self.latency else steps
        image = None
        if step and request.query_params.get("skip_current_image") != "true":
            image = base64.b64encode(png(8, 8, (10 * step % 256, 80, 200))).decode()
        return JSONResponse({"progress": step / steps, "eta_relative": max(0.0, self.latency - elapsed),
                             "current_image": image, "textinfo": None,
                             "state": {"job_count": 1, "job_no": 0, "sampling_step": step, "sampling_steps": steps,
                                       "interrupted": False, "skipped": False}})

    async def _interrupt(self, request: Request) -> JSONResponse:
        self.interrupts += 1
        return JSONResponse({})
