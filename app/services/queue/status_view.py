"""How a queue looks from outside: QueueStatus with its counts, position, ETA, warnings and images.

Statuses are the hot read (browsers poll them), so they are built as plain dicts in QueueStatus's
field order and serialised once with orjson: the data comes from the service's own scripts, and
validating it again through pydantic cost more than everything else together. Signed image URLs
and timestamps repeat from poll to poll and are cached; each status carries an ETag made from the
queue's version (bumped by every script that changes it) and what else the answer depends on.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from app.core.conditional import make_etag
from app.models.queue import ImageResult, QueueStatus
from app.services.queue.states import ImageStatus, Priority
from app.services.queue.store import QueueStore, Schedule

SERVED_CACHE_SECONDS = 2.0
RUNNING_IMAGE_WEIGHT = 0.5  # a running image counts as half done in an ETA
URL_CACHE_SIZE = 65_536  # signed URLs (one per image attempt and expiry window) kept for the next poll
IMAGE_CACHE_SIZE = 50_000  # images of statuses kept built (~1 KB each)
SPEC_CACHE_SIZE = 1_024  # parsed specs of the queues polled lately...
SPEC_CACHE_MAX_BYTES = 65_536  # ...when they are at most this long (a big one is read each time)
ISO_CACHE_SIZE = 8_192
ALL_IMAGES = 2**31  # "to the end" as the last index of a page

ImageUrl = Callable[[str, int, int, int], str]
"""(queue id, index, attempt, expiry) -> the image's signed URL."""

_SUCCEEDED = ImageStatus.SUCCEEDED.value
_PENDING = ImageStatus.PENDING.value
_RUNNING = ImageStatus.RUNNING.value
_CANCELLED = ImageStatus.CANCELLED.value
_COUNTS = ("total", "pending", "running", "succeeded", "failed", "cancelled")


def _variant(image_url: str, path_suffix: str, param: str) -> str:
    """Another resource of a signed image URL: its path extended, `param` first, the same signature."""
    path, _, query = image_url.partition("?")
    return f"{path}{path_suffix}?{param}" + (f"&{query}" if query else "")


def thumbnail_url(image_url: str) -> str:
    """An image URL's thumbnail: the same URL (and signature) asking for the small WebP."""
    return _variant(image_url, "", "thumb=1")


def preview_url(image_url: str, previews: int) -> str:
    """A running image's latest preview: the URL (and signature) its attempt's image will have, with
    /preview and the count of previews so far (each new preview is a new URL)."""
    return _variant(image_url, "/preview", f"v={previews}")


def step_progress(step: int, steps: int) -> dict[str, Any]:
    """An image's `progress` as a status and an image.progress event show it."""
    return {"step": step, "steps": steps, "fraction": round(min(1.0, step / steps), 4) if steps > 0 else 0.0}


