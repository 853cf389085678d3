"""Webhooks from real worker processes to a local receiver: signatures, retries, order, SSRF guard."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.harness import RedisServer, free_port
from app.services.queue.validation import webhook_address_allowed
from tests.utils import MakeStack, auth, new_user, wait_until

SECRET = "whsec-test-0123456789"


class Receiver:
    """Verifies signatures; answers the scripted status codes first, then 200."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[dict[str, Any]] = []
        self.bad_signatures = 0
        self.script: list[int] = []
        self.delay = 0.0  # seconds before each answer: a slow receiver
        self.lock = threading.Lock()
        app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        header = request.headers["x-imagequeue-signature"]
        parts = dict(p.split("=", 1) for p in header.split(","))
        expected = hmac.new(SECRET.encode(), parts["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, parts["v1"]):
            self.bad_signatures += 1
            return Response(status_code=400)
        with self.lock:
            status = self.script.pop(0) if self.script else 200
        if self.delay:
            await asyncio.sleep(self.delay)
        self.received.append({"status": status, "event": json.loads(body),
                              "type": request.headers["x-imagequeue-event"], "at": time.monotonic()})
        return Response(status_code=status)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    wait_until(lambda: r.server.started, 10)
    yield r
    r.server.should_exit = True
    r.thread.join(10)


@pytest.fixture
def hook_stack(make_stack: MakeStack) -> Iterator[httpx.Client]:
    with make_stack(WEBHOOK_SECRET=SECRET, WEBHOOK_ALLOW_PRIVATE="true").client() as client:
        yield client


def test_webhooks_signed_retried_and_in_order(receiver: Receiver, hook_stack: httpx.Client) -> None:
    client = hook_stack
    headers = auth(new_user())
    receiver.script = [500]
    qid = client.post("/create-queue", headers=headers, json={
        "prompts": ["a"], "count": 3, "width": 64, "height": 64, "webhook_url": receiver.url}).json()["queue_id"]
    accepted = lambda: [r for r in receiver.received if r["status"] == 200]  # noqa: E731
    wait_until(lambda: len(accepted()) == 5, 30, what="five accepted deliveries")
    assert receiver.bad_signatures == 0
    assert receiver.received[0]["status"] == 500  # the first try failed ...
    assert receiver.received[1]["event"]["id"] == receiver.received[0]["event"]["id"]  # ... and was retried
    types = [r["type"] for r in accepted()]
    assert types == ["queue.started", "image.finished", "image.finished", "image.finished", "queue.finished"]
    ids = [r["event"]["id"] for r in accepted()]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    final = accepted()[-1]["event"]
    assert final["queue_id"] == qid and final["data"]["counts"]["succeeded"] == 3

    def webhook_state() -> dict[str, Any] | None:
        hook = client.get(f"/queue-status/{qid}", headers=headers).json()["webhook"]
        return hook if hook.get("deliveries", {}).get("delivered") == 5 else None

    hook = wait_until(webhook_state, 10, what="delivery state in the status")
    assert hook["url"] == receiver.url and hook["deliveries"]["attempts"] == 6
    assert hook["events"] == ["queue.started", "image.finished", "queue.finished"]


def test_webhook_event_filter(receiver: Receiver, hook_stack: httpx.Client) -> None:
    client = hook_stack
    headers = auth(new_user())
    client.post("/create-queue", headers=headers, json={
        "prompts": ["a"], "count": 2, "width": 64, "height": 64, "webhook_url": receiver.url,
        "webhook_events": ["queue.finished"]})
    wait_until(lambda: receiver.received, 20, what="a delivery")
    time.sleep(1.0)  # room for any unwanted delivery to show up
    assert [r["type"] for r in receiver.received] == ["queue.finished"]


def test_private_webhook_targets_are_refused_by_default(make_stack: MakeStack, receiver: Receiver) -> None:
    """An address (in any form a resolver reads as one) or localhost is refused when the queue is made;
    a name is checked where it resolves, at each delivery (DNS may change)."""
    headers = auth(new_user())
    with make_stack(concurrency=2, WEBHOOK_SECRET=SECRET).client() as client:
        for host in ("127.0.0.1", "127.1", "2130706433", "0x7f000001", "[::1]", "[::ffff:127.0.0.1]",
                     "169.254.169.254", "10.1.2.3", "100.64.0.1", "0.0.0.0", "localhost", "LOCALHOST.", "a.localhost"):
            r = client.post("/create-queue", headers=headers, json={
                "prompts": ["a"], "width": 64, "height": 64, "webhook_url": f"http://{host}:{receiver.port}/hook"})
            assert r.status_code == 422, (host, r.status_code, r.text)
            assert "private, loopback or reserved" in r.json()["detail"][0]["msg"], host
        # This machine's own name resolves to one of its addresses (here loopback): refused at delivery.
        name = socket.gethostname()
        assert not any(webhook_address_allowed(ipaddress.ip_address(info[4][0]))
                       for info in socket.getaddrinfo(name, None)), name
        qid = client.post("/create-queue", headers=headers, json={
            "prompts": ["a"], "width": 64, "height": 64,
            "webhook_url": f"http://{name}:{receiver.port}/hook"}).json()["queue_id"]
        hook = wait_until(lambda: client.get(f"/queue-status/{qid}", headers=headers).json()["webhook"]
                          .get("deliveries"), 20, what="delivery state")
        assert "private address" in hook["last_error"]
        assert receiver.received == []


def test_webhooks_need_a_configured_secret(client: httpx.Client) -> None:
    r = client.post("/create-queue", headers=auth(new_user()), json={"prompts": ["a"],
                                                                     "webhook_url": "https://example.com/h"})
    assert r.status_code == 422 and "WEBHOOK_SECRET" in r.json()["detail"][0]["msg"]


def test_deliveries_go_to_the_address_that_was_checked() -> None:
    from app.services.queue.webhooks import _pinned

    url, host, ext = _pinned("https://user:pw@hooks.example.com:8443/in?x=1", ipaddress.ip_address("93.184.216.34"))
    assert url == "https://user:pw@93.184.216.34:8443/in?x=1" and host == "hooks.example.com:8443"
    assert ext == {"sni_hostname": "hooks.example.com"}  # the certificate is still checked against the name
    url, host, ext = _pinned("http://hooks.example.com", ipaddress.ip_address("2001:db8::1"))
    assert url == "http://[2001:db8::1]/" and host == "hooks.example.com" and ext == {}


def test_webhook_address_check_allows_only_global_addresses() -> None:
    """Checked as a function (tests send traffic only to loopback): anything not globally routable is refused,
    including carrier-grade NAT, multicast and IPv6 forms that embed a private IPv4 address."""


    refused = ["100.64.0.1", "100.127.255.254", "10.0.0.1", "172.16.5.4", "192.168.1.1", "127.0.0.1", "0.0.0.0",
               "169.254.169.254", "192.0.0.8", "192.0.2.1", "198.18.0.1", "198.51.100.7", "203.0.113.9",
               "224.0.0.251", "239.255.255.250", "240.0.0.1", "255.255.255.255",
               "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1", "2001:db8::1", "64:ff9b:1::1",
               "64:ff9b::a00:1", "::ffff:127.0.0.1", "::ffff:100.64.0.1", "::ffff:169.254.169.254", "2002:a9fe:a9fe::1",
               "2001:0:4136:e378:8000:63bf:3fff:fdd2"]
    for text in refused:
        assert not webhook_address_allowed(ipaddress.ip_address(text)), text
    for text in ("93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:93.184.216.34"):
        assert webhook_address_allowed(ipaddress.ip_address(text)), text


def _start_receiver() -> Receiver:
    r = Receiver()
    r.thread.start()
    wait_until(lambda: r.server.started, 10)
    return r


async def _queue_with_events(store: Any, qid: str, images: int, url: str) -> None:
    """A queue whose images all finish at once: 2 + images webhook events become due."""
    from app.services.queue.states import Outcome

    result = await store.create(
        queue_id=qid, uk="hooks", fields={"model": qid, "priority": "normal", "total": images, "user": "u",
                                          "webhook": json.dumps({"url": url, "events": ALL_EVENTS})},
        spec="{}", safety_ttl=600, idempotency_key=None, fingerprint="", idempotency_ttl=600, max_pending=0,
        max_active=0)
    assert result.outcome == "created"
    for claim in (await store.claim("w", [qid], images, {}, 60_000)).claims:
        await store.complete(claim, Outcome.SUCCEEDED, ttl=600, user_ttl=600,
                             record={"k": f"{qid}/0.png", "n": 1, "ct": "image/png", "v": "x"})


ALL_EVENTS = ["queue.started", "image.finished", "queue.finished"]


async def _dispatch(dispatcher: Any, until: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    try:
        while not await until() and time.monotonic() < deadline:
            await dispatcher.run_once()
            await asyncio.sleep(0.05)
    finally:
        await dispatcher.aclose()


async def test_a_slow_receiver_holds_up_no_other_queue(redis_server: RedisServer) -> None:
    from redis.asyncio import Redis

    from app.services.queue.store import QueueStore
    from app.services.queue.webhooks import WebhookDispatcher

    slow, fast = _start_receiver(), _start_receiver()
    slow.delay = 1.0
    client = Redis.from_url(redis_server.fresh_url())
    try:
        store = QueueStore(client)
        await _queue_with_events(store, "slowq", 6, slow.url)  # 8 deliveries of a second each
        async with httpx.AsyncClient() as http:
            dispatcher = WebhookDispatcher(store, http, SECRET.encode(), allow_private=True, max_retry_seconds=60)
            started = time.monotonic()
            run = asyncio.create_task(_dispatch(dispatcher, lambda: _ready(len(slow.received) >= 8), 30))
            await asyncio.sleep(0.5)  # the slow queue's round is under way
            await _queue_with_events(store, "fastq", 1, fast.url)
            await asyncio.wait_for(_until(lambda: len(fast.received) == 3), 20)
            fast_done = fast.received[-1]["at"] - started
            await run
        assert fast_done < 3.0, f"the fast receiver waited {fast_done:.1f} s behind the slow one"
        assert [r["type"] for r in fast.received] == ["queue.started", "image.finished", "queue.finished"]
        assert len(slow.received) == 8
    finally:
        await client.aclose()
        for r in (slow, fast):
            r.server.should_exit = True
            r.thread.join(10)


async def _ready(value: bool) -> bool:
    return value


async def _until(check: Any) -> None:
    while not check():
        await asyncio.sleep(0.05)


async def test_two_workers_never_send_an_event_twice_or_move_the_cursor_back(redis_server: RedisServer) -> None:
    """A round longer than the lease: the lease is renewed as events go out, and a stale holder is fenced off."""
    from redis.asyncio import Redis

    from app.services.queue.store import QueueStore
    from app.services.queue.webhooks import WebhookDispatcher

    slow = _start_receiver()
    slow.delay = 0.5
    client = Redis.from_url(redis_server.fresh_url())
    try:
        store = QueueStore(client)
        await _queue_with_events(store, "leased", 6, slow.url)  # 8 deliveries: 4 s, longer than a lease
        events = [i for i, e in await store.events_after("leased", "0-0", 100)]
        async with httpx.AsyncClient() as http:
            dispatchers = [WebhookDispatcher(store, http, SECRET.encode(), allow_private=True, max_retry_seconds=60,
                                             lease_ms=3000) for _ in range(2)]
            async def sent_and_recorded() -> bool:
                return (await store.webhook_job("leased"))["wh_cursor"] == events[-1]

            await asyncio.gather(*(_dispatch(d, sent_and_recorded, 20) for d in dispatchers))
            await asyncio.sleep(1.5)  # room for a duplicate to show up
        ids = [r["event"]["id"] for r in slow.received]
        assert len(ids) == len(set(ids)) == 8, ids
        assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
        assert (await store.webhook_job("leased"))["wh_cursor"] == events[-1]
    finally:
        await client.aclose()
        slow.server.should_exit = True
        slow.thread.join(10)


def test_malformed_webhook_urls_are_refused_at_create(make_stack: MakeStack) -> None:
    headers = auth(new_user())
    with make_stack(0, WEBHOOK_SECRET=SECRET).client() as client:
        for url in ("http://h:99999/", "http://[::1/", "http://h:0/", "http://h:port/", "http://:80/",
                    "http:///path", "https://exa mple.com/", "http://h\\x/", "http://user@/", "ftp://h/",
                    "http://" + "a" * 64 + ".example.com/", "https://h:-1/"):
            r = client.post("/create-queue", headers=headers, json={"prompts": ["a"], "webhook_url": url})
            assert r.status_code == 422, (url, r.status_code, r.text[:200])
            assert r.json()["detail"][0]["loc"][-1] == "webhook_url", url
        for url in ("https://hooks.example.com/in?x=1", "http://user:pw@hooks.example.com:8080/h",
                    "https://[2606:4700::1111]:8443/h", "https://bücher.example/h"):  # no worker: nothing is sent
            r = client.post("/create-queue", headers=headers, json={
                "prompts": ["a"], "width": 64, "height": 64, "webhook_url": url})
            assert r.status_code == 201, (url, r.text[:200])


async def test_a_delivery_that_cannot_be_made_is_recorded_in_the_delivery_state(redis_server: RedisServer) -> None:
    """A URL stored before create checked it fully (port out of range): the delivery state says why nothing
    is sent, instead of the round failing silently every 30 s."""
    from redis.asyncio import Redis

    from app.services.queue.store import QueueStore
    from app.services.queue.webhooks import WebhookDispatcher

    client = Redis.from_url(redis_server.fresh_url())
    try:
        store = QueueStore(client)
        await _queue_with_events(store, "badport", 1, "http://127.0.0.1:99999/hook")
        async with httpx.AsyncClient() as http:
            dispatcher = WebhookDispatcher(store, http, SECRET.encode(), allow_private=True, max_retry_seconds=60)

            async def recorded() -> bool:
                return bool(json.loads((await store.webhook_job("badport"))["webhook_state"] or "{}").get("last_error"))

            await _dispatch(dispatcher, recorded, 10)
        state = json.loads((await store.webhook_job("badport"))["webhook_state"])
        assert "port" in state["last_error"].lower() and state["gave_up"] is True
    finally:
        await client.aclose()
