"""Fair sharing, priorities, admission control, global provider cap, position and ETA: end to end."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from app.harness import RedisServer
from tests.provider_servers import ProviderServer
from tests.utils import MakeStack, assert_counts_consistent, auth, new_user, wait_status, wait_until


@pytest.fixture
def slow_stack(make_stack: MakeStack) -> Iterator[httpx.Client]:
    stack = make_stack(concurrency=2, MAX_PENDING_IMAGES_PER_USER=500, MAX_ACTIVE_QUEUES_PER_USER=3)
    with stack.client() as client:
        yield client


def body(count: int, latency_ms: int = 100, **extra: object) -> dict[str, object]:
    return {"prompts": ["p"], "count": count, "width": 64, "height": 64, "params": {"latency_ms": latency_ms}, **extra}


def test_small_queue_is_not_starved_behind_a_big_one(slow_stack: httpx.Client) -> None:
    client = slow_stack
    big_user, small_user = auth(new_user()), auth(new_user())
    big = client.post("/create-queue", headers=big_user, json=body(200)).json()["queue_id"]
    wait_status(client, big_user, big, {"running"}, final=False)
    t0 = time.monotonic()
    small = client.post("/create-queue", headers=small_user, json=body(2)).json()["queue_id"]
    wait_status(client, small_user, small, {"completed"}, timeout=20)
    took = time.monotonic() - t0
    # Alone: 2 images on 2 slots at 100 ms. Behind FIFO: 200 images / 2 slots x 100 ms = 10 s.
    assert took < 0.6, took
    client.post(f"/cancel-queue/{big}", headers=big_user)


def test_high_priority_goes_first(slow_stack: httpx.Client) -> None:
    client = slow_stack
    user = auth(new_user())
    normal = client.post("/create-queue", headers=user, json=body(20)).json()["queue_id"]
    wait_status(client, user, normal, {"running"}, final=False)
    high = client.post("/create-queue", headers=user, json=body(4, priority="high")).json()["queue_id"]
    low = client.post("/create-queue", headers=auth(new_user()), json=body(2, priority="low")).json()
    assert low["position"] >= 10  # everything of the normal queue that is still pending is ahead
    done_high = wait_status(client, user, high, {"completed"}, timeout=20)
    normal_now = client.get(f"/queue-status/{normal}?images_limit=0", headers=user).json()
    assert normal_now["pending"] > 0, "the high-priority queue finished before the normal one drained"
    assert done_high["succeeded"] == 4
    client.post(f"/cancel-queue/{normal}", headers=user)


def test_position_and_eta_are_reported(slow_stack: httpx.Client) -> None:
    client = slow_stack
    first, second = auth(new_user()), auth(new_user())
    a = client.post("/create-queue", headers=first, json=body(30)).json()["queue_id"]
    wait_status(client, first, a, {"running"}, final=False)
    b = client.post("/create-queue", headers=second, json=body(10, priority="low")).json()
    assert b["position"] >= 20
    time.sleep(1.0)
    status = client.get(f"/queue-status/{b['queue_id']}?images_limit=0", headers=second).json()
    assert status["eta_seconds"] is not None and status["eta_seconds"] > 0
    assert status["position"] < b["position"]
    mine = client.get(f"/queue-status/{a}?images_limit=0", headers=first).json()
    assert mine["position"] == 0  # nothing of other queues is ahead of it
    client.post(f"/cancel-queue/{a}", headers=first)
    client.post(f"/cancel-queue/{b['queue_id']}", headers=second)


def test_admission_limits_answer_429_with_retry_after(slow_stack: httpx.Client) -> None:
    client = slow_stack
    user = auth(new_user())
    first = client.post("/create-queue", headers=user, json=body(300, 2000)).json()["queue_id"]
    over = client.post("/create-queue", headers=user, json=body(250))
    assert over.status_code == 429 and over.headers["retry-after"] and "pending images" in over.json()["detail"]
    client.post(f"/cancel-queue/{first}", headers=user)
    ids = [client.post("/create-queue", headers=user, json=body(5, 2000)).json()["queue_id"] for _ in range(3)]
    fourth = client.post("/create-queue", headers=user, json=body(1))
    assert fourth.status_code == 429 and "active queues" in fourth.json()["detail"]
    assert client.post("/create-queue", headers=auth(new_user()), json=body(1)).status_code == 201
    for qid in ids:
        client.post(f"/cancel-queue/{qid}", headers=user)
    wait_until(lambda: client.post("/create-queue", headers=user, json=body(1)).status_code == 201, 10)


# -- admission of retries and of queues no wait could admit ------------------------------------------
LIMITS = {"MAX_PENDING_IMAGES_PER_USER": 20, "MAX_ACTIVE_QUEUES_PER_USER": 3}


@pytest.fixture
def idle_stack(make_stack: MakeStack) -> Iterator[httpx.Client]:
    """No worker: what is pending stays pending, so the user's counts are exactly what the test made."""
    stack = make_stack(0, **LIMITS)
    with stack.client() as client:
        yield client


def cancelled_queue(client: httpx.Client, user: dict[str, str], count: int) -> str:
    qid = client.post("/create-queue", headers=user, json=body(count)).json()["queue_id"]
    assert client.post(f"/cancel-queue/{qid}", headers=user).json()["status"] == "cancelled"
    return str(qid)


