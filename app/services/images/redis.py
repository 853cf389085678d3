"""Image bytes in Redis (`IMAGE_STORE=redis`): how imagequeue kept them before the store existed.

For small demos and tests only: every byte costs Redis memory for the queue's lifetime (a 1024x1024
PNG is about 2 MB). The objects of one queue share a hash, so removing the queue's prefix is one
DEL, and each hash carries an expiry as a backstop for the sweep.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import redis
from redis.asyncio import Redis

from app.services.images.base import (
    ObjectMissing,
    ObjectStream,
    StoredObject,
    StoreUnavailable,
    check_key,
    check_prefix,
    content_type_of,
    first_line,
    single_chunk,
)

OBJECTS_PREFIX = "iq:obj:"


def _split(key: str) -> tuple[str, str]:
    """"<queue id>/<name>" -> the queue's hash ("iq:obj:{<queue id>}") and the field."""
    group, _, name = check_key(key).partition("/")
    if not name:
        group, name = "", key
    return f"{OBJECTS_PREFIX}{{{group}}}", name


def _etag(data: bytes) -> str:
    return f'"{len(data):x}-{zlib.crc32(data):08x}"'


class RedisStore:
    """Objects as fields of one hash per top-level key segment (a queue id)."""

    kind = "redis"

    def __init__(self, client: Redis, *, max_age_seconds: int) -> None:
        self.redis = client
        self.max_age_seconds = max_age_seconds

    @property
    def location(self) -> str:
        return "redis"

    def _fail(self, exc: Exception, what: str, key: str) -> StoreUnavailable:
        return StoreUnavailable(f"{what} {key!r} in Redis failed: {first_line(str(exc))}")

    async def put(self, key: str, data: bytes, content_type: str) -> StoredObject:
        group, name = _split(key)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(group, name, data)
                pipe.expire(group, self.max_age_seconds)
                await pipe.execute()
        except redis.RedisError as exc:
            raise self._fail(exc, "writing", key) from exc
        return StoredObject(key, len(data), content_type, _etag(data))

    async def get(self, key: str) -> bytes:
        group, name = _split(key)
        try:
            value: Any = await self.redis.hget(group, name)
        except redis.RedisError as exc:
            raise self._fail(exc, "reading", key) from exc
        if value is None:
            raise ObjectMissing(f"no object {key!r} in Redis")
        return value.encode() if isinstance(value, str) else bytes(value)

    async def open(self, key: str, byte_range: tuple[int, int] | None = None) -> ObjectStream:
        data = await self.get(key)  # Redis hands a value over whole: nothing to stream
        start, stop = byte_range if byte_range is not None else (0, len(data))
        stop = min(stop, len(data))
        return ObjectStream(key, len(data), content_type_of(key), _etag(data), start, stop,
                            single_chunk(data[start:stop]))

    async def exists(self, key: str) -> bool:
        group, name = _split(key)
        try:
            return bool(await self.redis.hexists(group, name))
        except redis.RedisError as exc:
            raise self._fail(exc, "looking up", key) from exc

    async def delete(self, keys: Sequence[str]) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hdel(*_split(key))
                await pipe.execute()
        except redis.RedisError as exc:
            raise self._fail(exc, "deleting", keys[0] if keys else "") from exc

    async def delete_prefix(self, prefix: str) -> int:
        group, rest = _split(check_prefix(prefix) + "x")
        rest = rest[:-1]
        try:
            if not rest:
                removed = int(await self.redis.hlen(group))
                await self.redis.delete(group)
                return removed
            fields: list[Any] = await self.redis.hkeys(group)
            names = [f for f in fields if (f.decode() if isinstance(f, bytes) else f).startswith(rest)]
            if names:
                await self.redis.hdel(group, *names)
            return len(names)
        except redis.RedisError as exc:
            raise self._fail(exc, "deleting", prefix) from exc

    async def presigned_url(self, key: str, expires_seconds: int) -> str | None:
        return None

    async def identity(self) -> str:
        return "redis"  # every process of a deployment shares its one Redis

    async def check(self) -> None:
        try:
            await self.redis.ping()
        except redis.RedisError as exc:
            raise StoreUnavailable(f"Redis unreachable: {first_line(str(exc))}") from exc

    async def aclose(self) -> None:
        return None  # the client belongs to whoever passed it in
