"""Images in any S3-compatible object store (`s3://bucket/prefix`): AWS S3, R2, MinIO, SeaweedFS, Garage.

The client is obstore (Rust's object_store under a thin Python layer): native async, so it runs on
the worker's own event loop, about a quarter of aiobotocore's CPU per 2.6 MB upload here and one
dependency-free wheel (BENCHMARKS.md). Credentials come from the standard AWS variables.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any

import obstore
from obstore.store import S3Store as _ObjectStore

from app.services.images.base import (
    MARKER_KEY,
    READ_CHUNK_BYTES,
    ObjectMissing,
    ObjectStream,
    StoredObject,
    StoreUnavailable,
    check_key,
    check_prefix,
    content_type_of,
    first_line,
)

DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes
REQUEST_TIMEOUT = timedelta(seconds=30)
CONNECT_TIMEOUT = timedelta(seconds=5)
# The client's own retries are kept short: the upload path retries with its own bound (upload.py),
# and a reader would rather get an answer than wait minutes.
CLIENT_RETRIES: Any = {"max_retries": 2, "retry_timeout": timedelta(seconds=10),
                       "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2)}}


def parse_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    rest = url.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket or rest == url:
        raise ValueError(f"IMAGE_STORE={url!r}: expected s3://bucket or s3://bucket/prefix")
    return bucket, prefix.strip("/")


class S3Store:
    """Objects in one bucket, under an optional prefix."""

    kind = "s3"

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        public_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
    ) -> None:
        self.bucket, self.prefix = parse_url(url)
        self.endpoint_url = endpoint_url
        config: dict[str, Any] = {"region": region or "us-east-1"}
        if access_key_id and secret_access_key:
            config.update(access_key_id=access_key_id, secret_access_key=secret_access_key)
        self._store = self._client(endpoint_url, config)
        # URLs handed to browsers are signed for the endpoint as browsers reach it.
        self._signer = self._client(public_url, config) if public_url else None

    def _client(self, endpoint: str | None, config: dict[str, Any]) -> _ObjectStore:
        options: Any = {"timeout": REQUEST_TIMEOUT, "connect_timeout": CONNECT_TIMEOUT}
        extra: dict[str, Any] = {}
        if endpoint:
            options["allow_http"] = endpoint.startswith("http://")
            extra = {"endpoint": endpoint.rstrip("/"), "virtual_hosted_style_request": False}
        return _ObjectStore(self.bucket, prefix=self.prefix or None, client_options=options,
                            retry_config=CLIENT_RETRIES, **config, **extra)

    @property
    def location(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return f"{where} at {self.endpoint_url}" if self.endpoint_url else where

    def _fail(self, exc: Exception, what: str, key: str) -> Exception:
        if isinstance(exc, FileNotFoundError):
            return ObjectMissing(f"no object {key!r} in {self.location}")
        return StoreUnavailable(f"{what} {key!r} in {self.location} failed: {first_line(str(exc))}")

    # -- write ------------------------------------------------------------------------------
    async def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        check_key(key)
        try:
            result = await obstore.put_async(self._store, key, data, attributes={"Content-Type": content_type})
        except Exception as exc:
            raise self._fail(exc, "writing", key) from exc
        return StoredObject(key, len(data), content_type, result.get("e_tag") or "")

    # -- read -------------------------------------------------------------------------------
    async def open(self, key: str, byte_range: tuple[int, int] | None = None) -> ObjectStream:
        check_key(key)
        options: Any = {"range": byte_range} if byte_range is not None else None
        try:
            result = await obstore.get_async(self._store, key, options=options)
        except Exception as exc:
            raise self._fail(exc, "reading", key) from exc
        meta = result.meta
        start, stop = result.range
        content_type = str(result.attributes.get("Content-Type") or content_type_of(key))
        return ObjectStream(key, int(meta["size"]), content_type, meta.get("e_tag") or "", start, stop,
                            self._chunks(result, key))

    async def _chunks(self, result: obstore.GetResult, key: str) -> AsyncIterator[bytes]:
        try:
            async for chunk in result.stream(min_chunk_size=READ_CHUNK_BYTES):
                yield bytes(chunk)
        except Exception as exc:
            raise self._fail(exc, "reading", key) from exc

    async def get(self, key: str) -> bytes:
        stream = await self.open(key)
        return await stream.read()

    async def exists(self, key: str) -> bool:
        check_key(key)
        try:
            await obstore.head_async(self._store, key)
        except FileNotFoundError:
            return False
        except Exception as exc:
            raise self._fail(exc, "looking up", key) from exc
        return True

    # -- delete -----------------------------------------------------------------------------
    async def delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            check_key(key)
        for i in range(0, len(keys), DELETE_BATCH):
            batch = list(keys[i : i + DELETE_BATCH])
            try:
                await obstore.delete_async(self._store, batch)
            except FileNotFoundError:
                pass
            except Exception as exc:
                raise self._fail(exc, "deleting", batch[0]) from exc

    async def delete_prefix(self, prefix: str) -> int:
        check_prefix(prefix)
        removed = 0
        try:
            stream = obstore.list(self._store, prefix, chunk_size=DELETE_BATCH)
            async for chunk in stream:
                keys = [meta["path"] for meta in chunk]
                if keys:
                    await self.delete(keys)
                    removed += len(keys)
        except StoreUnavailable:
            raise
        except Exception as exc:
            raise self._fail(exc, "listing", prefix) from exc
        return removed

    # -- the store as a whole ---------------------------------------------------------------
    async def presigned_url(self, key: str, expires_seconds: int) -> str | None:
        if self._signer is None:
            return None
        check_key(key)
        return await obstore.sign_async(self._signer, "GET", key, timedelta(seconds=expires_seconds))

    async def identity(self) -> str:
        """A random id kept in a marker object under the prefix, written by the first process to start:
        processes that reach the same bucket through different endpoint names still agree."""
        found = await self._marker()
        if found:
            return found
        mine = uuid.uuid4().hex
        try:
            await obstore.put_async(self._store, MARKER_KEY, mine.encode(), mode="create")
        except FileExistsError:
            pass  # another process wrote it first: its id is the store's
        except Exception as exc:
            if "precondition" not in str(exc).lower() and "not implemented" not in str(exc).lower():
                raise self._fail(exc, "writing", MARKER_KEY) from exc
            # A store without conditional writes: last writer wins, and everyone re-reads below.
            await obstore.put_async(self._store, MARKER_KEY, mine.encode())
        return await self._marker() or mine

    async def _marker(self) -> str | None:
        try:
            result = await obstore.get_async(self._store, MARKER_KEY)
            return bytes(await result.bytes_async()).decode().strip()
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._fail(exc, "reading", MARKER_KEY) from exc

    async def check(self) -> None:
        await self.identity()

    async def aclose(self) -> None:
        return None
