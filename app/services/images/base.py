"""The image store's contract: what every backend (file, s3, redis) does, the errors it raises, and
how objects are named.

An object is immutable once written: a new attempt at an image gets a new key, so readers may cache
forever and a late write from a worker presumed dead never overwrites the current image. Every
object of a queue lives under the queue's prefix, so removing a queue removes one prefix.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

MAX_KEY_LENGTH = 512
READ_CHUNK_BYTES = 256 * 1024  # streamed reads hand out chunks of about this size
MARKER_KEY = ".imagequeue-store-id"  # names the store, so processes can tell whether they share one
_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$")
CONTENT_TYPES = {"png": "image/png", "webp": "image/webp", "jpg": "image/jpeg", "jpeg": "image/jpeg"}
EXTENSIONS = {"image/png": "png", "image/webp": "webp", "image/jpeg": "jpg"}


class StoreError(Exception):
    """The image store failed; `message` says how, in words an operator can act on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class StoreUnavailable(StoreError):
    """The store could not be reached, or answered with an error (worth retrying)."""


class ObjectMissing(StoreError):
    """No object under this key (never written, deleted, or expired)."""


class RangeNotSatisfiable(ValueError):
    """A Range header that asks for bytes the object does not have."""

    def __init__(self, size: int) -> None:
        super().__init__(f"range not satisfiable (the object has {size} bytes)")
        self.size = size


@dataclass(frozen=True, slots=True)
class StoredObject:
    """What a write produced."""

    key: str
    size: int
    content_type: str
    etag: str


@dataclass(slots=True)
class ObjectStream:
    """An object being read: its metadata, the byte range being served (`start` to `stop`,
    exclusive; the whole object unless a range was asked for) and the bytes, as chunks."""

    key: str
    size: int
    content_type: str
    etag: str
    start: int
    stop: int
    chunks: AsyncIterator[bytes]
    closer: Callable[[], object] | None = None  # releases what the reader holds (idempotent)

    @property
    def partial(self) -> bool:
        return self.start > 0 or self.stop < self.size

    async def read(self) -> bytes:
        """All the (remaining) bytes; for small objects and tests."""
        try:
            parts = [chunk async for chunk in self.chunks]
        finally:
            await self.aclose()
        return b"".join(parts)

    async def aclose(self) -> None:
        aclose = getattr(self.chunks, "aclose", None)
        if aclose is not None:
            await aclose()
        if self.closer is not None:
            self.closer()


class ImageStore(Protocol):
    """Where image bytes live. Keys are relative paths (see `check_key`)."""

    kind: str  # "file" | "s3" | "redis"

    @property
    def location(self) -> str:
        """Where the bytes go, for logs and /health (no credentials)."""
        ...

    async def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        """Writes an object whole: readers see all of it or nothing."""
        ...

    async def open(self, key: str, byte_range: tuple[int, int] | None = None) -> ObjectStream:
        """Streams an object, or the bytes `start` to `stop` (exclusive) of it; ObjectMissing when absent."""
        ...

    async def get(self, key: str) -> bytes: ...

    async def exists(self, key: str) -> bool: ...

    async def delete(self, keys: Sequence[str]) -> None:
        """Removes objects; absent ones are no error."""
        ...

    async def delete_prefix(self, prefix: str) -> int:
        """Removes every object whose key starts with `prefix` (ending in "/"); returns how many."""
        ...

    async def presigned_url(self, key: str, expires_seconds: int) -> str | None:
        """A URL a browser can GET the object from without credentials, or None when the store has none."""
        ...

    async def identity(self) -> str:
        """An id of this store, the same for every process that sees the same bytes."""
        ...

    async def check(self) -> None:
        """Raises StoreUnavailable when the store cannot be read and written."""
        ...

    async def aclose(self) -> None: ...


async def single_chunk(data: bytes) -> AsyncIterator[bytes]:
    """The chunks of a value that was read whole."""
    yield data


def check_key(key: str) -> str:
    """Refuses keys that could escape the store's root or name something unexpected."""
    if len(key) > MAX_KEY_LENGTH or not _KEY.match(key) or any(part in (".", "..") for part in key.split("/")):
        raise ValueError(f"invalid object key {key!r}")
    return key


def check_prefix(prefix: str) -> str:
    """A prefix names a whole "directory": at least one segment, ending in "/"."""
    if not prefix.endswith("/"):
        raise ValueError(f"prefix {prefix!r} must end in '/'")
    check_key(prefix[:-1])
    return prefix


def content_type_of(key: str) -> str:
    return CONTENT_TYPES.get(key.rsplit(".", 1)[-1].lower(), "application/octet-stream")


def queue_prefix(queue_id: str) -> str:
    return f"{queue_id}/"


def image_key(queue_id: str, index: int, attempt: int, content_type: str) -> str:
    """One attempt at one image of a queue: a retried or re-run image never overwrites an earlier one."""
    return f"{queue_id}/{index}-{attempt}.{EXTENSIONS.get(content_type, 'bin')}"


def thumbnail_key(queue_id: str, index: int, attempt: int) -> str:
    return f"{queue_id}/{index}-{attempt}.thumb.webp"


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (start, stop) of a single-range `Range: bytes=…` header, or None to serve the whole object
    (no header, a unit other than bytes, several ranges, or a malformed one, as RFC 9110 allows).
    Raises RangeNotSatisfiable when the range lies past the end."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, sep, last = header[len("bytes=") :].strip().partition("-")
    if not sep or not (first.isdigit() or last.isdigit()) or (first and not first.isdigit()):
        return None
    if last and not last.isdigit():
        return None
    if not first:  # the last N bytes
        suffix = int(last)
        if suffix == 0:
            raise RangeNotSatisfiable(size)
        return max(0, size - suffix), size
    start = int(first)
    stop = size if not last else min(size, int(last) + 1)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(size)
    return start, stop


def first_line(text: str, limit: int = 300) -> str:
    """A client library's error as one short line (some put a whole debug dump in their message)."""
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line[:limit]