@functools.lru_cache(maxsize=ISO_CACHE_SIZE)
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
    pace (which already reflects its share of the workers); before that, from the step rate of its
    running images when their provider reports steps; else from the model's recent throughput and
    the images ahead of it."""
    running = counts["running"]
    if "pf" in meta:  # the share of the running images' steps already done (lua/progress.lua)
        remaining = counts["pending"] + running - min(running, max(0.0, float(meta["pf"])))
    else:
        remaining = counts["pending"] + running * RUNNING_IMAGE_WEIGHT
    done = counts["succeeded"] + counts["failed"] + counts["cancelled"]
    started = meta.get("started_at")
    if started and done and meta.get("attempt", "1") == "1":
        elapsed = max(0.001, (schedule.server_ms - int(started)) / 1000)  # both by Redis's clock
        return round(remaining * elapsed / done, 1)
    if running and meta.get("pe"):  # ms one image takes, by its steps: `running` go at a time
        return round(remaining * float(meta["pe"]) / 1000 / running, 1)
    if schedule.rate > 0:
        return round(((ahead or 0) + remaining) / schedule.rate, 1)
    return None


def page(total: int, offset: int, limit: int | None) -> tuple[int, int]:
    """The [start, stop) of a page of `limit` images (None: all) from `offset`, within `total`."""
    start = max(0, min(offset, total))
    return start, total if limit is None else min(total, start + max(0, limit))


def last_index(offset: int, limit: int | None) -> int:
    """The last image index a page asks for (before the queue's size bounds it); -1 for none."""
    if limit == 0:
        return -1
    return ALL_IMAGES if limit is None else offset + limit - 1


def summary(queue_id: str, meta: Mapping[str, str], schedule: Schedule | None = None) -> dict[str, Any]:
    """A QueueStatus without images, as a dict in the model's field order, from the queue's meta
    fields and, while it runs, its place in the schedule."""
    counts = {k: int(meta.get(k, 0)) for k in _COUNTS}
    total = counts["total"]
    terminal = counts["succeeded"] + counts["failed"] + counts["cancelled"]
    ahead: int | None = None
    seconds: float | None = None
    if schedule is not None and not meta.get("finished_at"):
        ahead = position(Priority(meta["priority"]), schedule) if counts["pending"] else None
        seconds = eta(meta, counts, ahead, schedule)
    webhook = orjson.loads(meta["webhook"]) if meta.get("webhook") else None
    if webhook is not None and meta.get("webhook_state"):
        webhook["deliveries"] = orjson.loads(meta["webhook_state"])
    return {
        "queue_id": queue_id,
        "name": meta.get("name"),
        "status": meta["status"],
        "priority": meta["priority"],
        "model": meta["model"],
        "tags": orjson.loads(meta["tags"]) if meta.get("tags") else [],
        "total": total,
        "pending": counts["pending"],
        "running": counts["running"],
        "succeeded": counts["succeeded"],
        "failed": counts["failed"],
        "cancelled": counts["cancelled"],
        "progress": round(100.0 * terminal / total, 2) if total else 100.0,
        "position": ahead,
        "eta_seconds": seconds,
        "created_at": iso(meta["created_at"]) or "",
        "started_at": iso(meta.get("started_at")),
        "finished_at": iso(meta.get("finished_at")),
        "attempt": int(meta.get("attempt", 1)),
        "webhook": webhook,
        "warnings": [],
        "images": None,
        "images_offset": None,
        "images_limit": None,
    }


def _answer_format() -> bytes:
    """What the shape of an answer depends on: a tag made by a version that answered other fields
    must not match after an upgrade."""
    return ",".join([*QueueStatus.model_fields, *ImageResult.model_fields]).encode()


class _Bounded(OrderedDict[Any, Any]):
    """A dict that forgets its oldest entries past `size` (the hot ones come back at once)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key: Any, value: Any) -> Any:
        self[key] = value
        if len(self) > self.size:
            self.popitem(last=False)
        return value


class StatusView:
    """Completes statuses with what needs more reads or keys: images, warnings, ETags."""

    def __init__(self, store: QueueStore, image_url: ImageUrl, signing_key: bytes) -> None:
        self.store = store
        self._url = functools.lru_cache(maxsize=URL_CACHE_SIZE)(image_url)
        self._served: tuple[float, set[str]] = (0.0, set())
        # An image's part of a status is a function of its queue, index, record and URL expiry (the
        # spec never changes): built once, then reused by every poll until its record changes.
        self._images = _Bounded(IMAGE_CACHE_SIZE)
        self._specs = _Bounded(SPEC_CACHE_SIZE)
        # Tags change with the answer's shape and with the URL signing key (new key: new URLs).
        self._salt = hashlib.blake2b(_answer_format() + b"\0" + signing_key, digest_size=16).digest()

    def image_url(self, queue_id: str, index: int, attempt: int, expires: int) -> str:
        return self._url(queue_id, index, attempt, expires)

    def etag(self, version: str | int, *parts: bytes | str | int | None) -> str:
        return make_etag(version, self._salt, *parts)

    def knows_spec(self, queue_id: str) -> bool:
        return queue_id in self._specs

    def spec(self, queue_id: str, raw: bytes | str | None) -> dict[str, Any]:
        """A queue's spec, parsed once (`raw` as read, None when it was not asked for: known)."""
        spec = self._specs.get(queue_id)
        if spec is None:
            spec = orjson.loads(raw) if raw else {"prompts": [""], "count": 1, "seed": 0}
            if raw and len(raw) <= SPEC_CACHE_MAX_BYTES:
                self._specs.put(queue_id, spec)
        return spec

    def attach_images(
        self,
        status: dict[str, Any],
        meta: Mapping[str, str],
        spec: Mapping[str, Any],
        records: Mapping[int, bytes],
        offset: int,
        limit: int | None,
        expires: int,
    ) -> None:
        """Sets a page of the queue's images on `status`, from the records (as stored) read with
        `meta`; the URLs of succeeded images are signed to `expires`."""
        start, stop = page(status["total"], offset, limit)
        cut = meta.get("cut") == "1"
        cursor = int(meta.get("cursor", 0))
        prompts = spec["prompts"]
        count = int(spec["count"])
        seed = int(spec["seed"])
        queue_id = status["queue_id"]
        cache = self._images
        images = []
        for i in range(start, stop):
            raw = records.get(i)
            if raw is None:
                images.append({
                    "index": i, "prompt": prompts[i // count], "seed": seed + i,
                    "status": _CANCELLED if (cut and i >= cursor) else _PENDING,
                    "url": None, "thumbnail_url": None, "error": None, "started_at": None, "finished_at": None,
                    "attempts": 0, "progress": None, "preview_url": None,
                })
                continue
            key = (queue_id, i, raw, expires)
            image = cache.get(key)
            if image is None:
                image = cache.put(key, self._image(queue_id, i, prompts[i // count], seed + i, raw, expires))
            images.append(image)
        status["images"] = images
        status["images_offset"] = start
        status["images_limit"] = limit

    def _image(self, queue_id: str, index: int, prompt: str, seed: int, raw: bytes, expires: int) -> dict[str, Any]:
        rec = orjson.loads(raw)
        state = rec["s"]
        attempts = int(rec.get("a", 0))
        url = self._url(queue_id, index, attempts, expires) if state == _SUCCEEDED else None
        progress = preview = None
        if state == _RUNNING:  # step progress (lua/progress.lua), cleared when the image settles
            if rec.get("pn"):  # a preview may come before the steps are known
                progress = step_progress(int(rec["ps"]), int(rec["pn"]))
            if rec.get("pv"):
                preview = preview_url(self._url(queue_id, index, attempts, expires), int(rec["pv"]))
        return {
            "index": index, "prompt": prompt, "seed": seed, "status": state,
            "url": url, "thumbnail_url": thumbnail_url(url) if url else None,
            "error": rec.get("e"), "started_at": iso(rec.get("t0")), "finished_at": iso(rec.get("t1")),
            "attempts": attempts, "progress": progress, "preview_url": preview,
        }

    async def add_warnings(self, status: dict[str, Any]) -> dict[str, Any]:
        """Adds what the user should know about an unfinished queue (no worker serves its model)."""
        if status["finished_at"] is None and status["pending"] and status["model"] not in await self._served_models():
            status["warnings"].append(
                f"no live worker serves model {status['model']!r}: its images wait until one starts"
            )
        return status

    async def _served_models(self) -> set[str]:
        """Models some live worker serves; cached briefly, as every status poll asks."""
        now = time.monotonic()
        if now - self._served[0] > SERVED_CACHE_SECONDS:
            workers = await self.store.workers()
            self._served = (now, {m for w in workers for m in w.get("models", [])})
        return self._served[1]
