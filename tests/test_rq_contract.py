"""The parts of RQ imagequeue relies on. An RQ upgrade that changes any of them fails here first.

- Tickets are ordinary RQ jobs: `Queue.prepare_data` + `enqueue_many`, counted by `Queue.count`.
- The worker is a `SimpleWorker` subclass: it registers like any RQ worker (`rq info` lists it), and
  RQ calls our `execute_job` override in-process, so tickets are redeemed into the worker's own
  runtime (images are claimed under the worker's name, not a stand-alone runtime's).
- Finished tickets land in RQ's finished registry with the result the ticket function returned.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import redis
from rq import Queue, Worker
from rq.job import Job
from rq.registry import FinishedJobRegistry

from app.harness import RedisServer
from app.services.queue.tickets import TICKET_FUNC, Tickets, rq_queue_name
from tests.utils import MakeStack, auth, new_user, wait_status, wait_until

MODEL = "procedural"  # the default model's name with IMAGE_PROVIDER=procedural and no IMAGE_MODEL


def test_tickets_are_plain_rq_jobs(redis_server: RedisServer) -> None:
    connection = redis.Redis.from_url(redis_server.fresh_url())
    try:
        tickets = Tickets(connection, job_timeout=123)
        assert tickets.wake(MODEL, 3) == 3
        assert tickets.wake(MODEL, 3) == 0, "wake tops up to the wanted number, never past it"
        queue = Queue(rq_queue_name(MODEL), connection=connection)
        assert queue.count == 3 == tickets.waiting(MODEL)
        jobs = [Job.fetch(job_id, connection=connection) for job_id in queue.job_ids]
        assert {job.func_name for job in jobs} == {TICKET_FUNC}
        assert all(job.args == (MODEL,) and job.timeout == 123 for job in jobs)
        assert rq_queue_name(MODEL) in {q.name for q in Queue.all(connection=connection)}
    finally:
        connection.close()


def test_worker_is_an_rq_worker_and_redeems_tickets_in_process(make_stack: MakeStack) -> None:
    stack = make_stack(0)
    url = stack.redis_url
    worker = stack.add_worker("--concurrency=4", name="rq-contract")
    connection = redis.Redis.from_url(url)
    try:
        wait_until(lambda: "rq-contract" in {w.name for w in Worker.all(connection=connection)}, 30,
                   what="RQ to list the worker")
        (listed,) = [w for w in Worker.all(connection=connection) if w.name == "rq-contract"]
        assert rq_queue_name(MODEL) in listed.queue_names()

        info = subprocess.run(
            [str(Path(sys.executable).with_name("rq")), "info", "--url", url],
            capture_output=True, text=True, timeout=60,
        )
        assert info.returncode == 0, info.stderr
        assert rq_queue_name(MODEL) in info.stdout and "rq-contract" in info.stdout, info.stdout

        headers = auth(new_user())
        with stack.client() as client:
            qid = client.post("/create-queue", headers=headers, json={
                "prompts": ["a", "b"], "count": 3, "width": 64, "height": 64}).json()["queue_id"]
            wait_status(client, headers, qid, {"completed"}, timeout=60)

        records = connection.hgetall(f"iq:q:{{{qid}}}:img")
        assert len(records) == 6
        assert all(b'"w":"rq-contract"' in v for v in records.values()), records

        registry = FinishedJobRegistry(rq_queue_name(MODEL), connection=connection)
        finished = [Job.fetch(job_id, connection=connection) for job_id in registry.get_job_ids()]
        assert finished, "redeemed tickets end in RQ's finished registry"
        assert sum(job.return_value()["claimed"] for job in finished) >= 1
    finally:
        connection.close()
    assert worker.stop() == 0, worker.output()


def test_burst_worker_drains_the_work_then_exits(make_stack: MakeStack) -> None:
    stack = make_stack(0)
    headers = auth(new_user())
    with stack.client() as client:
        qid = client.post("/create-queue", headers=headers, json={
            "prompts": ["a", "b"], "count": 5, "width": 64, "height": 64}).json()["queue_id"]
        worker = stack.add_worker("--concurrency=4", "--burst")
        assert worker.wait(60) == 0, worker.output()
        done = client.get(f"/queue-status/{qid}", headers=headers).json()
    assert done["status"] == "completed" and done["succeeded"] == 10, done
