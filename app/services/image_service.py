"""ImageService: the retry policy over one image provider.

Providers (app/services/providers/) make one attempt at one image; ImageService adds retries with
exponential backoff and jitter (honouring Retry-After), and a shared RateGate so a provider's 429
slows every worker down.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from app.services.providers.base import (
    MAX_RETRY_AFTER_SECONDS,
    GeneratedImage,
    ImageProvider,
    ImageRequest,
    ProviderError,
)


class RateGate(Protocol):
    """Shared back-off across every worker that calls the same provider."""

    async def wait(self) -> None: ...

    async def defer(self, seconds: float) -> None: ...


class ImageService:
    """Generates one image with retries, backoff and a shared rate gate."""

    def __init__(
        self,
        provider: ImageProvider,
        *,
        max_retries: int = 4,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        gate: RateGate | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self.provider = provider
        self.observe = observe  # called after every attempt with its outcome kind and duration
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.gate = gate
        self._sleep = sleep

    async def generate(self, request: ImageRequest) -> GeneratedImage:
        attempt = 0
        while True:
            if self.gate is not None:
                await self.gate.wait()
            started = time.monotonic()
            try:
                image = await self.provider.generate(request)
            except ProviderError as exc:
                self._observe(exc.kind, started)
                if not exc.retryable or attempt >= self.max_retries:
                    if attempt:
                        raise type(exc)(
                            f"after {attempt + 1} attempts: {exc.message}",
                            retryable=exc.retryable,
                            retry_after=exc.retry_after,
                        ) from exc
                    raise
                delay = random.uniform(0, min(self.backoff_max, self.backoff_base * 2**attempt))
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, MAX_RETRY_AFTER_SECONDS))
                if exc.kind == "rate_limited" and self.gate is not None:  # a 429: every worker waits
                    await self.gate.defer(delay)
                attempt += 1
                await self._sleep(delay)
            else:
                self._observe("ok", started)
                return image

    def _observe(self, kind: str, started: float) -> None:
        if self.observe is not None:
            self.observe(kind, time.monotonic() - started)

    async def interrupt(self, request: ImageRequest) -> None:
        await self.provider.interrupt(request)

    async def aclose(self) -> None:
        """Releases the provider's background resources; call once, when the worker stops."""
        await self.provider.aclose()
