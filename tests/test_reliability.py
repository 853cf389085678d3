"""Fault injection: workers killed and stopped, Redis restarted, cancels racing running images.

Each test starts its own API and worker processes on a database (or server) of its own, and
checks that every image ends in exactly one terminal state and none is lost.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from app.harness import RedisServer, Stack, start_api, start_worker, wait_until
from tests.utils import LOG_DIR, MakeStack, assert_counts_consistent, auth, new_user, service_env, wait_status

# Scheduling delays on a loaded two-core machine, on top of what the settings promise.
SLACK_SECONDS = 2.0


def _records(redis_url: str, queue_id: str) -> dict[int, dict[str, object]]:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.hgetall(f"iq:q:{{{queue_id}}}:img")
        return {int(k): json.loads(v) for k, v in raw.items()}
    finally:
        client.close()


@pytest.fixture
def own_stack(make_stack: MakeStack) -> Stack:
    """An API on a database of its own; each test starts the workers it needs."""
    return make_stack(0)


def test_killed_worker_images_rerun_elsewhere_within_seconds(own_stack: Stack) -> None:
    url = own_stack.redis_url
    victim = own_stack.add_worker("--concurrency=4", name="victim")
    survivor = own_stack.add_worker("--concurrency=4", name="survivor")
    # The last lease renewal is at most a heartbeat before the kill; the lease then runs out, and the
    # next sweep of the survivor's reaper (every heartbeat) re-queues the images.
    settings = own_stack.env
    bound = float(settings["WORKER_LEASE_SECONDS"]) + float(settings["WORKER_HEARTBEAT_SECONDS"]) + SLACK_SECONDS
    headers = auth(new_user())
    with own_stack.client() as client:
        qid = client.post("/create-queue", headers=headers, json={
            "prompts": ["p"], "count": 40, "width": 64, "height": 64, "params": {"latency_ms": 400}}).json()["queue_id"]
        held = wait_until(
            lambda: [i for i, r in _records(url, qid).items() if r["w"] == "victim" and r["s"] == "running"],
            20, what="the victim to hold images")
        victim.kill()
        killed_at = time.monotonic()

        def rerun() -> bool:
            recs = _records(url, qid)
            return all(recs[i]["s"] != "running" or recs[i]["w"] != "victim" for i in held)

        wait_until(rerun, 3 * bound, what="images of the killed worker to be re-run")
        recovery = time.monotonic() - killed_at
        done = wait_status(client, headers, qid, {"completed"}, timeout=60)
    survivor.stop()
    assert done["succeeded"] == 40 and done["failed"] == 0
    assert_counts_consistent(done)
    assert recovery <= bound, f"re-run {recovery:.2f}s after the kill, past lease + heartbeat ({bound:.1f}s)"
    print(f"\nkill -9 to re-run: {recovery:.2f}s for {len(held)} image(s)")


def test_sigterm_finishes_running_images_and_exits_zero(own_stack: Stack) -> None:
    url = own_stack.redis_url
    worker = own_stack.add_worker("--concurrency=4", "--grace=10", name="graceful")
    headers = auth(new_user())
    with own_stack.client() as client:
        qid = client.post("/create-queue", headers=headers, json={
            "prompts": ["p"], "count": 12, "width": 64, "height": 64, "params": {"latency_ms": 700}}).json()["queue_id"]
        wait_until(lambda: any(r["s"] == "running" for r in _records(url, qid).values()), 20, what="running images")
        worker.signal(signal.SIGTERM)
        t0 = time.monotonic()
        code = worker.wait(20)
        stopped_in = time.monotonic() - t0
        assert code == 0, worker.output()
        status = client.get(f"/queue-status/{qid}", headers=headers).json()
        assert status["running"] == 0 and status["failed"] == 0  # finished, not failed or stuck
        assert status["succeeded"] >= 1
        own_stack.add_worker("--concurrency=4")
        done = wait_status(client, headers, qid, {"completed"}, timeout=60)
    assert done["succeeded"] == 12
    assert_counts_consistent(done)
    assert stopped_in < 10, stopped_in


def test_sigterm_past_grace_hands_images_back(own_stack: Stack) -> None:
    url = own_stack.redis_url
    worker = own_stack.add_worker("--concurrency=4", "--grace=0.5", name="impatient")
    headers = auth(new_user())
    with own_stack.client() as client:
        qid = client.post("/create-queue", headers=headers, json={
            "prompts": ["p"], "count": 8, "width": 64, "height": 64, "params": {"latency_ms": 5000}}).json()["queue_id"]
        wait_until(lambda: sum(r["s"] == "running" for r in _records(url, qid).values()) == 4, 20,
                   what="four running images")
        worker.signal(signal.SIGTERM)
        assert worker.wait(15) == 0, worker.output()
        status = client.get(f"/queue-status/{qid}", headers=headers).json()
        assert status["running"] == 0 and status["pending"] == 8 and status["failed"] == 0, status
        own_stack.add_worker("--concurrency=8")
        done = wait_status(client, headers, qid, {"completed"}, timeout=60)
    assert done["succeeded"] == 8
    assert_counts_consistent(done)


def test_cancel_stops_running_images_within_a_second(own_stack: Stack) -> None:
    own_stack.add_worker("--concurrency=8")
    headers, bystander = auth(new_user()), auth(new_user())
    with own_stack.client() as client:
        qid = client.post("/create-queue", headers=headers, json={
            "prompts": ["p"], "count": 8, "width": 64, "height": 64,
            "params": {"latency_ms": 20000}}).json()["queue_id"]
        other = client.post("/create-queue", headers=bystander, json={
            "prompts": ["q"], "count": 1, "width": 64, "height": 64,
            "params": {"latency_ms": 1500}}).json()["queue_id"]
        wait_until(lambda: client.get(f"/queue-status/{qid}", headers=headers).json()["running"] >= 4, 20,
                   what="running images")
        t0 = time.monotonic()
        assert client.post(f"/cancel-queue/{qid}", headers=headers).status_code == 200
        done = wait_status(client, headers, qid, {"cancelled"}, timeout=5)
        quiet = time.monotonic() - t0
        other_done = wait_status(client, bystander, other, {"completed"}, timeout=30)
    assert done["cancelled"] == 8 and done["running"] == 0
    assert_counts_consistent(done)
    assert quiet < 1.0, quiet
    assert other_done["succeeded"] == 1  # another user's running image was not touched
    print(f"\ncancel to quiet: {quiet:.3f}s")


def test_redis_restart_api_503_then_queue_finishes(tmp_path: Path, make_stack: MakeStack) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=True, log_dir=LOG_DIR).start()
    stack = make_stack(redis_url=server.url)
    headers = auth(new_user())
    try:
        with stack.client() as client:
            qid = client.post("/create-queue", headers=headers, json={
                "prompts": ["p"], "count": 30, "width": 64, "height": 64,
                "params": {"latency_ms": 150}}).json()["queue_id"]
            wait_status(client, headers, qid, {"running"}, final=False)
            server.stop()
            t0 = time.monotonic()
            r = client.get(f"/queue-status/{qid}", headers=headers)
            answered_in = time.monotonic() - t0
            assert r.status_code == 503 and "Redis" in r.json()["detail"]
            assert answered_in < 5, answered_in
            assert client.get("/health").status_code == 503
            assert client.post("/create-queue", headers=headers, json={"prompts": ["x"]}).status_code == 503
            for stream in ("/events", f"/queue-events/{qid}"):  # refused before the stream starts
                assert client.get(stream, headers=headers, timeout=5).status_code == 503
            time.sleep(2)
            server.start()
            wait_until(lambda: client.get("/health").status_code == 200, 20, what="API to recover")
            done = wait_status(client, headers, qid, {"completed"}, timeout=60)
            assert done["succeeded"] == 30, [i["error"] for i in done["images"] if i["error"]]
            assert_counts_consistent(done)
            after = client.post("/create-queue", headers=headers, json={"prompts": ["x"], "width": 64, "height": 64})
            assert after.status_code == 201
            wait_status(client, headers, after.json()["queue_id"], {"completed"}, timeout=30)
    finally:
        stack.stop()  # while its Redis is still there
        server.stop()


def test_a_hung_redis_gets_503_within_one_socket_timeout(tmp_path: Path, make_stack: MakeStack) -> None:
    """A Redis that accepts connections but never answers (stopped, swapping, overloaded): every route
    answers 503 within one socket timeout, again and again, not after retries and pool waits add up."""
    server = RedisServer(tmp_path / "redis", log_dir=LOG_DIR).start()
    stack = make_stack(0, redis_url=server.url, REDIS_SOCKET_TIMEOUT="2")
    headers = auth(new_user())
    assert server.process is not None
    try:
        with stack.client() as client:
            assert client.get("/active-queues", headers=headers).status_code == 200
            server.process.proc.send_signal(signal.SIGSTOP)
            try:
                for method, path, body in [("GET", "/active-queues", None), ("GET", "/history", None),
                                           ("POST", "/create-queue", {"prompts": ["x"], "width": 64, "height": 64}),
                                           ("GET", "/active-queues", None), ("GET", "/history", None)]:
                    t0 = time.monotonic()
                    r = client.request(method, path, headers=headers, json=body, timeout=30)
                    took = time.monotonic() - t0
                    assert r.status_code == 503 and "Redis" in r.json()["detail"], (path, r.status_code)
                    assert r.headers["retry-after"] and took < 3.5, (path, took)
            finally:
                server.process.proc.send_signal(signal.SIGCONT)
            wait_until(lambda: client.get("/active-queues", headers=headers).status_code == 200, 20,
                       what="the API to recover")
    finally:
        stack.stop()
        server.stop()


def test_worker_started_before_redis_waits_for_it_and_stops_cleanly(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", log_dir=LOG_DIR)  # its port is chosen, nothing listens yet
    env = service_env(server.url)
    early = start_worker(env, "--concurrency=2", name="early", log_dir=LOG_DIR)
    idle = start_worker(env, "--concurrency=2", name="idle", log_dir=LOG_DIR)
    try:
        # Both up and waiting for Redis (on a loaded machine the interpreter alone may take seconds to start).
        wait_until(lambda: all("lost Redis" in w.output() for w in (early, idle)), 30, what="workers waiting")
        assert early.alive and idle.alive, early.output()
        idle.signal(signal.SIGTERM)  # a stop while Redis is still away is still a clean stop
        assert idle.wait(15) == 0, idle.output()
        server.start()
        api, base = start_api(env, log_dir=LOG_DIR)
        try:
            headers = auth(new_user())
            with httpx.Client(base_url=base, timeout=30) as client:
                wait_until(lambda: client.get("/health").json()["workers"] == 1, 30, what="the early worker")
                qid = client.post("/create-queue", headers=headers, json={
                    "prompts": ["p"], "count": 4, "width": 64, "height": 64}).json()["queue_id"]
                assert wait_status(client, headers, qid, {"completed"})["succeeded"] == 4
        finally:
            api.stop()
        assert early.stop() == 0
    finally:
        early.kill()
        idle.kill()
        server.stop()
