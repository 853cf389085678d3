"""Progress of one running image, as its provider reports it: step, steps and, where the server has one,
a preview.

A caller that wants progress sets `ImageRequest.on_progress` to a callback taking a `Progress`. It may be
a plain function (called on the event loop: it must return at once, e.g. by storing the value and
waking a task of its own) or a coroutine function (awaited; it may take its time). Providers never call it
directly: they hand each value to a `ProgressFeed`, whose `report()` costs a few attribute writes and
never blocks, never raises. The feed's own task delivers the newest value when the callback is free:
values that arrive while it is busy are coalesced (latest wins, and the latest preview is kept even when
a newer value carries none), so a slow callback sees fewer values, never slows the generation, and one
that raises is logged once and ignored. When the image ends the feed stops, dropping what was not
delivered. Progress is best effort by design: the image's result never depends on it. A plain
function marked with `immediate` (it only stores the value, in a few attribute writes) is called
from `report()` itself instead: no task and no wake-up per value, which at hundreds of images a
second is most of what progress costs.

What each provider reports:
- procedural: `steps` (params, default 4) values spread over its simulated latency, each with a small
  PNG preview of the final image, coarse first and sharper later;
- comfyui: the websocket's `progress` events for the prompt and its binary preview frames (JPEG/PNG);
- automatic1111: `/sdapi/v1/progress` polled while the request runs, with `current_image` as preview,
  only where the endpoint is known to serve one image at a time (see automatic1111.py);
- openai: the `image_generation.partial_image` events of a streamed request, when the model's catalogue
  entry sets `partial_images` (steps = partial images + 1, each partial image as preview).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger("imagequeue.providers")


@dataclass(frozen=True, slots=True)
class Progress:
    """Where one image is: `step` of `steps` done, and the latest preview if the provider sent one."""

    step: int
    steps: int
    preview: bytes | None = None
    preview_type: str | None = None  # "image/jpeg", "image/png" or "image/webp" with a preview

    @property
    def fraction(self) -> float:
        return min(1.0, max(0.0, self.step / self.steps)) if self.steps > 0 else 0.0


ProgressCallback = Callable[[Progress], Awaitable[None] | None]
IMMEDIATE = "_progress_immediate"


def immediate(callback: Callable[[Progress], None]) -> Callable[[Progress], None]:
    """Marks a plain callback that returns at once (it stores the value, no more) to be called from
    `ProgressFeed.report()` directly."""
    setattr(callback, IMMEDIATE, True)
    return callback


class ProgressFeed:
    """Latest-wins delivery of one image's progress to its callback, off the provider's path."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self._callback = callback
        self._pending: Progress | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._complained = False
        self._busy = False  # the listener is handling a value
        self.step = 0  # the last step and steps reported, for previews that come without them
        self.steps = 0
        self._immediate = callback is not None and getattr(callback, IMMEDIATE, False)

    @property
    def wanted(self) -> bool:
        """Whether anyone listens: providers skip the work of fetching progress otherwise."""
        return self._callback is not None and not self._closed

    def report(self, step: int, steps: int, preview: bytes | None = None, preview_type: str | None = None) -> None:
        """Hands a value to the feed; returns at once, whatever the callback does."""
        if not self.wanted or steps < 0:
            return
        self.step, self.steps = max(0, min(step, steps)) if steps else max(0, step), steps
        if self._immediate:
            self._call(Progress(self.step, self.steps, preview, preview_type if preview is not None else None))
            return
        pending = self._pending
        if preview is None and pending is not None and pending.preview is not None:
            preview, preview_type = pending.preview, pending.preview_type
        self._pending = Progress(self.step, self.steps, preview, preview_type if preview is not None else None)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._deliver())
        self._wake.set()

    def preview(self, data: bytes, content_type: str) -> None:
        """A preview at the last known step."""
        if data:
            self.report(self.step, self.steps, data, content_type)

    async def aclose(self) -> None:
        """Stops delivering. A value still pending goes to an idle listener (one turn of the loop, so a
        plain function gets it); to a busy one, it is dropped."""
        self._closed = True
        if self._pending is not None and self._task is not None and not self._busy:
            await asyncio.sleep(0)
        self._pending = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _call(self, progress: Progress) -> None:
        assert self._callback is not None
        try:
            self._callback(progress)
        except Exception:
            if not self._complained:
                self._complained = True
                log.warning("progress callback failed (not logged again for this image)", exc_info=True)

    async def _deliver(self) -> None:
        assert self._callback is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            progress, self._pending = self._pending, None
            if progress is None:
                continue
            self._busy = True
            try:
                result = self._callback(progress)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                if not self._complained:
                    self._complained = True
                    log.warning("progress callback failed (not logged again for this image)", exc_info=True)
            finally:
                self._busy = False
