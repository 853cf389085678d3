"""Shared pieces of the benchmarks: a private Redis, API and worker processes, timing helpers."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.utils import (  # noqa: E402 - the benchmarks reuse the test factories
    Proc,
    RedisServer,
    auth,
    free_port,
    new_user,
    service_env,
    start_api,
    start_worker,
    wait_until,
)

free_port_proc = free_port

__all__ = [
    "Proc",
    "RedisServer",
    "auth",
    "free_port_proc",
    "new_user",
    "pct",
    "private_redis",
    "report",
    "service_env",
    "stack",
    "start_api",
    "start_worker",
    "wait_done",
    "wait_until",
]


@contextmanager
def private_redis() -> Iterator[RedisServer]:
    with TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp)).start()
        try:
            yield server
        finally:
            server.stop()


@contextmanager
def stack(redis_url: str, workers: int = 1, concurrency: int = 8, **env: object) -> Iterator[tuple[str, dict]]:
    """API + `workers` worker processes on `redis_url`; yields (base_url, env)."""
    environment = service_env(redis_url, LOG_LEVEL="WARNING", **env)
    api, base = start_api(environment)
    procs = [start_worker(environment, f"--concurrency={concurrency}") for _ in range(workers)]
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            wait_until(lambda: client.get("/health").json().get("workers") == workers, 30, what="workers")
        yield base, environment
    finally:
        for p in procs:
            p.stop()
        api.stop()


def wait_done(client: httpx.Client, headers: dict[str, str], queue_id: str, timeout: float = 600,
              interval: float = 0.02) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/queue-status/{queue_id}?images_limit=0", headers=headers).json()
        if body.get("finished_at"):
            return dict(body)
        time.sleep(interval)
    raise TimeoutError(queue_id)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def median(values: list[float]) -> float:
    return statistics.median(values)


def report(name: str, value: float, unit: str, target: str = "", baseline: float | None = None,
           baseline_name: str = "") -> None:
    line = f"{name:<58} {value:>10.2f} {unit:<8}"
    if baseline:
        line += f" ratio {value / baseline:6.3f} vs {baseline_name} ({baseline:.2f})"
    if target:
        line += f"  [target {target}]"
    print(line, flush=True)
