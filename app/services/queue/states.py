"""The queue's vocabulary: statuses, priorities, webhook events and what the store's scripts answer.

A leaf: it imports nothing of the application, so the schemas (app/models), the store, the services
and the workers can all share one definition. The values are persisted in Redis and appear in the
HTTP contract; they never change.
"""

from __future__ import annotations

from enum import StrEnum


class ImageStatus(StrEnum):
    """One image's status. Never claimed images are pending without a record of their own."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self not in (ImageStatus.PENDING, ImageStatus.RUNNING)


class QueueState(StrEnum):
    """A queue's status: pending until its first image is claimed, then running until every image
    has finished, then completed (some succeeded), failed (none did) or cancelled."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({QueueState.COMPLETED, QueueState.FAILED, QueueState.CANCELLED})


class Priority(StrEnum):
    """A queue's priority. Members are in serving order: the schedule claims `high` images first."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """0 for the priority served first."""
        return _PRIORITY_RANK[self]


_PRIORITY_RANK = {p: i for i, p in enumerate(Priority)}


class Outcome(StrEnum):
    """How a worker reports one claimed image."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REQUEUE = "requeue"


class WebhookEvent(StrEnum):
    QUEUE_STARTED = "queue.started"
    IMAGE_FINISHED = "image.finished"
    QUEUE_FINISHED = "queue.finished"


# -- what the store's scripts answer ----------------------------------------------------------------
class CreateOutcome(StrEnum):
    CREATED = "created"
    REPLAY = "replay"  # the same Idempotency-Key and body: the earlier queue
    CONFLICT = "conflict"  # the same Idempotency-Key with another body
    LIMIT_ACTIVE = "limit_active"
    LIMIT_PENDING = "limit_pending"


class CancelOutcome(StrEnum):
    CANCELLED = "cancelled"
    NOOP = "noop"  # already cancelled
    CONFLICT = "conflict"  # already finished otherwise
    NOT_FOUND = "notfound"


class RetryOutcome(StrEnum):
    RETRIED = "retried"
    NOTHING = "nothing"  # no failed (or cancelled) image to run again
    CONFLICT = "conflict"  # still running
    NOT_FOUND = "notfound"
    LIMIT_ACTIVE = "limit_active"  # refused by the per-user limits, as a create would be
    LIMIT_PENDING = "limit_pending"


class DeleteOutcome(StrEnum):
    DELETED = "deleted"
    CONFLICT = "conflict"  # still running
    NOT_FOUND = "notfound"


class Discarded(StrEnum):
    """A completion the store did not apply (otherwise it answers the queue's state after it)."""

    STALE = "stale"  # the lease lapsed and the image was handed to another worker
    GONE = "gone"  # the queue was deleted or expired
