"""Benchmark 4: Redis memory per pending image (INFO memory delta), against plain RQ's per-job cost;
and, for sizing, per finished image (its record and events, apart from the image bytes themselves).

python -m bench.memory [--images 10000] [--finished 2000]
"""

from __future__ import annotations

import argparse

import httpx
import redis
from rq import Queue

from bench.common import auth, new_user, private_redis, report, service_env, stack, start_api, wait_done


def used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--finished", type=int, default=2_000)
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
    """Bytes a finished image keeps in Redis for the queue TTL beyond its PNG: its record, its events
    (queue stream and user stream) and its share of the queue's hashes, by MEMORY USAGE of those keys
    (INFO's used_memory also moves with transient client buffers at this scale)."""
    n = max(100, n // 100 * 100)
    with stack(url, workers=1, concurrency=32, PROCEDURAL_LATENCY_MS=0) as (base, _):
        headers = auth(new_user())
        with httpx.Client(base_url=base, timeout=60) as http:
            r = http.post("/create-queue", headers=headers, json={
                "prompts": [f"a watercolour fox in the snow, soft light, take {i}" for i in range(n // 100)],
                "count": 100, "width": 64, "height": 64})
            assert r.status_code == 201, r.text
            qid = r.json()["queue_id"]
            wait_done(http, headers, qid, interval=0.2)
    keys = [k for pattern in (f"iq:q:{{{qid}}}*", "iq:u:*") for k in client.scan_iter(match=pattern, count=1000)]
    total = sum(int(client.memory_usage(k, samples=0) or 0) for k in keys)
    blob_key = f"iq:q:{{{qid}}}:blob"
    blobs = sum(int(client.hstrlen(blob_key, str(i))) for i in range(n))  # type: ignore[arg-type]
    report(f"Redis bytes per finished image beyond its PNG ({n:,} images)", (total - blobs) / n, "B")
    report("average PNG size (64x64 procedural)", blobs / n, "B")


if __name__ == "__main__":
    main()
