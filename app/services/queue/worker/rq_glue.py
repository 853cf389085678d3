"""The RQ side of a worker: the SimpleWorker that hands tickets to the runtime, and the ticket job."""

from __future__ import annotations

import contextvars
import os
import time
from collections.abc import Sequence
from typing import Any

import redis
from rq import SimpleWorker
from rq.job import Job
from rq.queue import Queue

from app.services.queue.tickets import rq_queue_name
from app.services.queue.worker.runtime import WorkerRuntime

_RUNTIME: contextvars.ContextVar[WorkerRuntime | None] = contextvars.ContextVar("imagequeue_runtime", default=None)


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
