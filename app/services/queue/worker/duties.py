"""A worker's background duties: heartbeat, reaper (with the ticket top-up), cancel watchers, webhooks."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any

import httpx
import redis
import redis.asyncio

from app.core.config import Settings
from app.services.queue.fleet import CLOCK_SKEW_WARN_MS
from app.services.queue.states import QueueState
from app.services.queue.store import CANCEL_CHANNEL, QueueStore
from app.services.queue.tickets import Tickets
from app.services.queue.webhooks import WebhookDispatcher
from app.services.queue.worker.slots import Slots

log = logging.getLogger("imagequeue.worker")

WEBHOOK_POLL_SECONDS = 0.5
WEBHOOK_BUSY_POLL_SECONDS = 0.05  # while deliveries are due, look again soon
CANCEL_LISTEN_SECONDS = 1.0  # below the socket timeout, so silence is not taken for a dead link
CANCEL_RECONNECT_SECONDS = 1.0


class Duties:
    """The loops that run beside the images for as long as the worker runs."""

    def __init__(
        self,
        *,
        settings: Settings,
        name: str,
        models: Sequence[str],
        store: QueueStore,
        redis_client: redis.asyncio.Redis,
        http: httpx.AsyncClient,
        tickets: Tickets,
        slots: Slots,
        busy: Callable[[], bool],
        store_info: Callable[[], Mapping[str, Any]],
    ) -> None:
        self.settings = settings
        self.name = name
        self.models = list(models)
        self.store = store
        self.redis = redis_client
        self.http = http
        self.tickets = tickets
        self.slots = slots
        self.busy = busy  # draining or stopping: no top-up needed
        self.clock_offset_ms: int | None = None  # this host's clock minus Redis's, as last measured
        self.store_info = store_info  # the image store this worker writes to (GET /health compares)

    def loops(self) -> dict[str, Callable[[], Coroutine[Any, Any, None]]]:
        """Each loop by name, as a factory: the supervisor starts it again after a failure."""
        s = self.settings
        loops: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
            "heartbeat": self.heartbeat,
            "reaper": self.reaper,
            "top-up": self.top_up_loop,
            "cancel-poll": self.cancel_poll,
            "cancel-listen": self.cancel_listen,
        }
        if s.webhook_secret:
            dispatcher = WebhookDispatcher(
                self.store,
                self.http,
                s.webhook_secret.encode(),
                allow_private=s.webhook_allow_private,
                max_retry_seconds=s.webhook_max_retry_seconds,
            )
            loops["webhooks"] = lambda: self.webhooks(dispatcher)
        return loops

    # -- heartbeat ----------------------------------------------------------------------------
    async def heartbeat(self) -> None:
        """Renews the leases of our images and announces the worker (GET /health lists it)."""
        s = self.settings
        info: dict[str, Any] = {
            "name": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "concurrency": self.slots.concurrency,
            "models": self.models,
        }
        while True:
            try:
                members = self.slots.lease_members()
                await self.store.renew(
                    members, int(s.worker_lease_seconds * 1000), safety_ttl=s.queue_safety_ttl_seconds
                )
                if self.clock_offset_ms is None:
                    self._note_clock(*await self._timed(self.store.server_time_ms()))
                info.setdefault("started_at", (time.time() * 1000 - (self.clock_offset_ms or 0)) // 1000)
                self._note_clock(*await self._timed(self.store.register_worker(
                    self.name,
                    {**info, "in_flight": len(members), "images_done": self.slots.images_done,
                     "clock_offset_ms": self.clock_offset_ms, "image_store": dict(self.store_info())},
                    int(s.worker_lease_seconds * 1000),
                )))
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc, extra={"worker": self.name})
            await asyncio.sleep(s.worker_heartbeat_seconds)

    @staticmethod
    async def _timed(call: Awaitable[int]) -> tuple[float, int, float]:
        """This host's clock before and after a call that answers Redis's time (ms), around it."""
        before = time.time() * 1000
        server_ms = await call
        return before, server_ms, time.time() * 1000

    def _note_clock(self, before: float, server_ms: int, after: float) -> None:
        """How far this host's clock is from Redis's, which every lease and timestamp is measured by.
        Nothing here depends on it; it is shown in /health and logged, since a skewed clock signals
        a host without time sync (signed URLs and tokens are checked by the API host's clock)."""
        offset = round((before + after) / 2 - server_ms)
        skewed = abs(offset) > CLOCK_SKEW_WARN_MS
        was_skewed = self.clock_offset_ms is not None and abs(self.clock_offset_ms) > CLOCK_SKEW_WARN_MS
        if skewed and not was_skewed:
            log.warning("this host's clock is %+d ms off the Redis server's clock", offset,
                        extra={"worker": self.name, "clock_offset_ms": offset})
        elif was_skewed and not skewed:
            log.info("this host's clock agrees with the Redis server's again (%+d ms)", offset,
                     extra={"worker": self.name, "clock_offset_ms": offset})
        self.clock_offset_ms = offset

    # -- reaper and top-up --------------------------------------------------------------------
    async def reaper(self) -> None:
        """Re-queues the images of workers whose leases lapsed, and wakes someone to run them."""
        s = self.settings
        while True:
            await asyncio.sleep(s.worker_heartbeat_seconds)
            try:
                models = await self.store.reap(
                    s.max_image_attempts, s.queue_ttl_seconds, s.queue_ttl_seconds + s.queue_safety_ttl_seconds
                )
                if models:
                    log.info("re-queued images of a lost worker", extra={"worker": self.name})
                for model in models:
                    await asyncio.to_thread(self.tickets.wake, model, 1)
            except redis.RedisError as exc:
                log.warning("reaper failed: %s", exc, extra={"worker": self.name})

    async def top_up_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.worker_heartbeat_seconds)
            try:
                await self.top_up()
            except redis.RedisError as exc:
                log.warning("ticket top-up failed: %s", exc, extra={"worker": self.name})

    async def top_up(self) -> None:
        """Safety net: claimable work with no ticket waiting and nobody draining gets a ticket."""
        if self.busy():
            return
        for model in self.models:
            if await self.store.claimable(model) > 0:
                waiting = await asyncio.to_thread(self.tickets.waiting, model)
                if waiting == 0:
                    await asyncio.to_thread(self.tickets.wake, model, 1)

    # -- cancel watchers ----------------------------------------------------------------------
    async def cancel_poll(self) -> None:
        """Catches cancels whose notification was missed (e.g. during a reconnect)."""
        while True:
            await asyncio.sleep(self.settings.worker_cancel_poll_seconds)
            queue_ids = self.slots.queue_ids()
            if not queue_ids:
                continue
            try:
                statuses = await self.store.statuses(queue_ids)
            except redis.RedisError:
                continue
            for qid, status in statuses.items():
                if status in (QueueState.CANCELLED, None):
                    self.slots.cancel_queue(qid)

    async def cancel_listen(self) -> None:
        """Stops a queue's running images as soon as its cancel is published."""
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(CANCEL_CHANNEL)
                    while True:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=CANCEL_LISTEN_SECONDS
                        )
                        if message and message.get("type") == "message":
                            data = message["data"]
                            self.slots.cancel_queue(data.decode() if isinstance(data, bytes) else str(data))
            except (redis.RedisError, OSError) as exc:
                log.debug("cancel listener reconnecting: %s", exc)
                await asyncio.sleep(CANCEL_RECONNECT_SECONDS)

    # -- webhooks -----------------------------------------------------------------------------
    async def webhooks(self, dispatcher: WebhookDispatcher) -> None:
        try:
            while True:
                try:
                    busy = await dispatcher.run_once()
                except redis.RedisError as exc:
                    log.warning("webhook lease failed: %s", exc, extra={"worker": self.name})
                    busy = 0
                await asyncio.sleep(WEBHOOK_BUSY_POLL_SECONDS if busy else WEBHOOK_POLL_SECONDS)
        finally:
            await dispatcher.aclose()
