"""Session fixtures: a private Redis server, and a running stack (API + one worker) on it."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.utils import DATABASES, Proc, RedisServer, service_env, start_api, start_worker, wait_until

_db_numbers = itertools.count(1)


@pytest.fixture(autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    """Processes a test started and did not stop (say, because an assertion failed first) are killed,
    so they never outlive their test or the Redis they talk to."""
    before = set(map(id, Proc.live))
    yield
    for proc in [p for p in Proc.live if id(p) not in before]:
        proc.kill()
    Proc.live[:] = [p for p in Proc.live if p.proc.poll() is None]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Our own server on a free port: tests never touch a Redis they did not start."""
    server = RedisServer(Path(tmp_path_factory.mktemp("redis"))).start()
    yield server
    server.stop()


def fresh_redis_url(server: RedisServer) -> str:
    """A database of its own on the session server, which is started with DATABASES of them."""
    db = next(_db_numbers)
    assert db < DATABASES, "too many stacks on one test Redis"
    return f"redis://127.0.0.1:{server.port}/{db}"


@dataclass
class Stack:
    base_url: str
    redis_url: str
    env: dict[str, str]
    api: Proc
    workers: list[Proc]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30)


@pytest.fixture(scope="session")
def stack(redis_server: RedisServer) -> Iterator[Stack]:
    """API + one worker (concurrency 8, procedural provider at 20 ms), shared by tests that only read and write
    their own users' queues."""
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    env = service_env(url)
    api, base = start_api(env)
    worker = start_worker(env, "--concurrency=8")
    wait_until(lambda: httpx.get(base + "/health").json()["workers"] == 1, 30, what="the worker to register")
    yield Stack(base, url, env, api, [worker])
    worker.stop()
    api.stop()


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    with stack.client() as c:
        yield c
