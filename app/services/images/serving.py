"""Serving a stored image to its owner: the object behind an image record, opened as a stream, or a
presigned URL to send the browser to; a vanished object or a store this process cannot see is
told apart in words."""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from app.services.images.base import (
    ImageStore,
    ObjectMissing,
    ObjectStream,
    StoreError,
    content_type_of,
    single_chunk,
)

LegacyReader = Callable[[str, int], Awaitable[bytes | None]]


class ImageGone(StoreError):
    """The record says the image exists, but its bytes cannot be had; `message` says why."""


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
        if thumbnail and self.record.get("tk"):
            return str(self.record["tk"])
        return str(self.record["k"])

    def content_type(self, thumbnail: bool) -> str:
        if self.in_redis:
            return str(self.record.get("ct") or "image/png")
        return content_type_of(self.key(thumbnail))


class ImageServer:
    """Opens image objects from the store (or, for old records, from Redis)."""

    def __init__(self, store: ImageStore, legacy: LegacyReader) -> None:
        self.store = store
        self.legacy = legacy
        self.store_id: str | None = None

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
        return await self.store.presigned_url(image.key(thumbnail), expires_seconds)

    async def open(self, image: ImageObject, thumbnail: bool, byte_range: tuple[int, int] | None) -> ObjectStream:
        """The image's bytes (its thumbnail's when asked and there is one). ImageGone when the object
        has vanished; StoreUnavailable when the store cannot be reached."""
        if image.in_redis:
            return await self._open_legacy(image, byte_range)
        key = image.key(thumbnail)
        try:
            return await self.store.open(key, byte_range)
        except ObjectMissing:
            raise ImageGone(await self._why_missing(image)) from None

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
