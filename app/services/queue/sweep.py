"""Removing the image-store objects of queues that are gone (expired or deleted), as Redis lists them.

Workers and API processes all sweep: Redis leases each due queue to one sweeper at a time, so the
objects of an expired queue go even while no worker runs, and never twice at once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import redis

from app.services.images import ImageStore, StoreError, queue_prefix
from app.services.queue.store import QueueStore

log = logging.getLogger("imagequeue.images")

SWEEP_BATCH = 50  # queues whose objects one sweep removes at most
SWEEP_LEASE_MS = 60_000  # a sweep that dies leaves its queues to another after this


async def sweep_once(images: ImageStore, queues: QueueStore, extra: Mapping[str, Any]) -> int:
    """Removes the objects of up to SWEEP_BATCH due queues; returns how many queues were done. A queue
    whose removal fails stays leased, and another sweep takes it up after the lease."""
    due = await queues.gc_due(SWEEP_BATCH, SWEEP_LEASE_MS)
    done: list[str] = []
    for queue_id in due:
        try:
            removed = await images.delete_prefix(queue_prefix(queue_id))
        except StoreError as exc:
            log.warning("sweep of queue %s failed: %s", queue_id, exc.message, extra=dict(extra))
            continue
        done.append(queue_id)
        if removed:
            log.info("removed %d object(s) of expired queue %s", removed, queue_id,
                     extra={**extra, "queue_id": queue_id})
    await queues.gc_done(done)
    return len(done)


async def sweep_forever(images: ImageStore, queues: QueueStore, every: float, extra: Mapping[str, Any]) -> None:
    """sweep_once every `every` seconds, for ever: Redis errors wait for the next round, anything else
    is logged and waits for it too."""
    while True:
        await asyncio.sleep(every)
        try:
            await sweep_once(images, queues, extra)
        except redis.RedisError:
            pass
        except Exception:
            log.exception("the sweep of expired queues' objects failed (%s)", dict(extra))
