"""A worker never looks alive while doing nothing: odd provider text is stored safely, and every background
task runs under a supervisor that restarts it once and ends the process when it keeps failing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from app.harness import RedisServer, start_worker
from tests.provider_servers import ProviderServer
from tests.utils import (
    LOG_DIR,
    MakeStack,
    assert_counts_consistent,
    auth,
    new_user,
    service_env,
    wait_status,
    wait_until,
)

# Every background task of a worker, by the name the supervisor gives it (webhooks need WEBHOOK_SECRET).
TASKS = ("reporter", "heartbeat", "reaper", "top-up", "cancel-poll", "cancel-listen", "webhooks", "store-watch",
         "store-sweep", "progress")
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
    make_stack: MakeStack, openai_server: ProviderServer
) -> None:
    """A provider error whose JSON holds "\\ud800" used to end the reporter: every later image stayed running."""
    stack = make_stack(concurrency=2, IMAGE_PROVIDER="openai", IMAGE_PROVIDER_URL=openai_server.url, IMAGE_MODEL="m")
    headers = auth(new_user())
    openai_server.script("400:cut in the middle \ud800 of a character")
    with stack.client() as client:
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
    assert stack.workers[0].alive, stack.workers[0].output()


def test_each_background_task_restarts_after_one_failure(make_stack: MakeStack) -> None:
    faults = ",".join(f"{task}=1" for task in TASKS)
    stack = make_stack(concurrency=2, WEBHOOK_SECRET="whsec-test-0123456789", **{FAULTS_ENV: faults})
    worker = stack.workers[0]
    headers = auth(new_user())

    def failures() -> list[dict[str, Any]]:
        return [line for line in log_lines(worker.output()) if line.get("msg", "").startswith("background task failed")]

    wait_until(lambda: {line.get("task") for line in failures()} == set(TASKS), 30,
               what="every task to fail once and restart")
    with stack.client() as client:
        qid = client.post("/create-queue", headers=headers, json={
            "prompts": ["a"], "count": 6, "width": 64, "height": 64}).json()["queue_id"]
        assert wait_status(client, headers, qid, {"completed"}, timeout=30)["succeeded"] == 6
    stack.wait_for_workers(1, 10)  # the heartbeat runs again
    assert worker.alive, worker.output()
    assert all("InjectedFault" in line.get("exc", "") for line in failures())  # logged with its traceback


@pytest.mark.parametrize("task", TASKS)
def test_a_task_that_fails_again_soon_ends_the_process_non_zero(redis_server: RedisServer, task: str) -> None:
    env = service_env(redis_server.fresh_url(), WEBHOOK_SECRET="whsec-test-0123456789", **{FAULTS_ENV: f"{task}=2"})
    worker = start_worker(env, "--concurrency=2", log_dir=LOG_DIR)
    code = worker.wait(60)
    assert code not in (0, None), worker.output()
    fatal = [line for line in log_lines(worker.output()) if line.get("level") == "critical"]
    assert fatal and fatal[0].get("task") == task, worker.output()[-3000:]
