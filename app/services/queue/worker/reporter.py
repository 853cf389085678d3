"""The reporter: finished images' outcomes go to the store in batched, pipelined round trips."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import redis

from app.core.config import Settings
from app.services.queue.states import Outcome
from app.services.queue.store import Claim, QueueStore, Report

log = logging.getLogger("imagequeue.worker")

REPORT_ATTEMPTS = 30
REPORT_BATCH = 64
REPORT_RETRY_SECONDS = 1.0  # the pause after a failed report grows by this much per attempt
REPORT_RETRY_MAX_SECONDS = 5.0
ERROR_MAX_CHARS = 2000  # of a failed image's error message


class Reporter:
    """Sends the completions that arrive together in one pipelined round trip: images of a busy
    worker finish in bursts, and one round trip each would hold the slots up."""

    def __init__(self, store: QueueStore, settings: Settings, worker_name: str) -> None:
        self.store = store
        self.settings = settings
        self.worker_name = worker_name
        self._reports: asyncio.Queue[tuple[Report, asyncio.Future[str]]] = asyncio.Queue()

    async def report(self, claim: Claim, outcome: Outcome, error: str, record: Mapping[str, Any] | None) -> str:
        """Settle one image (`record`: where a succeeded image's bytes are); returns the store's
        answer ("lost" when Redis stayed away throughout)."""
        report = Report(claim, outcome, error[:ERROR_MAX_CHARS], record)
        loop = asyncio.get_running_loop()
        for attempt in range(REPORT_ATTEMPTS):
            done: asyncio.Future[str] = loop.create_future()
            await self._reports.put((report, done))
            try:
                return await done
            except redis.RedisError as exc:
                # Keep the result while Redis is away; if the lease lapses meanwhile another worker
                # re-runs the image and this report is discarded as stale.
                log.warning("report failed (%s), retrying", exc, extra={"worker": self.worker_name})
                await asyncio.sleep(min(REPORT_RETRY_MAX_SECONDS, REPORT_RETRY_SECONDS * (attempt + 1)))
        return "lost"

    async def run(self) -> None:
        """The loop that sends what report() queued, as long as the worker runs."""
        s = self.settings
        while True:
            batch = [await self._reports.get()]
            while len(batch) < REPORT_BATCH and not self._reports.empty():
                batch.append(self._reports.get_nowait())
            try:
                results = await self.store.complete_many(
                    [r for r, _ in batch], ttl=s.queue_ttl_seconds,
                    user_ttl=s.queue_ttl_seconds + s.queue_safety_ttl_seconds,
                )
            except (redis.RedisError, OSError) as exc:
                error = exc if isinstance(exc, redis.RedisError) else redis.ConnectionError(str(exc))
                for _, done in batch:
                    if not done.done():
                        done.set_exception(error)
                continue
            for (_, done), result in zip(batch, results, strict=True):
                if not done.done():
                    done.set_result(result)
