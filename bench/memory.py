"""Benchmark 4: Redis memory per pending image (INFO memory delta), against plain RQ's per-job cost;
and per finished 1024x1024 photo-like image (its record and events: the bytes are in the image store).

python -m bench.memory [--images 10000] [--finished 100]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import httpx
import redis
from rq import Queue

from bench.common import (
    ROOT,
    auth,
    free_port,
    new_user,
    private_redis,
    report,
    service_env,
    stack,
    start_api,
    wait_done,
    wait_until,
)
from bench.http_throughput import answers


def used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--finished", type=int, default=100)
    args = parser.parse_args()
    n = args.images
    with private_redis() as server:
        client = server.client()
        api, base = start_api(service_env(server.url, LOG_LEVEL="WARNING"))
        try:
            headers = auth(new_user())
            with httpx.Client(base_url=base, timeout=60) as http:
                http.post("/create-queue", headers=headers, json={"prompts": ["warm"], "width": 64, "height": 64})
                before = used(client)
                queues = max(1, n // 1000)
                for _ in range(queues):
                    r = http.post("/create-queue", headers=headers, json={
                        "prompts": ["a watercolour fox in the snow, soft light"], "count": n // queues,
                        "width": 512, "height": 512})
                    assert r.status_code == 201, r.text
                per_image = (used(client) - before) / n
        finally:
            api.stop()
        before = used(client)
        queue = Queue("bench-memory", connection=client)
        queue.enqueue_many([Queue.prepare_data("bench.throughput.generate_one", args=(
            "a watercolour fox in the snow, soft light", i, 0)) for i in range(n)])
        per_rq_job = (used(client) - before) / n
        report(f"Redis bytes per pending image ({n:,} images, {queues} queues)", per_image, "B", "<= 600 B",
               per_rq_job, "plain RQ job per image")
        finished_per_image(server.url, client, args.finished)
        client.close()


def finished_per_image(url: str, client: redis.Redis, n: int) -> None:
    """Bytes a finished 1024x1024 photo-like image (about 2.6 MB as PNG, from an OpenAI-protocol
    server) keeps in Redis for the queue TTL: its record, its events (queue stream and user stream)
    and its share of the queue's hashes, by MEMORY USAGE of those keys (INFO's used_memory also moves
    with transient client buffers). Against the same with IMAGE_STORE=redis, as before the store."""
    n = max(10, n // 10 * 10)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "bench.openai_server", "--port", str(port), "--photo"], cwd=ROOT)
    provider = {"IMAGE_PROVIDER": "openai", "IMAGE_PROVIDER_URL": f"http://127.0.0.1:{port}/v1", "IMAGE_MODEL": "bench"}
    try:
        wait_until(lambda: answers(provider["IMAGE_PROVIDER_URL"]), 20, what="OpenAI-protocol server")
        stored = per_image(url, client, n, provider)
        in_redis = per_image(url, client, max(10, n // 10), {**provider, "IMAGE_STORE": "redis"})
    finally:
        server.terminate()
        server.wait(10)
    report(f"Redis bytes per finished 1024x1024 photo-like image ({n} images)", stored, "B", "<= 4096 B",
           in_redis, "IMAGE_STORE=redis")


def per_image(url: str, client: redis.Redis, n: int, env: dict[str, str]) -> float:
    with stack(url, workers=1, concurrency=8, **env) as (base, _):
        headers = auth(new_user())
        with httpx.Client(base_url=base, timeout=120) as http:
            r = http.post("/create-queue", headers=headers, json={
                "prompts": [f"a watercolour fox in the snow, soft light, take {i}" for i in range(n // 10)],
                "count": 10, "width": 1024, "height": 1024})
            assert r.status_code == 201, r.text
            qid = r.json()["queue_id"]
            done = wait_done(http, headers, qid, interval=0.2)
            assert done["succeeded"] == n, done
    keys = [k for pattern in (f"iq:q:{{{qid}}}*", f"iq:obj:{{{qid}}}", "iq:u:*")
            for k in client.scan_iter(match=pattern, count=1000)]
    total = sum(int(client.memory_usage(k, samples=0) or 0) for k in keys)
    for key in keys:  # the next measurement counts only its own queue's keys
        client.delete(key)
    return total / n


if __name__ == "__main__":
    main()
