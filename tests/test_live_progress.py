"""Step progress from a worker to Redis: throttled, coalesced, cleared when the image settles, and never at
an image's expense when Redis is slow."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from app.core.config import Settings
from app.core.metrics import WorkerMetrics
from app.harness import RedisServer, free_port, start_worker
from app.services.providers.base import ImageRequest
from app.services.providers.procedural import ProceduralProvider
from app.services.providers.progress import Progress
from app.services.queue.queue_service import QueueService
from app.services.queue.states import Outcome
from app.services.queue.store import PROGRESS_TTL_SECONDS, Claim, ProgressNote, QueueStore, user_key
from app.services.queue.worker.progress import ProgressWriter
from tests.redis_proxy import StallingProxy
from tests.utils import LOG_DIR, MakeStack, auth, new_user, wait_status

TTL = 600


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[QueueStore]:
    client = Redis.from_url(redis_server.fresh_url())
    yield QueueStore(client)
    await client.aclose()


async def running_image(store: QueueStore, qid: str = "q1", user: str = "alice", total: int = 1) -> Claim:
    result = await store.create(
        queue_id=qid, uk=user_key(user), fields={"model": "m", "priority": "normal", "total": total, "user": user},
        spec=json.dumps({"prompts": ["p"], "count": total, "seed": 0}), safety_ttl=TTL, idempotency_key=None,
        fingerprint="", idempotency_ttl=TTL, max_pending=0, max_active=0,
    )
    assert result.outcome == "created"
    (claim,) = (await store.claim("w", ["m"], 1, {}, 10_000)).claims
    return claim


async def running_pair(store: QueueStore) -> tuple[Claim, Claim]:
    first = await running_image(store, "pair", total=2)
    (second,) = (await store.claim("w", ["m"], 1, {}, 10_000)).claims
    return first, second


async def progress_events(store: QueueStore, user: str = "alice") -> list[dict[str, object]]:
    rows = await store.redis.xrange(store.progress_events_key(user_key(user)))
    return [json.loads(fields[b"d"]) for _, fields in rows]


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buf, "PNG")
    return buf.getvalue()


def counted(metrics: WorkerMetrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("imagequeue_worker_progress_values_total", {"outcome": outcome}) or 0.0


# -- the store ----------------------------------------------------------------------------------------
async def test_progress_lives_in_the_running_record_until_the_image_settles(store: QueueStore) -> None:
    claim = await running_image(store)
    assert await store.write_progress([ProgressNote(claim, 3, 10, b"webp-bytes")]) == 1
    rec = (await store.records(claim.queue_id, [0]))[0]
    assert (rec["ps"], rec["pn"], rec["pv"]) == (3, 10, 1) and rec["pt"] >= rec["t0"]
    assert await store.preview(claim.queue_id, 0) == b"webp-bytes"
    pv_key = f"iq:q:{{{claim.queue_id}}}:pv:0"
    assert 0 < await store.redis.ttl(pv_key) <= PROGRESS_TTL_SECONDS
    (event,) = await progress_events(store)
    assert event | {"ts": 0} == {"type": "image.progress", "queue_id": claim.queue_id, "index": 0, "attempt": 1,
                                 "step": 3, "steps": 10, "pv": 1, "ts": 0}
    assert 0 < await store.redis.ttl(store.progress_events_key(user_key("alice"))) <= PROGRESS_TTL_SECONDS
    # A write without a preview keeps the last one (and its lifetime).
    assert await store.write_progress([ProgressNote(claim, 4, 10)]) == 1
    assert (await store.records(claim.queue_id, [0]))[0]["pv"] == 1

    await store.complete(claim, Outcome.SUCCEEDED, ttl=60, user_ttl=120, record={"k": "q1/0.png"})
    rec = (await store.records(claim.queue_id, [0]))[0]
    assert not {"ps", "pn", "pt", "pv"} & rec.keys(), rec
    assert await store.preview(claim.queue_id, 0) is None
    # A late write (the worker's last value racing its report) is refused: nothing comes back.
    assert await store.write_progress([ProgressNote(claim, 10, 10, b"late")]) == 0
    assert await store.preview(claim.queue_id, 0) is None
    assert len(await progress_events(store)) == 2


async def test_progress_of_an_earlier_attempt_or_a_gone_queue_is_refused(store: QueueStore) -> None:
    claim = await running_image(store)
    stale = Claim(claim.queue_id, claim.index, claim.attempt + 1)
    gone = Claim("nosuchqueue", 0, 1)
    assert await store.write_progress([ProgressNote(stale, 1, 2), ProgressNote(gone, 1, 2)]) == 0
    assert not await store.redis.exists("iq:q:{nosuchqueue}:img", "iq:q:{nosuchqueue}")


# -- the writer ---------------------------------------------------------------------------------------
async def test_writer_throttles_each_image_and_writes_the_latest_value(store: QueueStore) -> None:
    claims = [await running_image(store, f"q{i}") for i in range(2)]
    metrics = WorkerMetrics()
    writer = ProgressWriter(store, metrics, interval=0.3)
    task = asyncio.create_task(writer.run())
    callbacks = [writer.watch(c) for c in claims]
    big_preview = png(512, 384)
    started = time.monotonic()
    reported = 0
    while time.monotonic() - started < 2.0:  # 2 s of a value every 5 ms per image, a preview in every 7th
        reported += 1
        for callback in callbacks:
            callback(Progress(reported, 10_000, big_preview if reported % 7 == 0 else None, "image/png"))
        await asyncio.sleep(0.005)
    for c in claims:
        writer.forget(c)
    await asyncio.sleep(1.0)  # a write under way lands; nothing is left to start another
    task.cancel()
    events = await progress_events(store)
    for claim in claims:
        mine = [e for e in events if e["queue_id"] == claim.queue_id]
        # At most one write per 0.3 s (less 10% slack to share round trips), the first after 0.3 s.
        assert 2 <= len(mine) <= 7, mine
        steps = [int(str(e["step"])) for e in mine]
        assert steps == sorted(steps) and steps[-1] <= reported, steps
        gaps = [int(str(b["ts"])) - int(str(a["ts"])) for a, b in itertools.pairwise(mine)]
        assert all(gap >= 250 for gap in gaps), gaps  # by Redis's clock
        preview = await store.preview(claim.queue_id, claim.index)
        assert preview is not None
        with Image.open(io.BytesIO(preview)) as im:  # re-encoded small: 512x384 PNG -> 256x192 WebP
            assert im.format == "WEBP" and im.size == (256, 192)
    assert reported > 4 * len(events)  # coalesced: most values were never written
    assert counted(metrics, "written") == len(events)
    assert counted(metrics, "coalesced") == 2 * reported - len(events)
    assert writer.round_trips < len(events)  # the two images share round trips


async def test_image_shorter_than_the_interval_writes_nothing(store: QueueStore) -> None:
    claim = await running_image(store)
    metrics = WorkerMetrics()
    writer = ProgressWriter(store, metrics, interval=0.5)
    task = asyncio.create_task(writer.run())
    provider = ProceduralProvider(latency_ms=100)
    await provider.generate(ImageRequest("a fox", 1, 64, 64, params={"steps": 4}, on_progress=writer.watch(claim)))
    writer.forget(claim)
    await asyncio.sleep(0.6)
    task.cancel()
    assert await progress_events(store) == [] and writer.round_trips == 0
    assert counted(metrics, "coalesced") == 4


async def test_a_redis_that_never_answers_drops_progress_and_never_slows_the_image(
    store: QueueStore, redis_server: RedisServer
) -> None:
    claim = await running_image(store)
    with StallingProxy(redis_server.port, stall_all=True) as proxy:
        stalled = Redis(port=proxy.port, socket_timeout=1.0, socket_connect_timeout=1.0)
        metrics = WorkerMetrics()
        writer = ProgressWriter(QueueStore(stalled), metrics, interval=0.05)
        task = asyncio.create_task(writer.run())
        provider = ProceduralProvider(latency_ms=800)
        request = ImageRequest("a fox", 1, 256, 256, params={"steps": 16}, on_progress=writer.watch(claim))
        started = time.monotonic()
        image = await provider.generate(request)
        elapsed = time.monotonic() - started
        writer.forget(claim)
        for _ in range(100):  # the write under way times out after a second
            if counted(metrics, "dropped"):
                break
            await asyncio.sleep(0.05)
        task.cancel()
        await stalled.aclose()
    assert image.data.startswith(b"\x89PNG")
    # The writes wait a second each for an answer that never comes; the image took its own 0.8 s.
    assert elapsed < 1.4, elapsed
    assert counted(metrics, "dropped") >= 1 and counted(metrics, "written") == 0
    assert proxy.stalled >= 1


# -- a worker process ---------------------------------------------------------------------------------
def test_worker_whose_redis_stalls_progress_still_delivers_every_image_on_time(
    redis_server: RedisServer, make_stack: MakeStack
) -> None:
    """The worker reaches Redis through a proxy that never answers its progress connection: every image
    succeeds, none takes longer for it, and the worker counts the progress it dropped."""
    stack = make_stack(workers=0)
    db = stack.redis_url.rsplit("/", 1)[1]
    metrics_port = free_port()
    latency_ms = 1500
    with StallingProxy(redis_server.port, marker=b"imagequeue-progress") as proxy:
        worker_env = {**stack.env, "REDIS_URL": f"redis://127.0.0.1:{proxy.port}/{db}"}
        stack.workers.append(start_worker(worker_env, "--concurrency=8", f"--metrics-port={metrics_port}",
                                          log_dir=LOG_DIR))
        stack.wait_for_workers(1)
        headers = auth(new_user())
        with stack.client() as client:
            qid = client.post("/create-queue", headers=headers, json={
                "prompts": ["a fox"], "count": 8, "width": 128, "height": 128,
                "params": {"latency_ms": latency_ms, "steps": 12}}).json()["queue_id"]
            done = wait_status(client, headers, qid, {"completed"})
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        stack.stop()
    assert done["succeeded"] == 8
    for image in done["images"]:
        took = (datetime.fromisoformat(image["finished_at"]) - datetime.fromisoformat(image["started_at"]))
        # Each would take 2 s longer or more if the worker waited on its (1 s) progress writes.
        assert took.total_seconds() < latency_ms / 1000 + 1.5, image
        assert "progress" not in image or image["progress"] is None
    found = {s.labels["outcome"]: s.value for f in text_string_to_metric_families(metrics)
             for s in f.samples if s.name == "imagequeue_worker_progress_values_total"}
    assert found.get("dropped", 0) >= 1 and found.get("written", 0) == 0, found
    assert proxy.stalled >= 1


# -- progress on the event streams, against the image events ----------------------------------------
def events_service(store: QueueStore) -> QueueService:
    settings = Settings(_env_file=None, jwt_secret="x" * 40)
    return QueueService(store, None, settings, None,  # type: ignore[arg-type]  (only events are read)
                        lambda q, i, a, e: f"/images/{q}/{i}?exp={e}&sig=s", None)  # type: ignore[arg-type]


async def followed(svc: QueueService, key: str, after: str, live: str, live_after: str,
                   batches: int) -> list[tuple[str, object, object]]:
    stream = svc._follow(key, after, live, live_after, None)
    out = []
    try:
        for _ in range(batches):
            out += await stream.__anext__()
    finally:
        await stream.aclose()
    return [(e.type, e.data.get("index"), e.data.get("status")) for e in out]


async def test_progress_in_the_same_millisecond_as_the_images_end_comes_before_it(store: QueueStore) -> None:
    """A last progress write and the report right after it can fall in one millisecond, where each
    stream numbers its own entries (a progress id may even be the larger): the progress, written
    first, is sent first."""
    svc = events_service(store)
    uk = user_key("alice")
    events, live = store.user_events_key(uk), store.progress_events_key(uk)
    for index, (progress_id, event_id) in enumerate((("5000-0", "5000-0"), ("6000-7", "6000-0"))):
        await store.redis.xadd(live, {"d": json.dumps({"type": "image.progress", "queue_id": "q", "index": index,
                                                        "attempt": 1, "step": 4, "steps": 4, "pv": 0})}, id=progress_id)
        await store.redis.xadd(events, {"d": json.dumps({"type": "image", "queue_id": "q", "index": index,
                                                          "status": "succeeded", "attempt": 0})}, id=event_id)
    assert await followed(svc, events, "0-0", live, "0-0", 1) == [
        ("image.progress", 0, None), ("image", 0, "succeeded"), ("image.progress", 1, None), ("image", 1, "succeeded")]


async def test_a_backlog_of_progress_never_comes_after_the_images_end(store: QueueStore) -> None:
    """A reader more than a read's worth of progress behind gets it all before the events that follow."""
    svc = events_service(store)
    claim, _ = await running_pair(store)
    uk = user_key("alice")
    events, live = store.user_events_key(uk), store.progress_events_key(uk)
    start, live_start = await store.newest_event_id(events), await store.newest_event_id(live)
    for base in range(0, 700, 100):
        await store.write_progress([ProgressNote(claim, base + k + 1, 1000) for k in range(100)])
    await store.complete(claim, Outcome.SUCCEEDED, ttl=TTL, user_ttl=TTL)
    got = await followed(svc, events, start, live, live_start, 2)
    done = got.index(("image", 0, "succeeded"))
    assert ("image.progress", 0, None) in got[:done] and ("image.progress", 0, None) not in got[done:], got


