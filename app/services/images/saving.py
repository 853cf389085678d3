"""Keeping one generated image: encoded as asked, written with its thumbnail, described by a record.

The record (a few hundred bytes) is all Redis keeps of the image: where its bytes are, their size
and type, the picture's dimensions, its thumbnail, and which store holds them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.services.images.base import ImageStore, StoreError, image_key, thumbnail_key
from app.services.images.encoding import OutputFormat, encode_async
from app.services.images.serving import THUMBNAIL_TYPE
from app.services.images.upload import put_retrying


@dataclass(frozen=True, slots=True)
class SavedImage:
    key: str
    size: int
    content_type: str
    width: int
    height: int
    thumbnail_key: str | None
    store_id: str

    def record(self) -> dict[str, Any]:
        """The image record's fields (short names: every byte is kept per image for the queue's life)."""
        fields: dict[str, Any] = {"k": self.key, "n": self.size, "ct": self.content_type, "iw": self.width,
                                  "ih": self.height, "sid": self.store_id}
        if self.thumbnail_key:
            fields["tk"] = self.thumbnail_key
        return fields


async def save_image(
    store: ImageStore,
    *,
    store_id: str,
    queue_id: str,
    index: int,
    attempt: int,
    data: bytes,
    output_format: OutputFormat = "png",
    quality: int | None = None,
    give_up_after: float,
    on_retry: Callable[[int, StoreError], None] | None = None,
    thumbnail: bool | None = None,
) -> SavedImage:
    """Encodes (in a thread) and writes the image, then its thumbnail, retrying while the store is
    away for at most `give_up_after` seconds in all. Raises ImageUnreadable or StoreUnreachable.
    The thumbnail is made here only where the image was decoded anyway (`thumbnail` None: see
    encoding.encode); otherwise the API makes it on first request (serving.py)."""
    deadline = time.monotonic() + give_up_after
    encoded = await encode_async(data, output_format, quality, thumbnail=thumbnail)
    key = image_key(queue_id, index, attempt, encoded.content_type)
    stored = await put_retrying(store, key, encoded.data, encoded.content_type,
                                give_up_after=max(0.0, deadline - time.monotonic()), on_retry=on_retry)
    thumb = None
    if encoded.thumbnail is not None:
        thumb = thumbnail_key(queue_id, index, attempt)
        await put_retrying(store, thumb, encoded.thumbnail, THUMBNAIL_TYPE,
                           give_up_after=max(0.0, deadline - time.monotonic()), on_retry=on_retry)
    return SavedImage(key, stored.size, encoded.content_type, encoded.width, encoded.height, thumb, store_id)
