"""Fixtures: a private Redis server for the session, a shared stack on it, and `make_stack` for tests that
need a stack of their own."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

os.environ["IMAGEQUEUE_ENV_FILE"] = ""  # a developer's .env does not configure the tests (before app's imports)

import httpx
import pytest

from app.harness import Process, RedisServer, Stack, start_stack
from tests.seaweedfs import SEAWEEDFS_BUCKET, SeaweedServer
from tests.utils import DATABASES, LOG_DIR, MakeStack, service_env


@pytest.fixture(autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    """Processes a test started and did not stop (say, because an assertion failed first) are killed,
    so they never outlive their test or the Redis they talk to."""
    before = set(map(id, Process.started))
    yield
    for process in [p for p in Process.started if id(p) not in before]:
        process.kill()
    Process.started[:] = [p for p in Process.started if p.alive]


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A private SeaweedFS (S3) with the bucket SEAWEEDFS_BUCKET, shared by the session (it takes seconds to start)."""
    server = SeaweedServer(Path(tmp_path_factory.mktemp("seaweedfs"))).start()
    server.create_bucket(SEAWEEDFS_BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Our own server on a free port: tests never touch a Redis they did not start. Each stack takes a
    database of its own (`fresh_url()`); the shared `stack` has database 0. Not tracked: a test that
    asks for it first (getfixturevalue) must not take it down with its own leftovers."""
    server = RedisServer(Path(tmp_path_factory.mktemp("redis")), databases=DATABASES, log_dir=LOG_DIR,
                         tracked=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stack(redis_server: RedisServer) -> Iterator[Stack]:
    """API + one worker (concurrency 8, procedural provider at 20 ms), shared by tests that only read and write
    their own users' queues."""
    shared = start_stack(service_env(redis_server.url), workers=1, worker_args=("--concurrency=8",), log_dir=LOG_DIR)
    yield shared
    shared.stop()


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    with stack.client() as c:
        yield c


@pytest.fixture
def make_stack(redis_server: RedisServer) -> Iterator[MakeStack]:
    """Starts stacks of the test's own: the API and `workers` workers (`--concurrency`, then `worker_args`),
    on a fresh database of the session server unless `redis_url` is given, with the suite's settings
    and `settings` (as environment variables: IMAGE_PROVIDER="comfyui"). With `wait`, returns once the
    workers have registered. Everything it started is stopped after the test."""
    made: list[Stack] = []

    def make(workers: int = 1, *, concurrency: int = 4, worker_args: Sequence[str] = (),
             redis_url: str | None = None, wait: bool = True, **settings: object) -> Stack:
        env = service_env(redis_url or redis_server.fresh_url(), **settings)
        made.append(start_stack(env, workers=workers, worker_args=(f"--concurrency={concurrency}", *worker_args),
                                log_dir=LOG_DIR, wait=wait))
        return made[-1]

    yield make
    for stack in reversed(made):
        stack.stop()
