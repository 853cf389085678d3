"""Benchmark 1: images/s through API + Redis + worker, against the ideal N*W/L and plain RQ.

python -m bench.throughput [--latency-ms 50] [--concurrency 32] [--images 4000] [--rq-jobs 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import httpx
import redis
from rq import Queue, SimpleWorker

from bench.common import ROOT, auth, new_user, private_redis, report, stack, wait_done

SIZE = 64


def generate_one(prompt: str, seed: int, latency_ms: float) -> int:
    """Plain RQ baseline: one RQ job per image, the same provider call the worker makes."""
    from app.services.providers.base import ImageRequest
    from app.services.providers.procedural import ProceduralProvider

    provider = ProceduralProvider(latency_ms=latency_ms)
    image = asyncio.run(provider.generate(ImageRequest(prompt=prompt, seed=seed, width=SIZE, height=SIZE)))
    return len(image.data)


def provider_alone(images: int, concurrency: int, latency_ms: float) -> float:
    """The machine's ceiling for this provider: N concurrent generations on one event loop, no queue."""
    from app.services.providers.base import ImageRequest
    from app.services.providers.procedural import ProceduralProvider
    from app.services.queue.worker.runtime import new_loop

    provider = ProceduralProvider(latency_ms=latency_ms)

    async def run() -> float:
        slots = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with slots:
                await provider.generate(ImageRequest(prompt=f"benchmark {i}", seed=i, width=SIZE, height=SIZE))

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(images)))
        return images / (time.perf_counter() - t0)

    loop = new_loop()
    try:
        return loop.run_until_complete(run())
    finally:
        loop.close()


def run_queue(base: str, images: int, latency_ms: float) -> float:
    headers = auth(new_user())
    with httpx.Client(base_url=base, timeout=120) as client:
        t0 = time.perf_counter()
        r = client.post("/create-queue", headers=headers, json={
            "prompts": [f"benchmark {i}" for i in range(images // 100)], "count": 100, "width": SIZE, "height": SIZE,
            "params": {"latency_ms": latency_ms}})
        r.raise_for_status()
        done = wait_done(client, headers, r.json()["queue_id"])
        elapsed = time.perf_counter() - t0
    assert done["succeeded"] == images // 100 * 100, done
    return images / elapsed


def rq_baseline(redis_url: str, jobs: int, latency_ms: float, simple: bool) -> float:
    conn = redis.Redis.from_url(redis_url)
    queue = Queue("bench-baseline", connection=conn)
    queue.empty()
    specs = [Queue.prepare_data(generate_one, args=("benchmark", i, latency_ms), result_ttl=60) for i in range(jobs)]
    queue.enqueue_many(specs)
    t0 = time.perf_counter()
    if simple:
        SimpleWorker([queue], connection=conn).work(burst=True, logging_level="WARNING")
    else:
        subprocess.run([sys.executable, "-m", "rq.cli", "worker", "--burst", "--url", redis_url, "-q",
                        "bench-baseline"], cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t0
    conn.close()
    return jobs / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--rq-jobs", type=int, default=200)
    args = parser.parse_args()
    lat, n = args.latency_ms, args.concurrency
    ideal1 = n / (lat / 1000)
    print(f"# throughput: procedural provider, {SIZE}x{SIZE}, L={lat:g} ms, N={n}", flush=True)
    with private_redis() as server:
        rq_fork = rq_baseline(server.url, args.rq_jobs // 2, lat, simple=False)
        rq_simple = rq_baseline(server.url, args.rq_jobs, lat, simple=True)
        report("plain RQ, one job per image: rq worker (fork)", rq_fork, "img/s")
        report("plain RQ, one job per image: SimpleWorker", rq_simple, "img/s")
        with stack(server.url, workers=1, concurrency=n) as (base, _):
            run_queue(base, min(500, args.images), lat)  # warm-up
            one = run_queue(base, args.images, lat)
        alone = provider_alone(args.images, n, lat)
        report("provider alone: N generations on one loop, no queue", alone, "img/s", "", ideal1, "ideal N/L")
        report("imagequeue W=1", one, "img/s", ">= 90% of ideal", ideal1, "ideal N/L")
        report("imagequeue W=1 vs the provider alone", one, "img/s", "", alone, "provider alone")
        report("imagequeue W=1 vs plain RQ SimpleWorker", one, "img/s", "", rq_simple, "SimpleWorker")
        with stack(server.url, workers=2, concurrency=n) as (base, _):
            run_queue(base, min(500, args.images), lat)
            two = run_queue(base, args.images * 2, lat)
        report("imagequeue W=2", two, "img/s", ">= 1.9x W=1", one, "W=1")
        report("imagequeue W=2 vs ideal 2N/L", two, "img/s", "", 2 * ideal1, "ideal 2N/L")


if __name__ == "__main__":
    main()
