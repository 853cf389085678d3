"""Running one claimed image: its queue's spec, the provider request, the call and its outcome."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import redis

from app.core.config import Settings
from app.core.metrics import WorkerMetrics
from app.services.image_service import ImageService
from app.services.images import ImageUnreadable, StoreUnreachable
from app.services.models import Catalog
from app.services.providers.base import ImageRequest, ProviderError, ProviderRejected
from app.services.queue.states import Discarded, Outcome
from app.services.queue.store import Claim, QueueStore
from app.services.queue.worker.objects import ImageKeeper
from app.services.queue.worker.progress import ProgressWriter
from app.services.queue.worker.reporter import Reporter
from app.services.queue.worker.slots import Running, Slots

log = logging.getLogger("imagequeue.worker")

SPEC_CACHE_SIZE = 256
PROVIDER_NOTE_SECONDS = 1.0  # at most one provider health note per model and outcome this often
INTERRUPT_SECONDS = 2  # how long a cancelled image's provider gets to stop its job


class Execution:
    """Runs claimed images, each as a task in a slot, to an outcome that goes to the reporter."""

    def __init__(
        self,
        *,
        settings: Settings,
        catalog: Catalog,
        store: QueueStore,
        services: Mapping[str, ImageService],
        slots: Slots,
        reporter: Reporter,
        keeper: ImageKeeper,
        metrics: WorkerMetrics,
        worker_name: str,
        progress: ProgressWriter | None = None,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.store = store
        self.services = services
        self.slots = slots
        self.reporter = reporter
        self.keeper = keeper
        self.metrics = metrics
        self.worker_name = worker_name
        self.progress = progress  # None: nobody listens, providers report no progress
        self._specs: dict[str, dict[str, Any]] = {}
        self._health_noted: dict[tuple[str, bool], float] = {}

    def start(self, claim: Claim) -> None:
        """Take a slot for a claimed image and start generating it."""
        run = self.slots.take(claim)
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

    def _request(self, claim: Claim, model: str, spec: dict[str, Any]) -> ImageRequest:
        config = self.catalog.models[model]
        return ImageRequest(
            prompt=spec["prompts"][claim.index // int(spec["count"])],
            seed=int(spec["seed"]) + claim.index,
            width=int(spec["width"]),
            height=int(spec["height"]),
            negative_prompt=spec.get("negative_prompt"),
            params={**config.params, **spec["params"]},
            model=config.provider_model,
            request_id=f"{claim.queue_id}:{claim.index}",
        )

    async def _run(self, run: Running) -> None:
        claim = run.claim
        outcome, error, blob = Outcome.FAILED, "", b""
        spec: dict[str, Any] = {}
        reserved = False
        extra: dict[str, Any] = {
            "queue_id": claim.queue_id,
            "image": claim.index,
            "worker": self.worker_name,
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
            refusal = self.keeper.refusal()
            if refusal is not None:
                raise ProviderError(refusal)  # not generated at all: nobody could be shown the image
            request = self._request(claim, run.model, spec)
            if self.settings.log_prompts:
                extra["prompt"] = request.prompt
            if self.progress is not None:
                request = dataclasses.replace(request, on_progress=self.progress.watch(claim))
            try:
                image = await service.generate(request)
            except ProviderError as exc:
                if not isinstance(exc, ProviderRejected) or exc.retryable:
                    await self._note_provider(run.model, False, exc.message)
                raise
            finally:
                if self.progress is not None:
                    self.progress.forget(claim)
            await self._note_provider(run.model, True)
            outcome, blob = Outcome.SUCCEEDED, image.data
            # Room to keep it while it uploads; a store that is down makes this wait, which stops
            # the slot from freeing (a cancel meanwhile discards the image).
            await self.keeper.reserve()
            reserved = True
        except asyncio.CancelledError:
            run.stopped = True  # from here on no further cancel may cut the report short
            outcome = Outcome.REQUEUE if run.reason == "shutdown" else Outcome.CANCELLED
            if service is not None and request is not None and run.reason == "cancel":
                try:
                    await asyncio.wait_for(service.interrupt(request), INTERRUPT_SECONDS)
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
        self.slots.release(run)
        record = None
        try:
            if reserved:
                try:
                    record = await self.keeper.save(claim, spec, blob)
                except (StoreUnreachable, ImageUnreadable) as exc:
                    # Never generated again for this: the image fails with the store's words.
                    outcome, error = Outcome.FAILED, str(exc)
                except Exception as exc:
                    log.exception("storing the image failed unexpectedly", extra=extra)
                    outcome, error = Outcome.FAILED, f"internal error: {type(exc).__name__}: {exc}"
                finally:
                    blob = b""
                    self.keeper.unreserve()
            result = await self.reporter.report(claim, outcome, error, record)
            if record is not None and result in (Discarded.STALE, Discarded.GONE):
                await self.keeper.discard(record)  # a stale attempt's objects are nobody's
        finally:
            self.slots.settle(run)
        self.slots.images_done += 1
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
                **({"discarded": result} if result in tuple(Discarded) else {}),
            },
        )

    async def _note_provider(self, model: str, ok: bool, error: str = "") -> None:
        """Tells the API (GET /models) how the provider does; at most once a second per model and outcome."""
        now = time.monotonic()
        if now - self._health_noted.get((model, ok), 0.0) < PROVIDER_NOTE_SECONDS:
            return
        self._health_noted[(model, ok)] = now
        with contextlib.suppress(redis.RedisError):
            await self.store.record_provider(model, ok, error)
