"""The store's atomic scripts against real Redis: fairness, leases, exactly-once accounting."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from app.harness import RedisServer
from app.services.queue.states import Discarded, Outcome, Priority
from app.services.queue.store import (
    LUA_DIR,
    PREFIX,
    THROUGHPUT_BUCKET_MS,
    THROUGHPUT_BUCKET_TTL_SECONDS,
    THROUGHPUT_WINDOW_BUCKETS,
    USER_EVENTS_KEEP_SECONDS,
    USER_EVENTS_MAXLEN,
    QueueStore,
    lua_preamble,
)

TTL = 600


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[QueueStore]:
    client = Redis.from_url(redis_server.fresh_url(), max_connections=1000)
    yield QueueStore(client)
    await client.aclose()


async def make(store: QueueStore, qid: str, uk: str, total: int, priority: str = "normal", model: str = "m") -> None:
    result = await store.create(
        queue_id=qid, uk=uk, fields={"model": model, "priority": priority, "total": total, "user": uk},
        spec=json.dumps({"prompts": ["p"], "count": total, "seed": 0}), safety_ttl=TTL, idempotency_key=None,
        fingerprint="", idempotency_ttl=TTL, max_pending=0, max_active=0,
    )
    assert result.outcome == "created"


def counts(meta: dict[str, str] | None) -> dict[str, int]:
    assert meta is not None
    return {k: int(meta[k]) for k in ("total", "pending", "running", "succeeded", "failed", "cancelled")}


async def test_claims_alternate_between_users_not_fifo(store: QueueStore) -> None:
    await make(store, "big", "alice", 100)
    await make(store, "small", "bob", 2)
    result = await store.claim("w", ["m"], 6, {}, 10_000)
    owners = [c.queue_id for c in result.claims]
    assert owners[:4].count("small") == 2, owners  # bob's two images go out in the first rounds


async def test_higher_priority_always_first(store: QueueStore) -> None:
    await make(store, "low", "a", 3, "low")
    await make(store, "normal", "b", 3, "normal")
    await make(store, "high", "c", 3, "high")
    result = await store.claim("w", ["m"], 9, {}, 10_000)
    assert [c.queue_id for c in result.claims] == ["high"] * 3 + ["normal"] * 3 + ["low"] * 3


async def test_concurrency_cap_holds_across_claims(store: QueueStore) -> None:
    await make(store, "q", "a", 10)
    first = await store.claim("w1", ["m"], 10, {"m": 3}, 10_000)
    second = await store.claim("w2", ["m"], 10, {"m": 3}, 10_000)
    assert len(first.claims) == 3 and second.claims == [] and second.capped
    await store.complete(first.claims[0], Outcome.SUCCEEDED, ttl=TTL, user_ttl=TTL, record=stored("x"))
    third = await store.claim("w2", ["m"], 10, {"m": 3}, 10_000)
    assert len(third.claims) == 1


def stored(tag: str) -> dict[str, object]:
    """An image record's object fields, as a worker sends them once the bytes are in the store."""
    return {"k": "q/0-1.png", "n": 1, "ct": "image/png", "v": tag}


async def test_lapsed_lease_requeues_and_late_report_is_discarded(store: QueueStore) -> None:
    await make(store, "q", "a", 1)
    (first,) = (await store.claim("w1", ["m"], 1, {}, 1)).claims
    await asyncio.sleep(0.01)
    assert await store.reap(3, TTL, TTL) == ["m"]
    assert counts(await store.meta("q"))["pending"] == 1
    (second,) = (await store.claim("w2", ["m"], 1, {}, 10_000)).claims
    assert second.index == first.index and second.attempt == first.attempt + 1
    # The first worker was not dead after all: its late result must not count.
    assert await store.complete(first, Outcome.SUCCEEDED, ttl=TTL, user_ttl=TTL, record=stored("a")) == "stale"
    assert await store.complete(second, Outcome.SUCCEEDED, ttl=TTL, user_ttl=TTL, record=stored("b")) == \
        "completed"
    assert await store.complete(second, Outcome.SUCCEEDED, ttl=TTL, user_ttl=TTL, record=stored("c")) == \
        "stale"
    c = counts(await store.meta("q"))
    assert c == {"total": 1, "pending": 0, "running": 0, "succeeded": 1, "failed": 0, "cancelled": 0}
    assert (await store.records("q", [0]))[0]["v"] == "b"  # the current attempt's record, not the late one