async def test_the_step_share_of_running_images_returns_to_zero_on_every_way_out(store: QueueStore) -> None:
    qid = "share"
    result = await store.create(
        queue_id=qid, uk=user_key("bob"), fields={"model": "m", "priority": "normal", "total": 3, "user": "bob"},
        spec=json.dumps({"prompts": ["p"], "count": 3, "seed": 0}), safety_ttl=TTL, idempotency_key=None,
        fingerprint="", idempotency_ttl=TTL, max_pending=0, max_active=0,
    )
    assert result.outcome == "created"
    claims = (await store.claim("w", ["m"], 3, {}, 10_000)).claims
    await store.write_progress([ProgressNote(c, 1, 3) for c in claims])
    await store.write_progress([ProgressNote(claims[0], 2, 3), ProgressNote(claims[1], 0, 0),
                                ProgressNote(claims[2], 3, 3)])
    meta = await store.meta(qid)
    assert meta is not None and abs(float(meta["pf"]) - (2 / 3 + 1)) < 1e-9
    await store.complete(claims[0], Outcome.REQUEUE, ttl=TTL, user_ttl=TTL)  # handed back
    await store.cancel(qid, user_key("bob"), TTL, TTL)
    await store.complete(claims[1], Outcome.SUCCEEDED, ttl=TTL, user_ttl=TTL)
    await store.complete(claims[2], Outcome.FAILED, ttl=TTL, user_ttl=TTL, error="x")
    meta = await store.meta(qid)
    assert meta is not None and abs(float(meta.get("pf", 0))) < 1e-9


