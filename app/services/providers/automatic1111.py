"""The Stable Diffusion web UI API: AUTOMATIC1111, Forge, SD.Next."""

from __future__ import annotations

import contextlib
from typing import Any

import httpx

from app.services.providers.base import GeneratedImage, ImageRequest, ProviderKind, provider_params, request_values
from app.services.providers.http import HttpProvider

INTERRUPT_TIMEOUT_SECONDS = 5.0


class Automatic1111Provider(HttpProvider):
    """The Stable Diffusion web UI API (A1111, Forge, SD.Next): POST {url}/sdapi/v1/txt2img."""

    name = "automatic1111"

    def __init__(self, *args: Any, interrupt_on_cancel: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # /sdapi/v1/interrupt stops whatever the server is generating, so it is only safe when
        # the server runs one job at a time for this worker alone.
        self.supports_interrupt = interrupt_on_cancel

    async def generate(self, request: ImageRequest) -> GeneratedImage:
        body: dict[str, Any] = provider_params(request.params, ProviderKind.AUTOMATIC1111)
        body.update(request_values(request), batch_size=1, n_iter=1)
        model = request.model or self.model
        if model:
            body["override_settings"] = {"sd_model_checkpoint": model}
        answer = await self._post("/sdapi/v1/txt2img", body)
        images = answer.get("images") if isinstance(answer, dict) else None
        return await self._image(images[0] if isinstance(images, list) and images else None)

    async def interrupt(self, request: ImageRequest) -> None:
        if not self.supports_interrupt:
            return
        with contextlib.suppress(httpx.HTTPError):
            await self.client.post(
                self.base_url + "/sdapi/v1/interrupt", headers=self._headers(), timeout=INTERRUPT_TIMEOUT_SECONDS
            )
