"""Serving a stored image to its owner: the object behind an image record, opened as a stream, or a
presigned URL to send the browser to; a vanished object or a store this process cannot see is
told apart in words. A thumbnail the worker did not make (it makes none for images kept as the
provider sent them) is made here when first asked for, stored beside the image, and served from
the store from then on."""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from app.services.images.base import (
    ImageStore,
    ObjectMissing,
    ObjectStream,
    StoreError,
    content_type_of,
    single_chunk,
    thumbnail_key,
)
from app.services.images.encoding import ImageUnreadable, thumbnail_webp

log = logging.getLogger("imagequeue.images")

THUMBNAIL_TYPE = "image/webp"
KNOWN_THUMBNAILS = 100_000  # thumbnails this process knows exist (so it need not look again)
THUMBNAILS_AT_ONCE = 4  # made at the same time by one API process: each holds its image in memory
THUMBNAILS_PER_QUEUE = 2  # of those, for one queue: a grid of 1,000 new tiles leaves room for others
THUMBNAIL_WAIT_SECONDS = 30.0  # a request's wait for its thumbnail by default (Settings.thumbnail_wait_seconds)

LegacyReader = Callable[[str, int], Awaitable[bytes | None]]
Written = Callable[[str], Awaitable[None]]
"""Called with a queue's id after this process wrote an object of it (a thumbnail)."""


class ImageGone(StoreError):
    """The record says the image exists, but its bytes cannot be had; `message` says why."""


class ThumbnailBusy(StoreError):
    """The thumbnail is being made but not ready within THUMBNAIL_WAIT_SECONDS; asking again will find it."""


@dataclass(frozen=True, slots=True)
class ImageObject:
    """One succeeded image as its record describes it."""

    queue_id: str
    index: int
    attempt: int
    record: Mapping[str, Any]

    @property
    def in_redis(self) -> bool:
        """Written before the image store existed: the bytes are in Redis beside the record."""
        return "k" not in self.record

    def key(self, thumbnail: bool) -> str:
        """The image's key, or its thumbnail's as the worker stored it (the image's when it made none)."""
        if thumbnail and self.record.get("tk"):
            return str(self.record["tk"])
        return str(self.record["k"])

    def content_type(self, thumbnail: bool) -> str:
        if self.in_redis:
            return str(self.record.get("ct") or "image/png")
        return content_type_of(self.key(thumbnail))


