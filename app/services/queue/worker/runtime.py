"""A worker process's event loop thread: opening and closing it, and draining tickets into free slots."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
import redis
import redis.asyncio

from app.core.config import Settings
from app.core.metrics import WorkerMetrics
from app.services.image_service import ImageService
from app.services.images import ImageStore, open_store
from app.services.models import Catalog, ModelConfig
from app.services.providers.factory import build_model_provider
from app.services.providers.transport import provider_client
from app.services.queue.store import REDIS_ENCODING_ERRORS, QueueStore
from app.services.queue.tickets import Tickets, ticket_timeout
from app.services.queue.worker.duties import Duties
from app.services.queue.worker.execution import Execution
from app.services.queue.worker.gate import StoreGate
from app.services.queue.worker.objects import ImageKeeper
from app.services.queue.worker.progress import PROGRESS_TIMEOUT_SECONDS, ProgressWriter
from app.services.queue.worker.reporter import Reporter
from app.services.queue.worker.slots import Slots
from app.services.queue.worker.supervisor import Supervisor

log = logging.getLogger("imagequeue.worker")

T = TypeVar("T")
CLAIM_RETRY_SECONDS = 1.0  # after a claim failed on Redis
CAP_POLL_SECONDS = 0.05  # a concurrency cap stopped the claim: look again this soon
REPORT_GRACE_SECONDS = 10.0  # on shutdown, how long finished images' reports may still take
CLAIMABLE_TIMEOUT_SECONDS = 30
PROVIDER_CLOSE_SECONDS = 5.0  # on shutdown, how long each provider may take to release what it holds
PROGRESS_CLIENT_NAME = "imagequeue-progress"  # as CLIENT LIST shows the progress writer's connection


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (about twice as fast per image here), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


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
        self.metrics = WorkerMetrics()
        self.slots = Slots(concurrency, self.metrics.in_flight)
        self.loop = new_loop()
        # Each finished image takes up to three blocking jobs (encode, the image's write, the
        # thumbnail's), mostly waits on the disk or the network: asyncio's default pool (cores + 4
        # threads) queued them behind each other and filled the upload backlog, which holds slots.
        self.loop.set_default_executor(
            ThreadPoolExecutor(max_workers=max(8, concurrency + 4), thread_name_prefix="imagequeue-blocking"))
        self._thread = threading.Thread(target=self._run_loop, name="imagequeue-loop", daemon=True)
        self._stopping = False
        self._draining = False
        self._background: list[asyncio.Task[None]] = []
        self.store: QueueStore
        self.services: dict[str, ImageService] = {}
        self._execution: Execution
        self._redis: redis.asyncio.Redis
        self._progress_redis: redis.asyncio.Redis | None = None
        self._http: httpx.AsyncClient
        self._tickets: Tickets
        self.images: ImageStore
        self.keeper: ImageKeeper

    # -- called from the main thread ----------------------------------------------------------
    def start(self, sync_redis: redis.Redis) -> None:
        self._tickets = Tickets(sync_redis, ticket_timeout(self.settings))
        self._thread.start()
        self._call(self._open()).result()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _call(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
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
        self.loop.call_soon_threadsafe(self.slots.freed.set)  # wakes a drain waiting for a slot

    def claimable(self) -> int:
        """Images any of our models could claim now (0 when Redis is unreachable)."""

        async def count() -> int:
            try:
                return sum([await self.store.claimable(m) for m in self.models])
            except redis.RedisError:
                return 0

        return int(self._call(count()).result(timeout=CLAIMABLE_TIMEOUT_SECONDS))

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
        return len(self.slots.running)

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
            encoding_errors=REDIS_ENCODING_ERRORS,
        )
        self._redis = redis.asyncio.Redis(connection_pool=pool)
        self.store = QueueStore(self._redis)
        self._http = provider_client(self.concurrency, s.provider_timeout_seconds)
        for name in self.models:
            self.services[name] = self._service(self.catalog.models[name])
        self.images = open_store(s, self._redis)
        self.keeper = ImageKeeper(self.images, self.store, s, worker=self.name, concurrency=self.concurrency)
        await self.keeper.open()
        log.info("images go to %s", self.images.location, extra={"worker": self.name})
        reporter = Reporter(self.store, s, self.name)
        progress = self._progress_writer() if s.worker_progress else None
        self._execution = Execution(
            settings=s,
            catalog=self.catalog,
            store=self.store,
            services=self.services,
            slots=self.slots,
            reporter=reporter,
            keeper=self.keeper,
            metrics=self.metrics,
            worker_name=self.name,
            progress=progress,
        )
        duties = Duties(
            settings=s,
            name=self.name,
            models=self.models,
            store=self.store,
            redis_client=self._redis,
            http=self._http,
            tickets=self._tickets,
            slots=self.slots,
            busy=lambda: self._draining or self._stopping,
            store_info=lambda: self.keeper.info,
        )
        supervisor = Supervisor(self.name)
        loops = {**duties.loops(), "reporter": reporter.run, "store-watch": self.keeper.watch,
                 "store-sweep": self.keeper.sweep}
        if progress is not None:
            loops["progress"] = progress.run
        for name, loop in loops.items():
            self._background.append(supervisor.start(name, loop))

    def _progress_writer(self) -> ProgressWriter:
        """Progress goes through a client of its own (one connection, a short timeout): a slow
        Redis drops progress there and never holds up a connection that claims or reports need."""
        s = self.settings
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            s.effective_redis_url,
            max_connections=1,
            timeout=None,
            socket_timeout=PROGRESS_TIMEOUT_SECONDS,
            socket_connect_timeout=PROGRESS_TIMEOUT_SECONDS,
            client_name=PROGRESS_CLIENT_NAME,
        )
        self._progress_redis = redis.asyncio.Redis(connection_pool=pool)
        return ProgressWriter(QueueStore(self._progress_redis), self.metrics)

    def _service(self, model: ModelConfig) -> ImageService:
        s = self.settings
        provider = build_model_provider(model, client=self._http, settings=s)
        return ImageService(
            provider,
            max_retries=s.provider_max_retries,
            backoff_base=s.provider_backoff_base_seconds,
            backoff_max=s.provider_backoff_max_seconds,
            gate=StoreGate(self.store, model.name),
            observe=self.metrics.observer(model.name),
        )

    async def _close(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        while self.slots.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        leftovers = self.slots.stop_all("shutdown")
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
        for name, service in self.services.items():
            try:
                await asyncio.wait_for(service.aclose(), PROVIDER_CLOSE_SECONDS)
            except Exception:
                log.warning("closing the provider of model %s failed", name, exc_info=True)
        await self._http.aclose()
        await self.images.aclose()
        await self._redis.aclose()
        if self._progress_redis is not None:
            await self._progress_redis.aclose()

    async def _drain(self, deadline: float) -> dict[str, int]:
        slots = self.slots
        claimed = 0
        self._draining = True
        try:
            while not self._stopping:
                now = time.monotonic()
                if now >= deadline:
                    await self._continue_later()
                    break
                free = slots.free
                if free <= 0:
                    slots.freed.clear()
                    try:
                        await asyncio.wait_for(slots.freed.wait(), deadline - now)
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
                        safety_ttl=self.settings.queue_safety_ttl_seconds,
                    )
                except redis.RedisError as exc:
                    log.warning("claim failed, retrying: %s", exc, extra={"worker": self.name})
                    await asyncio.sleep(CLAIM_RETRY_SECONDS)
                    continue
                for claim in result.claims:
                    self._execution.start(claim)
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
