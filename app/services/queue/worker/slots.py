"""A worker's generation slots: the images it has claimed and not yet reported."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from prometheus_client import Gauge

from app.services.queue.store import Claim


@dataclass(slots=True)
class Running:
    """One claimed image, from its claim until its report is settled."""

    claim: Claim
    model: str = ""
    task: asyncio.Task[None] | None = None
    reason: str | None = None  # "cancel" | "shutdown" when we stopped it
    generating: bool = True  # False once only its report is left: the slot is free again
    begun: bool = False  # its task has started: a task cancelled before that never runs its body
    stopped: bool = False  # its generation has been stopped; what is left is the report
    started: float = field(default_factory=time.monotonic)

    def stop(self, reason: str) -> None:
        if self.stopped:
            return
        self.reason = reason
        if self.begun and self.task is not None:
            self.task.cancel()


class Slots:
    """The images claimed and not yet reported; those still generating hold one of `concurrency` slots."""

    def __init__(self, concurrency: int, gauge: Gauge) -> None:
        self.concurrency = concurrency
        self.running: dict[tuple[str, int], Running] = {}
        self.generating = 0
        self.images_done = 0
        self.freed = asyncio.Event()  # set whenever a slot frees up (or a drain must look again)
        self._gauge = gauge

    @property
    def free(self) -> int:
        return self.concurrency - self.generating

    def take(self, claim: Claim) -> Running:
        run = Running(claim)
        self.running[(claim.queue_id, claim.index)] = run
        self.generating += 1
        self._gauge.set(self.generating)
        return run

    def release(self, run: Running) -> None:
        """The provider's part is over: the slot takes the next image while this one's report travels."""
        run.generating = False
        self.generating -= 1
        self.freed.set()
        self._gauge.set(self.generating)

    def settle(self, run: Running) -> None:
        """Its report is done (or given up): the image is no longer ours."""
        self.running.pop((run.claim.queue_id, run.claim.index), None)

    def lease_members(self) -> list[str]:
        return [r.claim.lease_member for r in self.running.values()]

    def queue_ids(self) -> set[str]:
        return {qid for qid, _ in self.running}

    def cancel_queue(self, queue_id: str) -> None:
        for (qid, _), run in list(self.running.items()):
            # A run already told to stop is told again: a cancel can be lost inside a library call
            # (see execution.py), and the poll comes back every WORKER_CANCEL_POLL_SECONDS.
            if qid == queue_id and run.reason in (None, "cancel") and run.generating:
                run.stop("cancel")

    def stop_all(self, reason: str) -> list[Running]:
        """Stop every generation; a finished image whose report is under way keeps going. Returns
        every image still ours."""
        leftovers = list(self.running.values())
        for run in leftovers:
            if run.generating:
                run.stop(reason)
        return leftovers
