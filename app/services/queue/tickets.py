"""RQ tickets: real RQ jobs that wake workers to redeem images from the fair schedule.

A ticket names no image. The worker that runs one claims whatever images the schedule says are
next, for as long as there are any (up to a time slice), so RQ's per-job cost is paid per slice of
work rather than per image, and fairness is decided at claim time, not at enqueue time.
"""

from __future__ import annotations

from redis import Redis
from rq import Queue

from app.core.config import Settings

TICKET_FUNC = "app.services.queue.worker.redeem_ticket"
QUEUE_PREFIX = "imagequeue."
TICKET_RESULT_TTL_SECONDS = 300
TICKET_FAILURE_TTL_SECONDS = 86_400
MAX_TICKETS_PER_WAKE = 64
TICKET_MARGIN_SECONDS = 60  # of a ticket's RQ timeout, beyond its time slice and the shutdown grace


def rq_queue_name(model: str) -> str:
    return QUEUE_PREFIX + model


def ticket_timeout(settings: Settings) -> int:
    """RQ's timeout of a ticket job: the worker's time slice, its shutdown grace and a margin, so RQ
    never kills a ticket that is only finishing its images."""
    return int(settings.worker_ticket_seconds + settings.worker_grace_seconds + TICKET_MARGIN_SECONDS)


class Tickets:
    """Enqueues tickets for a model's RQ queue (sync: RQ's API is)."""

    def __init__(self, connection: Redis, job_timeout: int) -> None:
        self.connection = connection
        self.job_timeout = job_timeout

    def queue(self, model: str) -> Queue:
        return Queue(rq_queue_name(model), connection=self.connection)

    def waiting(self, model: str) -> int:
        return self.queue(model).count

    def wake(self, model: str, wanted: int) -> int:
        """Make sure about `wanted` tickets wait for `model`; returns how many were added."""
        queue = self.queue(model)
        missing = min(MAX_TICKETS_PER_WAKE, wanted - queue.count)
        if missing <= 0:
            return 0
        jobs = [
            Queue.prepare_data(
                TICKET_FUNC,
                args=(model,),
                timeout=self.job_timeout,
                result_ttl=TICKET_RESULT_TTL_SECONDS,
                failure_ttl=TICKET_FAILURE_TTL_SECONDS,
                description=f"imagequeue ticket ({model})",
            )
            for _ in range(missing)
        ]
        queue.enqueue_many(jobs)
        return missing
