"""Create, inspect, cancel, retry and list queues: the service behind the HTTP routes."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import re
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from app.core.config import Settings
from app.core.errors import Conflict, NotFound, TooManyRequests, Unprocessable
from app.core.security import check_image_signature, image_signature_current
from app.models.queue import MAX_SEED, CreateQueueRequest, GenerateRequest, ImageResult, QueueStatus
from app.services.models import Catalog
from app.services.providers.base import is_reserved
from app.services.queue.states import (
    TERMINAL,
    CancelOutcome,
    CreateOutcome,
    DeleteOutcome,
    ImageStatus,
    Priority,
    QueueState,
    RetryOutcome,
    WebhookEvent,
)
from app.services.queue.store import QueueStore, Schedule, user_key
from app.services.queue.tickets import Tickets

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_QUEUE_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_TAG_LENGTH = 64
MAX_VARIABLE_NAME_LENGTH = 64
SERVED_CACHE_SECONDS = 2.0
EVENTS_BLOCK_MS = 1000  # how long one read of a live event stream waits for news
EVENTS_BATCH = 500
WAIT_EVENTS_BATCH = 100
QUEUE_NOT_FOUND = "queue not found"
IMAGE_NOT_FOUND = "image not found"
LINK_NOT_FOUND = "image not found (or the link expired)"

ImageUrl = Callable[[str, int, int], str]


def _iso(ms: str | int | None) -> str | None:
    if ms in (None, ""):
        return None
    return datetime.fromtimestamp(int(ms) / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _position(priority: Priority, schedule: Schedule) -> int:
    """Images of other queues ahead of this queue's next pending image, in the fair schedule."""
    ahead = sum(n for p, n in schedule.pending.items() if p.rank < priority.rank)
    # Round robin: each user ahead in the ring gets one image first; each of this user's queues
    # ahead of this one costs a full round of every user.
    ahead += schedule.user_rank or 0
    ahead += (schedule.queue_rank or 0) * max(1, schedule.users)
    return ahead


def _eta(meta: Mapping[str, str], counts: dict[str, int], position: int | None, schedule: Schedule) -> float | None:
    """Seconds until the queue finishes. Once some of its images have finished, from the queue's own
    pace (which already reflects its share of the workers); before that, from the model's recent
    throughput and the images ahead of it."""
    remaining = counts["pending"] + counts["running"] * 0.5
    done = counts["succeeded"] + counts["failed"] + counts["cancelled"]
    started = meta.get("started_at")
    if started and done and meta.get("attempt", "1") == "1":
        elapsed = max(0.001, (schedule.server_ms - int(started)) / 1000)  # both by Redis's clock
        return round(remaining * elapsed / done, 1)
    if schedule.rate > 0:
        return round(((position or 0) + remaining) / schedule.rate, 1)
    return None


def _page(total: int, offset: int, limit: int | None) -> tuple[int, int]:
    start = max(0, min(offset, total))
    return start, total if limit is None else min(total, start + max(0, limit))


def valid_queue_id(queue_id: str) -> bool:
    return bool(_QUEUE_ID.match(queue_id))


def _owned(meta: Mapping[str, str] | None, user_id: str) -> Mapping[str, str]:
    """The one ownership check: someone else's queue is answered exactly like a missing one."""
    if meta is None or meta.get("uk") != user_key(user_id):
        raise NotFound(QUEUE_NOT_FOUND)
    return meta


@dataclass(frozen=True, slots=True)
class QueueEvent:
    """One entry of a queue's or a user's event stream."""

    id: str
    data: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.data.get("type", "message"))


@dataclass(frozen=True, slots=True)
class ImageSignature:
    """The `exp` and `sig` of a signed image URL."""

    expires: int
    signature: str


@dataclass(frozen=True, slots=True)
class StoredImage:
    """A succeeded image the caller may read: what it is, and how to fetch its bytes."""

    queue_id: str
    index: int
    attempt: int
    content_type: str
    fetch: Callable[[], Awaitable[bytes | None]]

    async def read(self) -> bytes:
        data = await self.fetch()
        if data is None:  # deleted or expired since it was looked up
            raise NotFound(IMAGE_NOT_FOUND)
        return data


