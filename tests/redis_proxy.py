"""A TCP proxy in front of a Redis server that can stall connections: a Redis that is slow for some clients.

    with StallingProxy(redis_port, marker=b"imagequeue-progress") as proxy:
        ... point a client at 127.0.0.1:proxy.port ...
        proxy.stalled     # connections stalled so far

A connection whose client has sent `marker` (a client name, say: CLIENT SETNAME is the first thing a named
redis-py connection sends), or every connection with `stall_all`, is stalled from then on: what it sends is
never forwarded and it is never answered, so its commands time out. Other connections pass untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import TracebackType

CHUNK = 65536


class StallingProxy:
    def __init__(self, target_port: int, *, marker: bytes = b"", stall_all: bool = False) -> None:
        self.target_port = target_port
        self.marker = marker
        self.stall_all = stall_all
        self.stalled = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._run, name="redis-proxy", daemon=True)

    def __enter__(self) -> StallingProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
        await asyncio.sleep(0.05)  # the transports finish closing

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._writers.add(client_w)
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        self._writers.add(server_w)
        stalled = asyncio.Event()

        async def upstream() -> None:
            seen = b""
            while data := await client_r.read(CHUNK):
                seen = (seen + data)[-4096:]
                if self.stall_all or (self.marker and self.marker in seen):
                    if not stalled.is_set():
                        stalled.set()
                        self.stalled += 1
                    continue  # swallowed
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(CHUNK):
                if stalled.is_set():
                    continue
                client_w.write(data)
                await client_w.drain()

        try:
            await asyncio.gather(upstream(), downstream())
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            for writer in (client_w, server_w):
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
                self._writers.discard(writer)
