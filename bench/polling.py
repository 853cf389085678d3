"""Benchmark 3: status polling, against GET /health of the same API process in the same run.

python -m bench.polling [--rounds 5] [--seconds 3] [--pollers 200] [--open-seconds 20]

One API process and one worker on a private Redis; a finished 100-image queue (64x64 images).
- back to back (closed loop, 50 connections): req/s of the full 100-image status, of its
  counts-only form (images_limit=0) and of a 304 (If-None-Match with the status's ETag), each
  against /health (which reads the workers and each model's backlog from Redis and checks the
  image store); /ready (one Redis PING) is shown beside them as the cheapest answer that touches
  Redis. The endpoints take turns in short runs, `rounds` times, and each figure is the
  median over the rounds of its ratio to /health in the same round: on a shared machine the
  load of the moment moves both sides alike.
- open loop: `pollers` clients each polling the full status once a second at jittered moments
  (a random phase, then each interval ±20%), as browsers do: latency p50/p99, and /health's the
  same way as the baseline.
Load comes from wrk when it is installed (a C load generator: what is measured is the API, not
the generator), otherwise from a small keep-alive generator on raw asyncio streams. The open loop
always uses the latter (wrk has no open-loop mode).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import shutil
import statistics
import subprocess
import time

import httpx

from bench.common import auth, new_user, pct, private_redis, report, stack, wait_done

IMAGES = 100


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """One keep-alive HTTP/1.1 GET on an open connection; returns the status code."""
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return status


def _request(url: str, headers: dict[str, str]) -> tuple[httpx.URL, bytes]:
    parts = httpx.URL(url)
    lines = [f"GET {parts.raw_path.decode()} HTTP/1.1", f"Host: {parts.host}:{parts.port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return parts, ("\r\n".join(lines) + "\r\n\r\n").encode()


async def load(url: str, headers: dict[str, str], clients: int, seconds: float, interval: float,
               expect: int = 200) -> tuple[list[float], int]:
    """`clients` keep-alive connections, each polling every `interval` s (±20%, from a random phase),
    or back to back when `interval` is 0. Returns the latencies and the count of unexpected answers."""
    parts, request = _request(url, headers)
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    rng = random.Random(1)

    async def poller() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(parts.host, parts.port)
        await asyncio.sleep(rng.uniform(0, interval))
        try:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                if await _get(reader, writer, request) != expect:
                    errors += 1
                took = time.perf_counter() - t0
                latencies.append(took)
                if interval:
                    await asyncio.sleep(max(0.0, interval * rng.uniform(0.8, 1.2) - took))
        finally:
            writer.close()

    await asyncio.gather(*(poller() for _ in range(clients)))
    return latencies, errors


def closed_loop_rate(url: str, headers: dict[str, str], seconds: float, expect: int) -> float:
    """Requests/s back to back over 50 connections: wrk when installed, else the asyncio generator."""
    wrk = shutil.which("wrk")
    if wrk:
        args = [wrk, "-t1", "-c50", f"-d{seconds:g}s"]
        for k, v in headers.items():
            args += ["-H", f"{k}: {v}"]
        out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        assert not bad, out
        return float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    latencies, errors = asyncio.run(load(url, headers, 50, seconds, 0, expect))
    assert errors == 0, errors
    return len(latencies) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--pollers", type=int, default=200)
    parser.add_argument("--open-seconds", type=float, default=20)
    args = parser.parse_args()
    generator = "wrk" if shutil.which("wrk") else "asyncio generator (wrk not installed)"
    print(f"# polling: one API process, a finished {IMAGES}-image queue; back to back: {args.rounds} rounds of "
          f"{args.seconds:g} s per endpoint, 50 connections, {generator}; open loop: {args.pollers} pollers at "
          f"1 Hz (jittered) for {args.open_seconds:g} s", flush=True)
    with private_redis() as server, stack(server.url, workers=1, concurrency=8, PROCEDURAL_LATENCY_MS=0) as (base, _):
        headers = auth(new_user())
        with httpx.Client(base_url=base, timeout=60) as client:
            r = client.post("/create-queue", headers=headers, json={
                "prompts": ["a lighthouse"], "count": IMAGES, "width": 64, "height": 64})
            qid = r.json()["queue_id"]
            wait_done(client, headers, qid)
            full = client.get(f"/queue-status/{qid}", headers=headers)
            assert len(full.json()["images"]) == IMAGES and full.headers.get("etag"), full.headers
            etag = full.headers["etag"]
            assert client.get(f"/queue-status/{qid}", headers={**headers, "If-None-Match": etag}).status_code == 304
        print(f"# status answer: {len(full.content):,} bytes, ETag {etag}", flush=True)
        cases = {
            "ready": (f"{base}/ready", {}, 200),
            "full": (f"{base}/queue-status/{qid}", headers, 200),
            "counts": (f"{base}/queue-status/{qid}?images_limit=0", headers, 200),
            "304": (f"{base}/queue-status/{qid}", {**headers, "If-None-Match": etag}, 304),
        }
        rates: dict[str, list[float]] = {"health": [], **{k: [] for k in cases}}
        ratios: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.rounds):
            health = closed_loop_rate(f"{base}/health", {}, args.seconds, 200)
            rates["health"].append(health)
            for name, (url, hdrs, expect) in cases.items():
                rate = closed_loop_rate(url, hdrs, args.seconds, expect)
                rates[name].append(rate)
                ratios[name].append(rate / health)
        med = {k: statistics.median(v) for k, v in rates.items()}
        report("GET /health back to back (baseline)", med["health"], "req/s")
        targets = {"ready": "", "full": ">= 0.50 of /health", "counts": "", "304": ">= 0.90 of /health"}
        labels = {"ready": "GET /ready (one Redis PING) back to back",
                  "full": f"full {IMAGES}-image status back to back", "counts": "counts-only status back to back",
                  "304": "304 (If-None-Match) back to back"}
        for name in cases:
            ratio = statistics.median(ratios[name])
            spread = f"{min(ratios[name]):.2f}-{max(ratios[name]):.2f}"
            print(f"{labels[name]:<58} {med[name]:>10.2f} req/s    ratio {ratio:6.3f} vs /health "
                  f"(median of {args.rounds} rounds, {spread})" + (f"  [target {targets[name]}]"
                                                                    if targets[name] else ""), flush=True)
        open_loop = {}
        for name, url, hdrs in (("/health", f"{base}/health", {}), ("full status", cases["full"][0], headers)):
            latencies, errors = asyncio.run(load(url, hdrs, args.pollers, args.open_seconds, 1.0))
            assert errors == 0, errors
            open_loop[name] = latencies
            report(f"{args.pollers} pollers at 1 Hz, {name}: p50", pct(latencies, 50) * 1000, "ms")
            report(f"{args.pollers} pollers at 1 Hz, {name}: p99", pct(latencies, 99) * 1000, "ms",
                   "<= 20 ms" if name != "/health" else "")


if __name__ == "__main__":
    main()
