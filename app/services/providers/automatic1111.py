"""The Stable Diffusion web UI API: AUTOMATIC1111, Forge, SD.Next.

Progress: while txt2img runs, `GET /sdapi/v1/progress` is polled for `state.sampling_step`,
`state.sampling_steps` and `current_image` (the live preview, base64). That endpoint describes whatever
the server is generating now, not a given request, so it is polled only when this endpoint is known to
serve one image of ours at a time (`exclusive`: the model's `max_concurrency` or the endpoint's `#max`
is 1) and somebody listens. The server should then serve this model alone: a job from elsewhere would
show as ours. Progress never touches the result: a failed poll is skipped.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
from typing import Any

import httpx

from app.services.providers.base import (
    GeneratedImage,
    ImageRequest,
    ProviderError,
    ProviderKind,
    provider_params,
    request_values,
)
from app.services.providers.http import HttpProvider, content_type, decode_b64
from app.services.providers.progress import ProgressFeed

INTERRUPT_TIMEOUT_SECONDS = 5.0
PROGRESS_POLL_SECONDS = 0.5
PROGRESS_TIMEOUT_SECONDS = 5.0


class Automatic1111Provider(HttpProvider):
    """The Stable Diffusion web UI API (A1111, Forge, SD.Next): POST {url}/sdapi/v1/txt2img."""

    name = "automatic1111"

    def __init__(self, *args: Any, interrupt_on_cancel: bool = False, exclusive: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # /sdapi/v1/interrupt stops whatever the server is generating, so it is only safe when
        # the server runs one job at a time for this worker alone.
        self.supports_interrupt = interrupt_on_cancel
        self.exclusive = exclusive  # one image of ours at a time here: /sdapi/v1/progress is about it

    async def generate(self, request: ImageRequest) -> GeneratedImage:
        body: dict[str, Any] = provider_params(request.params, ProviderKind.AUTOMATIC1111)
        body.update(request_values(request), batch_size=1, n_iter=1)
        model = request.model or self.model
        if model:
            body["override_settings"] = {"sd_model_checkpoint": model}
        feed = ProgressFeed(request.on_progress)
        poller = asyncio.create_task(self._poll_progress(feed)) if self.exclusive and feed.wanted else None
        try:
            answer = await self._post("/sdapi/v1/txt2img", body)
        finally:
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
            await feed.aclose()
        images = answer.get("images") if isinstance(answer, dict) else None
        return await self._image(images[0] if isinstance(images, list) and images else None)

    async def interrupt(self, request: ImageRequest) -> None:
        if not self.supports_interrupt:
            return
        with contextlib.suppress(httpx.HTTPError):
            await self.client.post(
                self.base_url + "/sdapi/v1/interrupt", headers=self._headers(), timeout=INTERRUPT_TIMEOUT_SECONDS
            )

    async def _poll_progress(self, feed: ProgressFeed) -> None:
        shown: str | None = None  # the preview last reported: the server repeats it between updates
        while True:
            await asyncio.sleep(PROGRESS_POLL_SECONDS)
            try:
                response = await self._request("GET", "/sdapi/v1/progress", params={"skip_current_image": "false"},
                                               timeout=PROGRESS_TIMEOUT_SECONDS)
                answer = response.json() if response.status_code == 200 else None
            except (ProviderError, httpx.HTTPError, ValueError):
                continue
            state = answer.get("state") if isinstance(answer, dict) else None
            if not isinstance(state, dict) or not state.get("job_count"):
                continue  # idle between jobs, or not started yet
            step, steps = state.get("sampling_step"), state.get("sampling_steps")
            if not isinstance(step, int) or not isinstance(steps, int) or steps <= 0:
                continue
            assert isinstance(answer, dict)
            image = answer.get("current_image")
            preview = None
            if isinstance(image, str) and image and image != shown:
                with contextlib.suppress(binascii.Error, ValueError):
                    preview = await decode_b64(image)
                shown = image
            feed.report(step, steps, *((preview, content_type(preview)) if preview else ()))
