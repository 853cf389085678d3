"""Webhook delivery, run by the workers beside generation (never in its way).

A queue created with `webhook_url` has its events (the same stream the SSE endpoint serves)
POSTed in order: `queue.started`, `image.finished` and `queue.finished`. Each POST is signed:

    X-ImageQueue-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>

Non-2xx answers and timeouts are retried with exponential backoff for up to WEBHOOK_MAX_RETRY_SECONDS
(an hour by default); after that the event is dropped and counted. Delivery state is kept in the
queue (`webhook.deliveries` in its status). URLs that resolve to any address that is not globally
routable (private, loopback, link-local, carrier-grade NAT, multicast, reserved) are refused unless
WEBHOOK_ALLOW_PRIVATE is set.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import socket
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from app.services.queue.states import ImageStatus, QueueState, WebhookEvent
from app.services.queue.store import QueueStore
from app.services.queue.validation import Address, webhook_address_allowed, webhook_url_problem

log = logging.getLogger("imagequeue.webhooks")

LEASE_MS = 30_000
BATCH_QUEUES = 32  # queues one worker delivers to at once, each in a task of its own
EVENTS_PER_ROUND = 100
DELIVERY_TIMEOUT_SECONDS = 10.0
MAX_BACKOFF_SECONDS = 300.0
SIGNATURE_HEADER = "X-ImageQueue-Signature"


def event_type(event: dict[str, Any]) -> WebhookEvent | None:
    """The webhook event an internal event stands for, if any."""
    if event.get("type") == "queue":
        if event.get("final"):
            return WebhookEvent.QUEUE_FINISHED
        if event.get("status") == QueueState.RUNNING:
            return WebhookEvent.QUEUE_STARTED
    if event.get("type") == "image" and ImageStatus(event.get("status", ImageStatus.PENDING)).finished:
        return WebhookEvent.IMAGE_FINISHED
    return None


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def _resolve(host: str) -> list[Address]:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


def _pinned(url: str, address: Address) -> tuple[str, str, dict[str, Any]]:
    """The URL aimed at the address that was checked (so a second DNS answer cannot send the POST
    elsewhere), the Host header it needs, and the TLS server name for certificate checks."""
    parts = urlsplit(url)
    ip = f"[{address}]" if address.version == 6 else str(address)
    userinfo, _, host_header = parts.netloc.rpartition("@")
    netloc = (f"{userinfo}@" if userinfo else "") + ip + (f":{parts.port}" if parts.port else "")
    extensions: dict[str, Any] = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")), host_header, extensions


class WebhookDispatcher:
    """Leases queues with due deliveries and sends each queue's events in order, every queue in a task of
    its own (a slow receiver holds up only its own queue). The lease is renewed as each event goes out,
    and a holder whose lease lapsed anyway is fenced off by the next one's token: no event is sent twice
    by two workers at once, and the cursor never moves back."""

    def __init__(
        self,
        store: QueueStore,
        client: httpx.AsyncClient,
        secret: bytes,
        *,
        allow_private: bool,
        max_retry_seconds: float,
        lease_ms: int = LEASE_MS,
        max_queues: int = BATCH_QUEUES,
    ) -> None:
        self.store = store
        self.client = client
        self.secret = secret
        self.allow_private = allow_private
        self.max_retry_seconds = max_retry_seconds
        self.lease_ms = lease_ms
        self.max_queues = max_queues
        self._rounds: dict[str, asyncio.Task[None]] = {}

    async def run_once(self) -> int:
        """Starts a round for each due queue there is room for; returns how many were started."""
        room = self.max_queues - len(self._rounds)
        if room <= 0:
            return 0
        leased = await self.store.lease_webhooks(room, self.lease_ms)
        for queue_id, token in leased:
            # Our own earlier round of this queue, if it is still here, lost its lease: the new token fences it.
            task = asyncio.create_task(self._round(queue_id, token), name=f"webhooks-{queue_id}")
            self._rounds[queue_id] = task
            task.add_done_callback(lambda done, qid=queue_id: self._finished(qid, done))  # type: ignore[misc]
        return len(leased)

    def _finished(self, queue_id: str, task: asyncio.Task[None]) -> None:
        if self._rounds.get(queue_id) is task:
            del self._rounds[queue_id]

    async def aclose(self) -> None:
        """Stops the rounds under way (their leases lapse and another worker goes on from the cursor)."""
        rounds = list(self._rounds.values())
        for task in rounds:
            task.cancel()
        await asyncio.gather(*rounds, return_exceptions=True)

    async def _round(self, queue_id: str, token: int) -> None:
        try:
            await self._deliver(queue_id, token)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Redis away, or a bug: the lease lapses and the queue's deliveries are tried again.
            log.warning("webhook round failed", exc_info=True, extra={"queue_id": queue_id})

    async def _deliver(self, queue_id: str, token: int) -> None:
        job = await self.store.webhook_job(queue_id)
        if not job["webhook"]:
            await self.store.webhook_progress(queue_id, token, job["wh_cursor"] or "0-0", {}, None)
            return
        config = json.loads(job["webhook"])
        state: dict[str, Any] = json.loads(job["webhook_state"] or "{}")
        state.setdefault("delivered", 0)
        state.setdefault("dropped", 0)
        state.setdefault("attempts", 0)
        cursor = job["wh_cursor"] or "0-0"
        wanted = set(config.get("events") or [])
        url = config["url"]
        problem = webhook_url_problem(url)  # a queue stored before create checked URLs fully
        host = "" if problem else urlsplit(url).hostname or ""
        addresses = [] if problem else await asyncio.to_thread(_resolve, host)
        if problem or (not self.allow_private and not all(webhook_address_allowed(a) for a in addresses)):
            error = f"invalid webhook URL: {problem}" if problem else f"refused: {host} resolves to a private address"
            state.update(last_error=error, gave_up=True)
            events = await self.store.events_after(queue_id, cursor, 10_000)
            cursor = events[-1][0] if events else cursor
            await self.store.webhook_progress(queue_id, token, cursor, state, None)
            return
        for event_id, event in await self.store.events_after(queue_id, cursor, EVENTS_PER_ROUND):
            kind = event_type(event)
            if kind is None or kind not in wanted:
                cursor = event_id
                continue
            ok, status, error = await self._post(url, addresses[0] if addresses else None, event_id, kind, event)
            now = await self.store.server_time_ms()  # Redis's clock: workers' clocks may disagree
            state["attempts"] += 1
            state["last_status"] = status
            state["last_attempt_at"] = now
            if ok:
                state["delivered"] += 1
                state["last_error"] = None
                state.pop("failing_since", None)
                state.pop("next_attempt_at", None)
                state["consecutive_failures"] = 0
                cursor = event_id
                # Each delivered event moves the cursor and renews the lease: a long round keeps its queue.
                if not await self.store.webhook_progress(queue_id, token, cursor, state, None, hold_ms=self.lease_ms):
                    return  # another worker holds the queue now and goes on from the cursor
                continue
            state["last_error"] = error
            failing_since = state.setdefault("failing_since", now)
            if now - failing_since > self.max_retry_seconds * 1000:
                log.warning("webhook gave up on an event after retrying", extra={"queue_id": queue_id})
                state["dropped"] += 1
                state.pop("failing_since", None)
                cursor = event_id
                continue
            failures = state.get("consecutive_failures", 0) + 1
            state["consecutive_failures"] = failures
            delay = min(MAX_BACKOFF_SECONDS, 2 ** min(failures, 10)) * random.uniform(0.5, 1.0)
            state["next_attempt_at"] = now + int(delay * 1000)
            await self.store.webhook_progress(queue_id, token, cursor, state, int(delay * 1000))
            return
        state["consecutive_failures"] = 0
        await self.store.webhook_progress(queue_id, token, cursor, state, None)

    async def _post(
        self, url: str, address: Address | None, event_id: str, kind: str, event: dict[str, Any]
    ) -> tuple[bool, int | None, str]:
        if address is None:
            return False, None, f"cannot resolve {urlsplit(url).hostname!r}"
        target, host_header, extensions = _pinned(url, address)
        payload = {
            "id": event_id,
            "type": kind,
            "queue_id": event["queue_id"],
            "created_at": event.get("ts"),
            "data": {k: v for k, v in event.items() if k not in ("queue_id", "ts")},
        }
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "imagequeue-webhooks",
            "X-ImageQueue-Event": kind,
            "X-ImageQueue-Delivery": event_id,
            "Host": host_header,
            SIGNATURE_HEADER: sign(self.secret, int(time.time()), body),
        }
        try:
            response = await self.client.post(
                target, content=body, headers=headers, timeout=DELIVERY_TIMEOUT_SECONDS, follow_redirects=False,
                extensions=extensions,
            )
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
            return False, None, f"{type(exc).__name__}: {exc}"[:300]
        if 200 <= response.status_code < 300:
            return True, response.status_code, ""
        return False, response.status_code, f"HTTP {response.status_code}"