async def test_image_lost_too_often_fails_with_reason(store: QueueStore) -> None:
    await make(store, "q", "a", 1)
    for _ in range(2):
        await store.claim("w", ["m"], 1, {}, 1)
        await asyncio.sleep(0.01)
        await store.reap(2, TTL, TTL)
    meta = await store.meta("q")
    assert meta is not None and meta["status"] == "failed"
    records = await store.records("q")
    assert "lost" in records[0]["e"]


async def test_racing_completions_and_cancel_keep_counts_exact(store: QueueStore) -> None:
    await make(store, "q", "a", 200)
    claims = (await store.claim("w", ["m"], 100, {}, 10_000)).claims

    async def finish(i: int) -> None:
        outcome = Outcome.SUCCEEDED if i % 2 else Outcome.FAILED
        await store.complete(claims[i], outcome, ttl=TTL, user_ttl=TTL, record=stored("x"))

    results = await asyncio.gather(*(finish(i) for i in range(100)), store.cancel("q", "a", TTL, TTL))
    assert results[-1] == "cancelled"
    c = counts(await store.meta("q"))
    assert sum(c[k] for k in ("pending", "running", "succeeded", "failed", "cancelled")) == 200
    assert c["pending"] == 0 and c["running"] == 0


async def test_finished_queue_keys_expire_with_the_ttl(store: QueueStore) -> None:
    await make(store, "q", "a", 1)
    (claim,) = (await store.claim("w", ["m"], 1, {}, 10_000, safety_ttl=TTL)).claims
    assert 0 < await store.redis.ttl("iq:q:{q}") <= TTL
    await store.complete(claim, Outcome.SUCCEEDED, ttl=60, user_ttl=120, record=stored("x"))
    for suffix in ("", ":spec", ":img", ":ev"):
        assert 0 < await store.redis.ttl("iq:q:{q}" + suffix) <= 60, suffix
    # Its objects in the image store are due for the sweep when its keys expire.
    due_ms = await store.redis.zscore("iq:gc", "q")
    assert abs(due_ms - (time.time() + 60) * 1000) < 5000


async def test_scripts_see_the_python_definitions(store: QueueStore) -> None:
    probe = "return {P, USER_EVENTS_MAXLEN, THROUGHPUT_BUCKET_MS, PRIORITIES, Outcome.REQUEUE, Discarded.STALE}"
    seen = await store.redis.eval(lua_preamble() + probe, 0)
    priorities = [p.value.encode() for p in Priority]  # in serving order
    assert seen == [PREFIX.encode(), USER_EVENTS_MAXLEN, THROUGHPUT_BUCKET_MS, priorities,
                    Outcome.REQUEUE.encode(), Discarded.STALE.encode()]


def test_lua_spells_no_shared_constant_by_hand() -> None:
    for path in LUA_DIR.glob("*.lua"):
        text = path.read_text()
        assert PREFIX not in text and str(USER_EVENTS_MAXLEN) not in text, path.name
        assert str(THROUGHPUT_BUCKET_MS) not in text and str(THROUGHPUT_BUCKET_TTL_SECONDS) not in text, path.name
    # A throughput bucket lives at least as long as the window that reads it.
    assert THROUGHPUT_BUCKET_TTL_SECONDS * 1000 > (THROUGHPUT_WINDOW_BUCKETS + 1) * THROUGHPUT_BUCKET_MS


async def _global_counters(store: QueueStore, uk: str, models: tuple[str, ...]) -> dict[str, object]:
    """Every figure a queue raises while it is unfinished, as the schedule and admission limits read them."""
    return {
        "inflight": {m: v for m, v in (await store.inflight()).items() if v},
        "pending": {m: p for m in models for p, v in (await store.pending_by_priority(m)).items() if v},
        "user_pending": await store.user_pending(uk),
        "active": await store.redis.zcard(f"{PREFIX}u:{uk}:active"),
        "leases": await store.redis.zcard(f"{PREFIX}leases"),
        "rings": [k async for k in store.redis.scan_iter(f"{PREFIX}s:*")],
    }


