"""The only module that knows imagequeue's Redis keys, TTLs and Lua scripts.

Pending images are never stored one by one: a queue keeps a cursor over its images, and an image
gets a record only once a worker claims it. A queue therefore costs a few hundred bytes whatever its
size until its images run. Every state change that touches counts goes through one Lua script, so
the five counts always add up to `total`. The scripts are in lua/, one file per group; their
shared constants are generated from the definitions below (see _lua_constants).

Key layout (every key imagequeue writes; {qid} in braces is the queue's id, {uk} a user_key()):
  iq:q:{qid}                 hash    queue meta, the five counts, and VERSION_FIELD (bumped by every change)
  iq:q:{qid}:spec            string  immutable JSON spec (prompts, params, ...)
  iq:q:{qid}:img             hash    index -> JSON record of an image that has left "never claimed"
                                     (a running image's step progress too, see lua/progress.lua)
  iq:q:{qid}:pv:{index}      string  a running image's latest preview (WebP), PROGRESS_TTL_SECONDS
  iq:q:{qid}:retry           list    indexes to claim before the cursor (re-queued images)
  iq:q:{qid}:blob            hash    index -> image bytes
  iq:q:{qid}:ev              stream  the queue's events
  iq:u:{uk}:active / :hist   zset    the user's queue ids, unfinished / finished
  iq:u:{uk}:ev               stream  the user's events, for GET /events: the last USER_EVENTS_KEEP_SECONDS of
                                     them (at most USER_EVENTS_MAXLEN), gone that long after the last
  iq:u:{uk}:prog             stream  the user's image.progress events: live only, capped at
                                     PROGRESS_STREAM_MAXLEN, gone PROGRESS_TTL_SECONDS after the last
  iq:u:{uk}:stats            hash    the user's claimable images ("pending")
  iq:u:{uk}:version          int     bumped by every change of the user's queues (history's ETag)
  iq:s:{model}:{prio}        zset    ring of users with claimable work (score = last served)
  iq:s:{model}:{prio}:{uk}   zset    ring of that user's queues
  iq:seq                     int     the rings' serving order
  iq:pend:{model}            hash    priority -> claimable images
  iq:inflight                hash    model -> images being generated
  iq:leases                  zset    "qid|index" -> lease expiry (ms)
  iq:backoff:{model}         string  present while a provider asked everyone to wait
  iq:tp:{model}:{bucket}     int     completions in a THROUGHPUT_BUCKET_MS bucket
  iq:stats                   hash    terminal status -> images ever finished so (for metrics)
  iq:wh:due                  zset    queue id -> when its webhook deliveries are next due (ms)
  iq:gc                      zset    queue id -> when its objects in the image store may be removed (ms)
  iq:store:readers           zset    image store id -> when an API instance last said it reads it (ms)
  iq:obj:{qid}               hash    object name -> bytes, for IMAGE_STORE=redis only
  iq:open                    hash    unfinished queue id -> its user, model and priority
  iq:open:n                  hash    "<qid>:p" / "<qid>:r" -> its pending / running images (what it
                                     holds of the global counters, given back if it expires unfinished)
  iq:health:{model}          hash    the provider's last success and last error, as workers saw them
  iq:workers                 zset    worker name -> heartbeat expiry (ms); iq:w:{name} its JSON info
  iq:idem:{uk}:{sha256}      string  an Idempotency-Key's queue id and request fingerprint
  iq:cancel                  pub/sub channel of cancelled queue ids
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from app.services.queue.states import (
    CancelOutcome,
    CreateOutcome,
    DeleteOutcome,
    Discarded,
    ImageStatus,
    Outcome,
    Priority,
    QueueState,
    RetryOutcome,
)

PREFIX = "iq:"
QUEUE_KEY_SUFFIXES = ("", ":spec", ":img", ":retry", ":blob", ":ev")  # a queue's keys share its lifetime
USER_KEY_SUFFIXES = (":active", ":hist", ":stats", ":version")  # (":ev" has a lifetime of its own)
LEASES_KEY = PREFIX + "leases"
INFLIGHT_KEY = PREFIX + "inflight"
WORKERS_KEY = PREFIX + "workers"
WORKER_KEY_PREFIX = PREFIX + "w:"
STATS_KEY = PREFIX + "stats"
SEQ_KEY = PREFIX + "seq"
WEBHOOKS_DUE_KEY = PREFIX + "wh:due"
OPEN_KEY = PREFIX + "open"
OPEN_COUNTS_KEY = PREFIX + "open:n"
OPEN_SWEEP = 16  # unfinished queues the reaper checks for expiry each round
DEFAULT_SAFETY_TTL_SECONDS = 7 * 86_400
CANCEL_CHANNEL = PREFIX + "cancel"
RECORDS_ALL_ABOVE = 256  # a status page of more images reads all of a queue's records at once
VERSION_FIELD = "v"  # of a queue's hash: bumped by every change of the queue (its status's ETag)
USER_EVENTS_MAXLEN = 10_000
USER_EVENTS_KEEP_SECONDS = 3600  # a live stream: a client away longer reloads its lists (each queue keeps its own)
PREVIEW_KEY_SUFFIX = ":pv:"  # + index, after a queue's key
PROGRESS_STREAM_SUFFIX = ":prog"  # after a user's key
PROGRESS_TTL_SECONDS = 60  # a preview, and a user's progress stream, outlive their last write this long
PROGRESS_STREAM_MAXLEN = 1000  # live only: a reader further behind than this has missed nothing that matters
THROUGHPUT_BUCKET_MS = 10_000
THROUGHPUT_WINDOW_BUCKETS = 6
THROUGHPUT_BUCKET_TTL_SECONDS = 120  # outlives the window of THROUGHPUT_WINDOW_BUCKETS buckets
REAP_BATCH = 200
PROVIDER_HEALTH_TTL_SECONDS = 3600
PROVIDER_ERROR_CHARS = 500
GC_KEY = PREFIX + "gc"  # zset queue id -> when its objects in the image store may be due for removal (ms)
STORE_READERS_KEY = PREFIX + "store:readers"  # zset image store id -> when an API last said it reads it (ms)
STORE_READERS_KEEP_MS = 86_400_000
# Text that is not valid Unicode (a lone surrogate from a provider's error JSON) is written with the
# offending characters replaced, never refused: every Redis client is made with this.
REDIS_ENCODING_ERRORS = "replace"


def user_key(user_id: str) -> str:
    """A user's id as it appears in keys: hashed, so no id can collide with or spell another key."""
    return hashlib.sha256(user_id.encode()).hexdigest()[:32]


