"""Benchmark 4: Redis memory per pending image (INFO memory delta), against plain RQ's per-job cost.

python -m bench.memory [--images 10000]
"""

from __future__ import annotations

import argparse

import httpx
import redis
from rq import Queue

from bench.common import auth, new_user, private_redis, report, service_env, start_api


def used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=10_000)
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
        client.close()


if __name__ == "__main__":
    main()