class QueueService:
    """Turns requests into queues in the store and queues into QueueStatus answers."""

    def __init__(
        self, store: QueueStore, tickets: Tickets, settings: Settings, catalog: Catalog, image_url: ImageUrl
    ) -> None:
        self.store = store
        self.tickets = tickets
        self.settings = settings
        self.catalog = catalog
        self.image_url = image_url
        self._served: tuple[float, set[str]] = (0.0, set())

    # -- create -----------------------------------------------------------------------------
    def expand(self, req: CreateQueueRequest) -> list[str]:
        """The request's prompts, with a template's variables expanded as a cartesian product."""
        s = self.settings
        if req.prompts is not None:
            if not req.prompts:
                raise Unprocessable("'prompts' must hold at least one prompt", ("body", "prompts"))
            if len(req.prompts) > s.max_prompts:
                raise Unprocessable(f"at most {s.max_prompts} prompts per queue", ("body", "prompts"))
            for i, p in enumerate(req.prompts):
                self._check_prompt(p, ("body", "prompts", i))
            return list(req.prompts)
        template = req.prompt or ""
        self._check_prompt(template, ("body", "prompt"))
        names = list(dict.fromkeys(_PLACEHOLDER.findall(template)))
        variables = req.variables or {}
        if len(variables) > s.max_variables:
            raise Unprocessable(f"at most {s.max_variables} variables", ("body", "variables"))
        missing = [n for n in names if n not in variables]
        if missing:
            raise Unprocessable(
                f"the template uses {', '.join('{' + n + '}' for n in missing)} but 'variables' gives no values",
                ("body", "variables"),
            )
        unused = [n for n in variables if n not in names]
        if unused:
            raise Unprocessable(f"variables not used in the template: {', '.join(unused)}", ("body", "variables"))
        combos = 1
        for n in names:
            values = variables[n]
            if not values:
                raise Unprocessable(f"variable {n!r} has no values", ("body", "variables", n))
            combos *= len(values)
            if combos > s.max_variable_combinations:
                raise Unprocessable(
                    f"variables expand to more than {s.max_variable_combinations} prompts", ("body", "variables")
                )
        prompts: list[str] = []
        for combo in itertools.product(*(variables[n] for n in names)):
            mapping = dict(zip(names, combo, strict=True))
            prompt = _PLACEHOLDER.sub(lambda m, mapping=mapping: mapping[m[1]], template)  # type: ignore[misc]
            self._check_prompt(prompt, ("body", "prompt"))
            prompts.append(prompt)
        return prompts

    def _check_prompt(self, prompt: str, loc: tuple[str | int, ...]) -> None:
        if not prompt.strip():
            raise Unprocessable("prompt must not be empty", loc)
        if len(prompt) > self.settings.max_prompt_length:
            raise Unprocessable(f"prompt longer than {self.settings.max_prompt_length} characters", loc)

    def _check_common(
        self, width: int, height: int, params: dict[str, Any], negative: str | None, model_name: str | None
    ) -> str:
        s = self.settings
        model = self.catalog.resolve(model_name)
        if model is None:
            known = ", ".join(sorted(self.catalog.models))
            raise Unprocessable(f"unknown model {model_name!r}; known models: {known}", ("body", "model"))
        kinds = {model.provider, *(e.kind for e in model.endpoints)}
        reserved = sorted(k for k in params if any(is_reserved(k, kind) for kind in kinds))
        if reserved:
            raise Unprocessable(
                f"params may not set {', '.join(reserved)}: use the request's own fields (prompt, seed, width, "
                "height, negative_prompt, model); the rest is fixed by the server",
                ("body", "params"),
            )
        max_w = model.max_width or s.max_width
        max_h = model.max_height or s.max_height
        if width > max_w:
            raise Unprocessable(f"width must be at most {max_w}", ("body", "width"))
        if height > max_h:
            raise Unprocessable(f"height must be at most {max_h}", ("body", "height"))
        if len(json.dumps(params)) > s.max_params_bytes:
            raise Unprocessable(f"params larger than {s.max_params_bytes} bytes of JSON", ("body", "params"))
        if negative is not None and len(negative) > s.max_prompt_length:
            raise Unprocessable(
                f"negative_prompt longer than {s.max_prompt_length} characters", ("body", "negative_prompt")
            )
        return model.name

    async def create(
        self, user_id: str, req: CreateQueueRequest, idempotency_key: str | None = None
    ) -> tuple[QueueStatus, bool]:
        """Creates a queue; returns its status and whether it is a replay of an earlier request."""
        s = self.settings
        model = self._check_common(req.width, req.height, req.params, req.negative_prompt, req.model)
        if req.count > s.max_count:
            raise Unprocessable(f"count must be at most {s.max_count}", ("body", "count"))
        if len(req.tags) > s.max_tags:
            raise Unprocessable(f"at most {s.max_tags} tags", ("body", "tags"))
        for i, tag in enumerate(req.tags):
            if not tag.strip() or len(tag) > MAX_TAG_LENGTH:
                raise Unprocessable(f"tags must be 1-{MAX_TAG_LENGTH} characters", ("body", "tags", i))
        prompts = self.expand(req)
        total = len(prompts) * req.count
        if total > s.max_images_per_queue:
            raise Unprocessable(
                f"{len(prompts)} prompts x count {req.count} = {total} images; at most "
                f"{s.max_images_per_queue} images per queue",
                ("body", "count"),
            )
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        if seed + total - 1 > MAX_SEED:
            raise Unprocessable(f"seed + images must stay below {MAX_SEED}", ("body", "seed"))
        webhook = self._check_webhook(req)
        spec = {
            "prompts": prompts,
            "count": req.count,
            "seed": seed,
            "width": req.width,
            "height": req.height,
            "negative_prompt": req.negative_prompt,
            "params": req.params,
        }
        fields: dict[str, str | int] = {
            "user": user_id,
            "model": model,
            "priority": req.priority.value,
            "total": total,
            "count": req.count,
            "seed": seed,
            "attempt": 1,
        }
        if req.name:
            fields["name"] = req.name
        if req.tags:
            fields["tags"] = json.dumps(req.tags)
        if webhook:
            fields["webhook"] = json.dumps(webhook)
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
        if result.outcome == CreateOutcome.LIMIT_ACTIVE:
            raise TooManyRequests(
                f"you already have {result.detail} active queues, the most allowed; wait for one to finish", 30
            )
        if result.outcome == CreateOutcome.LIMIT_PENDING:
            raise TooManyRequests(
                f"this queue would exceed your limit of {s.max_pending_images_per_user} pending images "
                f"(room for {max(0, int(result.detail))} more); wait for some to finish",
                30,
            )
        if result.outcome == CreateOutcome.REPLAY:
            return await self.status(user_id, result.queue_id, images_limit=None), True
        await self.wake(model, total)
        return await self.status(user_id, queue_id, images_limit=None), False

    def _check_webhook(self, req: CreateQueueRequest) -> dict[str, Any] | None:
        if req.webhook_url is None:
            return None
        if not self.settings.webhook_secret:
            raise Unprocessable(
                "webhooks are not enabled on this server (the operator sets WEBHOOK_SECRET)", ("body", "webhook_url")
            )
        url = req.webhook_url
        if not re.match(r"^https?://[^\s/]+", url) or len(url) > 2048:
            raise Unprocessable("webhook_url must be an http(s) URL", ("body", "webhook_url"))
        events = req.webhook_events or [e.value for e in WebhookEvent]
        known = {e.value for e in WebhookEvent}
        bad = [e for e in events if e not in known]
        if bad:
            raise Unprocessable(f"unknown webhook events {bad}; known: {sorted(known)}", ("body", "webhook_events"))
        return {"url": url, "events": events}

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
        event id `after`: one queue's from its start, ending with its final event, or all the user's
        queues' from now on. Ownership and the starting point are settled before this returns, so
        their errors come before any event."""
        if queue_id is not None:
            await self.owned_queue(user_id, queue_id)
            key = self.store.queue_events_key(queue_id)
            start = after or "0-0"
        else:
            key = self.store.user_events_key(user_key(user_id))
            start = after if after is not None else await self.store.newest_event_id(key)
        return self._follow(key, start, until_final=queue_id is not None)

    async def _follow(self, key: str, after: str, *, until_final: bool) -> AsyncGenerator[list[QueueEvent], None]:
        while True:
            batch = []
            events = await self.store.read_events(key, after, block_ms=EVENTS_BLOCK_MS, count=EVENTS_BATCH)
            for event_id, data in events:
                after = event_id
                batch.append(QueueEvent(event_id, self._with_url(data)))
                if until_final and data.get("final"):
                    yield batch
                    return
            yield batch

    def _with_url(self, data: dict[str, Any]) -> dict[str, Any]:
        """A succeeded image's event carries its signed URL, like the image in a status."""
        if data.get("type") == "image" and data.get("status") == ImageStatus.SUCCEEDED:
            attempt = int(data.get("attempt", 0))
            if attempt:
                data["url"] = self.image_url(data["queue_id"], int(data["index"]), attempt)
        return data

    async def status(
        self, user_id: str, queue_id: str, *, images_offset: int = 0, images_limit: int | None = None
    ) -> QueueStatus:
        if not valid_queue_id(queue_id):
            raise NotFound(QUEUE_NOT_FOUND)
        found_summary = await self.store.summary(queue_id)
        summary_meta = _owned(found_summary[0] if found_summary else None, user_id)
        schedule = found_summary[1] if found_summary else None
        if images_limit == 0:
            return await self._with_warnings(await self._summary(queue_id, summary_meta, schedule))
        total = int(await self.store.queue_field(queue_id, "total") or 0)
        start, stop = _page(total, images_offset, images_limit)
        indexes = list(range(start, stop))
        found, records = await self.store.snapshot(queue_id, None if len(indexes) > 256 else indexes)
        meta = _owned(found, user_id)
        status = await self._summary(queue_id, meta, schedule)
        await self._attach_images(status, meta, records, images_offset, images_limit)
        return await self._with_warnings(status)

    async def _with_warnings(self, status: QueueStatus) -> QueueStatus:
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

    async def _summary(self, queue_id: str, meta: Mapping[str, str], schedule: Schedule | None = None) -> QueueStatus:
        counts = {k: int(meta.get(k, 0)) for k in ("total", "pending", "running", "succeeded", "failed", "cancelled")}
        total = counts["total"]
        terminal = counts["succeeded"] + counts["failed"] + counts["cancelled"]
        position: int | None = None
        eta: float | None = None
        if schedule is not None and not meta.get("finished_at"):
            position = _position(Priority(meta["priority"]), schedule) if counts["pending"] else None
            eta = _eta(meta, counts, position, schedule)
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
            position=position,
            eta_seconds=eta,
            created_at=_iso(meta["created_at"]) or "",
            started_at=_iso(meta.get("started_at")),
            finished_at=_iso(meta.get("finished_at")),
            attempt=int(meta.get("attempt", 1)),
            webhook=webhook,
        )

    async def _attach_images(
        self,
        status: QueueStatus,
        meta: Mapping[str, str],
        records: dict[int, dict[str, Any]],
        offset: int,
        limit: int | None,
    ) -> None:
        start, stop = _page(status.total, offset, limit)
        spec_raw = await self.store.spec(status.queue_id)
        spec: dict[str, Any] = json.loads(spec_raw) if spec_raw else {"prompts": [""], "count": 1, "seed": 0}
        indexes = range(start, stop)
        cut = meta.get("cut") == "1"
        cursor = int(meta.get("cursor", 0))
        prompts: Sequence[str] = spec["prompts"]
        count = int(spec["count"])
        images = []
        for i in indexes:
            rec = records.get(i)
            if rec is not None:
                state = ImageStatus(rec["s"])
            else:
                state = ImageStatus.CANCELLED if (cut and i >= cursor) else ImageStatus.PENDING
            attempts = int(rec.get("a", 0)) if rec else 0
            images.append(
                ImageResult(
                    index=i,
                    prompt=prompts[i // count],
                    seed=int(spec["seed"]) + i,
                    status=state,
                    url=self.image_url(status.queue_id, i, attempts) if state == ImageStatus.SUCCEEDED else None,
                    error=rec.get("e") if rec else None,
                    started_at=_iso(rec.get("t0")) if rec else None,
                    finished_at=_iso(rec.get("t1")) if rec else None,
                    attempts=attempts,
                )
            )
        status.images = images
        status.images_offset = start
        status.images_limit = None if limit is None else limit

    async def active(self, user_id: str) -> list[QueueStatus]:
        uk = user_key(user_id)
        ids = await self.store.user_queue_ids(uk, "active")
        out, gone = [], []
        for qid in ids:
            found = await self.store.summary(qid)
            if found is None:
                gone.append(qid)
            elif not found[0].get("finished_at"):
                out.append(await self._summary(qid, *found))
        await self.store.forget(uk, "active", gone)
        return out

    async def history(
        self,
        user_id: str,
        *,
        limit: int,
        offset: int,
        status: QueueState | None = None,
        tag: str | None = None,
        search: str | None = None,
        images_limit: int | None = None,
    ) -> tuple[list[QueueStatus], int]:
        uk = user_key(user_id)
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
            kept = []
            for qid, m in rows:
                if needle in m.get("name", "").casefold():
                    kept.append((qid, m))
                    continue
                spec = await self.store.spec(qid)
                if spec and any(needle in p.casefold() for p in json.loads(spec)["prompts"]):
                    kept.append((qid, m))
            rows = kept
        page = rows[offset : offset + limit]
        out = []
        for qid, meta in page:
            st = await self._summary(qid, meta)
            if images_limit != 0:
                wanted = None if images_limit is None else range(min(images_limit, st.total))
                await self._attach_images(st, meta, await self.store.records(qid, wanted), 0, images_limit)
            out.append(st)
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
        outcome, _ = await self.store.retry(
            queue_id, user_key(user_id), include_cancelled, self.settings.queue_safety_ttl_seconds
        )
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

    async def image_for(
        self, queue_id: str, index: int, *, user_id: str | None = None, signature: ImageSignature | None = None
    ) -> StoredImage:
        """A succeeded image for its owner, or for the holder of a valid signed URL; NotFound otherwise.

        The caller is authorised before anything of the image is read: the owner check comes first,
        and a signature must be current before the image's record is read for the attempt it binds.
        Every failure answers the same, so a caller learns nothing of images not theirs."""
        if signature is not None:
            return await self._signed_image(queue_id, index, signature)
        if user_id is None:
            raise ValueError("image_for needs a user or a signature")
        try:
            await self.owned_queue(user_id, queue_id)
        except NotFound:
            raise NotFound(IMAGE_NOT_FOUND) from None
        found = await self._succeeded(queue_id, index)
        if found is None:
            raise NotFound(IMAGE_NOT_FOUND)
        return found

    async def _signed_image(self, queue_id: str, index: int, signature: ImageSignature) -> StoredImage:
        if not valid_queue_id(queue_id) or not image_signature_current(signature.expires, signature.signature):
            raise NotFound(LINK_NOT_FOUND)
        found = await self._succeeded(queue_id, index)
        if found is None or not check_image_signature(
            self.settings, queue_id, index, found.attempt, signature.expires, signature.signature
        ):
            raise NotFound(LINK_NOT_FOUND)
        return found

    async def _succeeded(self, queue_id: str, index: int) -> StoredImage | None:
        rec = (await self.store.records(queue_id, [index])).get(index)
        if rec is None or rec.get("s") != ImageStatus.SUCCEEDED:
            return None

        async def fetch() -> bytes | None:
            return await self.store.blob(queue_id, index)

        return StoredImage(queue_id, index, int(rec.get("a", 0)), rec.get("ct") or "image/png", fetch)

    @property
    def _user_ttl(self) -> int:
        return self.settings.queue_ttl_seconds + self.settings.queue_safety_ttl_seconds
