"""The queue service: create, inspect, follow, cancel, retry and delete queues, and list them.

The façade the routes call. What a new queue must satisfy is in validation.py; how a queue is shown
(QueueStatus, position, ETA, images) in status_view.py; every Redis read and write in store.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from app.core.conditional import known_versions, matches
from app.core.config import Settings
from app.core.errors import Conflict, NotFound, TooManyRequests, Unprocessable
from app.core.security import check_image_signature, image_signature_current, signature_expiry
from app.models.queue import CreateQueueRequest, GenerateRequest, QueueStatus
from app.services.images import StoreError, queue_prefix
from app.services.images.serving import ImageObject, ImageServer
from app.services.models import Catalog
from app.services.queue.states import (
    TERMINAL,
    CancelOutcome,
    CreateOutcome,
    DeleteOutcome,
    ImageStatus,
    Priority,
    QueueState,
    RetryOutcome,
)
from app.services.queue.status_view import (
    ImageUrl,
    StatusView,
    last_index,
    preview_url,
    step_progress,
    summary,
    thumbnail_url,
)
from app.services.queue.store import QueueStore, user_key
from app.services.queue.tickets import Tickets
from app.services.queue.validation import check_create, check_fits_pending_limit

log = logging.getLogger("imagequeue.api")

_QUEUE_ID = re.compile(r"^[0-9a-f]{32}$")
ADMISSION_RETRY_AFTER_SECONDS = 30  # Retry-After of a create refused by the per-user limits
EVENTS_BLOCK_MS = 1000  # how long one read of a live event stream waits for news
EVENTS_BATCH = 500
WAIT_EVENTS_BATCH = 100
QUEUE_NOT_FOUND = "queue not found"
IMAGE_NOT_FOUND = "image not found"
LINK_NOT_FOUND = "image not found (or the link expired)"
PREVIEW_NOT_FOUND = "no preview: the image is not running, or its provider has sent no preview yet"


def valid_queue_id(queue_id: str) -> bool:
    return bool(_QUEUE_ID.match(queue_id))


def _stream_id(value: str) -> tuple[int, int]:
    """A Redis stream id as a tuple that sorts like the id."""
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def _owned(meta: Mapping[str, str] | None, user_id: str) -> Mapping[str, str]:
    """The one ownership check: someone else's queue is answered exactly like a missing one."""
    if meta is None or meta.get("uk") != user_key(user_id):
        raise NotFound(QUEUE_NOT_FOUND)
    return meta


async def _no_more_events() -> AsyncGenerator[list[QueueEvent], None]:
    """The events of a queue that ended at or before the resume point: none (the stream goes straight
    to its end)."""
    return
    yield


@dataclass(frozen=True, slots=True)
class QueueEvent:
    """One entry of a queue's or a user's event stream."""

    id: str | None  # None: live only, never replayed (image.progress)
    data: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.data.get("type", "message"))


@dataclass(frozen=True, slots=True)
class Tagged:
    """An answer and its entity tag; `body` is None when the caller's copy (named by its tag) is current."""

    etag: str
    body: bytes | None


@dataclass(frozen=True, slots=True)
class ImageSignature:
    """The `exp`, `sig` and `a` (the attempt it binds; absent from URLs made before it was added) of a
    signed image URL."""

    expires: int
    signature: str
    attempt: int | None = None


