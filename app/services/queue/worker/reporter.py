"""The reporter: finished images' outcomes go to the store in batched, pipelined round trips."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import redis

from app.core.config import Settings
from app.services.queue.states import Outcome
from app.services.queue.store import Claim, QueueStore, Report

log = logging.getLogger("imagequeue.worker")

REPORT_ATTEMPTS = 30
REPORT_BATCH = 64
REPORT_RETRY_SECONDS = 1.0  # the pause after a failed report grows by this much per attempt
REPORT_RETRY_MAX_SECONDS = 5.0
ERROR_MAX_CHARS = 2000  # of a failed image's error message


class Reporter:
    """Sends the completions that arrive together in one pipelined round trip: images of a busy
    worker finish in bursts, and one round trip each would hold the slots up."""

    def __init__(self, store: QueueStore, settings: Settings, worker_name: str) -> None:
        self.store = store
        self.settings = settings
        self.worker_name = worker_name
        self._reports: asyncio.Queue[tuple[Report, asyncio.Future[str]]] = asyncio.Queue()

    async def report(self, claim: Claim, outcome: Outcome, error: str, record: Mapping[str, Any] | None) -> str:
        """Settle one image (`record`: where a succeeded image's bytes are); returns the store's
        answer ("lost" when it could not be sent)."""
        report = Report(claim, outcome, clean_text(error[:ERROR_MAX_CHARS]), record)
        loop = asyncio.get_running_loop()
        extra = {"worker": self.worker_name, "queue_id": claim.queue_id, "image": claim.index}
        for attempt in range(REPORT_ATTEMPTS):
            done: asyncio.Future[str] = loop.create_future()
            await self._reports.put((report, done))
            try:
                return await done
            except redis.RedisError as exc:
                # Keep the result while Redis is away; if the lease lapses meanwhile another worker
                # re-runs the image and this report is discarded as stale.
                log.warning("report failed (%s), retrying", exc, extra=extra)
                await asyncio.sleep(min(REPORT_RETRY_MAX_SECONDS, REPORT_RETRY_SECONDS * (attempt + 1)))
            except Exception:
                # Not Redis being away but this report itself: sending it again would fail again. Its
                # lease is no longer renewed, so the image runs again elsewhere (or fails as lost).
                log.exception("report could not be sent; the image will run again", extra=extra)
                return "lost"
        return "lost"

    async def run(self) -> None:
        """The loop that sends what report() queued, as long as the worker runs. Whatever happens to a
        batch, every image waiting on it hears back."""
        while True:
            batch = [await self._reports.get()]
            while len(batch) < REPORT_BATCH and not self._reports.empty():
                batch.append(self._reports.get_nowait())
            results: list[str | BaseException] | None = None
            try:
                results = list(await self._send([r for r, _ in batch]))
            except (redis.RedisError, OSError) as exc:
                results = [_as_redis_error(exc)] * len(batch)
            except Exception:
                # A bug or an odd report, not Redis: find out which by sending them one at a time.
                log.exception("report batch failed; sending its reports one by one", extra={"worker": self.worker_name})
                results = [await self._send_alone(report) for report, _ in batch]
            finally:
                if results is None:  # cancelled (the worker stops): nobody may wait forever on this batch
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(redis.ConnectionError("the reporter stopped"))
            for (_, done), result in zip(batch, results, strict=True):
                if done.done():
                    continue
                if isinstance(result, BaseException):
                    done.set_exception(result)
                else:
                    done.set_result(result)

    async def _send(self, reports: list[Report]) -> Sequence[str]:
        s = self.settings
        return await self.store.complete_many(
            reports, ttl=s.queue_ttl_seconds, user_ttl=s.queue_ttl_seconds + s.queue_safety_ttl_seconds
        )

    async def _send_alone(self, report: Report) -> str | BaseException:
        try:
            return (await self._send([report]))[0]
        except (redis.RedisError, OSError) as exc:
            return _as_redis_error(exc)
        except Exception as exc:
            return exc


def _as_redis_error(exc: Exception) -> redis.RedisError:
    return exc if isinstance(exc, redis.RedisError) else redis.ConnectionError(str(exc))


def clean_text(text: str) -> str:
    """Text as it can be stored: characters that are not valid Unicode (lone surrogates) become '?'."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text
