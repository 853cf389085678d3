"""A worker never looks alive while doing nothing: odd provider text is stored safely, and every background
task runs under a supervisor that restarts it once and ends the process when it keeps failing."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import fresh_redis_url
from tests.provider_servers import ProviderServer
from tests.utils import (
    RedisServer,
    assert_counts_consistent,
    auth,
    new_user,
    service_env,
    start_api,
    start_worker,
    wait_status,
    wait_until,
)

# Every background task of a worker, by the name the supervisor gives it (webhooks need WEBHOOK_SECRET).
TASKS = ("reporter", "heartbeat", "reaper", "top-up", "cancel-poll", "cancel-listen", "webhooks")
FAULTS_ENV = "IMAGEQUEUE_TEST_FAULTS"


def log_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


@pytest.fixture
def openai_server() -> Iterator[ProviderServer]:
    with ProviderServer("openai") as server:
        yield server


def test_provider_error_with_a_lone_surrogate_fails_only_its_image(
    redis_server: RedisServer, openai_server: ProviderServer
) -> None:
    """A provider error whose JSON holds "\\ud800" used to end the reporter: every later image stayed running."""
    env = service_env(fresh_redis_url(redis_server), IMAGE_PROVIDER="openai", IMAGE_PROVIDER_URL=openai_server.url,
                      IMAGE_MODEL="m")
    api, base = start_api(env)
    worker = start_worker(env, "--concurrency=2")
    headers = auth(new_user())
    openai_server.script("400:cut in the middle \ud800 of a character")
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            qid = client.post("/create-queue", headers=headers, json={
                "prompts": ["a", "b"], "width": 64, "height": 64}).json()["queue_id"]
            done = wait_status(client, headers, qid, {"completed"}, timeout=30)
            assert done["succeeded"] == 1 and done["failed"] == 1
            assert_counts_consistent(done)
            (failed,) = [i for i in done["images"] if i["status"] == "failed"]
            assert "cut in the middle" in failed["error"] and "of a character" in failed["error"]
            assert "\ud800" not in failed["error"]
            # The worker goes on: later queues finish too.
            later = client.post("/create-queue", headers=headers, json={
                "prompts": ["c"], "count": 4, "width": 64, "height": 64}).json()["queue_id"]
            assert wait_status(client, headers, later, {"completed"}, timeout=30)["succeeded"] == 4
        assert worker.proc.poll() is None, worker.output()
    finally:
        worker.stop()
        api.stop()


def test_each_background_task_restarts_after_one_failure(redis_server: RedisServer) -> None:
    faults = ",".join(f"{task}=1" for task in TASKS)
    env = service_env(fresh_redis_url(redis_server), WEBHOOK_SECRET="whsec-test-0123456789", **{FAULTS_ENV: faults})
    api, base = start_api(env)
    worker = start_worker(env, "--concurrency=2")
    headers = auth(new_user())
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            def restarted() -> set[str]:
                return {line.get("task") for line in log_lines(worker.output()) if line.get("msg", "").startswith(
                    "background task failed")}

            wait_until(lambda: restarted() == set(TASKS), 30, what="every task to fail once and restart")
            qid = client.post("/create-queue", headers=headers, json={
                "prompts": ["a"], "count": 6, "width": 64, "height": 64}).json()["queue_id"]
            assert wait_status(client, headers, qid, {"completed"}, timeout=30)["succeeded"] == 6
            wait_until(lambda: client.get("/health").json()["workers"] == 1, 10, what="heartbeat after restart")
        assert worker.proc.poll() is None, worker.output()
        failures = [line for line in log_lines(worker.output()) if line.get("msg", "").startswith(
            "background task failed")]
        assert all("InjectedFault" in line.get("exc", "") for line in failures)  # logged with its traceback
    finally:
        worker.stop()
        api.stop()


@pytest.mark.parametrize("task", TASKS)
def test_a_task_that_fails_again_soon_ends_the_process_non_zero(redis_server: RedisServer, task: str) -> None:
    env = service_env(fresh_redis_url(redis_server), WEBHOOK_SECRET="whsec-test-0123456789",
                      **{FAULTS_ENV: f"{task}=2"})
    worker = start_worker(env, "--concurrency=2")
    started = time.monotonic()
    code = worker.proc.wait(60)
    assert code not in (0, None), worker.output()
    assert time.monotonic() - started < 60
    fatal = [line for line in log_lines(worker.output()) if line.get("level") == "critical"]
    assert fatal and fatal[0].get("task") == task, worker.output()[-3000:]
