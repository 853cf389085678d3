"""Writing an image that has already cost GPU time: retried with back-off while the store is away,
the bytes kept in memory meanwhile, and given up only past a bound, with a clear error."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from app.services.images.base import ImageStore, StoredObject, StoreError, StoreUnavailable

BASE_DELAY_SECONDS = 0.2
MAX_DELAY_SECONDS = 5.0


class StoreUnreachable(StoreError):
    """The store stayed unavailable past the upload bound."""


async def put_retrying(
    store: ImageStore,
    key: str,
    data: bytes,
    content_type: str,
    *,
    give_up_after: float,
    on_retry: Callable[[int, StoreError], None] | None = None,
) -> StoredObject:
    """store.put, retried (exponential back-off with jitter) until it succeeds or `give_up_after`
    seconds have passed; then StoreUnreachable("image store unreachable: <the last error>")."""
    deadline = time.monotonic() + give_up_after
    attempt = 0
    while True:
        left = deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(0.5, left)):  # a store that hangs is a store that is down
                return await store.put(key, data, content_type)
        except (StoreUnavailable, TimeoutError) as exc:
            error = exc if isinstance(exc, StoreError) else StoreUnavailable(
                f"writing {key!r} to {store.location} timed out")
            attempt += 1
            delay = min(MAX_DELAY_SECONDS, BASE_DELAY_SECONDS * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            if time.monotonic() + delay >= deadline:
                raise StoreUnreachable(f"image store unreachable: {error.message}") from exc
            if on_retry is not None:
                on_retry(attempt, error)
            await asyncio.sleep(delay)
