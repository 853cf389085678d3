"""The worker's HTTP transport to providers: several small connection pools instead of one large one.

httpcore's pool re-examines every connection (and, for each idle one, every other) whenever a
request starts or ends, so its cost per request grows with the square of the connections it holds:
at 32 generations in flight it was the worker's largest CPU cost per image. Shards of a few
connections each, a request going to the shard with the fewest in flight, keep that cost small and
flat whatever the concurrency.
"""

from __future__ import annotations

import math
import urllib.request
from collections.abc import AsyncIterator

import httpx

CONNECTIONS_PER_SHARD = 4


def provider_client(concurrency: int, timeout: float) -> httpx.AsyncClient:
    """The client a worker's providers (and webhooks) share: room for `concurrency` requests in
    flight and as many more. With a proxy in the environment, httpx's own client, which honours it (a
    lone NO_PROXY names no proxy)."""
    connections = max(10, concurrency * 2)
    if any(scheme != "no" for scheme in urllib.request.getproxies()):
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=concurrency)
        return httpx.AsyncClient(limits=limits, timeout=timeout)
    return httpx.AsyncClient(transport=ShardedTransport(connections), timeout=timeout)


class ShardedTransport(httpx.AsyncBaseTransport):
    """Up to `connections` connections in shards of CONNECTIONS_PER_SHARD, each its own httpx pool
    (keep-alive for all of them: a connection closed for being surplus is one opened again soon)."""

    def __init__(self, connections: int, per_shard: int = CONNECTIONS_PER_SHARD) -> None:
        shards = max(1, math.ceil(connections / per_shard))
        limits = httpx.Limits(max_connections=per_shard, max_keepalive_connections=per_shard)
        self._shards = [httpx.AsyncHTTPTransport(limits=limits) for _ in range(shards)]
        self._in_flight = [0] * shards

    @property
    def in_flight(self) -> list[int]:
        """Requests each shard holds (until their bodies are read or dropped)."""
        return list(self._in_flight)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        shard = min(range(len(self._shards)), key=self._in_flight.__getitem__)
        self._in_flight[shard] += 1
        try:
            response = await self._shards[shard].handle_async_request(request)
        except BaseException:
            self._in_flight[shard] -= 1
            raise
        # The connection stays busy until the body has been read or dropped.
        response.stream = _Counted(response.stream, self._in_flight, shard)
        return response

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()


class _Counted(httpx.AsyncByteStream):
    """A response body that gives its shard's slot back when closed."""

    def __init__(self, stream: httpx.AsyncByteStream | httpx.SyncByteStream, in_flight: list[int],
                 shard: int) -> None:
        assert isinstance(stream, httpx.AsyncByteStream)
        self._stream = stream
        self._in_flight = in_flight
        self._shard = shard
        self._open = True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            if self._open:
                self._open = False
                self._in_flight[self._shard] -= 1