def queue_key(queue_id: str) -> str:
    return f"{PREFIX}q:{{{queue_id}}}"


def worker_key(name: str) -> str:
    return WORKER_KEY_PREFIX + name


def _user(uk: str, suffix: str) -> str:
    return f"{PREFIX}u:{uk}:{suffix}"


LUA_DIR = Path(__file__).with_name("lua")
# Besides preamble.lua:
LUA_FILES = ("create", "claim", "settle", "lifecycle", "webhooks", "summary", "workers", "progress")


def _lua_constants() -> dict[str, Any]:
    """What the scripts share with Python: generated into their preamble under these names."""
    return {
        "P": PREFIX,
        "QUEUE_KEY_SUFFIXES": QUEUE_KEY_SUFFIXES,
        "USER_KEY_SUFFIXES": USER_KEY_SUFFIXES,
        "LEASES_KEY": LEASES_KEY,
        "INFLIGHT_KEY": INFLIGHT_KEY,
        "WORKERS_KEY": WORKERS_KEY,
        "PROVIDER_HEALTH_TTL_SECONDS": PROVIDER_HEALTH_TTL_SECONDS,
        "WORKER_KEY_PREFIX": WORKER_KEY_PREFIX,
        "STATS_KEY": STATS_KEY,
        "SEQ_KEY": SEQ_KEY,
        "WEBHOOKS_DUE_KEY": WEBHOOKS_DUE_KEY,
        "GC_KEY": GC_KEY,
        "OPEN_KEY": OPEN_KEY,
        "OPEN_COUNTS_KEY": OPEN_COUNTS_KEY,
        "OPEN_SWEEP": OPEN_SWEEP,
        "CANCEL_CHANNEL": CANCEL_CHANNEL,
        "VERSION_FIELD": VERSION_FIELD,
        "RECORDS_ALL_ABOVE": RECORDS_ALL_ABOVE,
        "USER_EVENTS_MAXLEN": USER_EVENTS_MAXLEN,
        "USER_EVENTS_KEEP_SECONDS": USER_EVENTS_KEEP_SECONDS,
        "PREVIEW_KEY_SUFFIX": PREVIEW_KEY_SUFFIX,
        "PROGRESS_STREAM_SUFFIX": PROGRESS_STREAM_SUFFIX,
        "PROGRESS_TTL_SECONDS": PROGRESS_TTL_SECONDS,
        "THROUGHPUT_BUCKET_MS": THROUGHPUT_BUCKET_MS,
        "THROUGHPUT_BUCKET_TTL_SECONDS": THROUGHPUT_BUCKET_TTL_SECONDS,
        "PRIORITIES": tuple(Priority),  # in serving order
        **{
            enum.__name__: enum
            for enum in (ImageStatus, QueueState, Outcome, CreateOutcome, CancelOutcome, RetryOutcome,
                         DeleteOutcome, Discarded)
        },
    }


