"""How a queue looks from outside: QueueStatus with its counts, position, ETA, warnings and images."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from app.core.errors import NotFound
from app.models.queue import ImageResult, QueueStatus
from app.services.queue.states import ImageStatus, Priority, QueueState
from app.services.queue.store import QueueStore, Schedule

SERVED_CACHE_SECONDS = 2.0
RUNNING_IMAGE_WEIGHT = 0.5  # a running image counts as half done in an ETA

ImageUrl = Callable[[str, int, int], str]


def thumbnail_url(image_url: str) -> str:
    """An image URL's thumbnail: the same URL (and signature) asking for the small WebP."""
    path, _, query = image_url.partition("?")
    return f"{path}?thumb=1" + (f"&{query}" if query else "")
"""(queue id, index, attempt) -> the image's signed URL."""


class QueueGone(NotFound):
    """The queue vanished while its status was being read."""


def iso(ms: str | int | None) -> str | None:
    """Epoch milliseconds as ISO 8601 UTC with a Z."""
    if ms in (None, ""):
        return None
    return datetime.fromtimestamp(int(ms) / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def position(priority: Priority, schedule: Schedule) -> int:
    """Images of other queues ahead of this queue's next pending image, in the fair schedule."""
    ahead = sum(n for p, n in schedule.pending.items() if p.rank < priority.rank)
    # Round robin: each user ahead in the ring gets one image first; each of this user's queues
    # ahead of this one costs a full round of every user.
    ahead += schedule.user_rank or 0
    ahead += (schedule.queue_rank or 0) * max(1, schedule.users)
    return ahead


def eta(meta: Mapping[str, str], counts: dict[str, int], ahead: int | None, schedule: Schedule) -> float | None:
    """Seconds until the queue finishes. Once some of its images have finished, from the queue's own
    pace (which already reflects its share of the workers); before that, from the model's recent
    throughput and the images ahead of it."""
    remaining = counts["pending"] + counts["running"] * RUNNING_IMAGE_WEIGHT
    done = counts["succeeded"] + counts["failed"] + counts["cancelled"]
    started = meta.get("started_at")
    if started and done and meta.get("attempt", "1") == "1":
        elapsed = max(0.001, (schedule.server_ms - int(started)) / 1000)  # both by Redis's clock
        return round(remaining * elapsed / done, 1)
    if schedule.rate > 0:
        return round(((ahead or 0) + remaining) / schedule.rate, 1)
    return None


def page(total: int, offset: int, limit: int | None) -> tuple[int, int]:
    """The [start, stop) of a page of `limit` images (None: all) from `offset`, within `total`."""
    start = max(0, min(offset, total))
    return start, total if limit is None else min(total, start + max(0, limit))


def queue_status(queue_id: str, meta: Mapping[str, str], schedule: Schedule | None = None) -> QueueStatus:
    """The status of a queue from its meta fields and, while it runs, its place in the schedule."""
    counts = {k: int(meta.get(k, 0)) for k in ("total", "pending", "running", "succeeded", "failed", "cancelled")}
    total = counts["total"]
    terminal = counts["succeeded"] + counts["failed"] + counts["cancelled"]
    ahead: int | None = None
    seconds: float | None = None
    if schedule is not None and not meta.get("finished_at"):
        ahead = position(Priority(meta["priority"]), schedule) if counts["pending"] else None
        seconds = eta(meta, counts, ahead, schedule)
    webhook = json.loads(meta["webhook"]) if meta.get("webhook") else None
    if webhook is not None and meta.get("webhook_state"):
        webhook["deliveries"] = json.loads(meta["webhook_state"])
    return QueueStatus(
        queue_id=queue_id,
        total=counts["total"],
        pending=counts["pending"],
        running=counts["running"],
        succeeded=counts["succeeded"],
        failed=counts["failed"],
        cancelled=counts["cancelled"],
        name=meta.get("name"),
        status=QueueState(meta["status"]),
        priority=Priority(meta["priority"]),
        model=meta["model"],
        tags=json.loads(meta.get("tags", "[]")),
        progress=round(100.0 * terminal / total, 2) if total else 100.0,
        position=ahead,
        eta_seconds=seconds,
        created_at=iso(meta["created_at"]) or "",
        started_at=iso(meta.get("started_at")),
        finished_at=iso(meta.get("finished_at")),
        attempt=int(meta.get("attempt", 1)),
        webhook=webhook,
    )


class StatusView:
    """Completes a QueueStatus with what needs more reads: its images and its warnings."""

    def __init__(self, store: QueueStore, image_url: ImageUrl) -> None:
        self.store = store
        self.image_url = image_url
        self._served: tuple[float, set[str]] = (0.0, set())

    async def attach_images(
        self,
        status: QueueStatus,
        meta: Mapping[str, str],
        records: dict[int, dict[str, Any]],
        offset: int,
        limit: int | None,
    ) -> None:
        """Sets a page of the queue's images on `status`, from the records read with `meta`."""
        start, stop = page(status.total, offset, limit)
        spec_raw = await self.store.spec(status.queue_id)
        if spec_raw is None:
            # Deleted (or expired) between reading the queue and its spec: it is gone now.
            raise QueueGone("queue not found")
        spec: dict[str, Any] = json.loads(spec_raw)
        cut = meta.get("cut") == "1"
        cursor = int(meta.get("cursor", 0))
        prompts: Sequence[str] = spec["prompts"]
        count = int(spec["count"])
        images = []
        for i in range(start, stop):
            rec = records.get(i)
            if rec is not None:
                state = ImageStatus(rec["s"])
            else:
                state = ImageStatus.CANCELLED if (cut and i >= cursor) else ImageStatus.PENDING
            attempts = int(rec.get("a", 0)) if rec else 0
            url = self.image_url(status.queue_id, i, attempts) if state == ImageStatus.SUCCEEDED else None
            images.append(
                ImageResult(
                    index=i,
                    prompt=prompts[i // count],
                    seed=int(spec["seed"]) + i,
                    status=state,
                    url=url,
                    thumbnail_url=thumbnail_url(url) if url else None,
                    error=rec.get("e") if rec else None,
                    started_at=iso(rec.get("t0")) if rec else None,
                    finished_at=iso(rec.get("t1")) if rec else None,
                    attempts=attempts,
                )
            )
        status.images = images
        status.images_offset = start
        status.images_limit = None if limit is None else limit

    async def with_warnings(self, status: QueueStatus) -> QueueStatus:
        """Adds what the user should know about an unfinished queue (no worker serves its model)."""
        if status.finished_at is None and status.pending and status.model not in await self._served_models():
            status.warnings.append(
                f"no live worker serves model {status.model!r}: its images wait until one starts"
            )
        return status

    async def _served_models(self) -> set[str]:
        """Models some live worker serves; cached briefly, as every status poll asks."""
        now = time.monotonic()
        if now - self._served[0] > SERVED_CACHE_SECONDS:
            workers = await self.store.workers()
            self._served = (now, {m for w in workers for m in w.get("models", [])})
        return self._served[1]
