"""Local servers speaking the OpenAI Images and AUTOMATIC1111 txt2img protocols, with scripted faults.

    with ProviderServer("openai") as server:   # or "automatic1111"; api_key=..., latency=...
        server.script("500", "429:2", "ok")      # next answers: a 500, a 429 with Retry-After: 2, then images
        server.script(["500", "ok"])             # a list works too
        ... point IMAGE_PROVIDER_URL at server.url ...
        server.requests                          # [{"path", "json", "headers", "at"}, ...]

Script steps: "ok", "500", "502", "503", "429" or "429:<Retry-After value>" (seconds or an HTTP date),
"400:<message>" (the protocol's error JSON carrying that message), "hang" (never answers within a
client's timeout), "garbage" (200 with no image). When the script is empty, every answer
is "ok" (after `latency` seconds). `api_key` makes the server answer 401 without that bearer key.
`server.url` is the base a provider is configured with: `<root>/v1` for openai, `<root>` for A1111.
`server.interrupts` counts POSTs to /sdapi/v1/interrupt; `server.max_in_flight` is the most requests
it ever held at once. The server runs uvicorn in a daemon thread of the calling process, so a fixture
in any test module can start one and hand `server.url` to worker processes.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, Self

import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.utils import free_port, wait_until


def png(width: int, height: int, colour: tuple[int, int, int] = (200, 80, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, "PNG")
    return buf.getvalue()


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
    def __init__(self, kind: str, *, latency: float = 0.0, api_key: str | None = None) -> None:
        assert kind in ("openai", "automatic1111")
        self.kind = kind
        self.latency = latency
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        self.interrupts = 0
        self.in_flight = 0
        self.max_in_flight = 0
        super().__init__([Route("/v1/images/generations", self._openai, methods=["POST"]),
                          Route("/sdapi/v1/txt2img", self._a1111, methods=["POST"]),
                          Route("/sdapi/v1/interrupt", self._interrupt, methods=["POST"])], "provider test server")

    @property
    def url(self) -> str:
        root = f"http://127.0.0.1:{self.port}"
        return root + "/v1" if self.kind == "openai" else root

    def _next(self) -> str:
        with self._lock:
            return self._script.popleft() if self._script else "ok"

    async def _common(self, request: Request) -> tuple[dict[str, Any], JSONResponse | None]:
        body = await request.json()
        self.requests.append({"path": request.url.path, "json": body, "headers": dict(request.headers),
                              "at": time.monotonic()})
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return body, self._error(401, "Incorrect API key provided")
        step = self._next()
        if self.latency:
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

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        if self.kind == "openai":
            payload: dict[str, Any] = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
        else:
            payload = {"error": "HTTPException", "detail": message, "body": "", "errors": ""}
        return JSONResponse(payload, status_code=status, headers=headers)

    async def _track(self, handler: Any, request: Request) -> JSONResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1

    async def _openai(self, request: Request) -> JSONResponse:
        async def handle(request: Request) -> JSONResponse:
            body, error = await self._common(request)
            if error is not None:
                return error
            width, height = (int(v) for v in body.get("size", "64x64").split("x"))
            return JSONResponse({"created": int(time.time()),
                                 "data": [{"b64_json": base64.b64encode(png(width, height)).decode()}]})

        return await self._track(handle, request)

    async def _a1111(self, request: Request) -> JSONResponse:
        async def handle(request: Request) -> JSONResponse:
            body, error = await self._common(request)
            if error is not None:
                return error
            image = base64.b64encode(png(int(body["width"]), int(body["height"]), (40, 80, 200))).decode()
            return JSONResponse({"images": [image], "parameters": body, "info": "{}"})

        return await self._track(handle, request)

    async def _interrupt(self, request: Request) -> JSONResponse:
        self.interrupts += 1
        return JSONResponse({})
