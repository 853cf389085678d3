"""FailoverProvider: several endpoints behind one ImageProvider, with health tracking and per-endpoint caps.

An endpoint that fails with timeouts, connection errors or 5xx `failure_threshold` times in a row is
taken out for `cooldown` seconds; after that one trial request decides whether it is back. A 429
rests the endpoint for its Retry-After without counting as a failure. Each image tries every usable
endpoint at most once; when all have failed, or all are resting, a retryable error lets ImageService's
backoff apply. Caps hold within one worker process; the model's `max_concurrency` caps all workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from app.services.providers.base import (
    MAX_RETRY_AFTER_SECONDS,
    GeneratedImage,
    ImageProvider,
    ImageRequest,
    ProviderError,
    ProviderRateLimited,
    ProviderUnavailable,
)

REMEMBERED_REQUESTS = 4096  # request_id -> endpoint entries kept for cancels; oldest dropped first


@dataclass(eq=False)
class Endpoint:
    """One provider at one address, with its own cap and health."""

    provider: ImageProvider
    label: str  # the address as shown in messages (no credentials)
    max_concurrency: int = 0  # 0 = no cap
    in_flight: int = 0
    failures: int = 0  # consecutive
    resting_until: float = 0.0
    probing: bool = False  # a trial request after a cool-down is in flight
    served: int = 0  # images it made

    def has_room(self) -> bool:
        return self.max_concurrency <= 0 or self.in_flight < self.max_concurrency


class FailoverProvider:
    """Sends each image to a healthy endpoint with room, and moves on when one fails."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        failure_threshold: int = 3,
        cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not endpoints:
            raise ValueError("FailoverProvider needs at least one endpoint")
        self.endpoints = list(endpoints)
        self.failure_threshold = max(1, failure_threshold)
        self.cooldown = cooldown
        self.name = "+".join(dict.fromkeys(e.provider.name for e in self.endpoints))
        self._clock = clock
        self._last = -1  # index of the endpoint chosen last, so equals take turns
        self._freed = asyncio.Event()  # set whenever a request ends, for images waiting for room
        # request_id -> endpoint of images in flight, and of cancelled ones until interrupt() takes them.
        self._routes: OrderedDict[str, Endpoint] = OrderedDict()

    async def generate(self, request: ImageRequest) -> GeneratedImage:
        tried: set[int] = set()
        errors: list[tuple[Endpoint, ProviderError]] = []
        while True:
            endpoint = await self._acquire(tried)
            if endpoint is None:
                raise self._exhausted(errors)
            tried.add(id(endpoint))
            cancelled = False
            if request.request_id:
                self._routes[request.request_id] = endpoint
                while len(self._routes) > REMEMBERED_REQUESTS:
                    self._routes.popitem(last=False)
            try:
                image = await endpoint.provider.generate(request)
            except (ProviderUnavailable, ProviderRateLimited) as exc:
                self._failed(endpoint, exc)
                errors.append((endpoint, exc))
            except asyncio.CancelledError:
                cancelled = True  # the worker calls interrupt() next, which needs the route
                raise
            else:
                endpoint.failures = 0
                endpoint.served += 1
                return image
            finally:
                # A rejected or cancelled trial says nothing about health: the next request tries again.
                endpoint.probing = False
                if not cancelled and request.request_id:
                    self._routes.pop(request.request_id, None)
                endpoint.in_flight -= 1
                self._freed.set()

    async def interrupt(self, request: ImageRequest) -> None:
        endpoint = self._routes.pop(request.request_id, None)
        if endpoint is not None:
            await endpoint.provider.interrupt(request)

    async def aclose(self) -> None:
        for endpoint in self.endpoints:
            await endpoint.provider.aclose()

    def usable(self, endpoint: Endpoint, now: float) -> bool:
        """Not resting; a tripped endpoint past its cool-down takes one trial request at a time."""
        if now < endpoint.resting_until:
            return False
        return endpoint.failures < self.failure_threshold or not endpoint.probing

    # -- internals --------------------------------------------------------------------------------
    async def _acquire(self, tried: set[int]) -> Endpoint | None:
        """A usable endpoint not yet tried for this image, waiting for room; None when there is none."""
        while True:
            now = self._clock()
            candidates = [e for e in self.endpoints if id(e) not in tried and self.usable(e, now)]
            if not candidates:
                return None
            free = [e for e in candidates if e.has_room()]
            if free:
                endpoint = self._choose(free)
                endpoint.in_flight += 1
                if endpoint.failures >= self.failure_threshold:
                    endpoint.probing = True
                return endpoint
            # Every candidate is at its cap: wait for a request to end (or a rest to end, checked each second).
            # No await between the check and clear(), so a release cannot slip in unseen.
            self._freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._freed.wait(), timeout=1.0)

    def _choose(self, free: list[Endpoint]) -> Endpoint:
        """A trial first (so recovery is noticed), else the least loaded, rotating among equals."""
        n = len(self.endpoints)

        def order(e: Endpoint) -> tuple[bool, float, int]:
            cap = e.max_concurrency or 1_000_000
            trial = e.failures >= self.failure_threshold
            return (not trial, e.in_flight / cap, (self.endpoints.index(e) - self._last - 1) % n)

        chosen = min(free, key=order)
        self._last = self.endpoints.index(chosen)
        return chosen

    def _failed(self, endpoint: Endpoint, exc: ProviderError) -> None:
        now = self._clock()
        endpoint.probing = False
        if isinstance(exc, ProviderRateLimited):
            # Alive but busy: rest it for as long as it asked, without counting a failure.
            rest = exc.retry_after if exc.retry_after is not None else 1.0
            endpoint.resting_until = max(endpoint.resting_until, now + min(rest, MAX_RETRY_AFTER_SECONDS))
            return
        endpoint.failures += 1
        if endpoint.failures >= self.failure_threshold:
            endpoint.resting_until = now + self.cooldown

    def _exhausted(self, errors: list[tuple[Endpoint, ProviderError]]) -> ProviderError:
        """The retryable error for ImageService's backoff: what each endpoint said, or when one is back."""
        now = self._clock()
        if not errors:
            resting = [e.resting_until for e in self.endpoints if e.resting_until > now]
            back_in = max(0.0, min(resting) - now) if resting else self.cooldown
            return ProviderUnavailable(
                f"{self.name}: all {len(self.endpoints)} endpoints are cooling down; the first is back in "
                f"{back_in:.1f}s",
                retryable=True,
                retry_after=back_in,
            )
        message = "; ".join(f"{e.label}: {exc.message}" for e, exc in errors)
        if len(errors) == 1:
            message = errors[0][1].message
        waits = [exc.retry_after for _, exc in errors if exc.retry_after is not None]
        kind = ProviderRateLimited if all(isinstance(exc, ProviderRateLimited) for _, exc in errors) \
            else ProviderUnavailable
        return kind(message, retryable=True, retry_after=min(waits) if waits else None)
