"""ComfyUI's websocket, for progress only: one socket per provider, shared by its images in flight.

`GET /ws?clientId=<the client_id our prompts carry>` receives, for our prompts only, JSON messages
(`execution_start`, `executing`, `progress` {value, max, prompt_id}, `execution_success`, ...) and
binary frames; a preview frame is a big-endian u32 event type 1, a u32 image format (1 = JPEG, 2 = PNG)
and the image bytes. A preview names no prompt: it belongs to the prompt ComfyUI last said it was
executing (ComfyUI runs one prompt at a time).

The socket is opened when the first image with a progress listener starts, reopened with back-off
when it drops, and closed when no such image has been in flight for IDLE_SECONDS. Completion never
depends on it (the provider polls /history), so a dropped socket loses only the progress in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
from typing import Any

import httpx
from websockets.asyncio.client import connect

from app.services.providers.progress import ProgressFeed

log = logging.getLogger("imagequeue.providers")

PREVIEW_EVENT = 1
PREVIEW_FORMATS = {1: "image/jpeg", 2: "image/png"}
IDLE_SECONDS = 30.0  # how long the socket stays open with no image listening
RECONNECT_MIN_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 10.0
OPEN_TIMEOUT_SECONDS = 10.0
MAX_FRAME_BYTES = 16 * 1024 * 1024  # previews are small; a full-size PNG frame still fits


def ws_url(base_url: str, client_id: str) -> str:
    """ws(s)://host:port[/prefix]/ws?clientId=… from the server's http(s) root."""
    url = httpx.URL(base_url)
    scheme = "wss" if url.scheme == "https" else "ws"
    return str(url.copy_with(scheme=scheme, path=url.path.rstrip("/") + "/ws", params={"clientId": client_id}))


class ProgressSocket:
    """Routes ComfyUI's progress messages and preview frames to the feeds of our prompts."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url = url
        self.headers = headers
        self.connections = 0  # sockets opened so far (tests and logs)
        self._feeds: dict[str, ProgressFeed] = {}  # prompt_id -> feed
        self._current: str | None = None  # the prompt ComfyUI last said it runs
        self._task: asyncio.Task[None] | None = None
        self._idle: asyncio.TimerHandle | None = None

    def watch(self, prompt_id: str, feed: ProgressFeed) -> None:
        """Sends `prompt_id`'s progress to `feed` from now on; opens the socket if needed (without waiting)."""
        self._feeds[prompt_id] = feed
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def unwatch(self, prompt_id: str) -> None:
        self._feeds.pop(prompt_id, None)
        if self._current == prompt_id:
            self._current = None
        if not self._feeds and self._task is not None and self._idle is None:
            self._idle = asyncio.get_running_loop().call_later(IDLE_SECONDS, self._close_if_idle)

    async def aclose(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _close_if_idle(self) -> None:
        self._idle = None
        if not self._feeds and self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        delay = RECONNECT_MIN_SECONDS
        while True:
            try:
                async with connect(
                    self.url, additional_headers=self.headers, open_timeout=OPEN_TIMEOUT_SECONDS,
                    max_size=MAX_FRAME_BYTES, user_agent_header=None,
                ) as socket:
                    self.connections += 1
                    delay = RECONNECT_MIN_SECONDS
                    async for message in socket:
                        self._dispatch(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # progress is best effort: whatever happened, try again later
                log.debug("comfyui progress socket: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    def _dispatch(self, message: str | bytes) -> None:
        try:
            if isinstance(message, bytes):
                self._frame(message)
            else:
                body = json.loads(message)
                if isinstance(body, dict) and isinstance(body.get("data"), dict):
                    self._event(str(body.get("type")), body["data"])
        except (ValueError, TypeError, struct.error):
            return  # a message we do not understand says nothing about our images

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        prompt_id = data.get("prompt_id")
        if kind == "execution_start" or (kind == "executing" and data.get("node") is not None):
            self._current = prompt_id if isinstance(prompt_id, str) else self._current
        elif kind == "executing" or kind in ("execution_success", "execution_error", "execution_interrupted"):
            if prompt_id is None or prompt_id == self._current:
                self._current = None
        elif kind == "progress":
            if isinstance(prompt_id, str):
                self._current = prompt_id
            feed = self._feed()
            value, steps = data.get("value"), data.get("max")
            if feed is not None and isinstance(value, int) and isinstance(steps, int):
                feed.report(value, steps)

    def _frame(self, frame: bytes) -> None:
        event, image_format = struct.unpack_from(">II", frame)
        ctype = PREVIEW_FORMATS.get(image_format)
        feed = self._feed()
        if event == PREVIEW_EVENT and ctype is not None and feed is not None:
            feed.preview(frame[8:], ctype)

    def _feed(self) -> ProgressFeed | None:
        """The running prompt's feed; with no word on which runs (say, just after a reconnect), the only one."""
        if self._current is not None:
            return self._feeds.get(self._current)
        return next(iter(self._feeds.values())) if len(self._feeds) == 1 else None
