"""Fair sharing, priorities, admission control, global provider cap, position and ETA: end to end."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

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
    over = client.post("/create-queue", headers=user, json=body(501))
    assert over.status_code == 429 and over.headers["retry-after"] and "pending images" in over.json()["detail"]
    ids = [client.post("/create-queue", headers=user, json=body(5, 2000)).json()["queue_id"] for _ in range(3)]
    fourth = client.post("/create-queue", headers=user, json=body(1))
    assert fourth.status_code == 429 and "active queues" in fourth.json()["detail"]
    assert client.post("/create-queue", headers=auth(new_user()), json=body(1)).status_code == 201
    for qid in ids:
        client.post(f"/cancel-queue/{qid}", headers=user)
    wait_until(lambda: client.post("/create-queue", headers=user, json=body(1)).status_code == 201, 10)


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
