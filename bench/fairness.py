"""Benchmark 5: completion time of a small queue behind another user's big one, against its time alone.

python -m bench.fairness [--big 2000] [--small 2] [--latency-ms 50] [--concurrency 8]

Each small queue is submitted after a random pause of 0 to L ms (seeded): behind a big queue whose
images all take exactly L, the worker's slots free together once per L, and small queues submitted
back to back would otherwise always arrive at the same point of that cycle (just after it, as the
previous one finished with it), measuring one phase instead of the spread a real user meets.
"""

from __future__ import annotations

import argparse
import random
import time

import httpx

from bench.common import auth, median, new_user, private_redis, report, stack, wait_done


def small_queue_time(client: httpx.Client, images: int, latency_ms: float, rng: random.Random) -> float:
    headers = auth(new_user())
    time.sleep(rng.uniform(0, latency_ms / 1000))
    t0 = time.perf_counter()
    qid = client.post("/create-queue", headers=headers, json={
        "prompts": ["small"], "count": images, "width": 64, "height": 64,
        "params": {"latency_ms": latency_ms}}).json()["queue_id"]
    wait_done(client, headers, qid, interval=0.005)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--big", type=int, default=2000)
    parser.add_argument("--small", type=int, default=2)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    with private_redis() as server, stack(server.url, workers=1, concurrency=args.concurrency) as (base, _):
        with httpx.Client(base_url=base, timeout=60) as client:
            rng = random.Random(5)
            alone = median([small_queue_time(client, args.small, args.latency_ms, rng) for _ in range(args.repeat)])
            big_user = auth(new_user())
            big = client.post("/create-queue", headers=big_user, json={
                "prompts": [f"big {i}" for i in range(args.big // 1000 or 1)], "count": min(args.big, 1000),
                "width": 64, "height": 64, "params": {"latency_ms": args.latency_ms}}).json()["queue_id"]
            time.sleep(0.5)  # the big queue fills every slot
            behind = median([small_queue_time(client, args.small, args.latency_ms, rng) for _ in range(args.repeat)])
            client.post(f"/cancel-queue/{big}", headers=big_user)
            fifo = args.big / args.concurrency * args.latency_ms / 1000
    report(f"{args.small}-image queue alone (median of {args.repeat})", alone * 1000, "ms")
    report(f"{args.small}-image queue behind a {args.big:,}-image queue", behind * 1000, "ms", "<= 1.5x alone",
           alone * 1000, "alone")
    report("for scale: the same queue behind FIFO would wait", fifo * 1000, "ms")


if __name__ == "__main__":
    main()
