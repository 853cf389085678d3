"""Benchmark 2: create-queue latency for 1,000 and 10,000 images, and status latency of those queues.

python -m bench.create_status [--repeat 5]
No worker runs, so the queues stay pending and the status reads the biggest possible summary.
"""

from __future__ import annotations

import argparse
import time

import httpx

from bench.common import auth, median, new_user, private_redis, report, service_env, start_api


def body(images: int) -> dict[str, object]:
    return {"prompts": [f"prompt {i}" for i in range(images // 1000 or 1)], "count": min(images, 1000),
            "width": 64, "height": 64}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with private_redis() as server:
        env = service_env(server.url, LOG_LEVEL="WARNING")
        api, base = start_api(env)
        try:
            with httpx.Client(base_url=base, timeout=60) as client:
                headers = auth(new_user())
                bare = []
                for _ in range(args.repeat * 4):
                    t0 = time.perf_counter()
                    client.get("/openapi.json")
                    bare.append(time.perf_counter() - t0)
                report("baseline: GET /openapi.json (cached) round trip", median(bare) * 1000, "ms")
                for images, target in ((1000, "<= 50 ms"), (10_000, "<= 400 ms")):
                    created, summary, page = [], [], []
                    for _ in range(args.repeat):
                        t0 = time.perf_counter()
                        r = client.post("/create-queue", headers=headers, json=body(images))
                        created.append(time.perf_counter() - t0)
                        assert r.status_code == 201, r.text
                        qid = r.json()["queue_id"]
                        for _ in range(5):
                            t0 = time.perf_counter()
                            client.get(f"/queue-status/{qid}?images_limit=0", headers=headers)
                            summary.append(time.perf_counter() - t0)
                            t0 = time.perf_counter()
                            client.get(f"/queue-status/{qid}?images_limit=50", headers=headers)
                            page.append(time.perf_counter() - t0)
                    report(f"create-queue of {images:,} images (median)", median(created) * 1000, "ms", target)
                    report(f"status of {images:,}-image queue, summary (median)", median(summary) * 1000, "ms",
                           "<= 10 ms", median(bare) * 1000, "bare GET")
                    report(f"status of {images:,}-image queue, 50-image page (median)", median(page) * 1000, "ms")
        finally:
            api.stop()


if __name__ == "__main__":
    main()
