"""The worker's side of the image store: keeping finished images (after the generation slot is
free, retried while the store is away), noticing a store the API cannot see, and sweeping the
objects of queues whose records have expired or been deleted."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

import redis

from app.core.config import Settings
from app.services.images import ImageStore, StoreError
from app.services.images.encoding import OutputFormat
from app.services.images.saving import save_image
from app.services.queue.store import Claim, QueueStore
from app.services.queue.sweep import sweep_forever

log = logging.getLogger("imagequeue.worker")

BACKLOG_PER_SLOT = 2  # images awaiting their upload, per slot, before finished slots wait to free
VISIBILITY_CHECK_SECONDS = 10.0
READER_FRESH_MS = 10 * 60 * 1000  # an API that announced its store this recently counts as a reader
STORE_RETRY_SECONDS = 5.0  # a store unreachable at start is looked at again this often


class StoreMismatch(Exception):
    """This worker writes to a store the API does not read: its images could not be served."""


class ImageKeeper:
    """Saves finished images to the image store and watches over the store."""

    def __init__(self, images: ImageStore, queues: QueueStore, settings: Settings, *, worker: str,
                 concurrency: int) -> None:
        self.images = images
        self.queues = queues
        self.settings = settings
        self.worker = worker
        self.store_id: str | None = None
        self.mismatch: str | None = None  # why this worker's images could not be served, when so
        self._backlog = asyncio.Semaphore(max(1, concurrency * BACKLOG_PER_SLOT))

    async def open(self) -> None:
        await self._identify()

    async def _identify(self) -> str | None:
        if self.store_id is None:
            try:
                self.store_id = await self.images.identity()
            except StoreError as exc:
                log.error("image store unreachable: %s", exc.message, extra={"worker": self.worker})
        return self.store_id

    @property
    def info(self) -> dict[str, Any]:
        """What the heartbeat tells GET /health about this worker's store."""
        return {"kind": self.images.kind, "location": self.images.location, "id": self.store_id,
                "mismatch": self.mismatch}

    # -- one image ----------------------------------------------------------------------------
    async def reserve(self) -> None:
        """Wait for room in the upload backlog (while holding the generation slot): a store that is
        down stops this worker from claiming more instead of piling images up in memory."""
        await self._backlog.acquire()

    def unreserve(self) -> None:
        self._backlog.release()

    def refusal(self) -> str | None:
        """Why an image should not be generated here at all (its bytes could not be served)."""
        return self.mismatch

    async def save(self, claim: Claim, spec: dict[str, Any], data: bytes) -> dict[str, Any]:
        """Encodes and stores the image and its thumbnail; returns the record's fields. Raises
        StoreUnreachable past IMAGE_STORE_RETRY_SECONDS, ImageUnreadable for bytes that are no image."""
        store_id = await self._identify() or "?"
        fmt: OutputFormat = spec.get("output_format") or "png"
        quality = spec.get("output_quality")
        extra = {"queue_id": claim.queue_id, "image": claim.index, "worker": self.worker}

        def retrying(attempt: int, error: StoreError) -> None:
            if attempt == 1:
                log.warning("image store unavailable, retrying: %s", error.message, extra=extra)

        saved = await save_image(
            self.images, store_id=store_id, queue_id=claim.queue_id, index=claim.index, attempt=claim.attempt,
            data=data, output_format=fmt, quality=quality,
            give_up_after=self.settings.image_store_retry_seconds, on_retry=retrying,
        )
        return saved.record()

    async def discard(self, record: dict[str, Any]) -> None:
        """Removes what was stored for a report the queue no longer wanted (a stale attempt)."""
        keys = [k for k in (record.get("k"), record.get("tk")) if k]
        with contextlib.suppress(StoreError):
            await self.images.delete(keys)

    # -- duties -------------------------------------------------------------------------------
    async def watch(self) -> None:
        """Compares this worker's store with the ones API instances announce; a worker that writes
        where no API reads (a file store on another host) says so in its images, /health and logs."""
        while True:
            try:
                mine = await self._identify()
                readers = await self.queues.store_readers(READER_FRESH_MS)
                mismatch = None
                if mine is not None and readers and mine not in readers:
                    mismatch = (
                        f"image store mismatch: this worker ({self.worker} on {socket.gethostname()}) writes "
                        f"to {self.images.location} (store id {mine[:8]}), which no API instance reads "
                        f"(theirs: {', '.join(sorted(r[:8] for r in readers))}); give the API and every "
                        "worker the same IMAGE_STORE on shared storage (a volume every host mounts, or s3://...)"
                    )
                if mismatch and mismatch != self.mismatch:
                    log.error(mismatch, extra={"worker": self.worker})
                self.mismatch = mismatch
            except redis.RedisError as exc:
                log.debug("store visibility check failed: %s", exc)
            await asyncio.sleep(VISIBILITY_CHECK_SECONDS if self.store_id else STORE_RETRY_SECONDS)

    async def sweep(self) -> None:
        """Removes the objects of queues that are gone (expired or deleted), as Redis lists them."""
        await sweep_forever(self.images, self.queues, self.settings.image_store_sweep_seconds,
                            {"worker": self.worker})