class ImageServer:
    """Opens image objects from the store (or, for old records, from Redis)."""

    def __init__(self, store: ImageStore, legacy: LegacyReader, written: Written | None = None, *,
                 thumbnail_wait: float = THUMBNAIL_WAIT_SECONDS) -> None:
        self.store = store
        self.thumbnail_wait = thumbnail_wait  # a request waits this long for its thumbnail, then gets a 503
        self.legacy = legacy
        self.written = written
        self.store_id: str | None = None
        # Thumbnail key -> the key to serve for it: itself once made or found, or the image's own key
        # when the image could not be read as one (not tried again).
        self._thumbnails: OrderedDict[str, str] = OrderedDict()
        self._making: dict[str, asyncio.Future[str]] = {}
        self._thumbnail_slots = asyncio.Semaphore(THUMBNAILS_AT_ONCE)
        self._queue_slots: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}  # queue -> (slots, [users])
        # Decoding has threads of its own, so file streaming (the default executor) never waits behind it.
        self._decoder = ThreadPoolExecutor(THUMBNAILS_AT_ONCE, thread_name_prefix="thumbnail")

    def close(self) -> None:
        self._decoder.shutdown(wait=False, cancel_futures=True)

    async def identify(self) -> str | None:
        if self.store_id is None:
            try:
                self.store_id = await self.store.identity()
            except StoreError:
                return None
        return self.store_id

    async def presigned_url(self, image: ImageObject, thumbnail: bool, expires_seconds: int) -> str | None:
        if image.in_redis:
            return None
        key = await self._key(image, thumbnail)
        return await self.store.presigned_url(key, expires_seconds)

    async def open(self, image: ImageObject, thumbnail: bool, byte_range: tuple[int, int] | None) -> ObjectStream:
        """The image's bytes (its thumbnail's when asked). ImageGone when the object has vanished;
        StoreUnavailable when the store cannot be reached."""
        if image.in_redis:
            return await self._open_legacy(image, byte_range)
        key = await self._key(image, thumbnail)
        try:
            return await self.store.open(key, byte_range)
        except ObjectMissing:
            self._thumbnails.pop(key, None)
            raise ImageGone(await self._why_missing(image)) from None

    async def _key(self, image: ImageObject, thumbnail: bool) -> str:
        return await self._thumbnail_key(image) if thumbnail else image.key(False)

    async def _thumbnail_key(self, image: ImageObject) -> str:
        """The key of the image's thumbnail: the worker's, or one made now (once, however many ask at
        the same moment). The image's own key when its bytes cannot be read as an image."""
        if image.record.get("tk"):
            return image.key(True)  # the worker made it
        key = thumbnail_key(image.queue_id, image.index, image.attempt)
        known = self._thumbnails.get(key)
        if known is not None:
            return known
        making = self._making.get(key)
        if making is None:
            making = asyncio.ensure_future(self._make_thumbnail(image, key))
            self._making[key] = making
            making.add_done_callback(lambda done: self._made(key, done))
        try:
            async with asyncio.timeout(self.thumbnail_wait):
                return await asyncio.shield(making)
        except TimeoutError:  # the thumbnail goes on being made, for the retry
            raise ThumbnailBusy(f"the thumbnail of image {image.queue_id}/{image.index} is still being made "
                                "(many are asked for at once): try again in a few seconds") from None

    def _made(self, key: str, done: asyncio.Future[str]) -> None:
        """A making ended. Its failure is read here, since every request that waited for it may have
        given up (ThumbnailBusy) and none would; the next request tries again."""
        self._making.pop(key, None)
        if not done.cancelled() and (exc := done.exception()) is not None:
            log.warning("making thumbnail %s failed: %s", key, getattr(exc, "message", None) or repr(exc))

    async def _make_thumbnail(self, image: ImageObject, key: str) -> str:
        """At most THUMBNAILS_AT_ONCE in this process, THUMBNAILS_PER_QUEUE of them for one queue. A
        making is never cut short (its thread could not be stopped, and a thumbnail written but not
        told to the sweep would be left behind): the store's own timeouts bound it."""
        slots, users = self._queue_slots.setdefault(
            image.queue_id, (asyncio.Semaphore(THUMBNAILS_PER_QUEUE), [0]))
        users[0] += 1
        try:
            async with slots, self._thumbnail_slots:
                return await self._make_thumbnail_now(image, key)
        finally:
            users[0] -= 1
            if not users[0]:
                del self._queue_slots[image.queue_id]

    async def _make_thumbnail_now(self, image: ImageObject, key: str) -> str:
        served = key
        if not await self.store.exists(key):
            try:
                data = await self.store.get(image.key(False))
            except ObjectMissing:
                raise ImageGone(await self._why_missing(image)) from None
            try:
                thumb = await asyncio.get_running_loop().run_in_executor(self._decoder, thumbnail_webp, data)
            except ImageUnreadable as exc:
                log.warning("no thumbnail for image %s/%s: %s", image.queue_id, image.index, exc)
                served = image.key(False)
            else:
                await self.store.put(key, thumb, THUMBNAIL_TYPE)
                if self.written is not None:
                    # The queue may have been deleted or swept while this was made: its objects are
                    # looked at again, so this one is not left behind.
                    await self.written(image.queue_id)
        self._thumbnails[key] = served
        if len(self._thumbnails) > KNOWN_THUMBNAILS:
            self._thumbnails.popitem(last=False)
        return served

    async def _why_missing(self, image: ImageObject) -> str:
        written_to = str(image.record.get("sid") or "")
        mine = await self.identify()
        if written_to and mine and written_to != mine:
            return (f"image {image.queue_id}/{image.index} was written to an image store this API cannot see "
                    f"(store id {written_to[:8]}; this API reads {self.store.location}, store id {mine[:8]}): "
                    "give the API and every worker the same IMAGE_STORE on shared storage")
        return (f"image {image.queue_id}/{image.index} is no longer in the image store ({self.store.location}): "
                "it was removed or expired")

    async def _open_legacy(self, image: ImageObject, byte_range: tuple[int, int] | None) -> ObjectStream:
        data = await self.legacy(image.queue_id, image.index)
        if data is None:
            raise ImageGone(f"image {image.queue_id}/{image.index} is no longer in Redis: it expired")
        start, stop = byte_range if byte_range is not None else (0, len(data))
        stop = min(stop, len(data))
        etag = f'"{len(data):x}-{zlib.crc32(data):08x}"'
        return ObjectStream(f"{image.queue_id}/{image.index}", len(data), image.content_type(False), etag, start,
                            stop, single_chunk(data[start:stop]))
