"""The fleet as operators and clients see it: live workers, models and their figures, read from Redis."""

from __future__ import annotations

from app.core.metrics import ApiMetrics
from app.services.models import Catalog
from app.services.queue.states import Priority
from app.services.queue.store import QueueStore


class FleetService:
    """Read models of the workers and models: the figures behind /metrics."""

    def __init__(self, store: QueueStore, catalog: Catalog) -> None:
        self.store = store
        self.catalog = catalog

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
        metrics.worker_slots.set(sum(int(w.get("concurrency", 0)) for w in workers))