def _lua_literal(value: Any) -> str:
    if isinstance(value, type) and issubclass(value, StrEnum):
        return "{" + ", ".join(f"{m.name} = {_lua_literal(m.value)}" for m in value) + "}"
    if isinstance(value, tuple):
        return "{" + ", ".join(_lua_literal(v) for v in value) + "}"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"
    raise TypeError(f"no Lua literal for {value!r}")


def lua_preamble() -> str:
    """The head of every script: the generated constants, then lua/preamble.lua."""
    lines = ["-- Generated by store.py from its Python definitions."]
    lines += [f"local {name} = {_lua_literal(value)}" for name, value in _lua_constants().items()]
    return "\n".join(lines) + "\n" + (LUA_DIR / "preamble.lua").read_text()


@functools.cache
def lua_scripts() -> dict[str, str]:
    """Each script's full source: the preamble, the head of its file (what precedes the first
    "-- @script NAME" marker), then its own section."""
    preamble, scripts = lua_preamble(), {}
    for group in LUA_FILES:
        head, *sections = re.split(r"^-- @script (\w+)$", (LUA_DIR / f"{group}.lua").read_text(), flags=re.MULTILINE)
        for name, body in zip(sections[::2], sections[1::2], strict=True):
            if name in scripts:
                raise ValueError(f"Lua script {name!r} defined twice")
            scripts[name] = f"{preamble}\n-- {group}.lua\n{head}\n-- @script {name}{body}"
    return scripts


@dataclass(frozen=True, slots=True)
class Claim:
    queue_id: str
    index: int
    attempt: int

    @property
    def lease_member(self) -> str:
        return f"{self.queue_id}|{self.index}"


@dataclass(frozen=True, slots=True)
class Report:
    """How one claimed image ended."""

    claim: Claim
    outcome: Outcome
    error: str = ""
    record: Mapping[str, Any] | None = None  # a succeeded image: where its bytes are (the image store)


@dataclass(frozen=True, slots=True)
class ProgressNote:
    """Where one running image is: `step` of `steps`, with a new preview (WebP) or None."""

    claim: Claim
    step: int
    steps: int
    preview: bytes | None = None


@dataclass(frozen=True, slots=True)
class ClaimResult:
    claims: list[Claim]
    wait_ms: int  # > 0 when a provider asked every worker to back off
    capped: bool  # a concurrency cap stopped the claim


@dataclass(frozen=True, slots=True)
class CreateResult:
    outcome: CreateOutcome
    queue_id: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class RetryResult:
    outcome: RetryOutcome
    images: int  # the images run again, or that a refused retry would have run again
    detail: str = ""  # refused: the limit (active queues) or the room left (pending images)


