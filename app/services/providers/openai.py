"""The OpenAI Images API and the many servers that speak it.

With `partial_images = N` in the model's catalogue entry and a progress listener, the request is
streamed (`stream: true, partial_images: N`): the answer is Server-Sent Events, N
`image_generation.partial_image` events (each a b64_json image, reported as step i + 1 of N + 1 with
the image as preview) and one `image_generation.completed` event holding the final b64_json. A
server that answers plain JSON anyway is read as usual. Without either, a plain request, as ever.
"""

from __future__ import annotations

import binascii
from typing import Any

from app.services.providers.base import (
    GeneratedImage,
    ImageRequest,
    ProviderKind,
    ProviderRejected,
    ProviderUnavailable,
    provider_params,
)
from app.services.providers.http import ERROR_TEXT_CHARS, HttpProvider, content_type, decode_b64, sse_events
from app.services.providers.progress import ProgressFeed

PARTIAL_EVENT = "image_generation.partial_image"
COMPLETED_EVENT = "image_generation.completed"


class OpenAIProvider(HttpProvider):
    """The OpenAI Images API (and compatible servers): POST {url}/images/generations."""

    name = "openai"

    def __init__(self, *args: Any, partial_images: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.partial_images = max(0, partial_images)

    async def generate(self, request: ImageRequest) -> GeneratedImage:
        body: dict[str, Any] = provider_params(request.params, ProviderKind.OPENAI)
        body.update(prompt=request.prompt, n=1, size=f"{request.width}x{request.height}", response_format="b64_json")
        if request.model or self.model:
            body["model"] = request.model or self.model
        feed = ProgressFeed(request.on_progress)
        if not (self.partial_images and feed.wanted):
            return await self._first_image(await self._post("/images/generations", body))
        try:
            return await self._streamed(body, feed)
        finally:
            await feed.aclose()

    async def _first_image(self, answer: Any) -> GeneratedImage:
        data = answer.get("data") if isinstance(answer, dict) else None
        first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
        return await self._image(first.get("b64_json"))

    async def _streamed(self, body: dict[str, Any], feed: ProgressFeed) -> GeneratedImage:
        body.update(stream=True, partial_images=self.partial_images)
        steps = self.partial_images + 1
        response = await self._request("POST", "/images/generations", body=body, stream=True)
        try:
            with self._transport_errors(self.timeout):
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    await response.aread()
                    return await self._first_image(self._answer(response))
                async for event in sse_events(response):
                    kind = event.get("type")
                    if kind == COMPLETED_EVENT:
                        return await self._image(event.get("b64_json"))
                    if kind == PARTIAL_EVENT:
                        await self._partial(event, steps, feed)
                    elif kind == "error" or isinstance(event.get("error"), dict):
                        raise self._error(ProviderRejected, _stream_error_text(event))
        finally:
            await response.aclose()
        raise self._error(ProviderUnavailable, "the image stream ended before the image was complete", retryable=True)

    async def _partial(self, event: dict[str, Any], steps: int, feed: ProgressFeed) -> None:
        """A partial image as progress; one that does not decode is skipped, it is only a preview."""
        index = event.get("partial_image_index")
        b64 = event.get("b64_json")
        if not isinstance(index, int) or not isinstance(b64, str):
            return
        try:
            data = await decode_b64(b64)
        except (binascii.Error, ValueError):
            return
        feed.report(min(index + 1, steps - 1), steps, data, content_type(data))


def _stream_error_text(event: dict[str, Any]) -> str:
    err = event.get("error")
    message = err.get("message") if isinstance(err, dict) else None
    return f"stream error: {message or event.get('message') or str(event)[:ERROR_TEXT_CHARS]}"
