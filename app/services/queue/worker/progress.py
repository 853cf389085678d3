"""Step progress of running images, from their providers to Redis: throttled, coalesced, never in the way.

Each running image gets a callback (ImageRequest.on_progress) that only keeps the newest value: a few
attribute writes on the event loop, nothing awaited. One task writes what is due. An image's first
write comes PROGRESS_INTERVAL_SECONDS after it started and later ones at least that far apart, each
with the newest step and preview at that moment: at most two writes a second per image, and an image
that finishes within the interval is never written at all (no reader polling or streaming at that
pace could have shown it). Everything due goes in one script call; new previews are first re-encoded
to a small WebP in a thread. The writes use a Redis client of their own with a short timeout, so a
slow or failing Redis loses progress values (counted, never retried), never delays an image, and
never holds a connection the claims and reports need.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from app.core.metrics import WorkerMetrics
from app.services.images.encoding import ImageUnreadable, preview_webp
from app.services.providers.progress import Progress, ProgressCallback, immediate
from app.services.queue.store import Claim, ProgressNote, QueueStore

log = logging.getLogger("imagequeue.worker")

PROGRESS_INTERVAL_SECONDS = 0.5  # per image: the first write this long after it started, then at most this often
PROGRESS_TIMEOUT_SECONDS = 1.0  # a write that takes longer is dropped
PROGRESS_BATCH = 256  # images per script call
BATCH_SLACK = 0.1  # of the interval: how early an image may be written to join a round trip
FAILURE_LOG_SECONDS = 60.0  # a Redis that keeps failing progress writes is logged this often


@dataclass(slots=True)
class _Watch:
    """One running image's newest value not yet written."""

    claim: Claim
    next_at: float  # monotonic time its next write may happen
    step: int = 0
    steps: int = 0
    preview: bytes | None = None  # the newest preview not yet written (as the provider sent it)
    fresh: bool = False  # a value arrived since the last write


class ProgressWriter:
    """Throttled, coalesced progress writes for a worker's running images."""

    def __init__(
        self,
        store: QueueStore,
        metrics: WorkerMetrics,
        *,
        interval: float = PROGRESS_INTERVAL_SECONDS,
        timeout: float = PROGRESS_TIMEOUT_SECONDS,
        encode: Callable[[bytes], bytes] = preview_webp,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.interval = interval
        self.timeout = timeout
        self._encode = encode
        self._watched: dict[tuple[str, int], _Watch] = {}
        self._wake = asyncio.Event()
        self._sleeping_until = -math.inf  # while the writer sleeps: when it looks next on its own
        self._failure_logged = -math.inf
        values = metrics.progress_values
        self._written, self._stale = values.labels("written"), values.labels("stale")
        self._dropped, self._coalesced = values.labels("dropped"), values.labels("coalesced")
        self.round_trips = 0

    def watch(self, claim: Claim) -> ProgressCallback:
        """Starts following an image; the callback to give its provider."""
        key = (claim.queue_id, claim.index)
        entry = _Watch(claim, time.monotonic() + self.interval)
        self._watched[key] = entry
        coalesced = self._coalesced

        @immediate  # it stores the value: the writer's loop does the rest
        def on_progress(progress: Progress) -> None:
            if self._watched.get(key) is not entry:
                return  # the image has ended
            if entry.fresh:
                coalesced.inc()
            entry.step, entry.steps, entry.fresh = progress.step, progress.steps, True
            if progress.preview is not None:
                entry.preview = progress.preview
            if entry.next_at < self._sleeping_until:
                self._wake.set()

        return on_progress

    def forget(self, claim: Claim) -> None:
        """The image has ended: what it had not written is dropped (it settles without progress)."""
        entry = self._watched.pop((claim.queue_id, claim.index), None)
        if entry is not None and entry.fresh:
            self._coalesced.inc()

    async def run(self) -> None:
        """Writes due values for as long as the worker runs."""
        while True:
            now = time.monotonic()
            # Images due a little later go too: a worker's images share round trips.
            soon = now + self.interval * BATCH_SLACK
            due = [w for w in self._watched.values() if w.fresh and w.next_at <= soon][:PROGRESS_BATCH]
            if due:
                await self._write(due)
                continue
            wake_at = min((w.next_at for w in self._watched.values() if w.fresh), default=math.inf)
            self._wake.clear()
            self._sleeping_until = wake_at
            try:
                await asyncio.wait_for(self._wake.wait(), None if wake_at == math.inf else max(0.0, wake_at - now))
            except TimeoutError:
                pass
            finally:
                self._sleeping_until = -math.inf

    async def _write(self, due: Sequence[_Watch]) -> None:
        taken = []
        for w in due:
            taken.append((w, w.step, w.steps, w.preview))
            w.fresh, w.preview = False, None
        raw = [(i, p) for i, (_, _, _, p) in enumerate(taken) if p is not None]
        encoded: dict[int, bytes] = {}
        if raw:
            encoded = await asyncio.to_thread(self._encode_all, raw)
        sent = time.monotonic()  # the interval runs from the write, however long the previews took
        for w in due:
            w.next_at = sent + self.interval
        notes = [ProgressNote(w.claim, step, steps, encoded.get(i)) for i, (w, step, steps, _) in enumerate(taken)]
        try:
            self.round_trips += 1
            written = await asyncio.wait_for(self.store.write_progress(notes), self.timeout * 2)
        except (redis.RedisError, OSError, TimeoutError) as exc:
            self._dropped.inc(len(notes))
            for w, _, _, preview in taken:
                if preview is not None and w.preview is None:
                    w.preview = preview  # the newest preview still is: it goes with the next write
            if time.monotonic() - self._failure_logged > FAILURE_LOG_SECONDS:
                self._failure_logged = time.monotonic()
                log.warning("progress not recorded, Redis slow or unreachable (%s: %s); images are not affected",
                            type(exc).__name__, exc)
            return
        self._written.inc(written)
        if written < len(notes):
            self._stale.inc(len(notes) - written)

    def _encode_all(self, previews: Sequence[tuple[int, bytes]]) -> dict[int, bytes]:
        """Small WebPs of the providers' previews (in a thread); one that cannot be read is left out."""
        out = {}
        for i, data in previews:
            try:
                out[i] = self._encode(data)
            except ImageUnreadable as exc:
                log.debug("preview dropped: %s", exc)
            except Exception:
                log.warning("preview dropped: re-encoding it failed unexpectedly", exc_info=True)
        return out
