"""Test helpers: the suite's settings and secret, tokens, polling a queue, checking its counts.

Processes (Redis, API, workers) come from app.harness, shared with ./run.sh and the benchmarks.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

import httpx
import pytest
from jose import jwt

from app.harness import QUICK_SETTINGS, ROOT, Stack, isolated_env, wait_until

TEST_SECRET = "test-secret-" + "x" * 24
LOG_DIR = ROOT / "test-artifacts" / "logs"
DATABASES = 512  # one per test that wants a clean slate; the server is ours, so it may have many


def service_env(redis_url: str, **overrides: Any) -> dict[str, str]:
    """The environment of the suite's API and workers on `redis_url`: quick leases and heartbeats."""
    # A directory of the stack's own for image bytes: API and workers share it, no test sees another's.
    images = "file://" + tempfile.mkdtemp(prefix="imagequeue-images-")
    return isolated_env(redis_url, TEST_SECRET,
                        **{**QUICK_SETTINGS, "LOG_LEVEL": "INFO", "IMAGE_STORE": images, **overrides})


def require_tool(found: bool, missing: str) -> None:
    """Skips the test when a tool it drives is not installed here, with `missing` saying so; in CI
    (CI=true), where scripts/install-test-tools.sh installs every tool, fails it instead."""
    if found:
        return
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{missing} (CI=true: every test must run)")
    pytest.skip(missing)


class MakeStack(Protocol):
    """The `make_stack` fixture (conftest.py)."""

    def __call__(self, workers: int = 1, *, concurrency: int = 4, worker_args: Sequence[str] = (),
                 redis_url: str | None = None, wait: bool = True, **settings: object) -> Stack: ...


def token(user: str, secret: str = TEST_SECRET, ttl: int = 3600, **claims: Any) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + ttl, **claims}, secret, algorithm="HS256")


def auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user)}"}


def new_user() -> str:
    return "user-" + uuid.uuid4().hex[:10]


def wait_status(client: httpx.Client, headers: dict[str, str], queue_id: str, statuses: set[str],
                timeout: float = 60, final: bool = True) -> dict[str, Any]:
    """Polls a queue until its status is in `statuses` (and, with `final`, it has finished)."""

    def check() -> dict[str, Any] | None:
        body = client.get(f"/queue-status/{queue_id}", headers=headers).json()
        if body["status"] in statuses and (not final or body["finished_at"]):
            return dict(body)
        return None

    return dict(wait_until(check, timeout, 0.1, what=f"queue {queue_id} to reach {statuses}"))


def assert_counts_consistent(status: dict[str, Any]) -> None:
    parts = sum(status[k] for k in ("pending", "running", "succeeded", "failed", "cancelled"))
    assert parts == status["total"], status
    if status.get("images") is not None and status.get("images_limit") is None:
        by_status: dict[str, int] = {}
        for image in status["images"]:
            by_status[image["status"]] = by_status.get(image["status"], 0) + 1
        for key in ("pending", "running", "succeeded", "failed", "cancelled"):
            assert by_status.get(key, 0) == status[key], (key, status)