async def _make_short_lived(store: QueueStore, qid: str, uk: str, total: int, model: str, safety: int) -> None:
    result = await store.create(
        queue_id=qid, uk=uk, fields={"model": model, "priority": "normal", "total": total, "user": uk},
        spec=json.dumps({"prompts": ["p"], "count": total, "seed": 0}), safety_ttl=safety, idempotency_key=None,
        fingerprint="", idempotency_ttl=TTL, max_pending=0, max_active=0,
    )
    assert result.outcome == "created"


async def test_a_queue_that_expires_unfinished_settles_every_global_counter(store: QueueStore) -> None:
    """Its safety TTL ran out (nothing renewed it): the counters it held are settled by whoever meets it gone."""
    zero = {"inflight": {}, "pending": {}, "user_pending": 0, "active": 0, "leases": 0, "rings": []}
    await _make_short_lived(store, "busy", "u6", 5, "m", 1)  # claimed from, then left to expire
    await _make_short_lived(store, "idle", "u6", 3, "idle-model", 1)  # no worker serves its model
    claims = (await store.claim("w", ["m"], 2, {}, 60_000, safety_ttl=1)).claims
    assert len(claims) == 2
    await asyncio.sleep(2.5)
    assert await store.meta("busy") is None and await store.meta("idle") is None
    # A running image's report finds the queue gone; the schedule meets it; the reaper sweeps the rest.
    assert await store.complete(claims[0], Outcome.SUCCEEDED, ttl=TTL, user_ttl=TTL) == Discarded.GONE
    assert (await store.claim("w", ["m"], 5, {}, 60_000)).claims == []
    await store.reap(3, TTL, TTL)
    assert await store.complete(claims[1], Outcome.FAILED, ttl=TTL, user_ttl=TTL) == Discarded.GONE
    assert await _global_counters(store, "u6", ("m", "idle-model")) == zero
    # A lease of the gone queue that lapses instead (its worker died) changes nothing more.
    await store.redis.zadd(f"{PREFIX}leases", {claims[1].lease_member: 0})
    await store.reap(3, TTL, TTL)
    assert await _global_counters(store, "u6", ("m", "idle-model")) == zero


async def test_a_living_queue_keeps_renewing_its_lifetime(store: QueueStore) -> None:
    await _make_short_lived(store, "long", "u7", 4, "m", 2)
    claims = (await store.claim("w", ["m"], 1, {}, 60_000, safety_ttl=2)).claims
    for _ in range(8):  # 4 s: twice the safety TTL
        await store.renew([c.lease_member for c in claims], 60_000, safety_ttl=2)
        await asyncio.sleep(0.5)
    assert await store.meta("long") is not None
    for suffix in ("", ":spec", ":img", ":ev"):
        assert await store.redis.ttl(f"{PREFIX}q:{{long}}{suffix}") > 0, suffix
    for suffix in (":active", ":ev", ":stats"):
        assert await store.redis.ttl(f"{PREFIX}u:u7{suffix}") > 0, suffix


async def test_retry_gives_the_user_keys_it_recreates_a_lifetime(store: QueueStore) -> None:
    await make(store, "r", "u8", 1)
    (claim,) = (await store.claim("w", ["m"], 1, {}, 60_000)).claims
    assert await store.complete(claim, Outcome.FAILED, ttl=TTL, user_ttl=TTL, error="x") == "failed"
    for suffix in (":active", ":hist", ":ev", ":stats"):  # the user's index is gone, the queue still here
        await store.redis.delete(f"{PREFIX}u:u8{suffix}")
    assert (await store.retry("r", "u8", False, TTL, max_pending=0, max_active=0)).images == 1
    keys = [k async for k in store.redis.scan_iter(f"{PREFIX}u:u8*")]
    assert keys
    for key in keys:
        assert await store.redis.ttl(key) > 0, key


async def test_a_users_event_stream_keeps_the_last_hour_and_lives_an_hour(store: QueueStore) -> None:
    """GET /events is live: the user's stream holds the last USER_EVENTS_KEEP_SECONDS of events and goes
    that long after the last, whatever the user's other keys' lifetimes (each queue keeps its own events)."""
    key = store.user_events_key("u10")
    await store.redis.xadd(key, {"d": "{}"}, id="1-0")  # an event from long ago
    await make(store, "keep", "u10", 1)
    (claim,) = (await store.claim("w", ["m"], 1, {}, 60_000)).claims
    await store.complete(claim, Outcome.SUCCEEDED, ttl=TTL, user_ttl=10 * USER_EVENTS_KEEP_SECONDS,
                         record=stored("x"))
    ids = [i.decode() for i, _ in await store.redis.xrange(key)]
    assert ids and "1-0" not in ids
    assert 0 < await store.redis.ttl(key) <= USER_EVENTS_KEEP_SECONDS
    assert await store.redis.ttl(f"{PREFIX}u:u10:hist") > USER_EVENTS_KEEP_SECONDS  # the history stays longer


