"""Every background task of a worker runs under a supervisor: none can end unnoticed.

A worker whose reporter (or heartbeat, reaper, ...) had died would keep claiming images, renew their
leases and look healthy while finishing nothing. Here a task that raises is logged with its traceback
and started again; one that fails again within SUPERVISOR_WINDOW_SECONDS ends the process with a
non-zero code, so that whatever runs it (systemd, Docker, Kubernetes) starts a fresh one. Its leases
then lapse and its images run again on other workers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

log = logging.getLogger("imagequeue.worker")

SUPERVISOR_WINDOW_SECONDS = 60.0  # a second failure within this long is fatal
RESTART_PAUSE_SECONDS = 0.5
FATAL_EXIT_CODE = 70  # EX_SOFTWARE
# Test-only: "reporter=1,heartbeat=2" makes those tasks raise InjectedFault on their first N starts.
TEST_FAULTS_ENV = "IMAGEQUEUE_TEST_FAULTS"

TaskFactory = Callable[[], Coroutine[Any, Any, None]]


class InjectedFault(RuntimeError):
    """A failure asked for through IMAGEQUEUE_TEST_FAULTS, to test the supervisor."""


def faults_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, int]:
    """The faults a test asked for: task name -> how many of its starts fail."""
    faults: dict[str, int] = {}
    for item in environ.get(TEST_FAULTS_ENV, "").split(","):
        name, _, count = item.strip().partition("=")
        if name:
            faults[name] = int(count or 1)
    return faults


def exit_process(task: str) -> None:
    """Ends the process at once (the event loop's thread cannot unwind RQ's main thread cleanly)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(FATAL_EXIT_CODE)


class Supervisor:
    """Starts named background tasks and keeps them running."""

    def __init__(
        self,
        worker_name: str,
        *,
        on_fatal: Callable[[str], None] = exit_process,
        window: float = SUPERVISOR_WINDOW_SECONDS,
        faults: Mapping[str, int] | None = None,
    ) -> None:
        self.worker_name = worker_name
        self.on_fatal = on_fatal
        self.window = window
        self._faults = dict(faults if faults is not None else faults_from_env())
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, factory: TaskFactory) -> asyncio.Task[None]:
        task = asyncio.create_task(self._supervise(name, factory), name=f"imagequeue-{name}")
        self.tasks[name] = task
        return task

    async def _supervise(self, name: str, factory: TaskFactory) -> None:
        extra = {"worker": self.worker_name, "task": name}
        last_failure: float | None = None
        while True:
            try:
                if self._faults.get(name, 0) > 0:
                    self._faults[name] -= 1
                    raise InjectedFault(f"fault injected into {name} ({TEST_FAULTS_ENV})")
                await factory()
                log.error("background task failed: it returned, which it never should", extra=extra)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background task failed", extra=extra)
            now = time.monotonic()
            if last_failure is not None and now - last_failure < self.window:
                log.critical(
                    "background task %s failed twice within %.0f s: exiting so that the process is restarted "
                    "(its images run again elsewhere once their leases lapse)", name, self.window, extra=extra,
                )
                self.on_fatal(name)
                return
            last_failure = now
            await asyncio.sleep(RESTART_PAUSE_SECONDS)
            log.warning("background task restarted", extra=extra)
