"""The concurrent worker: an RQ worker whose tickets feed N image generations on one event loop.

The main thread runs a real RQ `SimpleWorker` (registered, visible to `rq info`, handling signals).
Each RQ job it takes is a ticket (see tickets.py); redeeming one means claiming images from the fair
schedule into free generation slots until nothing is claimable or the ticket's time slice ends.
The images themselves run as tasks on a dedicated asyncio loop in a second thread, sharing one
httpx.AsyncClient and one Redis connection pool. Leases renewed by a heartbeat let any worker
re-queue the images of a worker that died; a cancel watcher stops the images of cancelled queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis
import redis.asyncio
from rq import SimpleWorker
from rq.job import Job
from rq.queue import Queue

from app.core.config import Settings
from app.core.metrics import WorkerMetrics
from app.services.image_service import (
    ImageRequest,
    ImageService,
    ProviderError,
    ProviderRejected,
)
from app.services.models import Catalog, ModelConfig
from app.services.providers import build_model_provider
from app.services.queue.store import CANCEL_CHANNEL, Claim, Outcome, QueueStore, Report
from app.services.queue.tickets import Tickets, rq_queue_name
from app.services.queue.webhooks import WebhookDispatcher

log = logging.getLogger("imagequeue.worker")

_RUNTIME: contextvars.ContextVar[WorkerRuntime | None] = contextvars.ContextVar("imagequeue_runtime", default=None)
SPEC_CACHE_SIZE = 256
REDIS_RETRY_SECONDS = 1.0
CAP_POLL_SECONDS = 0.05
REPORT_ATTEMPTS = 30
WEBHOOK_POLL_SECONDS = 0.5
REPORT_BATCH = 64
REPORT_GRACE_SECONDS = 10.0  # on shutdown, how long finished images' reports may still take
GATE_CHECK_SECONDS = 0.25  # how stale a worker's view of a shared back-off may be


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (about twice as fast per image here), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class _StoreGate:
    """RateGate over Redis: a 429 from the provider makes every worker of that model wait."""

    def __init__(self, store: QueueStore, model: str) -> None:
        self.store = store
        self.model = model
        self._quiet_until = 0.0  # no back-off seen until then: skip the round trip
        self._check: asyncio.Task[int] | None = None  # the one look-up under way, shared by all slots

    async def wait(self) -> None:
        now = time.monotonic()
        if now < self._quiet_until:
            return
        if self._check is None or self._check.done():
            self._check = asyncio.create_task(self._backoff_ms())
        ms = await asyncio.shield(self._check)
        if ms > 0:
            await asyncio.sleep(ms / 1000)
        else:
            self._quiet_until = max(self._quiet_until, now + GATE_CHECK_SECONDS)

    async def _backoff_ms(self) -> int:
        try:
            return await self.store.backoff_ms(self.model)
        except redis.RedisError:
            return 0  # the store is away: do not fail images over an advisory pause

    async def defer(self, seconds: float) -> None:
        self._quiet_until = 0.0
        with contextlib.suppress(redis.RedisError):
            await self.store.set_backoff(self.model, seconds)


@dataclass(slots=True)
class _Running:
    claim: Claim
    model: str
    task: asyncio.Task[None] | None = None
    reason: str | None = None  # "cancel" | "shutdown" when we stopped it
    generating: bool = True  # False once only its report is left: the slot is free again
    begun: bool = False  # its task has started: a task cancelled before that never runs its body
    stopped: bool = False  # its generation has been stopped; what is left is the report
    started: float = field(default_factory=time.monotonic)


class WorkerRuntime:
    """A worker process's event loop thread, its generation slots and its background duties."""

    def __init__(
        self, settings: Settings, catalog: Catalog, *, name: str, concurrency: int, models: Sequence[str]
    ) -> None:
        unknown = [m for m in models if m not in catalog.models]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; known: {sorted(catalog.models)}")
        self.settings = settings
        self.catalog = catalog
        self.name = name
        self.concurrency = concurrency
        self.models = list(models)
        self.loop = _new_loop()
        self._thread = threading.Thread(target=self._run_loop, name="imagequeue-loop", daemon=True)
        self._running: dict[tuple[str, int], _Running] = {}  # claimed and not yet reported
        self._generating = 0  # of those, the ones holding a generation slot
        self._specs: dict[str, dict[str, Any]] = {}
        self._slot_free: asyncio.Event | None = None
        self._stopping = False
        self._draining = False
        self._background: list[asyncio.Task[None]] = []
        self._reports: asyncio.Queue[tuple[Report, asyncio.Future[str]]]
        self.store: QueueStore
        self.services: dict[str, ImageService] = {}
        self._redis: redis.asyncio.Redis
        self._http: httpx.AsyncClient
        self._tickets: Tickets
        self._sync_redis: redis.Redis
        self.images_done = 0
        self._health_noted: dict[tuple[str, bool], float] = {}
        self.metrics = WorkerMetrics()

    # -- lifecycle (called from the main thread) ---------------------------------------------
    def start(self, sync_redis: redis.Redis) -> None:
        self._sync_redis = sync_redis
        self._tickets = Tickets(sync_redis, self.ticket_timeout)
        self._thread.start()
        self._call(self._open()).result()

    @property
    def ticket_timeout(self) -> int:
        return int(self.settings.worker_ticket_seconds + self.settings.worker_grace_seconds + 60)

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _call(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def drain(self) -> dict[str, int]:
        """Redeem one ticket: claim and start images until none is claimable or the slice ends."""
        future = self._call(self._drain(time.monotonic() + self.settings.worker_ticket_seconds))
        while True:
            try:
                # A short timeout keeps the main thread responsive to signals.
                return dict(future.result(timeout=0.5))
            except TimeoutError:
                continue

    def request_stop(self) -> None:
        """Stop claiming (thread-safe); running images go on until shutdown()."""
        self._stopping = True
        self.loop.call_soon_threadsafe(self._wake_drain)

    def _wake_drain(self) -> None:
        if self._slot_free is not None:
            self._slot_free.set()

    def claimable(self) -> int:
        """Images any of our models could claim now (0 when Redis is unreachable)."""

        async def count() -> int:
            try:
                return sum([await self.store.claimable(m) for m in self.models])
            except redis.RedisError:
                return 0

        return int(self._call(count()).result(timeout=30))

    def shutdown(self, grace: float) -> None:
        """Stop claiming; let running images finish for `grace` seconds, then hand the rest back."""
        self._stopping = True
        try:
            self._call(self._close(grace)).result(timeout=grace + 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def in_flight(self) -> int:
        """Images claimed and not yet reported (generating, or only their report left)."""
        return len(self._running)

    # -- on the loop ----------------------------------------------------------------------------
    async def _open(self) -> None:
        s = self.settings
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            s.effective_redis_url,
            max_connections=self.concurrency * 2 + 16,
            timeout=None,
            socket_timeout=s.redis_socket_timeout,
            socket_connect_timeout=s.redis_connect_timeout,
            health_check_interval=15,
        )
        self._redis = redis.asyncio.Redis(connection_pool=pool)
        self.store = QueueStore(self._redis)
        limits = httpx.Limits(max_connections=max(10, self.concurrency * 2), max_keepalive_connections=self.concurrency)
        self._http = httpx.AsyncClient(limits=limits, timeout=s.provider_timeout_seconds)
        for name in self.models:
            self.services[name] = self._service(self.catalog.models[name])
        self._slot_free = asyncio.Event()
        self._reports = asyncio.Queue()
        loops = [self._heartbeat_loop(), self._reaper_loop(), self._cancel_poll_loop(), self._cancel_listen_loop(),
                 self._reporter_loop()]
        if s.webhook_secret:
            webhooks = WebhookDispatcher(
                self.store,
                self._http,
                s.webhook_secret.encode(),
                allow_private=s.webhook_allow_private,
                max_retry_seconds=s.webhook_max_retry_seconds,
            )
            loops.append(self._webhook_loop(webhooks))
        for coro in loops:
            self._background.append(asyncio.create_task(coro))

    def _service(self, model: ModelConfig) -> ImageService:
        s = self.settings
        provider = build_model_provider(model, client=self._http, settings=s)
        return ImageService(
            provider,
            max_retries=s.provider_max_retries,
            backoff_base=s.provider_backoff_base_seconds,
            backoff_max=s.provider_backoff_max_seconds,
            gate=_StoreGate(self.store, model.name),
            observe=self.metrics.observer(model.name),
        )

    async def _close(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        while self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        leftovers = list(self._running.values())
        for run in leftovers:
            # Stop generations; a finished image whose report is under way keeps going.
            if run.generating:
                self._stop_run(run, "shutdown")
        if leftovers:
            log.info("handing back %d unfinished image(s)", len(leftovers), extra={"worker": self.name})
            tasks = [r.task for r in leftovers if r.task is not None]
            # Reports that cannot reach Redis in time are left to the leases: those images run again.
            await asyncio.wait(tasks, timeout=REPORT_GRACE_SECONDS)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        try:
            await self.store.unregister_worker(self.name)
        except redis.RedisError:
            pass
        await self._http.aclose()
        await self._redis.aclose()

    async def _drain(self, deadline: float) -> dict[str, int]:
        assert self._slot_free is not None
        claimed = 0
        self._draining = True
        try:
            while not self._stopping:
                now = time.monotonic()
                if now >= deadline:
                    await self._continue_later()
                    break
                free = self.concurrency - self._generating
                if free <= 0:
                    self._slot_free.clear()
                    try:
                        await asyncio.wait_for(self._slot_free.wait(), deadline - now)
                    except TimeoutError:
                        pass
                    continue
                try:
                    result = await self.store.claim(
                        self.name,
                        self.models,
                        free,
                        self.catalog.caps(),
                        int(self.settings.worker_lease_seconds * 1000),
                    )
                except redis.RedisError as exc:
                    log.warning("claim failed, retrying: %s", exc, extra={"worker": self.name})
                    await asyncio.sleep(REDIS_RETRY_SECONDS)
                    continue
                for claim in result.claims:
                    self._start(claim)
                claimed += len(result.claims)
                if result.claims:
                    continue
                if result.wait_ms > 0 or result.capped:
                    pause = result.wait_ms / 1000 if result.wait_ms else CAP_POLL_SECONDS
                    await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                    continue
                break
        finally:
            self._draining = False
        return {"claimed": claimed}

    async def _continue_later(self) -> None:
        """The slice is over but work may remain: leave a ticket so someone (maybe us) goes on."""
        for model in self.models:
            try:
                if await self.store.claimable(model) > 0:
                    await asyncio.to_thread(self._tickets.wake, model, 1)
            except redis.RedisError:
                pass

    def _start(self, claim: Claim) -> None:
        run = _Running(claim, "")
        self._running[(claim.queue_id, claim.index)] = run
        self._generating += 1
        self.metrics.in_flight.set(self._generating)
        run.task = asyncio.create_task(self._run(run))

    async def _spec(self, queue_id: str) -> dict[str, Any]:
        spec = self._specs.get(queue_id)
        if spec is None:
            raw = await self.store.spec(queue_id)
            fields = await self.store.queue_fields(queue_id, ("model", "user"))
            if raw is None or fields["model"] is None:
                raise LookupError("queue vanished")
            spec = json.loads(raw)
            spec["_model"] = fields["model"]
            spec["_user"] = fields["user"]
            if len(self._specs) >= SPEC_CACHE_SIZE:
                self._specs.pop(next(iter(self._specs)))
            self._specs[queue_id] = spec
        return spec

    async def _run(self, run: _Running) -> None:
        claim = run.claim
        outcome, error, blob, ctype = Outcome.FAILED, "", b"", ""
        extra: dict[str, Any] = {
            "queue_id": claim.queue_id,
            "image": claim.index,
            "worker": self.name,
            "attempt": claim.attempt,
        }
        request: ImageRequest | None = None
        service: ImageService | None = None
        run.begun = True
        try:
            if run.reason is not None:  # stopped before it could start
                raise asyncio.CancelledError
            spec = await self._spec(claim.queue_id)
            if run.reason is not None:
                # Stopped while the spec was read: a cancel arriving as a Redis reply completes can
                # be lost inside the client (Python 3.11's wait_for), so the flag is checked too.
                raise asyncio.CancelledError
            run.model = spec["_model"]
            extra["model"] = run.model
            extra["user"] = spec["_user"]
            service = self.services.get(run.model)
            if service is None:
                raise ProviderError(f"this worker does not serve model {run.model!r}")
            params = {**self.catalog.models[run.model].params, **spec["params"]}
            request = ImageRequest(
                prompt=spec["prompts"][claim.index // int(spec["count"])],
                seed=int(spec["seed"]) + claim.index,
                width=int(spec["width"]),
                height=int(spec["height"]),
                negative_prompt=spec.get("negative_prompt"),
                params=params,
                model=self.catalog.models[run.model].provider_model,
                request_id=f"{claim.queue_id}:{claim.index}",
            )
            if self.settings.log_prompts:
                extra["prompt"] = request.prompt
            try:
                image = await service.generate(request)
            except ProviderError as exc:
                if not isinstance(exc, ProviderRejected) or exc.retryable:
                    await self._note_provider(run.model, False, exc.message)
                raise
            await self._note_provider(run.model, True)
            outcome, blob, ctype = Outcome.SUCCEEDED, image.data, image.content_type
        except asyncio.CancelledError:
            run.stopped = True  # from here on no further cancel may cut the report short
            outcome = Outcome.REQUEUE if run.reason == "shutdown" else Outcome.CANCELLED
            if service is not None and request is not None and run.reason == "cancel":
                try:
                    await asyncio.wait_for(service.interrupt(request), 2)
                except Exception:
                    log.debug("interrupt failed", exc_info=True)
        except ProviderError as exc:
            error = exc.message
        except LookupError:
            outcome = Outcome.CANCELLED
        except redis.RedisError as exc:
            # Our store failed, not the image: hand it back to run again once Redis is reachable.
            log.warning("store unavailable while running an image: %s", exc, extra=extra)
            outcome = Outcome.REQUEUE
        except Exception as exc:
            log.exception("image failed unexpectedly", extra=extra)
            error = f"internal error: {type(exc).__name__}: {exc}"
        seconds = round(time.monotonic() - run.started, 3)
        # The provider's part is over: free the slot now, so the next image starts while this
        # one's report travels (a report waits for its batch's round trip, several ms under load).
        run.generating = False
        self._generating -= 1
        assert self._slot_free is not None
        self._slot_free.set()
        self.metrics.in_flight.set(self._generating)
        try:
            result = await self._report(claim, outcome, error, blob, ctype)
        finally:
            self._running.pop((claim.queue_id, claim.index), None)
        self.images_done += 1
        self.metrics.images.labels(run.model or "?", outcome.value).inc()
        log.info(
            "image %s:%s %s in %.2fs",
            claim.queue_id,
            claim.index,
            outcome.value,
            seconds,
            extra={
                **extra,
                "status": outcome.value,
                "seconds": seconds,
                "error": error or None,
                **({"discarded": result} if result in ("stale", "gone") else {}),
            },
        )

    async def _note_provider(self, model: str, ok: bool, error: str = "") -> None:
        """Tells the API (GET /models) how the provider does; at most once a second per model and outcome."""
        now = time.monotonic()
        if now - self._health_noted.get((model, ok), 0.0) < 1.0:
            return
        self._health_noted[(model, ok)] = now
        with contextlib.suppress(redis.RedisError):
            await self.store.record_provider(model, ok, error)

    async def _report(self, claim: Claim, outcome: Outcome, error: str, blob: bytes, ctype: str) -> str:
        report = Report(claim, outcome, error[:2000], blob, ctype)
        for attempt in range(REPORT_ATTEMPTS):
            done: asyncio.Future[str] = self.loop.create_future()
            await self._reports.put((report, done))
            try:
                return await done
            except redis.RedisError as exc:
                # Keep the result while Redis is away; if the lease lapses meanwhile another worker
                # re-runs the image and this report is discarded as stale.
                log.warning("report failed (%s), retrying", exc, extra={"worker": self.name})
                await asyncio.sleep(min(5.0, REDIS_RETRY_SECONDS * (attempt + 1)))
        return "lost"

    async def _reporter_loop(self) -> None:
        """Sends the completions that arrive together in one pipelined round trip: images of a busy
        worker finish in bursts, and one round trip each would hold the slots up."""
        s = self.settings
        while True:
            batch = [await self._reports.get()]
            while len(batch) < REPORT_BATCH and not self._reports.empty():
                batch.append(self._reports.get_nowait())
            try:
                results = await self.store.complete_many(
                    [r for r, _ in batch], ttl=s.queue_ttl_seconds,
                    user_ttl=s.queue_ttl_seconds + s.queue_safety_ttl_seconds,
                )
            except (redis.RedisError, OSError) as exc:
                error = exc if isinstance(exc, redis.RedisError) else redis.ConnectionError(str(exc))
                for _, done in batch:
                    if not done.done():
                        done.set_exception(error)
                continue
            for (_, done), result in zip(batch, results, strict=True):
                if not done.done():
                    done.set_result(result)

    # -- background duties -----------------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        s = self.settings
        info = {
            "name": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "concurrency": self.concurrency,
            "models": self.models,
            "started_at": int(time.time()),
        }
        while True:
            try:
                members = [r.claim.lease_member for r in self._running.values()]
                await self.store.renew(members, int(s.worker_lease_seconds * 1000))
                await self.store.register_worker(
                    self.name,
                    {**info, "in_flight": len(members), "images_done": self.images_done},
                    int(s.worker_lease_seconds * 1000),
                )
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc, extra={"worker": self.name})
            await asyncio.sleep(s.worker_heartbeat_seconds)

    async def _reaper_loop(self) -> None:
        s = self.settings
        while True:
            await asyncio.sleep(s.worker_heartbeat_seconds)
            try:
                models = await self.store.reap(
                    s.max_image_attempts, s.queue_ttl_seconds, s.queue_ttl_seconds + s.queue_safety_ttl_seconds
                )
                if models:
                    log.info("re-queued images of a lost worker", extra={"worker": self.name})
                for model in models:
                    await asyncio.to_thread(self._tickets.wake, model, 1)
                await self._top_up()
            except redis.RedisError as exc:
                log.warning("reaper failed: %s", exc, extra={"worker": self.name})

    async def _top_up(self) -> None:
        """Safety net: claimable work with no ticket waiting and nobody draining gets a ticket."""
        if self._draining or self._stopping:
            return
        for model in self.models:
            if await self.store.claimable(model) > 0:
                waiting = await asyncio.to_thread(self._tickets.waiting, model)
                if waiting == 0:
                    await asyncio.to_thread(self._tickets.wake, model, 1)

    async def _webhook_loop(self, webhooks: WebhookDispatcher) -> None:
        while True:
            try:
                busy = await webhooks.run_once()
            except redis.RedisError as exc:
                log.warning("webhook round failed: %s", exc, extra={"worker": self.name})
                busy = 0
            await asyncio.sleep(0.05 if busy else WEBHOOK_POLL_SECONDS)

    async def _cancel_poll_loop(self) -> None:
        """Catches cancels whose notification was missed (e.g. during a reconnect)."""
        while True:
            await asyncio.sleep(self.settings.worker_cancel_poll_seconds)
            queue_ids = {qid for qid, _ in self._running}
            if not queue_ids:
                continue
            try:
                statuses = await self.store.statuses(queue_ids)
            except redis.RedisError:
                continue
            for qid, status in statuses.items():
                if status in ("cancelled", None):
                    self._cancel_queue(qid)

    async def _cancel_listen_loop(self) -> None:
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(CANCEL_CHANNEL)
                    while True:
                        # Wait less than the socket timeout, so silence is not taken for a dead link.
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if message and message.get("type") == "message":
                            data = message["data"]
                            self._cancel_queue(data.decode() if isinstance(data, bytes) else str(data))
            except (redis.RedisError, OSError) as exc:
                log.debug("cancel listener reconnecting: %s", exc)
                await asyncio.sleep(REDIS_RETRY_SECONDS)

    def _cancel_queue(self, queue_id: str) -> None:
        for (qid, _), run in list(self._running.items()):
            # A run already told to stop is told again: a cancel can be lost inside a library call
            # (see _run), and the poll comes back every WORKER_CANCEL_POLL_SECONDS.
            if qid == queue_id and run.reason in (None, "cancel") and run.generating:
                self._stop_run(run, "cancel")

    @staticmethod
    def _stop_run(run: _Running, reason: str) -> None:
        if run.stopped:
            return
        run.reason = reason
        if run.begun and run.task is not None:
            run.task.cancel()


class ImageWorker(SimpleWorker):
    """RQ's in-process worker, with a WorkerRuntime that its ticket jobs redeem into."""

    def __init__(self, *args: Any, runtime: WorkerRuntime, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runtime = runtime

    def execute_job(self, job: Job, queue: Queue) -> None:
        token = _RUNTIME.set(self.runtime)
        try:
            super().execute_job(job, queue)
        finally:
            _RUNTIME.reset(token)

    def request_stop(self, signum: Any, frame: Any) -> None:
        self.runtime.request_stop()
        super().request_stop(signum, frame)


def redeem_ticket(model: str) -> dict[str, int]:
    """The RQ job behind every ticket. Under a plain `rq worker` it runs a short-lived runtime."""
    runtime = _RUNTIME.get()
    if runtime is not None:
        return runtime.drain()
    from app.core.config import get_settings
    from app.services.models import load_catalog

    settings = get_settings()
    catalog = load_catalog(settings)
    standalone = WorkerRuntime(
        settings,
        catalog,
        name=f"rq-{os.getpid()}-{int(time.time())}",
        concurrency=settings.worker_concurrency,
        models=[model],
    )
    standalone.start(redis.Redis.from_url(settings.effective_redis_url))
    try:
        return standalone.drain()
    finally:
        standalone.shutdown(settings.worker_grace_seconds)


def queue_names(models: Sequence[str]) -> list[str]:
    return [rq_queue_name(m) for m in models]