async def test_a_status_is_read_in_one_snapshot(store: QueueStore) -> None:
    """Meta, records and spec come from one script, so a DELETE cannot land between them (reading them
    one after the other once turned such a race into an IndexError); a deleted queue reads as None."""
    await make(store, "gone", "u9", 3)
    for claim in (await store.claim("w", ["m"], 3, {}, 60_000)).claims:
        await store.complete(claim, Outcome.SUCCEEDED, ttl=TTL, user_ttl=TTL, record=stored("x"))
    read = await store.status_read("gone", 0, 2**31)
    assert read is not None and read.complete and read.spec and sorted(read.records) == [0, 1, 2]
    assert read.meta["succeeded"] == "3"
    known = await store.status_read("gone", 0, 2**31, [read.version])
    assert known is not None and not known.complete and known.records == {}  # nothing read beyond the meta
    assert await store.delete("gone", "u9") == "deleted"
    assert await store.status_read("gone", 0, 2**31) is None
    assert (await store.page_details(["gone"], None)) == [(None, {})]  # a history page drops it


async def test_every_change_a_status_shows_bumps_the_queue_version(store: QueueStore) -> None:
    """The status ETag is made from the queue's version: claims, progress, completions, cancels and
    webhook deliveries move it (the user's version too, for history); plain reads do not."""
    from app.services.queue.store import ProgressNote

    async def versions() -> tuple[str, str]:
        read = await store.status_read("ver", 0, 10)
        assert read is not None
        return read.version, (await store.history_version("u11", TTL))[0]

    await make(store, "ver", "u11", 3)
    seen = [await versions()]
    assert await versions() == seen[-1]  # reading changes nothing
    (claim,) = (await store.claim("w", ["m"], 1, {}, 60_000)).claims
    seen.append(await versions())
    assert await store.write_progress([ProgressNote(claim, 1, 4)]) == 1
    seen.append(await versions())
    await store.complete(claim, Outcome.SUCCEEDED, ttl=TTL, user_ttl=TTL, record=stored("x"))
    seen.append(await versions())
    assert await store.cancel("ver", "u11", TTL, TTL) == "cancelled"
    seen.append(await versions())
    queue_versions = [int(v) for v, _ in seen]
    assert queue_versions == sorted(set(queue_versions)), seen  # each step moved it on
    user_versions = [int(u) for _, u in seen]
    assert user_versions[-1] > user_versions[0] and user_versions == sorted(user_versions)


async def test_a_late_lease_renewal_does_not_stretch_a_finished_queue(store: QueueStore) -> None:
    """A heartbeat that read its leases just before the report finished the queue renews them after."""
    await make(store, "fin", "u10", 1)
    (claim,) = (await store.claim("w", ["m"], 1, {}, 60_000, safety_ttl=TTL)).claims
    await store.complete(claim, Outcome.SUCCEEDED, ttl=30, user_ttl=60, record=stored("x"))
    await store.renew([claim.lease_member], 60_000, safety_ttl=10 * TTL)
    assert 0 < await store.redis.ttl(f"{PREFIX}q:{{fin}}") <= 30


async def test_a_workers_own_429_holds_its_other_slots_before_the_shared_back_off_is_written(
        store: QueueStore) -> None:
    """The slots of the worker that got the 429 wait from that moment, not from when Redis has the
    back-off (a slot asking in between would have found none); other workers read it from Redis."""
    from app.services.queue.worker.gate import StoreGate

    gate = StoreGate(store, "m")
    deferring = asyncio.create_task(gate.defer(0.4))
    await asyncio.sleep(0)  # the back-off is on its way to Redis, not there yet
    t0 = time.monotonic()
    await gate.wait()
    assert time.monotonic() - t0 >= 0.35
    await deferring
    # Another worker (its own gate) learns of a back-off from Redis.
    await gate.defer(0.3)
    t0 = time.monotonic()
    await StoreGate(store, "m").wait()
    assert 0.2 <= time.monotonic() - t0 < 2