class QueueStore:
    """Async access to queues, the fair schedule, leases, events and images in Redis."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._scripts: dict[str, AsyncScript] = {
            name: redis.register_script(source) for name, source in lua_scripts().items()
        }

    async def _run(self, name: str, *args: Any) -> Any:
        return await self._scripts[name](keys=[], args=list(args))

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    # -- queues -----------------------------------------------------------------------------
    async def create(
        self,
        *,
        queue_id: str,
        uk: str,
        fields: Mapping[str, str | int],
        spec: str,
        safety_ttl: int,
        idempotency_key: str | None,
        fingerprint: str,
        idempotency_ttl: int,
        max_pending: int,
        max_active: int,
    ) -> CreateResult:
        idem = ""
        if idempotency_key is not None:
            idem = f"{PREFIX}idem:{uk}:{hashlib.sha256(idempotency_key.encode()).hexdigest()}"
        res = await self._run(
            "create",
            queue_id,
            uk,
            safety_ttl,
            json.dumps(dict(fields)),
            spec,
            idem,
            fingerprint,
            idempotency_ttl,
            max_pending,
            max_active,
        )
        outcome, value = CreateOutcome(_s(res[0])), _s(res[1])
        if outcome in (CreateOutcome.LIMIT_ACTIVE, CreateOutcome.LIMIT_PENDING):
            return CreateResult(outcome, "", value)
        return CreateResult(outcome, value)

    async def cancel(self, queue_id: str, uk: str, ttl: int, user_ttl: int) -> CancelOutcome:
        return CancelOutcome(_s(await self._run("cancel", queue_id, uk, ttl, user_ttl)))

    async def retry(
        self, queue_id: str, uk: str, include_cancelled: bool, safety_ttl: int, *, max_pending: int, max_active: int
    ) -> RetryResult:
        """Runs a finished queue's failed (and cancelled) images again, within the user's limits, as
        create does (0: no cap); a retry the limits refuse writes nothing."""
        res = await self._run(
            "retry", queue_id, uk, "1" if include_cancelled else "0", safety_ttl, max_pending, max_active
        )
        return RetryResult(RetryOutcome(_s(res[0])), int(res[1]), _s(res[2]) if len(res) > 2 else "")

    async def delete(self, queue_id: str, uk: str) -> DeleteOutcome:
        return DeleteOutcome(_s(await self._run("delete", queue_id, uk)))

    async def meta(self, queue_id: str) -> dict[str, str] | None:
        raw = await self.redis.hgetall(queue_key(queue_id))
        return {_s(k): _s(v) for k, v in raw.items()} if raw else None

    async def metas(self, queue_ids: Sequence[str]) -> list[dict[str, str] | None]:
        if not queue_ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for qid in queue_ids:
                pipe.hgetall(queue_key(qid))
            rows = await pipe.execute()
        return [{_s(k): _s(v) for k, v in row.items()} if row else None for row in rows]

    async def statuses(self, queue_ids: Iterable[str]) -> dict[str, str | None]:
        ids = list(queue_ids)
        async with self.redis.pipeline(transaction=False) as pipe:
            for qid in ids:
                pipe.hget(queue_key(qid), "status")
            rows = await pipe.execute()
        return {qid: (_s(v) if v is not None else None) for qid, v in zip(ids, rows, strict=True)}

    async def queue_fields(self, queue_id: str, names: Sequence[str]) -> dict[str, str | None]:
        values = await self.redis.hmget(queue_key(queue_id), list(names))
        return {n: (_s(v) if v is not None else None) for n, v in zip(names, values, strict=True)}

    async def spec(self, queue_id: str) -> str | None:
        raw = await self.redis.get(queue_key(queue_id) + ":spec")
        return _s(raw) if raw is not None else None

    async def specs(self, queue_ids: Sequence[str]) -> list[bytes | None]:
        """The specs (as stored) of several queues, in one round trip."""
        if not queue_ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for qid in queue_ids:
                pipe.get(queue_key(qid) + ":spec")
            return list(await pipe.execute())

    async def records(self, queue_id: str, indexes: Sequence[int] | None = None) -> dict[int, dict[str, Any]]:
        """Records of images that have left "never claimed"; all of them, or those among `indexes`."""
        key = queue_key(queue_id) + ":img"
        if indexes is None:
            raw = await self.redis.hgetall(key)
            return {int(k): json.loads(v) for k, v in raw.items()}
        if not indexes:
            return {}
        values = await self.redis.hmget(key, [str(i) for i in indexes])
        return {i: json.loads(v) for i, v in zip(indexes, values, strict=True) if v is not None}

    async def blob(self, queue_id: str, index: int) -> bytes | None:
        value = await self.redis.hget(queue_key(queue_id) + ":blob", str(index))
        return value.encode() if isinstance(value, str) else value

    async def user_queue_ids(self, uk: str, which: str, *, min_score: int | None = None) -> list[str]:
        """Queue ids of a user's `active` or `hist` index, newest first."""
        key = _user(uk, which)
        if min_score is not None:
            # History entries outlive nothing: drop those whose queue has expired.
            await self.redis.zremrangebyscore(key, "-inf", f"({min_score}")
        return [_s(v) for v in await self.redis.zrevrange(key, 0, -1)]

    async def forget(self, uk: str, which: str, queue_ids: Sequence[str]) -> None:
        if queue_ids:
            await self.redis.zrem(_user(uk, which), *queue_ids)

    # -- schedule ---------------------------------------------------------------------------
    async def claim(
        self,
        worker: str,
        models: Sequence[str],
        n: int,
        caps: Mapping[str, int],
        lease_ms: int,
        *,
        safety_ttl: int = DEFAULT_SAFETY_TTL_SECONDS,
    ) -> ClaimResult:
        """Claims up to n images; the queues they come from get their safety TTL renewed."""
        res = await self._run(
            "claim", worker, lease_ms, n, json.dumps(dict(caps)), json.dumps(list(models)), safety_ttl
        )
        claims = [Claim(_s(res[i]), int(res[i + 1]), int(res[i + 2])) for i in range(2, len(res), 3)]
        return ClaimResult(claims, int(res[0]), bool(int(res[1])))

    async def complete(
        self,
        claim: Claim,
        outcome: Outcome,
        *,
        ttl: int,
        user_ttl: int,
        error: str = "",
        record: Mapping[str, Any] | None = None,
    ) -> Settled:
        return _settled(
            await self._run(
                "complete",
                claim.queue_id,
                claim.index,
                claim.attempt,
                outcome.value,
                error,
                ttl,
                user_ttl,
                _record_arg(record),
            )
        )

    async def complete_many(self, reports: Sequence[Report], *, ttl: int, user_ttl: int) -> list[Settled]:
        """Several completions in one pipelined round trip (each still its own atomic script)."""
        script = self._scripts["complete"]
        async with self.redis.pipeline(transaction=False) as pipe:
            for r in reports:
                await script(
                    keys=[],
                    args=[r.claim.queue_id, r.claim.index, r.claim.attempt, r.outcome.value, r.error,
                          ttl, user_ttl, _record_arg(r.record)],
                    client=pipe,
                )
            results = await pipe.execute()
        return [_settled(v) for v in results]

    async def renew(
        self, members: Sequence[str], lease_ms: int, *, safety_ttl: int = DEFAULT_SAFETY_TTL_SECONDS
    ) -> None:
        """Extends the leases, and the lifetime of the queues they belong to."""
        if members:
            await self._run("renew", lease_ms, safety_ttl, *members)

    async def reap(self, max_lost: int, ttl: int, user_ttl: int) -> list[str]:
        """Re-queue images whose worker stopped renewing their lease; returns the models touched."""
        res = await self._run("reap", REAP_BATCH, max_lost, ttl, user_ttl)
        return sorted({_s(m) for m in res})

    async def claimable(self, model: str) -> int:
        values = await self.redis.hvals(f"{PREFIX}pend:{model}")
        return sum(max(0, int(v)) for v in values)

    async def pending_by_priority(self, model: str) -> dict[Priority, int]:
        raw = await self.redis.hgetall(f"{PREFIX}pend:{model}")
        return {p: max(0, int(raw.get(p.encode(), 0))) for p in Priority}

    async def user_pending(self, uk: str) -> int:
        return max(0, int(await self.redis.hget(_user(uk, "stats"), "pending") or 0))

    async def ranks(self, model: str, priority: str, uk: str, queue_id: str) -> tuple[int | None, int, int | None]:
        """Where a user and one of their queues stand in the round-robin rings: (user rank, users, queue rank)."""
        ring = f"{PREFIX}s:{model}:{priority}"
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrank(ring, uk)
            pipe.zcard(ring)
            pipe.zrank(f"{ring}:{uk}", queue_id)
            user_rank, users, queue_rank = await pipe.execute()
        return user_rank, int(users), queue_rank

    async def status_read(
        self, queue_id: str, first: int, last: int, known_versions: Sequence[str] = (), *, with_spec: bool = True
    ) -> StatusRead | None:
        """A queue's meta and schedule and, unless its version is among `known_versions`, the records
        of images first..last (none when last < first) and, `with_spec`, its spec: one round trip,
        one snapshot."""
        res = await self._run(
            "status", queue_id, THROUGHPUT_WINDOW_BUCKETS, first, last, ",".join(known_versions), int(with_spec)
        )
        if not res:
            return None
        meta = _pairs(res[0])
        schedule = _schedule(res[1], int(res[2]))
        if len(res) < 5:
            return StatusRead(meta, schedule, False)
        recs = res[4]
        records = {int(recs[i]): recs[i + 1] for i in range(0, len(recs), 2)}
        return StatusRead(meta, schedule, True, res[3] or None, records)

    async def summaries(self, uk: str) -> tuple[list[tuple[str, dict[str, str], Schedule | None]], list[str]]:
        """The user's unfinished queues (id, meta, schedule), newest first, and the ids of those gone."""
        res = await self._run("summaries", uk, THROUGHPUT_WINDOW_BUCKETS)
        server_ms = int(res[0])
        found, gone = [], []
        for i in range(1, len(res), 3):
            qid = _s(res[i])
            if res[i + 1]:
                found.append((qid, _pairs(res[i + 1]), _schedule(res[i + 2], server_ms)))
            else:
                gone.append(qid)
        return found, gone

    async def history_version(self, uk: str, ttl_seconds: int) -> tuple[int, int]:
        """The version of a user's queues and the number of their finished queues within the TTL."""
        version, count = await self._run("history_version", uk, ttl_seconds * 1000)
        return int(version), int(count)

    async def page_details(
        self, queue_ids: Sequence[str], limit: int | None
    ) -> list[tuple[bytes | None, dict[int, bytes]]]:
        """Spec and records (as stored) of the first `limit` images (None: all) of each queue, in one
        round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for qid in queue_ids:
                key = queue_key(qid)
                pipe.get(key + ":spec")
                if limit is None:
                    pipe.hgetall(key + ":img")
                else:
                    pipe.hmget(key + ":img", [str(i) for i in range(max(1, limit))])
            rows = await pipe.execute()
        out: list[tuple[bytes | None, dict[int, bytes]]] = []
        for i in range(0, len(rows), 2):
            spec, recs = rows[i], rows[i + 1]
            if limit is None:
                records = {int(k): v for k, v in recs.items()}
            else:
                records = {n: v for n, v in enumerate(recs[:limit]) if v is not None}
            out.append((spec, records))
        return out

    async def throughput(self, model: str) -> float:
        """Images finished per second over the last minute, for ETAs."""
        *values, server_ms = await self._run("throughput", model, THROUGHPUT_WINDOW_BUCKETS)
        return _rate([int(v) for v in values], int(server_ms))

    async def finished_totals(self) -> dict[str, int]:
        raw = await self.redis.hgetall(STATS_KEY)
        totals = {s.value: 0 for s in (ImageStatus.SUCCEEDED, ImageStatus.FAILED, ImageStatus.CANCELLED)}
        totals.update({_s(k): int(v) for k, v in raw.items()})
        return totals

    async def inflight(self) -> dict[str, int]:
        raw = await self.redis.hgetall(INFLIGHT_KEY)
        return {_s(k): int(v) for k, v in raw.items()}

    # -- step progress ------------------------------------------------------------------------
    async def write_progress(self, notes: Sequence[ProgressNote]) -> int:
        """Records running images' progress (one round trip); returns how many were still running."""
        args: list[Any] = [PROGRESS_TTL_SECONDS, PROGRESS_STREAM_MAXLEN]
        for n in notes:
            args += [n.claim.queue_id, n.claim.index, n.claim.attempt, n.step, n.steps, n.preview or b""]
        return int(await self._run("progress", *args))

    async def preview(self, queue_id: str, index: int) -> bytes | None:
        """A running image's latest preview (WebP), if it has one."""
        value = await self.redis.get(queue_key(queue_id) + PREVIEW_KEY_SUFFIX + str(index))
        return value.encode() if isinstance(value, str) else value

    def progress_events_key(self, uk: str) -> str:
        return _user(uk, PROGRESS_STREAM_SUFFIX.lstrip(":"))

    # -- provider health ----------------------------------------------------------------------
    async def record_provider(self, model: str, ok: bool, error: str = "") -> None:
        await self._run("provider_note", model, "1" if ok else "0", error[:PROVIDER_ERROR_CHARS])

    async def provider_health(self, model: str) -> dict[str, str]:
        raw = await self.redis.hgetall(f"{PREFIX}health:{model}")
        return {_s(k): _s(v) for k, v in raw.items()}

    # -- provider back-off ------------------------------------------------------------------
    async def set_backoff(self, model: str, seconds: float) -> None:
        ms = max(1, int(seconds * 1000))
        key = f"{PREFIX}backoff:{model}"
        # Extend only: a shorter Retry-After never cuts a longer wait another worker was told.
        current = await self.redis.pttl(key)
        if current < ms:
            await self.redis.set(key, "1", px=ms)

    async def backoff_ms(self, model: str) -> int:
        return max(0, int(await self.redis.pttl(f"{PREFIX}backoff:{model}")))

    # -- image store: sweeping and who reads it ---------------------------------------------
    async def gc_due(self, limit: int, lease_ms: int) -> list[str]:
        """Queues whose objects are due for removal: gone from Redis (expired or deleted), their time
        on the sweep list passed. Each is leased for `lease_ms` (a sweep that dies leaves it to the
        next); queues still alive (a retry extended them) are put back at their own expiry."""
        now = await self.server_time_ms()
        due = [_s(q) for q in await self.redis.zrangebyscore(GC_KEY, "-inf", now, start=0, num=limit)]
        if not due:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for qid in due:
                pipe.pttl(queue_key(qid))
            ttls = await pipe.execute()
        gone = [q for q, t in zip(due, ttls, strict=True) if int(t) == -2]
        later = {q: now + (int(t) if int(t) > 0 else lease_ms) for q, t in zip(due, ttls, strict=True) if int(t) != -2}
        later.update({q: now + lease_ms for q in gone})
        await self.redis.zadd(GC_KEY, later, xx=True)
        return gone

    async def gc_done(self, queue_ids: Sequence[str]) -> None:
        if queue_ids:
            await self.redis.zrem(GC_KEY, *queue_ids)

    async def gc_recheck(self, queue_id: str) -> None:
        """An object of the queue was written outside the worker's save (a thumbnail made on request):
        if the queue is gone, or goes while it was written, the sweep removes it; a live queue keeps
        its own time on the sweep list (gc_due puts it back at its expiry)."""
        await self.redis.zadd(GC_KEY, {queue_id: 0}, nx=True)

    async def gc_now(self, queue_id: str) -> None:
        """A deleted queue's objects are due at once (the API removes them; the sweep if that failed)."""
        await self.redis.zadd(GC_KEY, {queue_id: 0})

    async def note_store_reader(self, store_id: str) -> None:
        now = await self.server_time_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(STORE_READERS_KEY, {store_id: now})
            pipe.zremrangebyscore(STORE_READERS_KEY, "-inf", now - STORE_READERS_KEEP_MS)
            await pipe.execute()

    async def store_readers(self, fresh_ms: int) -> set[str]:
        """Ids of the image stores API instances announced within `fresh_ms`."""
        since = await self.server_time_ms() - fresh_ms
        return {_s(v) for v in await self.redis.zrangebyscore(STORE_READERS_KEY, since, "+inf")}

    # -- workers ----------------------------------------------------------------------------
    async def register_worker(self, name: str, info: Mapping[str, Any], ttl_ms: int) -> int:
        """Marks a worker alive for `ttl_ms` of the server's clock; returns the server's time (ms)."""
        return int(await self._run("register_worker", name, json.dumps(dict(info)), ttl_ms))

    async def unregister_worker(self, name: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(WORKERS_KEY, name)
            pipe.delete(worker_key(name))
            await pipe.execute()

    async def workers(self) -> list[dict[str, Any]]:
        _, *infos = await self._run("live_workers")
        return [json.loads(v) for v in infos]

    async def server_time_ms(self) -> int:
        """Redis's clock, which every decision about time is made by (leases, schedules, timestamps)."""
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    # -- webhooks ---------------------------------------------------------------------------
    async def lease_webhooks(self, limit: int, lease_ms: int) -> list[tuple[str, int]]:
        """Queues whose deliveries are due, each with the fencing token of this lease."""
        res = await self._run("webhook_lease", limit, lease_ms)
        return [(_s(res[i]), int(res[i + 1])) for i in range(0, len(res), 2)]

    async def webhook_job(self, queue_id: str) -> dict[str, str | None]:
        return await self.queue_fields(queue_id, ("webhook", "wh_cursor", "webhook_state", "user"))

    async def events_after(self, queue_id: str, cursor: str, count: int) -> list[tuple[str, dict[str, Any]]]:
        rows: Any = await self.redis.xrange(queue_key(queue_id) + ":ev", f"({cursor}", "+", count=count)
        return [(_s(i), json.loads(f[b"d"])) for i, f in rows]

    async def webhook_progress(
        self,
        queue_id: str,
        token: int,
        cursor: str,
        state: Mapping[str, Any],
        next_due_in_ms: int | None,
        *,
        hold_ms: int | None = None,
    ) -> bool:
        """Records how far deliveries got (the cursor only moves forward) and when they are next due;
        with `hold_ms` the round goes on and the lease is extended that long. False when the lease was
        lost to another worker: the caller must stop sending."""
        due: str | int = "" if next_due_in_ms is None else next_due_in_ms
        if hold_ms is not None:
            due = "hold"
        res = await self._run(
            "webhook_progress", queue_id, token, cursor, json.dumps(dict(state)), due, hold_ms or 0
        )
        return int(res) >= 0

    # -- events -----------------------------------------------------------------------------
    def queue_events_key(self, queue_id: str) -> str:
        return queue_key(queue_id) + ":ev"

    def user_events_key(self, uk: str) -> str:
        return _user(uk, "ev")

    async def read_events(
        self, key: str, after: str, *, block_ms: int, count: int
    ) -> list[tuple[str, dict[str, Any]]]:
        """Up to `count` events of a stream after the id `after`, waiting up to `block_ms` for the first."""
        batch: Any = await self.redis.xread({key: after}, block=block_ms, count=count)
        return [(_s(i), json.loads(f[b"d"])) for _, entries in batch for i, f in entries]

    async def read_streams(
        self, after: Mapping[str, str], *, block_ms: int, count: int
    ) -> dict[str, list[tuple[str, dict[str, Any]]]]:
        """Up to `count` entries of each stream after its id in `after`, in one read (waiting up to
        `block_ms` for the first of any)."""
        streams: Any = dict(after)
        batch: Any = await self.redis.xread(streams, block=block_ms, count=count)
        return {_s(key): [(_s(i), json.loads(f[b"d"])) for i, f in entries] for key, entries in batch}

    async def newest_event(self, key: str) -> tuple[str, dict[str, Any]] | None:
        """An event stream's newest entry, id and data (None when empty)."""
        newest: Any = await self.redis.xrevrange(key, count=1)
        return (_s(newest[0][0]), json.loads(newest[0][1][b"d"])) if newest else None

    async def newest_event_id(self, key: str) -> str:
        """The id of a stream's newest entry ("0-0" when empty): where "from now on" starts."""
        newest: Any = await self.redis.xrevrange(key, count=1)
        return _s(newest[0][0]) if newest else "0-0"


@dataclass(frozen=True, slots=True)
class Schedule:
    """Where an unfinished queue stands: claimable images per priority, its rank among users and
    among its user's queues, and its model's recent throughput (images/s)."""

    pending: dict[Priority, int]
    user_rank: int | None
    users: int
    queue_rank: int | None
    rate: float
    server_ms: int  # Redis's clock when this was read


@dataclass(frozen=True, slots=True)
class StatusRead:
    """What one read of a status found: meta and schedule, and when `complete` (the version was not
    known, or the page holds no image) the page's records and the spec (if asked for), both as stored
    (JSON)."""

    meta: dict[str, str]
    schedule: Schedule | None
    complete: bool
    spec: bytes | None = None
    records: dict[int, bytes] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.meta.get(VERSION_FIELD, "0")


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    return {_s(flat[i]): _s(flat[i + 1]) for i in range(0, len(flat), 2)}


def _schedule(extra: Sequence[Any], server_ms: int) -> Schedule | None:
    if not extra:
        return None
    pending = {p: max(0, int(extra[i])) for i, p in enumerate(Priority)}
    user_rank, users, queue_rank = (int(v) for v in extra[3:6])
    return Schedule(
        pending=pending,
        user_rank=None if user_rank < 0 else user_rank,
        users=users,
        queue_rank=None if queue_rank < 0 else queue_rank,
        rate=_rate([int(v) for v in extra[6:]], server_ms),
        server_ms=server_ms,
    )


def _rate(buckets: list[int], server_ms: int) -> float:
    """Images/s over the whole buckets plus the current one's elapsed part (by the server's clock)."""
    elapsed_in_current = (server_ms % THROUGHPUT_BUCKET_MS) / 1000
    window = THROUGHPUT_WINDOW_BUCKETS * THROUGHPUT_BUCKET_MS / 1000 + elapsed_in_current
    return sum(buckets) / window


Settled = QueueState | Discarded
"""What a completion answers: the queue's state after it, or why it was not applied."""


def _settled(value: Any) -> Settled:
    text = _s(value)
    return Discarded(text) if text in _DISCARDED else QueueState(text)


_DISCARDED = frozenset(Discarded)


def _record_arg(record: Mapping[str, Any] | None) -> str:
    return json.dumps(dict(record), separators=(",", ":")) if record else ""


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
