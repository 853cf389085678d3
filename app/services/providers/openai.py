"""The OpenAI Images API and the many servers that speak it."""

from __future__ import annotations

from typing import Any

from app.services.providers.base import GeneratedImage, ImageRequest, ProviderKind, provider_params
from app.services.providers.http import HttpProvider


class OpenAIProvider(HttpProvider):
    """The OpenAI Images API (and compatible servers): POST {url}/images/generations."""

    name = "openai"

    async def generate(self, request: ImageRequest) -> GeneratedImage:
        body: dict[str, Any] = provider_params(request.params, ProviderKind.OPENAI)
        body.update(prompt=request.prompt, n=1, size=f"{request.width}x{request.height}", response_format="b64_json")
        if request.model or self.model:
            body["model"] = request.model or self.model
        answer = await self._post("/images/generations", body)
        data = answer.get("data") if isinstance(answer, dict) else None
        first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
        return await self._image(first.get("b64_json"))