async def test_the_step_rate_for_the_eta_leaves_out_time_before_the_steps(store: QueueStore) -> None:
    """An image that waited 1 s before its first step (a model loading), then went 0.1 s a step: about
    1.9 s in all, not the 4 s that time-since-claim over steps-done would say."""
    claim = await running_image(store, "rate")
    await asyncio.sleep(1.0)
    await store.write_progress([ProgressNote(claim, 1, 10)])
    meta = await store.meta("rate")
    assert meta is not None and "pe" not in meta  # one point gives no rate yet
    await asyncio.sleep(0.2)
    await store.write_progress([ProgressNote(claim, 3, 10)])
    meta = await store.meta("rate")
    assert meta is not None and 1600 <= float(meta["pe"]) <= 2600, meta


async def test_a_running_images_preview_lasts_while_its_lease_is_renewed(store: QueueStore) -> None:
    claim = await running_image(store, "quiet")
    await store.write_progress([ProgressNote(claim, 3, 10, b"webp")])
    key = f"iq:q:{{{claim.queue_id}}}:pv:0"
    await store.redis.expire(key, 2)  # the provider went quiet for most of PROGRESS_TTL_SECONDS
    await store.renew([claim.lease_member], 10_000)
    assert await store.redis.ttl(key) > PROGRESS_TTL_SECONDS - 5
