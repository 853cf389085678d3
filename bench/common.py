"""Shared pieces of the benchmarks: a private Redis, API and worker processes (app.harness), tokens,
timing helpers."""

from __future__ import annotations

import os
import statistics
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import httpx

from app.core.config import Settings
from app.core.security import mint_token
from app.harness import QUICK_SETTINGS, ROOT, Process, RedisServer, free_port, isolated_env, running_stack, wait_until
from app.harness import start_api as _start_api

BENCH_SECRET = "bench-secret-" + "x" * 24
LOG_DIR = ROOT / "test-artifacts" / "logs"

__all__ = [
    "IMAGE_TMP_DIR",
    "LOG_DIR",
    "ROOT",
    "Process",
    "RedisServer",
    "auth",
    "free_port",
    "new_user",
    "pct",
    "private_redis",
    "report",
    "service_env",
    "stack",
    "start_api",
    "wait_done",
    "wait_until",
]


# Images go to tmpfs where there is one, so that the figures measure the service rather than the disk
# (creating a file costs about 0.7 ms of kernel CPU on some virtual disks, 2 µs on tmpfs).
TMPFS_FREE_BYTES = 8 << 30  # the 1024x1024 rounds write about 5 GB; a small /dev/shm (containers: 64 MB) is passed over


def _tmpfs() -> str | None:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) and st.f_bavail * st.f_frsize >= TMPFS_FREE_BYTES else None


IMAGE_TMP_DIR = _tmpfs()
_IMAGES = TemporaryDirectory(prefix="imagequeue-bench-images-", dir=IMAGE_TMP_DIR)  # removed at exit


def service_env(redis_url: str, **overrides: Any) -> dict[str, str]:
    """The benchmarks' API and workers on `redis_url`: the tests' quick settings, warnings-only logs, and
    images in a temporary directory of this benchmark's (never the checkout's .data), on tmpfs if any."""
    return isolated_env(redis_url, BENCH_SECRET, **{**QUICK_SETTINGS, "LOG_LEVEL": "WARNING",
                                                     "IMAGE_STORE": f"file://{_IMAGES.name}", **overrides})


def auth(user: str) -> dict[str, str]:
    token = mint_token(Settings(_env_file=None, jwt_secret=BENCH_SECRET), user, 3600)
    return {"Authorization": f"Bearer {token}"}


def new_user() -> str:
    return "user-" + uuid.uuid4().hex[:10]


@contextmanager
def private_redis() -> Iterator[RedisServer]:
    with TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp), log_dir=LOG_DIR).start()
        try:
            yield server
        finally:
            server.stop()


def start_api(env: dict[str, str]) -> tuple[Process, str]:
    return _start_api(env, log_dir=LOG_DIR)


@contextmanager
def stack(redis_url: str, workers: int = 1, concurrency: int = 8, **env: object) -> Iterator[tuple[str, dict]]:
    """API + `workers` worker processes on `redis_url`, once the workers have registered; yields (base_url, env)."""
    with running_stack(service_env(redis_url, **env), workers=workers, worker_args=(f"--concurrency={concurrency}",),
                       log_dir=LOG_DIR) as running:
        yield running.base_url, running.env


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
