"""The shared back-off: a 429 from a provider makes every worker of that model wait."""

from __future__ import annotations

import asyncio
import contextlib
import time

import redis

from app.services.queue.store import QueueStore

# How stale a worker's view of a shared back-off may be: shorter than a fast provider's answer, so a
# 429 to one worker reaches the others before their next requests (one GET per worker and model at
# most this often, shared by all its slots).
GATE_CHECK_SECONDS = 0.05


class StoreGate:
    """RateGate over Redis: a 429 from the provider makes every worker of that model wait."""

    def __init__(self, store: QueueStore, model: str) -> None:
        self.store = store
        self.model = model
        self._quiet_until = 0.0  # no back-off seen until then: skip the round trip
        self._deferred_until = 0.0  # this worker's own 429: known here before Redis has it
        self._check: asyncio.Task[int] | None = None  # the one look-up under way, shared by all slots

    async def wait(self) -> None:
        now = time.monotonic()
        if now < self._deferred_until:
            await asyncio.sleep(self._deferred_until - now)
            return
        if now < self._quiet_until:
            return
        if self._check is None or self._check.done():
            self._check = asyncio.create_task(self._backoff_ms())
        ms = await asyncio.shield(self._check)
        if ms > 0:
            await asyncio.sleep(ms / 1000)
        else:
            self._quiet_until = max(self._quiet_until, now + GATE_CHECK_SECONDS)

    async def _backoff_ms(self) -> int:
        try:
            return await self.store.backoff_ms(self.model)
        except redis.RedisError:
            return 0  # the store is away: do not fail images over an advisory pause

    async def defer(self, seconds: float) -> None:
        # The slots of this worker wait from now on, not from when the shared back-off is written.
        self._deferred_until = max(self._deferred_until, time.monotonic() + seconds)
        self._quiet_until = 0.0
        with contextlib.suppress(redis.RedisError):
            await self.store.set_backoff(self.model, seconds)
