"""The fleet as operators and clients see it: live workers, models and their figures, read from Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import redis.exceptions

from app.core.metrics import ApiMetrics
from app.models.queue import Health, WorkerClock
from app.services.images import StoreError
from app.services.images.serving import ImageServer
from app.services.models import Catalog
from app.services.queue.states import Priority
from app.services.queue.store import QueueStore

HEALTH_REDIS_TIMEOUT_SECONDS = 2.0
CLOCK_SKEW_WARN_MS = 2_000  # a worker host's clock this far from Redis's is flagged in /health and logged
STORE_CHECK_SECONDS = 2.0  # /health waits this long for the image store


def _slots(workers: list[dict[str, Any]]) -> int:
    return sum(int(w.get("concurrency", 0)) for w in workers)


def _clock_warnings(workers: list[dict[str, Any]]) -> list[str]:
    """Workers whose host clock is far from Redis's: harmless to leases and timestamps (they use
    Redis's clock), but a sign of a host without time sync."""
    return [
        f"worker {w.get('name')!r} on {w.get('host')!r}: host clock is {w['clock_offset_ms'] / 1000:+.1f} s "
        "off the Redis server's (run NTP on it)"
        for w in workers
        if abs(w.get("clock_offset_ms") or 0) > CLOCK_SKEW_WARN_MS
    ]


class FleetService:
    """Read models of the workers and models: GET /models, /health, /ready and the figures behind /metrics."""

    def __init__(self, store: QueueStore, catalog: Catalog, images: ImageServer) -> None:
        self.store = store
        self.catalog = catalog
        self.images = images

    async def models_overview(self) -> dict[str, Any]:
        """Configured models with live workers and their concurrency, pending and running images,
        recent images/s and the provider's last known health."""
        store, catalog = self.store, self.catalog
        workers = await store.workers()
        inflight = await store.inflight()
        out = []
        for model in catalog.models.values():
            serving = [w for w in workers if model.name in w.get("models", [])]
            health = await store.provider_health(model.name)
            ok_at, error_at = int(health.get("ok_at", 0)), int(health.get("error_at", 0))
            healthy: bool | None = None
            if ok_at or error_at:
                healthy = ok_at >= error_at
            out.append({
                "name": model.name,
                "provider": model.provider,
                "default": model.name == catalog.default,
                "max_concurrency": model.max_concurrency or None,
                "workers": len(serving),
                "concurrency": _slots(serving),
                "pending": await store.claimable(model.name),
                "running": max(0, inflight.get(model.name, 0)),
                "images_per_second": round(await store.throughput(model.name), 2),
                "healthy": healthy,
                "last_error": health.get("error") if healthy is False else None,
            })
        return {"default": catalog.default, "models": out}

    async def health(self) -> Health:
        """Redis reachability and live workers per model; `redis` is False when Redis does not answer
        within HEALTH_REDIS_TIMEOUT_SECONDS."""
        try:
            async with asyncio.timeout(HEALTH_REDIS_TIMEOUT_SECONDS):
                await self.store.ping()
                workers = await self.store.workers()
                models: dict[str, dict[str, int]] = {}
                for name in self.catalog.models:
                    serving = [w for w in workers if name in w.get("models", [])]
                    models[name] = {
                        "workers": len(serving),
                        "concurrency": _slots(serving),
                        "pending": await self.store.claimable(name),
                    }
        except (redis.exceptions.RedisError, TimeoutError):
            return Health(status="degraded", redis=False, workers=0, warnings=["Redis is unreachable"])
        warnings = [f"no live worker serves model {n!r}" for n, m in models.items() if m["workers"] == 0]
        image_store, store_warnings = await self.image_store_health(workers)
        return Health(
            status="ok",
            redis=True,
            workers=len(workers),
            worker_concurrency=_slots(workers),
            models=models,
            clocks=[WorkerClock(name=str(w.get("name")), host=w.get("host"), clock_offset_ms=w.get("clock_offset_ms"))
                    for w in workers],
            image_store=image_store,
            warnings=warnings + _clock_warnings(workers) + store_warnings,
        )

    async def image_store_health(self, workers: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
        """The image store as this API sees it, and warnings: unreachable, or workers writing to a
        store this API cannot read (each such worker's images fail, saying so)."""
        store = self.images.store
        info: dict[str, Any] = {"kind": store.kind, "location": store.location, "reachable": True}
        warnings = []
        try:
            async with asyncio.timeout(STORE_CHECK_SECONDS):
                await store.check()
        except (StoreError, TimeoutError) as exc:
            info["reachable"] = False
            warnings.append(f"image store unreachable: {exc.message if isinstance(exc, StoreError) else 'timed out'}")
        mine = await self.images.identify()
        for worker in workers:
            theirs = worker.get("image_store") or {}
            if theirs.get("id") and mine and theirs["id"] != mine:
                warnings.append(
                    f"worker {worker.get('name')} on {worker.get('host')} writes images to {theirs.get('location')} "
                    f"(store id {str(theirs['id'])[:8]}), which this API cannot read ({store.location}, store id "
                    f"{mine[:8]}): its images fail; give the API and every worker the same IMAGE_STORE on shared "
                    "storage"
                )
        with contextlib.suppress(redis.exceptions.RedisError):
            await self.announce_image_store()
        return info, warnings

    async def announce_image_store(self) -> None:
        """Tells workers which image store this API reads, so one writing elsewhere says so."""
        store_id = await self.images.identify()
        if store_id is not None:
            await self.store.note_store_reader(store_id)

    async def ready(self) -> bool:
        """Whether Redis answers within HEALTH_REDIS_TIMEOUT_SECONDS."""
        try:
            async with asyncio.timeout(HEALTH_REDIS_TIMEOUT_SECONDS):
                await self.store.ping()
        except (redis.exceptions.RedisError, TimeoutError):
            return False
        return True

    async def refresh_metrics(self, metrics: ApiMetrics) -> None:
        """Sets the gauges that mirror Redis (all workers' figures) just before a scrape."""
        store = self.store
        for status, value in (await store.finished_totals()).items():
            metrics.images_finished.labels(status).set(value)
        inflight = await store.inflight()
        for model in self.catalog.models:
            metrics.in_flight.labels(model).set(max(0, inflight.get(model, 0)))
            pending = await store.pending_by_priority(model)
            for priority in Priority:
                metrics.pending.labels(model, priority).set(pending[priority])
        workers = await store.workers()
        metrics.workers.set(len(workers))
        metrics.worker_slots.set(_slots(workers))
