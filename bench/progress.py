"""Benchmark: throughput with step progress on against off (WORKER_PROGRESS), in the same run, and
the Redis writes progress costs per image.

python -m bench.progress [--latency-ms 50] [--concurrency 32] [--steps 4] [--images 2000] [--rounds 5]

One worker (--concurrency=N) on a private Redis, the built-in provider reporting `steps` steps per
image, each but the last with a preview (what it renders for them is part of the cost measured).
The two settings take turns, `rounds` times each, and the figure is the median ratio of the rounds:
on a shared machine the load of the moment moves both sides alike. Beside images/s, the worker's CPU
time per image (from /proc), which other load on the machine moves far less. Redis writes per image are the
entries the user's progress stream received (XINFO STREAM entries-added: one per progress write of
one image), at the given latency and at a long one (2 s, 20 steps), where the worker's throttle
(one write per image per 0.5 s at most) is what bounds them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from app.harness import running_stack
from app.services.queue.store import QueueStore, user_key
from bench.common import LOG_DIR, auth, new_user, private_redis, report, service_env, wait_done

SIZE = 64
LONG_LATENCY_MS = 2000
LONG_STEPS = 20


def run_queue(base: str, redis_url: str, images: int, latency_ms: float, steps: int) -> tuple[float, float]:
    """(images/s, progress writes per image) for one queue of `images` images."""
    user = new_user()
    headers = auth(user)
    with httpx.Client(base_url=base, timeout=120) as client:
        t0 = time.perf_counter()
        count = min(100, images)
        r = client.post("/create-queue", headers=headers, json={
            "prompts": [f"benchmark {i}" for i in range(images // count)], "count": count, "width": SIZE,
            "height": SIZE, "params": {"latency_ms": latency_ms, "steps": steps}})
        r.raise_for_status()
        done = wait_done(client, headers, r.json()["queue_id"])
        elapsed = time.perf_counter() - t0
    assert done["succeeded"] == images // count * count, done
    return images / elapsed, progress_writes(redis_url, user) / images


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def progress_writes(redis_url: str, user: str) -> int:
    """Entries ever added to the user's progress stream (trimming does not lower it)."""
    conn = redis.Redis.from_url(redis_url)
    try:
        key = QueueStore(conn).progress_events_key(user_key(user))  # type: ignore[arg-type]
        if not conn.exists(key):
            return 0
        info: Any = conn.xinfo_stream(key)
        return int(info["entries-added"])
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    n, lat, steps = args.concurrency, args.latency_ms, args.steps
    print(f"# progress on/off: procedural provider, {SIZE}x{SIZE}, N={n}, L={lat:g} ms, {steps} steps", flush=True)
    rates: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    writes: dict[bool, float] = {}
    long_writes = 0.0
    with private_redis() as server:
        for _ in range(args.rounds):
            for on in (True, False):
                env = service_env(server.url, WORKER_PROGRESS=str(on).lower())
                with running_stack(env, workers=1, worker_args=(f"--concurrency={n}",), log_dir=LOG_DIR) as running:
                    base, worker = running.base_url, running.workers[0].proc.pid
                    run_queue(base, server.url, min(300, args.images), lat, steps)  # warm-up
                    before = cpu_seconds(worker)
                    rate, per_image = run_queue(base, server.url, args.images, lat, steps)
                    cpu[on].append((cpu_seconds(worker) - before) * 1000 / args.images)
                    rates[on].append(rate)
                    writes[on] = per_image
                    if on and not long_writes:
                        long_writes = run_queue(base, server.url, 2 * n, LONG_LATENCY_MS, LONG_STEPS)[1]
        ratios = [a / b for a, b in zip(rates[True], rates[False], strict=True)]
        on_rate, off_rate = statistics.median(rates[True]), statistics.median(rates[False])
        report("progress on (median of rounds)", on_rate, "img/s", "", off_rate, "progress off")
        print(f"{'median ratio on/off over rounds':<58} {statistics.median(ratios):>10.3f} "
              f"(rounds: {', '.join(f'{r:.3f}' for r in ratios)})  [target >= 0.97]", flush=True)
        report("worker CPU per image, progress on (median)", statistics.median(cpu[True]), "ms", "",
               statistics.median(cpu[False]), "progress off")
        report(f"progress writes per image, L={lat:g} ms, {steps} steps", writes[True], "writes")
        report("progress writes per image, progress off", writes[False], "writes")
        report(f"progress writes per image, L={LONG_LATENCY_MS} ms, {LONG_STEPS} steps", long_writes, "writes",
               f"<= {LONG_LATENCY_MS / 500:.0f} (one per 0.5 s)")


if __name__ == "__main__":
    main()