def active(client: httpx.Client, user: dict[str, str]) -> tuple[int, int]:
    """The user's active queues and pending images."""
    queues = client.get("/active-queues", headers=user).json()["queues"]
    return len(queues), sum(q["pending"] for q in queues)


def test_a_queue_larger_than_the_pending_limit_is_422_not_429(idle_stack: httpx.Client) -> None:
    client = idle_stack
    user = auth(new_user())
    too_big = client.post("/create-queue", headers=user, json=body(21))
    assert too_big.status_code == 422 and "retry-after" not in too_big.headers
    msg = too_big.json()["detail"][0]["msg"]
    assert "21" in msg and "20" in msg and "MAX_PENDING_IMAGES_PER_USER" in msg, msg
    assert active(client, user) == (0, 0)
    assert client.post("/create-queue", headers=user, json=body(20)).status_code == 201  # exactly the limit fits
    later = client.post("/create-queue", headers=user, json=body(1))  # fits once some have finished
    assert later.status_code == 429 and later.headers["retry-after"]


def test_retry_is_held_to_the_active_queue_limit(idle_stack: httpx.Client) -> None:
    client = idle_stack
    user = auth(new_user())
    old = cancelled_queue(client, user, 2)
    running = [client.post("/create-queue", headers=user, json=body(1)).json()["queue_id"] for _ in range(3)]
    assert client.post("/create-queue", headers=user, json=body(1)).status_code == 429
    refused = client.post(f"/retry-queue/{old}", headers=user, json={"include_cancelled": True})
    assert refused.status_code == 429 and refused.headers["retry-after"], refused.text
    assert "3 active queues" in refused.json()["detail"]
    assert active(client, user) == (3, 3)
    untouched = client.get(f"/queue-status/{old}", headers=user).json()
    assert untouched["status"] == "cancelled" and untouched["cancelled"] == 2 and untouched["pending"] == 0
    client.post(f"/cancel-queue/{running[0]}", headers=user)
    retried = client.post(f"/retry-queue/{old}", headers=user, json={"include_cancelled": True})
    assert retried.status_code == 200 and retried.json()["pending"] == 2
    assert active(client, user) == (3, 4)


def test_retry_is_held_to_the_pending_image_limit(idle_stack: httpx.Client) -> None:
    client = idle_stack
    user = auth(new_user())
    old = cancelled_queue(client, user, 20)
    other = client.post("/create-queue", headers=user, json=body(16)).json()["queue_id"]
    refused = client.post(f"/retry-queue/{old}", headers=user, json={"include_cancelled": True})
    assert refused.status_code == 429 and refused.headers["retry-after"], refused.text
    assert "20 pending images" in refused.json()["detail"] and "room for 4" in refused.json()["detail"]
    assert active(client, user) == (1, 16)
    untouched = client.get(f"/queue-status/{old}", headers=user).json()
    assert untouched["status"] == "cancelled" and untouched["cancelled"] == 20 and untouched["pending"] == 0
    client.post(f"/cancel-queue/{other}", headers=user)
    retried = client.post(f"/retry-queue/{old}", headers=user, json={"include_cancelled": True})
    assert retried.status_code == 200 and retried.json()["pending"] == 20 and retried.json()["cancelled"] == 0
    assert active(client, user) == (1, 20)


def test_a_retry_larger_than_the_pending_limit_is_422(make_stack: MakeStack, redis_server: RedisServer) -> None:
    """A queue made under a higher limit, retried once the operator has lowered it: no wait can admit it."""
    url = redis_server.fresh_url()
    user = auth(new_user())
    before = make_stack(0, redis_url=url, **LIMITS)
    with before.client() as client:
        old = cancelled_queue(client, user, 20)
    before.stop()
    after = make_stack(0, redis_url=url, **{**LIMITS, "MAX_PENDING_IMAGES_PER_USER": 10})
    with after.client() as client:
        refused = client.post(f"/retry-queue/{old}", headers=user, json={"include_cancelled": True})
        assert refused.status_code == 422 and "retry-after" not in refused.headers, refused.text
        msg = refused.json()["detail"][0]["msg"]
        assert "20" in msg and "10" in msg and "MAX_PENDING_IMAGES_PER_USER" in msg, msg
        assert client.get(f"/queue-status/{old}", headers=user).json()["status"] == "cancelled"
        assert active(client, user) == (0, 0)


def test_global_provider_cap_holds_across_workers(make_stack: MakeStack) -> None:
    with ProviderServer("automatic1111", latency=0.2) as server:
        stack = make_stack(2, IMAGE_PROVIDER="automatic1111", IMAGE_PROVIDER_URL=server.url,
                           PROVIDER_MAX_CONCURRENCY=3)
        user = auth(new_user())
        with stack.client() as client:
            qid = client.post("/create-queue", headers=user, json={"prompts": ["p"], "count": 24, "width": 64,
                                                                   "height": 64}).json()["queue_id"]
            done = wait_status(client, user, qid, {"completed"}, timeout=60)
        stack.stop()
    assert done["succeeded"] == 24
    assert_counts_consistent(done)
    assert server.max_in_flight == 3