class QueueService:
    """Turns requests into queues in the store and queues into QueueStatus answers."""

    def __init__(
        self,
        store: QueueStore,
        tickets: Tickets,
        settings: Settings,
        catalog: Catalog,
        image_url: ImageUrl,
        images: ImageServer,
    ) -> None:
        self.store = store
        self.tickets = tickets
        self.settings = settings
        self.catalog = catalog
        self.images = images
        self.view = StatusView(store, image_url, settings.signing_key)

    # -- create -----------------------------------------------------------------------------
    async def create(
        self, user_id: str, req: CreateQueueRequest, idempotency_key: str | None = None
    ) -> tuple[QueueStatus, bool]:
        """Creates a queue; returns its status and whether it is a replay of an earlier request."""
        s = self.settings
        checked = check_create(req, s, self.catalog)
        spec = {
            "prompts": checked.prompts,
            "count": req.count,
            "seed": checked.seed,
            "width": req.width,
            "height": req.height,
            "negative_prompt": req.negative_prompt,
            "params": req.params,
        }
        if req.output_format != "png":
            spec.update(output_format=req.output_format, output_quality=req.output_quality)
        fields: dict[str, str | int] = {
            "user": user_id,
            "model": checked.model,
            "priority": req.priority.value,
            "total": checked.total,
            "count": req.count,
            "seed": checked.seed,
            "attempt": 1,
        }
        if req.name:
            fields["name"] = req.name
        if req.tags:
            fields["tags"] = json.dumps(req.tags)
        if checked.webhook:
            fields["webhook"] = json.dumps(checked.webhook)
        fingerprint = hashlib.sha256(req.model_dump_json().encode()).hexdigest()
        queue_id = uuid.uuid4().hex
        uk = user_key(user_id)
        result = await self.store.create(
            queue_id=queue_id,
            uk=uk,
            fields=fields,
            spec=json.dumps(spec, separators=(",", ":")),
            safety_ttl=s.queue_safety_ttl_seconds,
            idempotency_key=idempotency_key,
            fingerprint=fingerprint,
            idempotency_ttl=s.idempotency_ttl_seconds,
            max_pending=s.max_pending_images_per_user,
            max_active=s.max_active_queues_per_user,
        )
        if result.outcome == CreateOutcome.CONFLICT:
            raise Unprocessable(
                "this Idempotency-Key was already used with a different request body", ("header", "Idempotency-Key")
            )
        if result.outcome in (CreateOutcome.LIMIT_ACTIVE, CreateOutcome.LIMIT_PENDING):
            raise self._refused("this queue", result.outcome == CreateOutcome.LIMIT_ACTIVE, result.detail)
        if result.outcome == CreateOutcome.REPLAY:
            return await self.status(user_id, result.queue_id, images_limit=None), True
        await self.wake(checked.model, checked.total)
        return await self.status(user_id, queue_id, images_limit=None), False

    def _refused(self, what: str, active: bool, detail: str) -> TooManyRequests:
        """The 429 of a create or a retry the per-user limits refuse for now (`detail`: the active-queue
        limit, or the room left for pending images); the same words for both, since a retry admits
        images and a queue exactly as a create does."""
        if active:
            return TooManyRequests(
                f"you already have {detail} active queues, the most allowed; wait for one to finish",
                ADMISSION_RETRY_AFTER_SECONDS,
            )
        return TooManyRequests(
            f"{what} would exceed your limit of {self.settings.max_pending_images_per_user} pending images "
            f"(room for {max(0, int(detail))} more); wait for some to finish",
            ADMISSION_RETRY_AFTER_SECONDS,
        )

    async def wake(self, model: str, images: int) -> None:
        """Enqueue enough RQ tickets for every live worker of `model` to join in."""
        workers = [w for w in await self.store.workers() if model in w.get("models", [])]
        wanted = max(1, min(images, len(workers)))
        await asyncio.to_thread(self.tickets.wake, model, wanted)

    async def generate(self, user_id: str, req: GenerateRequest) -> QueueStatus:
        create = CreateQueueRequest(
            prompts=[req.prompt],
            seed=req.seed,
            width=req.width,
            height=req.height,
            negative_prompt=req.negative_prompt,
            params=req.params,
            model=req.model,
            priority=Priority.HIGH,
        )
        status, _ = await self.create(user_id, create)
        return status

    async def wait_terminal(self, user_id: str, queue_id: str, timeout: float) -> QueueStatus:
        """The queue's status once terminal, or as it stands when `timeout` runs out."""
        deadline = time.monotonic() + timeout
        key = self.store.queue_events_key(queue_id)
        last = "0-0"
        while True:
            status = await self.status(user_id, queue_id, images_limit=None)
            if status.status in TERMINAL and status.finished_at:
                return status
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return status
            block = int(min(remaining, 1.0) * 1000) or 1
            events = await self.store.read_events(key, last, block_ms=block, count=WAIT_EVENTS_BATCH)
            if events:
                last = events[-1][0]

    # -- read -------------------------------------------------------------------------------
    async def owned_queue(self, user_id: str, queue_id: str) -> Mapping[str, str]:
        """The queue's meta fields, if it exists and is the user's; NotFound otherwise."""
        if not valid_queue_id(queue_id):
            raise NotFound(QUEUE_NOT_FOUND)
        return _owned(await self.store.meta(queue_id), user_id)

    async def events(
        self, user_id: str, queue_id: str | None, after: str | None
    ) -> AsyncGenerator[list[QueueEvent], None]:
        """Batches of events (an empty one each time EVENTS_BLOCK_MS passes without news), after the
        event id `after`: one queue's from its start, ending with its final event (at once when `after`
        is at or past it), or all the user's queues' from now on. Running images' image.progress events
        are merged in live, from now on, without ids (they are never replayed: a status has the current
        progress). Ownership and the starting points are settled before this returns, so their errors
        come before any event."""
        uk = user_key(user_id)
        if queue_id is not None:
            await self.owned_queue(user_id, queue_id)
            key = self.store.queue_events_key(queue_id)
            if after is not None and await self._ended_by(key, after):
                return _no_more_events()
            start = after or "0-0"
        else:
            key = self.store.user_events_key(uk)
            start = after if after is not None else await self.store.newest_event_id(key)
        live = self.store.progress_events_key(uk)
        return self._follow(key, start, live, await self.store.newest_event_id(live), queue_id)

    async def _ended_by(self, key: str, after: str) -> bool:
        """Whether a queue's newest event is its final one and comes at or before `after`: a reader
        resuming there has seen the queue end. Following would wait for a final event that already
        went by (until a retry starts the queue again, which writes a newer event and so is followed)."""
        newest = await self.store.newest_event(key)
        return newest is not None and bool(newest[1].get("final")) and _stream_id(newest[0]) <= _stream_id(after)

    async def _follow(
        self, key: str, after: str, live: str, live_after: str, queue_id: str | None
    ) -> AsyncGenerator[list[QueueEvent], None]:
        while True:
            read = await self.store.read_streams({key: after, live: live_after},
                                                 block_ms=EVENTS_BLOCK_MS, count=EVENTS_BATCH)
            # Each entry with its id as (ms, seq), parsed once.
            events = [(_stream_id(i), i, d) for i, d in read.get(key, [])]
            progress = [(_stream_id(i), i, d) for i, d in read.get(live, [])]
            # Where one read stopped short (it was full), the other waits there too: what comes later in
            # either stream is sent next time, in order. Ids of two streams compare by their time only
            # (each stream counts its own sequence within a millisecond), and a millisecond that
            # reaches the cut waits whole, unless it is all there is.
            full = [part[-1][0][0] for part in (events, progress) if len(part) == EVENTS_BATCH]
            if full:
                cut = min(full)
                early = [e for e in events if e[0][0] < cut]
                soon = [e for e in progress if e[0][0] < cut]
                if early or soon:
                    events, progress = early, soon
                else:
                    events = [e for e in events if e[0][0] <= cut]
                    progress = [e for e in progress if e[0][0] <= cut]
            if progress:
                live_after = progress[-1][1]
            # Coalesced: an image's newest progress only, where its last write falls among the events.
            latest = {(d["queue_id"], d["index"]): (at, d) for at, _, d in progress
                      if queue_id is None or d.get("queue_id") == queue_id}
            # Within one millisecond, progress goes first: a run's progress is written before it
            # settles, never after.
            merged = [((ms, 1, seq), QueueEvent(i, self._with_url(d))) for (ms, seq), i, d in events]
            merged += [((ms, 0, seq), QueueEvent(None, self._progress_event(d))) for (ms, seq), d in latest.values()]
            merged.sort(key=lambda item: item[0])
            batch = []
            for _, event in merged:
                batch.append(event)
                if event.id is not None:
                    after = event.id
                    if queue_id is not None and event.data.get("final"):
                        yield batch
                        return
            yield batch

    def _with_url(self, data: dict[str, Any]) -> dict[str, Any]:
        """A succeeded image's event carries its signed URL, like the image in a status."""
        if data.get("type") == "image" and data.get("status") == ImageStatus.SUCCEEDED:
            attempt = int(data.get("attempt", 0))
            if attempt:
                expires = signature_expiry(self.settings)
                data["url"] = self.view.image_url(data["queue_id"], int(data["index"]), attempt, expires)
                data["thumbnail_url"] = thumbnail_url(data["url"])
        return data

    def _progress_event(self, data: dict[str, Any]) -> dict[str, Any]:
        """An entry of a user's progress stream (lua/progress.lua) as an image.progress event."""
        queue_id, index, attempt, previews = data["queue_id"], int(data["index"]), int(data["attempt"]), int(data["pv"])
        url = None
        if previews:
            url = preview_url(self.view.image_url(queue_id, index, attempt, signature_expiry(self.settings)), previews)
        return {"type": "image.progress", "queue_id": queue_id, "index": index, "attempt": attempt,
                **step_progress(int(data["step"]), int(data["steps"])), "preview_url": url}

    async def status(
        self, user_id: str, queue_id: str, *, images_offset: int = 0, images_limit: int | None = None
    ) -> QueueStatus:
        """A queue's status as a model (the routes that answer one now and then)."""
        _, status = await self._status(user_id, queue_id, images_offset, images_limit, None)
        assert status is not None
        return QueueStatus.model_validate(status)

    async def status_answer(
        self,
        user_id: str,
        queue_id: str,
        *,
        images_offset: int = 0,
        images_limit: int | None = None,
        known: Sequence[str] | None = None,
    ) -> Tagged:
        """A queue's status as JSON with its ETag; no body when `known` (the tags the caller holds)
        names it, and then no image record is read."""
        etag, status = await self._status(user_id, queue_id, images_offset, images_limit, known)
        return Tagged(etag, None if status is None else orjson.dumps(status))

    async def _status(
        self, user_id: str, queue_id: str, offset: int, limit: int | None, known: Sequence[str] | None
    ) -> tuple[str, dict[str, Any] | None]:
        if not valid_queue_id(queue_id):
            raise NotFound(QUEUE_NOT_FOUND)
        last = last_index(offset, limit)
        expires = signature_expiry(self.settings) if last >= 0 else 0
        versions = known_versions(known)
        with_spec = not self.view.knows_spec(queue_id)
        while True:
            read = await self.store.status_read(queue_id, offset, last, versions, with_spec=with_spec)
            meta = _owned(read.meta if read else None, user_id)
            assert read is not None
            status = await self.view.add_warnings(summary(queue_id, meta, read.schedule))
            # The tag covers the summary as sent (position, ETA and warnings are not in the version),
            # the page asked for and the URLs' expiry.
            etag = self.view.etag(read.version, orjson.dumps(status), offset, limit, expires)
            if matches(known, etag):
                return etag, None
            if read.complete:
                break
            versions = []  # the version was known but the answer moved on (ETA, URL expiry): read it all
        if last >= 0:
            spec = self.view.spec(queue_id, read.spec)
            self.view.attach_images(status, meta, spec, read.records, offset, limit, expires)
        return etag, status

    async def active_answer(self, user_id: str, known: Sequence[str] | None = None) -> Tagged:
        """The user's unfinished queues, newest first, as JSON with its ETag (one round trip)."""
        uk = user_key(user_id)
        found, gone = await self.store.summaries(uk)
        await self.store.forget(uk, "active", gone)
        queues = [summary(qid, meta, schedule) for qid, meta, schedule in found if not meta.get("finished_at")]
        body = orjson.dumps({"queues": queues})
        etag = self.view.etag(0, body)  # position and ETA move without a version: the answer is the tag
        return Tagged(etag, None if matches(known, etag) else body)

    async def history_answer(
        self,
        user_id: str,
        *,
        limit: int,
        offset: int,
        status: QueueState | None = None,
        tag: str | None = None,
        search: str | None = None,
        images_limit: int | None = None,
        known: Sequence[str] | None = None,
    ) -> Tagged:
        """The user's finished queues within the TTL, as JSON with its ETag; no body when `known`
        names it, and then only the version of the user's queues is read."""
        uk = user_key(user_id)
        version, count = await self.store.history_version(uk, self.settings.queue_ttl_seconds)
        expires = signature_expiry(self.settings) if images_limit != 0 else 0
        etag = self.view.etag(version, count, limit, offset, status, tag, search, images_limit, expires)
        if matches(known, etag):
            return Tagged(etag, None)
        queues, total = await self._history(uk, limit, offset, status, tag, search, images_limit, expires)
        return Tagged(etag, orjson.dumps({"queues": queues, "total": total}))

    async def _history(
        self,
        uk: str,
        limit: int,
        offset: int,
        status: QueueState | None,
        tag: str | None,
        search: str | None,
        images_limit: int | None,
        expires: int,
    ) -> tuple[list[dict[str, Any]], int]:
        horizon = await self.store.server_time_ms() - self.settings.queue_ttl_seconds * 1000
        ids = await self.store.user_queue_ids(uk, "hist", min_score=horizon)
        metas = await self.store.metas(ids)
        rows = [(qid, m) for qid, m in zip(ids, metas, strict=True) if m is not None and m.get("finished_at")]
        await self.store.forget(uk, "hist", [qid for qid, m in zip(ids, metas, strict=True) if m is None])
        if status is not None:
            rows = [(q, m) for q, m in rows if m["status"] == status.value]
        if tag is not None:
            rows = [(q, m) for q, m in rows if tag in json.loads(m.get("tags", "[]"))]
        if search:
            needle = search.casefold()
            unnamed = [qid for qid, m in rows if needle not in m.get("name", "").casefold()]
            unknown = [qid for qid in unnamed if not self.view.knows_spec(qid)]
            raw = dict(zip(unknown, await self.store.specs(unknown), strict=True))
            missed = {
                qid for qid in unnamed
                if not any(needle in p.casefold() for p in self.view.spec(qid, raw.get(qid))["prompts"])
            }
            rows = [(qid, m) for qid, m in rows if qid not in missed]
        shown = rows[offset : offset + limit]
        out = [summary(qid, meta) for qid, meta in shown]
        gone: set[str] = set()
        if images_limit != 0 and shown:
            details = await self.store.page_details([qid for qid, _ in shown], images_limit)
            for st, (qid, meta), (raw_spec, records) in zip(out, shown, details, strict=True):
                if raw_spec is None and not self.view.knows_spec(qid):
                    gone.add(qid)  # deleted while the page was read: no longer part of the history
                    continue
                spec = self.view.spec(qid, raw_spec)
                self.view.attach_images(st, meta, spec, records, 0, images_limit, expires)
            out = [st for st in out if st["queue_id"] not in gone]
        return out, len(rows)

    # -- change -----------------------------------------------------------------------------
    async def cancel(self, user_id: str, queue_id: str) -> QueueStatus:
        if not valid_queue_id(queue_id):
            raise NotFound(QUEUE_NOT_FOUND)
        s = self.settings
        outcome = await self.store.cancel(queue_id, user_key(user_id), s.queue_ttl_seconds, self._user_ttl)
        if outcome == CancelOutcome.NOT_FOUND:
            raise NotFound(QUEUE_NOT_FOUND)
        if outcome == CancelOutcome.CONFLICT:
            meta = await self.owned_queue(user_id, queue_id)
            raise Conflict(f"queue already finished ({meta['status']}); nothing to cancel")
        return await self.status(user_id, queue_id)

    async def retry(self, user_id: str, queue_id: str, include_cancelled: bool) -> QueueStatus:
        if not valid_queue_id(queue_id):
            raise NotFound(QUEUE_NOT_FOUND)
        s = self.settings
        result = await self.store.retry(
            queue_id, user_key(user_id), include_cancelled, s.queue_safety_ttl_seconds,
            max_pending=s.max_pending_images_per_user, max_active=s.max_active_queues_per_user,
        )
        outcome = result.outcome
        if outcome == RetryOutcome.LIMIT_PENDING:
            # Only a limit lowered since the queue was made lets a retry outgrow it on its own.
            check_fits_pending_limit(
                result.images, s, what="this retry would run", loc=("body",),
                advice="retry without include_cancelled if that leaves fewer, or create smaller queues",
            )
        if outcome in (RetryOutcome.LIMIT_ACTIVE, RetryOutcome.LIMIT_PENDING):
            raise self._refused("this retry", outcome == RetryOutcome.LIMIT_ACTIVE, result.detail)
        if outcome == RetryOutcome.NOT_FOUND:
            raise NotFound(QUEUE_NOT_FOUND)
        if outcome == RetryOutcome.CONFLICT:
            raise Conflict("queue is still running; retry it once it has finished (or cancel it first)")
        if outcome == RetryOutcome.NOTHING:
            what = "failed or cancelled" if include_cancelled else "failed"
            raise Conflict(f"queue has no {what} images to retry")
        meta = await self.owned_queue(user_id, queue_id)
        await self.wake(meta["model"], int(meta["pending"]))
        return await self.status(user_id, queue_id)

    async def delete(self, user_id: str, queue_id: str) -> None:
        if not valid_queue_id(queue_id):
            raise NotFound(QUEUE_NOT_FOUND)
        outcome = await self.store.delete(queue_id, user_key(user_id))
        if outcome == DeleteOutcome.NOT_FOUND:
            raise NotFound(QUEUE_NOT_FOUND)
        if outcome == DeleteOutcome.CONFLICT:
            raise Conflict("queue is still running; cancel it first, then delete it once nothing of it runs")
        await self.store.gc_now(queue_id)
        try:
            await self.images.store.delete_prefix(queue_prefix(queue_id))
        except StoreError as exc:  # the sweep removes them once the store is back
            log.warning("could not remove the objects of deleted queue %s yet: %s", queue_id, exc.message)
            return
        await self.store.gc_done([queue_id])

    async def image_for(
        self, queue_id: str, index: int, *, user_id: str | None = None, signature: ImageSignature | None = None
    ) -> ImageObject:
        """A succeeded image for its owner, or for the holder of a valid signed URL; NotFound otherwise.

        The caller is authorised before anything of the image is read: the owner check comes first,
        and a signature must be current before the image's record is read for the attempt it binds.
        Every failure answers the same, so a caller learns nothing of images not theirs."""
        rec = await self._authorised_record(queue_id, index, user_id, signature)
        if rec is None or rec.get("s") != ImageStatus.SUCCEEDED:
            raise NotFound(LINK_NOT_FOUND if signature is not None else IMAGE_NOT_FOUND)
        return ImageObject(queue_id, index, int(rec.get("a", 0)), rec)

    async def preview_for(
        self, queue_id: str, index: int, *, user_id: str | None = None, signature: ImageSignature | None = None
    ) -> bytes:
        """A running image's latest preview (WebP) for its owner, or for the holder of its attempt's
        signed URL; NotFound otherwise. Authorised as image_for is, before the preview is read."""
        rec = await self._authorised_record(queue_id, index, user_id, signature)
        data = await self.store.preview(queue_id, index) if rec and rec.get("s") == ImageStatus.RUNNING else None
        if data is None:
            raise NotFound(PREVIEW_NOT_FOUND)
        return data

    async def _authorised_record(
        self, queue_id: str, index: int, user_id: str | None, signature: ImageSignature | None
    ) -> dict[str, Any] | None:
        """An image's record, once the caller is known to hold a signed URL for its current attempt or to
        be its owner (NotFound otherwise, the same whatever exists); None when it has none. With both,
        a signature that does not hold falls back to the owner's check."""
        if signature is not None:
            try:
                return await self._signed_record(queue_id, index, signature)
            except NotFound:
                if user_id is None:
                    raise
        if user_id is None:
            raise ValueError("an image is read by its owner or with a signature")
        try:
            await self.owned_queue(user_id, queue_id)
        except NotFound:
            raise NotFound(IMAGE_NOT_FOUND) from None
        return (await self.store.records(queue_id, [index])).get(index)

    async def _signed_record(self, queue_id: str, index: int, signature: ImageSignature) -> dict[str, Any] | None:
        """The record of an image whose signed URL holds (NotFound LINK_NOT_FOUND otherwise)."""
        if not valid_queue_id(queue_id) or not image_signature_current(signature.expires, signature.signature):
            raise NotFound(LINK_NOT_FOUND)
        # A URL that names its attempt is checked whole before anything is read.
        if signature.attempt is not None and not check_image_signature(
            self.settings, queue_id, index, signature.attempt, signature.expires, signature.signature
        ):
            raise NotFound(LINK_NOT_FOUND)
        rec = (await self.store.records(queue_id, [index])).get(index)
        attempt = int(rec.get("a", 0)) if rec is not None else None
        if attempt is None or (signature.attempt is not None and attempt != signature.attempt) or (
            signature.attempt is None and not check_image_signature(
                self.settings, queue_id, index, attempt, signature.expires, signature.signature)
        ):
            raise NotFound(LINK_NOT_FOUND)
        return rec

    @property
    def _user_ttl(self) -> int:
        return self.settings.queue_ttl_seconds + self.settings.queue_safety_ttl_seconds
